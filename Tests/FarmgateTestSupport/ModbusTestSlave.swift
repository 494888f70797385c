import CModbus
import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Modbus RTU slaves for tests, on a real pseudo-terminal: the driver under test opens ``path`` as its serial port, and
/// this object answers on the other end, one thread reading request frames and libmodbus (`modbus_reply`) building every
/// answer from registers the test sets, exceptions included (a read outside the registers is exception 02).
///
/// Slave ids in `answering` answer; any other id is silent, like a transmitter that is unpowered or has another address,
/// unless ``reply(to:with:)`` gives it a raw answer (a gateway or a server that answers for ids it does not have).
/// Answers can be delayed, every one (``delayAnswers(of:by:)``) or the next one only (``delayNextAnswer(of:by:)``, a
/// slave that answers late once, after the master gave up).
/// Every request is recorded (slave, function, registers, when it arrived and when it was answered), so that tests can
/// count requests and check their spacing. ``unplug()`` and ``replug()`` do what a USB adapter does: the port fails with
/// EIO and vanishes, then comes back (as a new pseudo-terminal behind the same path).
public final class ModbusTestSlave: Sendable {
    public enum Table: Sendable { case holding, input }

    public struct Request: Sendable {
        public var slave: Int
        public var function: Int
        public var address: Int
        public var count: Int
        /// When the whole frame had arrived.
        public var receivedAt: ContinuousClock.Instant
        /// When the answer was written; nil for a silent slave.
        public var answeredAt: ContinuousClock.Instant?
    }

    /// The port to configure: a symbolic link to the current pseudo-terminal, as `/dev/serial/by-id/...` is to
    /// `/dev/ttyUSB0`.
    public let path: String
    /// How many registers each slave has in each table (addresses 0..<registerCount).
    public let registerCount: Int
    private let answering: Set<Int>
    private let state = Mutex(State())

    private struct State {
        var holding: [Int: [UInt16]] = [:]
        var input: [Int: [UInt16]] = [:]
        var requests: [Request] = []
        var generation = 0
        var running: Int?
        var delays: [Int: Duration] = [:]
        var nextDelays: [Int: Duration] = [:]
        var rawReplies: [Int: [UInt8]] = [:]
        var secondAnswers: [Int: [UInt8]] = [:]
    }

    /// - Parameters:
    ///   - path: where to put the link to the pseudo-terminal (the file must not exist).
    ///   - answering: the slave ids that answer.
    ///   - registerCount: registers per table and slave, all 0 until set.
    public init(path: String, answering: Set<Int>, registerCount: Int = 100) throws {
        self.path = path
        self.answering = answering
        self.registerCount = registerCount
        state.withLock { state in
            for slave in answering {
                state.holding[slave] = Array(repeating: 0, count: registerCount)
                state.input[slave] = Array(repeating: 0, count: registerCount)
            }
        }
        try replug()
    }

    deinit {
        state.withLock { $0.running = nil }
        try? FileManager.default.removeItem(atPath: path)
    }

    /// Sets registers of `slave` from `address` on.
    public func set(slave: Int, _ table: Table = .holding, address: Int, _ values: [UInt16]) {
        state.withLock { state in
            for (offset, value) in values.enumerated() where address + offset < registerCount {
                switch table {
                case .holding: state.holding[slave]?[address + offset] = value
                case .input: state.input[slave]?[address + offset] = value
                }
            }
        }
    }

    /// Makes `slave` wait this long before each answer (a slow transmitter).
    public func delayAnswers(of slave: Int, by delay: Duration) {
        state.withLock { $0.delays[slave] = delay }
    }

    /// Makes `slave` wait this long before its next answer only: a late answer that arrives after the master's
    /// response timeout, while later answers come at once.
    public func delayNextAnswer(of slave: Int, by delay: Duration) {
        state.withLock { $0.nextDelays[slave] = delay }
    }

    /// Answers every request to `slave` (answering or not) with `frame` followed by its CRC, instead of what libmodbus
    /// would build: malformed or unusual answers, such as `[id, 0x80, 0x04]`, the exception with function byte 0x80
    /// that some servers send for a unit id they do not have.
    public func reply(to slave: Int, with frame: [UInt8]) {
        state.withLock { $0.rawReplies[slave] = frame }
    }

    /// Makes every answer of `slave` followed, 2 ms later, by `frame` and its CRC: a second device with the same unit id
    /// that answers too (a little later, so that the two do not collide).
    public func answerTwice(_ slave: Int, then frame: [UInt8]) {
        state.withLock { $0.secondAnswers[slave] = frame }
    }

    /// Every request received so far, in order.
    public var requests: [Request] { state.withLock { $0.requests } }

    /// How many requests were addressed to `slave`.
    public func requestCount(slave: Int) -> Int { state.withLock { $0.requests.filter { $0.slave == slave }.count } }

    /// Closes the pseudo-terminal (the driver's next read or write fails with EIO) and removes the link.
    public func unplug() {
        state.withLock { $0.running = nil }
        try? FileManager.default.removeItem(atPath: path)
        // The serving thread notices within one poll and closes its descriptor.
        Thread.sleep(forTimeInterval: 0.1)
    }

    /// Opens a new pseudo-terminal and points the link at it.
    public func replug() throws {
        let (master, terminal) = try PseudoTerminal.open()
        try? FileManager.default.removeItem(atPath: path)
        try FileManager.default.createSymbolicLink(atPath: path, withDestinationPath: terminal)
        let generation = state.withLock { state -> Int in
            state.generation += 1
            state.running = state.generation
            return state.generation
        }
        let thread = Thread { [self] in serve(master: master, generation: generation) }
        thread.name = "modbus-test-slave"
        thread.start()
    }

    /// Stops answering and removes the link.
    public func stop() {
        unplug()
    }

    private func serve(master: Int32, generation: Int) {
        // libmodbus builds and sends the answers; it reads nothing here (frames are read below), so its context only
        // needs the descriptor.
        guard let context = modbus_new_rtu("/dev/null", 9600, CChar(UInt8(ascii: "N")), 8, 1) else {
            close(master)
            return
        }
        modbus_set_socket(context, master)
        guard let mapping = modbus_mapping_new(0, 0, Int32(registerCount), Int32(registerCount)) else {
            modbus_free(context)
            close(master)
            return
        }
        defer {
            modbus_mapping_free(mapping)
            modbus_set_socket(context, -1)
            modbus_free(context)
            close(master)
        }
        var pending: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 256)
        while state.withLock({ $0.running == generation }) {
            var descriptor = pollfd(fd: master, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, 20)
            guard ready > 0 else { continue }
            guard descriptor.revents & Int16(POLLIN) != 0 else {
                // POLLHUP: nobody has the terminal open yet (or any more); wait for the driver to open it.
                Thread.sleep(forTimeInterval: 0.01)
                continue
            }
            let count = read(master, &buffer, buffer.count)
            guard count > 0 else {
                // EIO while nobody has the terminal open: wait for the driver to (re)open it.
                Thread.sleep(forTimeInterval: 0.01)
                continue
            }
            pending.append(contentsOf: buffer[0..<count])
            // Read requests (functions 1-6) are 8 bytes: id, function, address, count, CRC. Resynchronise on a bad CRC.
            while pending.count >= 8 {
                let frame = Array(pending[0..<8])
                guard Self.crc16(frame[0..<6]) == UInt16(frame[6]) | UInt16(frame[7]) << 8 else {
                    pending.removeFirst()
                    continue
                }
                pending.removeFirst(8)
                answer(frame, master: master, context: context, mapping: mapping)
            }
        }
    }

    private static func sleep(_ delay: Duration) {
        Thread.sleep(forTimeInterval: Double(delay.components.seconds) + Double(delay.components.attoseconds) / 1e18)
    }

    private func answer(_ frame: [UInt8], master: Int32, context: OpaquePointer, mapping: UnsafeMutablePointer<modbus_mapping_t>) {
        let slave = Int(frame[0])
        var request = Request(
            slave: slave, function: Int(frame[1]), address: Int(frame[2]) << 8 | Int(frame[3]),
            count: Int(frame[4]) << 8 | Int(frame[5]), receivedAt: .now, answeredAt: nil)
        let (raw, nextDelay) = state.withLock { ($0.rawReplies[slave], $0.nextDelays.removeValue(forKey: slave)) }
        if let raw {
            if let nextDelay { Self.sleep(nextDelay) }
            request.answeredAt = .now
            state.withLock { $0.requests.append(request) }
            let crc = Self.crc16(raw)
            let bytes = raw + [UInt8(crc & 0xFF), UInt8(crc >> 8)]
            _ = bytes.withUnsafeBufferPointer { write(master, $0.baseAddress, $0.count) }
            return
        }
        guard answering.contains(slave) else {
            state.withLock { $0.requests.append(request) }
            return
        }
        let (holding, input, delay) = state.withLock { ($0.holding[slave] ?? [], $0.input[slave] ?? [], $0.delays[slave]) }
        for (index, value) in holding.enumerated() { mapping.pointee.tab_registers[index] = value }
        for (index, value) in input.enumerated() { mapping.pointee.tab_input_registers[index] = value }
        if let delay = nextDelay ?? delay { Self.sleep(delay) }
        // Recorded and stamped just before the answer goes out: on a pseudo-terminal the master may read it (start its
        // silent interval, send its next request, let the test count requests) before this thread runs again.
        request.answeredAt = .now
        state.withLock { $0.requests.append(request) }
        _ = frame.withUnsafeBufferPointer { modbus_reply(context, $0.baseAddress, Int32($0.count), mapping) }
        if let second = state.withLock({ $0.secondAnswers[slave] }) {
            Self.sleep(.milliseconds(2))
            let crc = Self.crc16(second)
            let bytes = second + [UInt8(crc & 0xFF), UInt8(crc >> 8)]
            _ = bytes.withUnsafeBufferPointer { write(master, $0.baseAddress, $0.count) }
        }
    }

    /// The Modbus RTU CRC: initial 0xFFFF, reflected polynomial 0xA001, sent low byte first.
    public static func crc16<Bytes: Collection>(_ bytes: Bytes) -> UInt16 where Bytes.Element == UInt8 {
        var crc: UInt16 = 0xFFFF
        for byte in bytes {
            crc ^= UInt16(byte)
            for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0xA001 : crc >> 1 }
        }
        return crc
    }
}
