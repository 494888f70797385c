import CModbus
import FarmgateSupport
import FarmgateWire
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// One Modbus RTU bus: a serial port, the libmodbus context that owns it, and every sensor on it.
///
/// All traffic runs on the bus's own thread, one request at a time, so requests on one wire never overlap and
/// consecutive frames are kept apart by the RTU silent interval. A request waits at most its response timeout, so a
/// request to a silent slave holds the bus for at most twice that (the timeout, then the drain that waits for the line
/// to fall silent so that a late answer is never taken for the next request), and a slave that keeps timing out is
/// asked less and less often (``ModbusLink/SilentSlave``) so that the others keep their intervals. Registers of one slave that lie close
/// together are read in one request (``ModbusRequestPlan``), and the block is kept for the round (at most
/// ``ModbusLink/sharedReadWindow``): each sensor's read returns its slice.
final class ModbusBus: Sendable {
    let settings: ModbusBusSettings
    /// The device the port opens (``SerialDevice/identity(of:)``), by which ``ModbusBuses`` finds the bus.
    let device: String
    private let members = Mutex(Members())
    private let link: ThreadOwned<ModbusLink>

    struct Members: Sendable {
        var version = 0
        var bySensor: [SensorID: ModbusMember] = [:]
    }

    init(settings: ModbusBusSettings, device: String? = nil, logger: Logger) throws {
        self.settings = settings
        self.device = device ?? SerialDevice.identity(of: settings.port)
        var logger = logger
        logger[metadataKey: "port"] = "\(settings.port)"
        let linkLogger = logger
        link = try ThreadOwned(name: "farmgate-modbus") { ModbusLink(settings: settings, logger: linkLogger) }
    }

    func add(_ member: ModbusMember) {
        members.withLock {
            $0.bySensor[member.sensor] = member
            $0.version += 1
        }
    }

    /// Removes a sensor; returns how many remain.
    func remove(_ sensor: SensorID) -> Int {
        members.withLock {
            $0.bySensor[sensor] = nil
            $0.version += 1
            return $0.bySensor.count
        }
    }

    /// The registers of `sensor`: from this round's block when another sensor of the block read it within
    /// ``ModbusLink/sharedReadWindow`` (and this is not an installer's one-off read, ``SensorReadContext/oneOff``),
    /// otherwise from a new request.
    func registers(for sensor: SensorID) async throws(SensorError) -> [UInt16] {
        let snapshot = members.withLock { $0 }
        let fresh = SensorReadContext.oneOff
        let outcome: Result<[UInt16], SensorError>
        do {
            outcome = try await link.withValue { link in link.registers(for: sensor, members: snapshot, fresh: fresh) }
        } catch {
            throw SensorError(.disconnected, "the Modbus bus on \(settings.port) has shut down")
        }
        return try outcome.get()
    }

    /// Closes the port (on the bus's thread) and stops the thread.
    func close() async {
        await link.release()
    }
}

/// The libmodbus context of one bus and what the bus remembers between requests. Lives on the bus's thread only.
final class ModbusLink {
    private let settings: ModbusBusSettings
    private let logger: Logger
    private var context: OpaquePointer?
    /// Reconnection after the port vanished or could not be opened: 1 s, doubling, at most 5 s, so that a replugged
    /// adapter is read again within seconds; sooner when the port's path is back (``connect()``).
    static let reconnectBackoff = Backoff(initial: .seconds(1), maximum: .seconds(5))
    private var reconnect = ModbusLink.reconnectBackoff
    private var retryAt: ContinuousClock.Instant?
    private var lastConnectError: SensorError?
    /// The port's path did not exist when the last attempt failed: an adapter that is unplugged (or not yet plugged).
    /// When the path is back, the next read opens it at once instead of waiting out the backoff.
    private var portWasMissing = false
    /// When the last frame on the wire ended (answer received or timeout): the next request waits t3.5 after it.
    private var lastFrameEnd: ContinuousClock.Instant?

    private var planVersion = -1
    private var blocks: [ModbusBlock] = []
    private var blockIndex: [SensorID: Int] = [:]
    private var uncoalesced: Set<ModbusUnit> = []
    private var cache: [ModbusBlock: Cached] = [:]
    /// Slaves whose last requests timed out, by unit id (see ``SilentSlave``).
    private var silent: [Int: SilentSlave] = [:]
    /// The last request, when it was answered in full: anything on the line after it, up to the next request, answers
    /// nothing (``noteSecondAnswer(_:)``).
    private var answered: (slave: Int, function: UInt8, what: String)?
    /// Unit ids a second answer was seen from, warned about once while the port stays open.
    private var secondAnswerWarned: Set<Int> = []
    /// Requests that timed out and whose answers were not seen in the drain after them: such an answer may still come,
    /// later than the drain waited, and cross the next request of the same slave, function and length on the wire,
    /// where nothing tells it from that request's answer (one of another slave or length is refused as such). Until
    /// an answer of that shape is taken with the line silent after it (``laterBytesArrive(_:within:)``), its answers
    /// are checked so.
    private var lateAnswersPossible: Set<AnswerShape> = []

    /// What an answer to a read shows of its request: the slave, the function and the number of registers.
    struct AnswerShape: Hashable {
        var slave: Int
        var function: UInt8
        var count: Int
    }

    /// A slave that stopped answering. Every request to it holds the bus for up to twice its response timeout (the
    /// timeout, then the drain), time the other sensors on the bus wait: asked at every tick, a slave with a 2 s timeout
    /// polled every 2 s would take the whole bus. After ``backoffAfterTimeouts`` timeouts in a row it is asked only every
    /// 2nd, 4th, 8th … interval, at most ``backoffLimit`` apart (or its interval, when that is longer); the reads in
    /// between fail at once as `disconnected`, saying when it is asked next. Any answer ends the back-off.
    struct SilentSlave {
        var timeouts = 0
        var nextAttempt: ContinuousClock.Instant?
        var lastError: SensorError?
    }

    /// Timeouts in a row after which a slave is asked less often: one lost answer (noise, a slave busy for a moment) is
    /// no reason to skip it.
    static let backoffAfterTimeouts = 2
    /// The longest a silent slave goes unasked (unless its interval is longer).
    static let backoffLimit: Duration = .seconds(60)

    /// How long after a request that was its `timeouts`-th timeout in a row the slave is asked again: nil before
    /// ``backoffAfterTimeouts``, then 2, 4, 8 … intervals, and never less than four times what that request held the
    /// bus (`cost`: the timeout and the drain, which can be longer than the interval), so that a silent slave takes at
    /// most a fifth of the bus; capped at ``backoffLimit`` (or one interval, if longer).
    static func backoff(timeouts: Int, interval: Duration, cost: Duration) -> Duration? {
        guard timeouts >= backoffAfterTimeouts else { return nil }
        let limit = max(backoffLimit, interval)
        let doublings = min(timeouts - backoffAfterTimeouts + 1, 20)
        let wait = max(interval * (1 << doublings), cost * 4)
        return min(wait, limit)
    }

    private struct Cached {
        var at: ContinuousClock.Instant
        var result: Result<[UInt16], ModbusFailure>
        var servedTo: Set<SensorID>
    }

    init(settings: ModbusBusSettings, logger: Logger) {
        self.settings = settings
        self.logger = logger
    }

    deinit { disconnect() }

    /// How long a block read for one sensor is served to the others of its block: long enough for the sensors that
    /// share a sampling tick (their reads queue on the bus one after the other), far shorter than any interval, so
    /// that a value is never stored as read now when it was read a round ago.
    static let sharedReadWindow: Duration = .seconds(1)

    /// - Parameter fresh: ask the device even when the block was read just now (the installer's one-off read).
    func registers(for sensor: SensorID, members: ModbusBus.Members, fresh: Bool = false) -> Result<[UInt16], SensorError> {
        if members.version != planVersion { replan(members) }
        guard let member = members.bySensor[sensor], let index = blockIndex[sensor] else {
            return .failure(SensorError(.fault, "sensor \(sensor) is not registered on the Modbus bus \(settings.port)"))
        }
        let block = blocks[index]
        let slice = { (registers: [UInt16]) -> [UInt16] in
            let from = member.address - block.start
            return Array(registers[from..<(from + member.count)])
        }
        if !fresh, var cached = cache[block], !cached.servedTo.contains(sensor),
            ContinuousClock.now - cached.at < min(block.maxAge, Self.sharedReadWindow)
        {
            cached.servedTo.insert(sensor)
            cache[block] = cached
            return cached.result.map(slice).mapError(\.error)
        }
        let started = ContinuousClock.now
        let slave = block.unit.slave
        if !fresh, let silence = silent[slave], let next = silence.nextAttempt, started < next {
            let last = silence.lastError.map { ": \($0.message)" } ?? ""
            return .failure(
                SensorError(
                    .disconnected,
                    "slave \(slave) did not answer its last \(silence.timeouts) requests in time; next attempt in \(Self.seconds(next - started)), so that the other sensors on \(settings.port) keep their intervals (last error\(last))"))
        }
        var result = transact(block)
        result = noteSilence(result, slave: slave, started: started, interval: block.maxAge)
        if case .failure(let failure) = result, failure.exception == 2, block.members.count > 1 {
            // The slave has no register somewhere in the block's gaps: read this unit one sensor at a time from now on.
            logger.warning(
                "Modbus slave refused a coalesced read; reading its registers one sensor at a time",
                metadata: ["slave": "\(block.unit.slave)", "start": "\(block.start)", "count": "\(block.count)"])
            uncoalesced.insert(block.unit)
            replan(members)
            return registers(for: sensor, members: members, fresh: fresh)
        }
        cache[block] = Cached(at: ContinuousClock.now, result: result, servedTo: [sensor])
        return result.map(slice).mapError(\.error)
    }

    /// Counts timeouts in a row of `slave` and schedules its next request (``SilentSlave``); any answer resets it.
    private func noteSilence(
        _ result: Result<[UInt16], ModbusFailure>, slave: Int, started: ContinuousClock.Instant, interval: Duration
    ) -> Result<[UInt16], ModbusFailure> {
        guard case .failure(var failure) = result else {
            if let silence = silent.removeValue(forKey: slave), silence.nextAttempt != nil {
                logger.info("Modbus slave answers again", metadata: ["slave": "\(slave)", "after_timeouts": "\(silence.timeouts)"])
            }
            return result
        }
        switch failure.error.kind {
        case .timeout:
            var silence = silent[slave] ?? SilentSlave()
            silence.timeouts += 1
            silence.lastError = failure.error
            if let wait = Self.backoff(timeouts: silence.timeouts, interval: interval, cost: ContinuousClock.now - started) {
                // From the request's start, less half an interval: the tick that falls due then is not missed by the
                // time this request took.
                let next = started + wait - interval / 2
                silence.nextAttempt = next
                if silence.timeouts == Self.backoffAfterTimeouts {
                    logger.warning(
                        "Modbus slave does not answer; asking it less often so that the other sensors on the bus keep their intervals",
                        metadata: ["slave": "\(slave)", "timeouts": "\(silence.timeouts)", "max_wait": "\(max(Self.backoffLimit, interval))"])
                }
                failure.error.message += "; \(silence.timeouts) timeouts in a row: next attempt in \(Self.seconds(next - ContinuousClock.now))"
            }
            silent[slave] = silence
            return .failure(failure)
        case .disconnected:
            // The port, not the slave: says nothing about whether it answers.
            return result
        default:
            // An answer, even a bad one: the slave is there.
            silent[slave] = nil
            return result
        }
    }

    private func replan(_ members: ModbusBus.Members) {
        blocks = ModbusRequestPlan.blocks(for: Array(members.bySensor.values), uncoalesced: uncoalesced)
        blockIndex = [:]
        for (index, block) in blocks.enumerated() {
            for sensor in block.members { blockIndex[sensor] = index }
        }
        let current = Set(blocks)
        cache = cache.filter { current.contains($0.key) }
        planVersion = members.version
    }

    /// One request on the wire.
    ///
    /// The request is sent and its answer received as raw frames (`modbus_send_raw_request`,
    /// `modbus_receive_confirmation`: libmodbus still adds and checks the CRC and times the answer) and parsed here, so
    /// that an answer from another address can say which address it came from.
    private func transact(_ block: ModbusBlock) -> Result<[UInt16], ModbusFailure> {
        let context: OpaquePointer
        switch connect() {
        case .success(let open): context = open
        case .failure(let error): return .failure(ModbusFailure(error))
        }
        waitForSilentInterval()
        // RTU answers carry no transaction id: an answer that came after its request timed out waits in the port's
        // buffer, and libmodbus 3.1.6 (which does not flush before sending) would take it as the answer to this request,
        // so that values lag a round or two sensors swap. Whatever arrived since the last frame is no answer to this one.
        // An answer later still, one that would cross this request on the wire, is caught by the drain after every
        // timeout and malformed answer (``drain(quiet:answerOf:)``): the line must have been silent for a response
        // timeout before the next request goes out.
        noteSecondAnswer(context)
        modbus_flush(context)
        let registers = block.unit.function == .holding ? "holding registers" : "input registers"
        // Every message names the slave already ("slave 5 answered holding registers 0-1 ...").
        let what = "\(registers) \(block.start)-\(block.start + block.count - 1)"
        let slave = block.unit.slave
        modbus_set_slave(context, Int32(slave))
        let timeout = block.responseTimeout.components
        modbus_set_response_timeout(
            context, UInt32(timeout.seconds), UInt32(timeout.attoseconds / 1_000_000_000_000))
        let function = block.unit.function.code
        let request: [UInt8] = [
            UInt8(slave), function, UInt8(block.start >> 8), UInt8(block.start & 0xFF), UInt8(block.count >> 8),
            UInt8(block.count & 0xFF),
        ]
        let sentAt = ContinuousClock.now
        let sent = request.withUnsafeBufferPointer { buffer -> Int32 in
            guard let base = buffer.baseAddress else { return -1 }
            return modbus_send_raw_request(context, base, Int32(buffer.count))
        }
        if sent < 0 {
            let code = errno
            lastFrameEnd = ContinuousClock.now
            return .failure(classify(code, what: what, slave: slave, timeout: block.responseTimeout))
        }
        var answer = [UInt8](repeating: 0, count: Int(MODBUS_RTU_MAX_ADU_LENGTH))
        let length = answer.withUnsafeMutableBufferPointer { buffer -> Int32 in
            guard let base = buffer.baseAddress else { return -1 }
            return modbus_receive_confirmation(context, base)
        }
        let code = errno
        lastFrameEnd = ContinuousClock.now
        if length < 0 {
            // libmodbus reads into `answer` as bytes arrive: a timeout after some came is an answer cut short, not
            // silence (the slave is there, and must not be asked less often as a silent one is).
            if code == ETIMEDOUT, let first = answer.firstIndex(where: { $0 != 0 }) {
                drain(quiet: block.responseTimeout)
                let from = answer[first] == UInt8(slave) && first == 0 ? "" : " (its first byte: \(answer[first]))"
                return .failure(
                    ModbusFailure(
                        SensorError(
                            .invalidResponse,
                            "slave \(slave) began to answer \(what) but the answer stopped short\(from): noise, a missing termination or a loose A/B wire cut it, or the baud and parity (\(settings)) do not match the transmitter's")))
            }
            return .failure(
                classify(code, what: what, slave: slave, timeout: block.responseTimeout, request: (function, sentAt, block.count)))
        }
        let base = Int32(MODBUS_ENOBASE)
        // libmodbus returns 0 for a frame from another unit id (it does not check that frame's CRC).
        if length == 0 || answer[0] != UInt8(slave) {
            drain(quiet: block.responseTimeout)
            return .failure(
                ModbusFailure(
                    SensorError(
                        .invalidResponse,
                        "an answer to the request for \(what) of slave \(slave) came from address \(answer[0]) instead of \(slave): another device on \(settings.port) answered (two masters, or a slave answering for ids it does not have), or `slave` is wrong (check the transmitter's Modbus address)")))
        }
        let frame = answer[0..<Int(length)]
        if frame.count >= 3, frame[1] == function {
            let byteCount = Int(frame[2])
            guard byteCount == 2 * block.count, frame.count == 3 + byteCount + 2 else {
                drain(quiet: block.responseTimeout)
                // A slave answers exactly what it was asked: another count is most likely the answer to another
                // request (another master's, taken for this one), or another device with this id.
                let sent = byteCount % 2 == 0 ? "\(byteCount / 2) registers" : "\(byteCount) data bytes"
                return .failure(
                    ModbusFailure(
                        SensorError(
                            .invalidResponse,
                            "slave \(slave) answered \(what) with \(sent) where \(byteCount % 2 == 0 ? "\(block.count) \(block.count == 1 ? "register was" : "registers were")" : "\(2 * block.count) bytes (\(block.count) \(block.count == 1 ? "register" : "registers")) were") asked: the answer to another request (is another master on \(settings.port)?) or from another device with id \(slave); otherwise check address, function and data_type against its register map")))
            }
            let values = (0..<block.count).map { UInt16(frame[3 + 2 * $0]) << 8 | UInt16(frame[4 + 2 * $0]) }
            let shape = AnswerShape(slave: slave, function: function, count: block.count)
            if lateAnswersPossible.contains(shape) {
                // After a timeout whose answer never showed, this may be that answer, come late: the slave's own
                // answer would then follow it. Neither is taken when more arrives within a response timeout.
                if laterBytesArrive(context, within: block.responseTimeout) {
                    drain(quiet: block.responseTimeout)
                    return .failure(
                        ModbusFailure(
                            SensorError(
                                .invalidResponse,
                                "slave \(slave) answered \(what) twice: after a request that timed out, the first was most likely that request's late answer (RTU answers carry no request id), so neither was taken; if a slave on \(settings.port) answers slowly, raise its response_timeout")))
                }
                lateAnswersPossible.remove(shape)
            }
            answered = (slave, function, what)
            return .success(values)
        }
        if frame.count >= 3, frame[1] >= 0x80 {
            // An exception of the request's function, from the slave asked, is that slave's exception, whatever its
            // code (one the specification does not define is named as such). Any other function byte (0x80, as some
            // servers and gateways send for a unit id they do not have) is an invalid exception response.
            // An exception of the other read function, whole (5 bytes): an answer to another request.
            if frame[1] != 0x80, frame[1] & 0x7F != function, frame.count == 5 {
                drain(quiet: block.responseTimeout)
                return .failure(
                    ModbusFailure(
                        SensorError(
                            .invalidResponse,
                            "slave \(slave) answered \(what) with an exception of function code \(Self.functionName(frame[1] & 0x7F)) (code \(Self.exceptionName(Int(frame[2])))) where \(Self.functionName(function)) was asked: the answer to another request (is another master on \(settings.port)?); check `function` (holding = 03, input = 04) against its register map")))
            }
            guard frame[1] == function | 0x80, frame.count == 5 else {
                return .failure(classify(base + 14, what: what, slave: slave, timeout: block.responseTimeout))  // EMBBADEXC
            }
            return .failure(exception(Int(frame[2]), what: what, slave: slave))
        }
        if frame.count >= 2 {
            // A well-formed answer (libmodbus checked its CRC) of another function: no slave answers a read with
            // another function unless the frame answers another request.
            drain(quiet: block.responseTimeout)
            return .failure(
                ModbusFailure(
                    SensorError(
                        .invalidResponse,
                        "slave \(slave) answered \(what) with function code \(Self.functionName(frame[1])) where \(Self.functionName(function)) was asked: the answer to another request (is another master on \(settings.port)?), or a transmitter that serves these registers under the other function; check `function` (holding = 03, input = 04) against its register map")))
        }
        return .failure(classify(base + 13, what: what, slave: slave, timeout: block.responseTimeout))  // EMBBADDATA
    }

    /// - Parameter request: the function asked and when the request went out, so that a timeout can tell a slave that
    ///   answered late from one that did not answer.
    private func classify(
        _ code: Int32, what: String, slave: Int, timeout: Duration, request: (function: UInt8, sentAt: ContinuousClock.Instant, count: Int)? = nil
    ) -> ModbusFailure {
        let base = Int32(MODBUS_ENOBASE)
        // An exception frame that is not one of the request's function (function byte 0x80): typically a server or
        // gateway that answers for unit ids it does not have. (Exception responses themselves are parsed in
        // ``transact(_:)``, which knows the function asked.)
        if code == base + 14 {  // EMBBADEXC
            return ModbusFailure(
                SensorError(
                    .fault,
                    "slave \(slave) answered \(what) with an invalid exception response (\(Self.text(code))): most likely no transmitter on \(settings.port) has unit id \(slave) and another device answered for it; check `slave` (the transmitter's Modbus address, from its manual or display)"))
        }
        if code > base, code <= base + 11 {
            return exception(Int(code - base), what: what, slave: slave)
        }
        switch code {
        case ETIMEDOUT:
            let late = drain(quiet: timeout, answerOf: request.map { (slave, $0.function) })
            if late == nil, let request { lateAnswersPossible.insert(AnswerShape(slave: slave, function: request.function, count: request.count)) }
            if let late, let request {
                // The slave is there, at the right id, baud and wiring: it is only slower than response_timeout. The
                // answer itself was discarded (it cannot be told from an answer to the next request).
                let after = late - request.sentAt
                return ModbusFailure(
                    SensorError(
                        .timeout,
                        "slave \(slave) answered \(what) late, about \(Self.roughly(after)) after the request where response_timeout is \(ConfigTable.format(timeout)) on \(settings.port), so the answer was discarded: raise response_timeout for the sensors of slave \(slave) (response_timeout = \"\(ConfigTable.format(Self.suggestedTimeout(after)))\", say; keep it well under half the shortest interval on the bus)"))
            }
            return ModbusFailure(
                SensorError(.timeout, "slave \(slave) did not answer within \(timeout) on \(settings.port); check its unit id, the baud and parity (\(settings)), the A/B wiring and its power"))
        case base + 12:  // EMBBADCRC
            drain(quiet: timeout)
            return ModbusFailure(
                SensorError(.invalidResponse, "the answer of slave \(slave) failed its CRC; check the baud and parity (\(settings)), termination and cable (noise)"))
        case base + 13, base + 15...(base + 17):  // bad data, unknown exception, too many data, wrong slave
            drain(quiet: timeout)
            return ModbusFailure(
                SensorError(.invalidResponse, "slave \(slave) answered \(what) with a malformed frame (\(Self.text(code))); is another master on the bus, or two slaves with id \(slave)?"))
        case EIO, ENXIO, ENODEV, EBADF, ECONNRESET, EPIPE, ENOENT:
            let error = SensorError(.disconnected, "\(settings.port) failed (\(Self.text(code))): the USB adapter was unplugged or the port went away")
            lostPort(error)
            return ModbusFailure(error)
        default:
            drain(quiet: timeout)
            return ModbusFailure(SensorError(.fault, "reading \(what) of slave \(slave) on \(settings.port) failed: \(Self.text(code))"))
        }
    }

    /// The exception response `code` of `slave` to the request for `what`, with the advice that fits it.
    private func exception(_ code: Int, what: String, slave: Int) -> ModbusFailure {
        let name = Self.exceptionName(code)
        let message: String
        switch code {
        case 1, 2, 3:
            message = "slave \(slave) answered \(what) with exception \(name); check address, function and data_type against its register map"
        case 4:
            // Slave device failure: the request was fine, the transmitter could not carry it out.
            message = "slave \(slave) reported an internal failure reading \(what) (exception \(name)): check the transmitter itself (its probe, power and display or error code; see its manual)"
        case 5, 6:
            message = "slave \(slave) answered \(what) with exception \(name): the transmitter is busy (a calibration, a long operation); the read is retried at the next interval. If it stays busy, check the transmitter (its display, its manual)"
        case 7:
            message = "slave \(slave) answered \(what) with exception \(name): it cannot carry out this request; check function against its register map"
        case 8:
            message = "slave \(slave) answered \(what) with exception \(name): the transmitter found a memory error; check the transmitter itself (see its manual)"
        case 10:
            message = "slave \(slave) answered \(what) with exception \(name): a gateway on the way has no path to unit id \(slave); check the gateway (its routing of unit id \(slave)) and the target behind it"
        case 11:
            message = "slave \(slave) answered \(what) with exception \(name): the gateway got no answer from the device behind it; check the gateway and the target behind it (its power, wiring, unit id \(slave) and baud)"
        default:
            message = "slave \(slave) answered \(what) with exception \(name), a code not defined by the Modbus specification (its manual may list its own codes); check the transmitter, and address, function and data_type against its register map"
        }
        return ModbusFailure(SensorError(.fault, message), exception: code)
    }

    /// The open context, opening the port when it is not: fails fast with the last error until the next attempt is due.
    private func connect() -> Result<OpaquePointer, SensorError> {
        if let context { return .success(context) }
        let now = ContinuousClock.now
        if let retryAt, let lastConnectError, now < retryAt, !(portWasMissing && portExists) {
            let wait = retryAt - now
            return .failure(SensorError(lastConnectError.kind, "\(lastConnectError.message); next attempt in \(Self.seconds(wait))"))
        }
        switch open() {
        case .success(let context):
            if reconnect.failures > 0 {
                logger.info("Modbus port is back", metadata: ["after_failures": "\(reconnect.failures)"])
            }
            reconnect.reset()
            retryAt = nil
            lastConnectError = nil
            portWasMissing = false
            self.context = context
            return .success(context)
        case .failure(let error):
            if reconnect.failures == 0 {
                logger.warning("Cannot open the Modbus port", metadata: ["error": "\(error)"])
            }
            retryAt = now + reconnect.ceiling
            reconnect.recordFailure()
            lastConnectError = error
            portWasMissing = !portExists
            return .failure(error)
        }
    }

    private func open() -> Result<OpaquePointer, SensorError> {
        let port = settings.port
        guard
            let context = modbus_new_rtu(
                port, Int32(settings.baud), CChar(UInt8(ascii: settings.parity.letter.unicodeScalars.first ?? "N")),
                Int32(settings.dataBits), Int32(settings.stopBits))
        else {
            return .failure(SensorError(.fault, "libmodbus refused the settings \(settings) for \(port): \(Self.text(errno))"))
        }
        if modbus_connect(context) == -1 {
            let code = errno
            modbus_free(context)
            return .failure(Self.openError(code, port: port))
        }
        let fd = modbus_get_socket(context)
        // libmodbus waits with select(2), which cannot watch descriptors past FD_SETSIZE.
        if fd >= 1024 {
            modbus_close(context)
            modbus_free(context)
            return .failure(SensorError(.fault, "\(port) opened as descriptor \(fd), beyond what libmodbus can wait on (1023)"))
        }
        // One owner per port: an advisory lock that `farmgate scan` and other agents respect, and TIOCEXCL so that other
        // (non-root) programs cannot open it while the agent does.
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let code = errno
            modbus_close(context)
            modbus_free(context)
            guard code == EWOULDBLOCK else { return .failure(SensorError(.disconnected, "cannot lock \(port): \(Self.text(code))")) }
            // Two names of one device are one bus (``ModbusBuses``), but only when the device was there to compare when
            // the sensors started: named two ways while it was unplugged, its two buses find each other's lock.
            if let other = ModbusBuses.shared.otherName(of: port) {
                return .failure(
                    SensorError(
                        .disconnected,
                        "\(port) is held by this agent, for the sensors that name it \(other) (the same device, which was missing when they started); name the port one way in every sensor, or restart the agent now that the device is there"))
            }
            return .failure(
                SensorError(.disconnected, "\(port) is in use by another program (another farmgate agent or `farmgate scan`?); stop it"))
        }
        _ = ioctl(fd, UInt(TIOCEXCL))
        if settings.rs485, modbus_rtu_set_serial_mode(context, Int32(MODBUS_RTU_RS485)) == -1 {
            let code = errno
            modbus_close(context)
            modbus_free(context)
            return .failure(
                SensorError(
                    .fault,
                    "\(port) does not support the kernel's RS-485 mode (\(Self.text(code))); remove rs485 = true (USB RS-485 adapters switch direction themselves)"))
        }
        // Between two bytes of one answer; the first byte is bounded by the response timeout.
        modbus_set_byte_timeout(context, 0, 100_000)
        // Whatever the line held before (a half answer from before an unplug) is not an answer to our first request.
        modbus_flush(context)
        lastFrameEnd = ContinuousClock.now
        return .success(context)
    }

    static func openError(_ code: Int32, port: String) -> SensorError {
        switch code {
        case ENOENT, ENODEV, ENXIO:
            SensorError(.disconnected, "\(port) does not exist: is the USB RS-485 adapter plugged in? (`ls /dev/serial/by-id/` lists adapters)")
        case EACCES, EPERM:
            SensorError(
                .disconnected,
                "permission denied opening \(port): add the agent's user to the dialout group (`sudo usermod -aG dialout farmgate`) and restart it")
        case EBUSY:
            SensorError(.disconnected, "\(port) is busy: another program holds it (ModemManager, a serial console, another agent?)")
        default:
            SensorError(.disconnected, "cannot open \(port): \(text(code))")
        }
    }

    private func lostPort(_ error: SensorError) {
        logger.warning("Modbus port lost; reconnecting with backoff", metadata: ["error": "\(error)"])
        disconnect()
        lastConnectError = error
        retryAt = ContinuousClock.now + reconnect.ceiling
        reconnect.recordFailure()
        portWasMissing = !portExists
    }

    /// Whether the port's path exists (a `/dev/serial/by-id/...` link resolves): udev removes it when the adapter is
    /// unplugged and creates it again when it is back.
    private var portExists: Bool {
        FileManager.default.fileExists(atPath: settings.port)
    }

    private func disconnect() {
        guard let context else { return }
        modbus_close(context)
        modbus_free(context)
        self.context = nil
        cache = [:]
        // A replugged adapter (or another one behind the path): every slave is asked afresh.
        silent = [:]
        answered = nil
        lateAnswersPossible = []
        secondAnswerWarned = []
    }

    /// The longest a drain goes on beyond its quiet window when the line never falls silent (another master, noise).
    static let drainLimit: Duration = .seconds(2)

    /// Discards whatever arrives until the line has been silent for `quiet` (a response timeout), at most `quiet` plus
    /// ``drainLimit`` in all: after a timeout or a malformed answer, the slave may still be sending (a late answer,
    /// the rest of a garbled one), and RTU frames carry no transaction id, so that answer would be taken for the next
    /// request's if it went out now. libmodbus's own error recovery does the same (wait a response timeout, flush).
    /// - Parameter expected: after a timeout, the slave and function asked: when a complete answer of that slave to
    ///   that function (or its exception) with a valid CRC was among the bytes discarded, the slave answered late.
    /// - Returns: when that late answer began to arrive; nil when there was none (or nothing was `expected`).
    @discardableResult
    private func drain(quiet: Duration, answerOf expected: (slave: Int, function: UInt8)? = nil) -> ContinuousClock.Instant? {
        guard let context else { return nil }
        let fd = modbus_get_socket(context)
        guard fd >= 0 else { return nil }
        let limit = ContinuousClock.now + quiet + Self.drainLimit
        var buffer = [UInt8](repeating: 0, count: 256)
        var discarded = 0
        // What was discarded, with when each chunk came (kept only when an answer is looked for, and only as much as
        // the longest answer and some noise before it).
        var received: [UInt8] = []
        var arrivals: [(offset: Int, at: ContinuousClock.Instant)] = []
        while true {
            let now = ContinuousClock.now
            guard now < limit else {
                logger.warning(
                    "Modbus line did not fall silent after a failed request; sending the next request anyway",
                    metadata: ["discarded_bytes": "\(discarded)", "quiet": "\(quiet)"])
                break
            }
            let wait = min(quiet, now.duration(to: limit))
            var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, Int32(clamping: max(wait.wholeMilliseconds, 1)))
            if ready == 0 { break }  // silent for the whole window
            if ready < 0 {
                if errno == EINTR { continue }
                break
            }
            let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count > 0 {
                discarded += count
                if expected != nil, received.count < 2 * Int(MODBUS_RTU_MAX_ADU_LENGTH) {
                    arrivals.append((received.count, ContinuousClock.now))
                    received.append(contentsOf: buffer[0..<count])
                }
                continue
            }
            if count < 0, errno == EINTR || errno == EAGAIN { continue }
            break  // EIO (unplugged), POLLHUP: the next request finds out and reports it
        }
        if discarded > 0 {
            logger.debug("Modbus: discarded bytes that came after a failed request", metadata: ["bytes": "\(discarded)"])
        }
        lastFrameEnd = ContinuousClock.now
        guard let expected, let start = Self.answerStart(in: received, slave: expected.slave, function: expected.function) else {
            return nil
        }
        return arrivals.last { $0.offset <= start }?.at
    }

    /// Where a complete answer of `slave` to `function` (its registers, or its exception) with a valid CRC begins in
    /// `bytes` (noise before it is skipped); nil when there is none. Only for bytes the bus discards: the answers it
    /// takes are framed and checked by libmodbus.
    static func answerStart(in bytes: [UInt8], slave: Int, function: UInt8) -> Int? {
        for start in bytes.indices where bytes[start] == UInt8(truncatingIfNeeded: slave) && start + 2 < bytes.count {
            let length: Int
            switch bytes[start + 1] {
            case function: length = 3 + Int(bytes[start + 2]) + 2
            case function | 0x80: length = 5
            default: continue
            }
            guard start + length <= bytes.count else { continue }
            let crc = ModbusRTU.crc16(bytes[start..<(start + length - 2)])
            if bytes[start + length - 2] == UInt8(crc & 0xFF), bytes[start + length - 1] == UInt8(crc >> 8) { return start }
        }
        return nil
    }

    /// Looks at what arrived since the last request was answered in full, before the next request discards it: another
    /// complete answer of the same slave is a second device with its unit id (or another master polling it), which
    /// nothing else shows, since its answers come after the one taken (the first answer was stored). Warned once per
    /// slave while the port stays open.
    private func noteSecondAnswer(_ context: OpaquePointer) {
        guard let previous = answered else { return }
        answered = nil
        let fd = modbus_get_socket(context)
        guard fd >= 0, !secondAnswerWarned.contains(previous.slave) else { return }
        var pending: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 256)
        // Only what is already there: never waits.
        while pending.count < 2 * Int(MODBUS_RTU_MAX_ADU_LENGTH) {
            var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&descriptor, 1, 0) > 0 else { break }
            let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            guard count > 0 else { break }
            pending.append(contentsOf: buffer[0..<count])
        }
        guard Self.answerStart(in: pending, slave: previous.slave, function: previous.function) != nil else { return }
        secondAnswerWarned.insert(previous.slave)
        logger.warning(
            "Modbus: a second answer from unit id \(previous.slave) came after its answer; two devices may answer to id \(previous.slave) (give each transmitter its own unit id), or another master is polling it; the first answer was taken",
            metadata: ["slave": "\(previous.slave)", "registers": "\(previous.what)"])
    }

    /// Whether any byte arrives on the line within `window` (left unread, for the drain that follows).
    private func laterBytesArrive(_ context: OpaquePointer, within window: Duration) -> Bool {
        let fd = modbus_get_socket(context)
        guard fd >= 0 else { return false }
        let end = ContinuousClock.now + window
        while true {
            let now = ContinuousClock.now
            guard now < end else { return false }
            var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, Int32(clamping: max(now.duration(to: end).wholeMilliseconds, 1)))
            if ready > 0 { return descriptor.revents & Int16(POLLIN) != 0 }
            if ready == 0 { return false }
            if errno != EINTR { return false }
        }
    }

    /// Sleeps until t3.5 has passed since the last frame ended, so that the next request is never glued to it.
    private func waitForSilentInterval() {
        guard let lastFrameEnd else { return }
        let due = lastFrameEnd + settings.silentInterval
        let now = ContinuousClock.now
        guard now < due else { return }
        sleepBlocking(due - now)
    }

    static func exceptionName(_ code: Int) -> String {
        let names = [
            1: "illegal function", 2: "illegal data address", 3: "illegal data value", 4: "slave device failure",
            5: "acknowledge", 6: "slave device busy", 7: "negative acknowledge", 8: "memory parity error",
            10: "gateway path unavailable", 11: "gateway target failed to respond",
        ]
        let digits = String(code, radix: 16, uppercase: true)
        let hex = "0x" + String(repeating: "0", count: max(0, 2 - digits.count)) + digits
        return names[code].map { "\(hex) (\($0))" } ?? hex
    }

    /// `0x04 (read input registers)`.
    static func functionName(_ code: UInt8) -> String {
        let names: [UInt8: String] = [3: "read holding registers", 4: "read input registers"]
        let digits = String(code, radix: 16, uppercase: true)
        let hex = "0x" + String(repeating: "0", count: max(0, 2 - digits.count)) + digits
        return names[code].map { "\(hex) (\($0))" } ?? hex
    }

    /// A response_timeout that a slave answering after `answer` keeps within: half as long again, up to the next
    /// 100 ms, within what the key accepts (10 s).
    static func suggestedTimeout(_ answer: Duration) -> Duration {
        let milliseconds = (answer * 3 / 2).wholeMilliseconds
        return .milliseconds(min((milliseconds + 99) / 100 * 100, 10_000))
    }

    /// `about 610ms`, `about 1.3s`: how late an answer was, to the 10 ms (to the 100 ms from a second).
    static func roughly(_ duration: Duration) -> String {
        let milliseconds = duration.wholeMilliseconds
        guard milliseconds >= 1000 else { return "\((milliseconds + 5) / 10 * 10)ms" }
        let tenths = (milliseconds + 50) / 100
        return "\(tenths / 10).\(tenths % 10)s"
    }

    static func text(_ code: Int32) -> String {
        guard let message = modbus_strerror(code) else { return "error \(code)" }
        return String(cString: message)
    }

    static func seconds(_ duration: Duration) -> String {
        let milliseconds = duration.wholeMilliseconds
        return milliseconds >= 1000 ? "\((milliseconds + 999) / 1000)s" : "\(milliseconds)ms"
    }
}

/// A failed request: the sensor error it becomes and, for a Modbus exception, its code.
struct ModbusFailure: Error {
    var error: SensorError
    var exception: Int?

    init(_ error: SensorError, exception: Int? = nil) {
        self.error = error
        self.exception = exception
    }
}

/// The buses of this process, one per serial device, shared by every sensor that names it.
///
/// The runtime builds drivers one sensor at a time, so a bus is found here by its device: the first sensor opens it, the
/// last one to close releases it. A device named two ways (its `/dev/serial/by-id/...` link in one sensor, the link's
/// target in another) is one bus (``SerialDevice/identity(of:)``): two buses would lock each other out of the port.
final class ModbusBuses: Sendable {
    static let shared = ModbusBuses()

    private let buses = Mutex<[String: ModbusBus]>([:])

    /// The bus on `settings.port`'s device, created on first use. Fails when the device is already open with other
    /// settings (the configuration check refuses that first).
    func bus(for settings: ModbusBusSettings, logger: Logger) throws -> ModbusBus {
        let device = SerialDevice.identity(of: settings.port)
        return try buses.withLock { buses in
            if let bus = buses[device] {
                var same = settings
                same.port = bus.settings.port
                guard bus.settings == same else {
                    let spelling = bus.settings.port == settings.port ? "" : " (as \(bus.settings.port), the same device)"
                    throw SensorError(.fault, "\(settings.port) is already used\(spelling) with \(bus.settings); every sensor on a bus must use the same settings (this one has \(settings))")
                }
                return bus
            }
            let bus = try ModbusBus(settings: settings, device: device, logger: logger)
            buses[device] = bus
            return bus
        }
    }

    /// Another spelling of `port`'s device that a bus of this process was made for, if any.
    func otherName(of port: String) -> String? {
        let device = SerialDevice.identity(of: port)
        let names = buses.withLock { $0.values.map(\.settings.port) }
        return names.first { $0 != port && SerialDevice.identity(of: $0) == device }
    }

    /// Takes `sensor` off its bus; closes the bus when it was the last.
    func release(_ sensor: SensorID, from bus: ModbusBus) async {
        let last = buses.withLock { buses -> Bool in
            guard bus.remove(sensor) == 0 else { return false }
            if buses[bus.device] === bus { buses[bus.device] = nil }
            return true
        }
        if last { await bus.close() }
    }
}
