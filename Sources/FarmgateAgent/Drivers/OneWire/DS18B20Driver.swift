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

/// A DS18B20 (or another w1-therm sensor) read through the Linux 1-Wire sysfs files.
///
/// Each read runs on the sensor's own thread (a sysfs read blocks for the whole conversion, 750 ms at 12 bits), one at
/// a time per bus (``W1BusGate``), and is abandoned after `read_timeout` from when it has the bus if the bus hangs.
/// `w1_slave` is preferred, because it carries the kernel's CRC verdict; the `temperature` file of newer kernels is
/// used when there is no `w1_slave`.
///
/// What is refused: a failed CRC (`fault`), an empty read (the conversion failed), an all-zero scratchpad, the 127.94 °C
/// of a starved parasite-powered sensor, and the 85.000 °C power-on value, always (``W1Therm/check(millidegrees:)``).
/// A device directory that vanished is `disconnected`. Values are the kernel's millidegrees over 1000, unrounded.
public final class DS18B20Driver: SensorDriver {
    /// The w1-therm families: DS18S20, DS1822, DS18B20, MAX31850, DS28EA00 (and DS1825 shares 3b).
    static let families: Set<String> = ["10", "22", "28", "3b", "42"]

    static let optionKeys: Set<String> = ["address", "w1_root", "read_timeout"]

    public static let description = DriverDescription(
        kind: "ds18b20",
        summary: "A DS18B20 1-Wire temperature probe through the kernel's w1-therm sysfs files (1/16 °C).",
        optionKeys: optionKeys,
        sampleConfiguration: """
            [[sensor]]
            id = "tank1.temp"
            driver = "ds18b20"
            quantity = "temperature"
            address = "28-0316a2791aff"      # the directory name under /sys/bus/w1/devices
            interval = "30s"
            # w1_root = "/sys/bus/w1/devices"
            # read_timeout = "2s"
            """,
        validate: { configuration throws(ConfigurationError) in _ = try Options(configuration) },
        claims: { configuration throws(ConfigurationError) in
            let options = try Options(configuration)
            // One probe however its w1_root is spelt (`/sys/bus/w1/devices/`, `//`, `..`, a link to it): a tester,
            // 2026-12-07, configured one probe twice that way.
            let device = FileSystem.lexicallyNormalized(FileSystem.resolvedPath(options.root + "/" + options.address))
            return [
                ResourceClaim(
                    resource: "1-Wire device \(options.root)/\(options.address)", key: "address", shareable: false, identity: "1-Wire device \(device)")
            ]
        },
        make: { configuration, context in try DS18B20Driver(configuration: configuration, logger: context.logger) })

    struct Options: Sendable {
        /// `address`: the sensor's directory under the w1 root, `28-0316a2791aff`. Required.
        var address: String
        /// `w1_root`: where the kernel lists 1-Wire devices. Default `/sys/bus/w1/devices` (another for tests and
        /// containers).
        var root: String
        /// `read_timeout`: how long a read may block before it is abandoned as a timeout. Default 2 s, 100 ms–60 s.
        var readTimeout: Duration

        init(_ configuration: SensorConfiguration) throws(ConfigurationError) {
            let table = configuration.options
            // A w1-therm probe gives a temperature and nothing else: stored under another quantity, 21 °C would read
            // as "21.00 pH" and alerts on that quantity would judge a temperature.
            guard configuration.descriptor.quantity == .temperature else {
                throw table.error(
                    "quantity",
                    "a ds18b20 sensor measures \"temperature\" only, not \"\(configuration.descriptor.quantity.rawValue)\"; write quantity = \"temperature\", or use the driver of the probe that measures \(configuration.descriptor.quantity.rawValue)")
            }
            let text = try table.requiredString("address")
            let address = text.lowercased()
            let parts = address.split(separator: "-", omittingEmptySubsequences: false)
            guard parts.count == 2, parts[0].count == 2, parts[1].count == 12,
                parts.allSatisfy({ $0.allSatisfy(\.isHexDigit) })
            else {
                throw table.error(
                    "address", "must be a 1-Wire device name such as \"28-0316a2791aff\" (family, dash, 12 hex digits; `ls /sys/bus/w1/devices` lists them), got \"\(text)\"")
            }
            guard DS18B20Driver.families.contains(String(parts[0])) else {
                throw table.error(
                    "address", "family \(parts[0]) is not a w1-therm temperature sensor (DS18B20 addresses start with 28-)")
            }
            self.address = address
            root = try table.string("w1_root") ?? "/sys/bus/w1/devices"
            guard root.hasPrefix("/") else {
                throw table.error("w1_root", "must be an absolute directory such as \"/sys/bus/w1/devices\" (got \"\(root)\")")
            }
            readTimeout = try table.duration("read_timeout", in: .milliseconds(100)...(.seconds(60))) ?? .seconds(2)
        }
    }

    private struct State {
        /// When the read running on the thread began (possibly abandoned, stuck on the bus); nil when none runs.
        var busySince: ContinuousClock.Instant?
        /// When that read got its bus (``W1BusGate``); nil while it waits for it.
        var readingSince: ContinuousClock.Instant?
    }

    let options: Options
    /// How long a read waits for its bus (and its thread to run it) before it gives up: the sensor's interval, at
    /// least 5 s, as long as the sampler gives a read (a wait of a second timed out under load, on a bus of one probe).
    let busWait: Duration
    private let thread: DedicatedThread
    private let state = Mutex(State())
    /// Set by ``close()``: reads that get the bus after it give it back unread.
    private let closed = AtomicFlag()

    public init(configuration: SensorConfiguration, logger: Logger) throws {
        options = try Options(configuration)
        busWait = max(configuration.interval, .seconds(5))
        thread = DedicatedThread(name: "farmgate-w1")
    }

    deinit { thread.shutdown() }

    /// A read may wait ``busWait`` for its bus and then take its `read_timeout`: the sampler, whose bound is the same
    /// as ``busWait``, must wait for both (a tester, 2026-12-07: on a busy bus reads that got it late were abandoned by
    /// the sampler mid-conversion and their readings dropped, 32 of 73, each told as "no answer within 5s").
    public var setupAllowance: Duration { options.readTimeout + .seconds(1) }

    public func read() async throws(SensorError) -> SensorValue {
        let blockedSince = state.withLock { state -> ContinuousClock.Instant? in
            if let since = state.busySince { return since }
            state.busySince = .now
            return nil
        }
        let gate = W1BusGate.forDevice(options.root + "/" + options.address, root: options.root)
        if let blockedSince {
            let reading = state.withLock { $0.readingSince }
            guard let reading else {
                throw SensorError(
                    .timeout,
                    "the previous read of \(options.address) still waits for its 1-Wire bus (for \(Int((ContinuousClock.now - blockedSince) / .seconds(1))) s): a read of another probe on it is blocked, or the bus has more probes than their interval allows (each conversion holds it up to 750 ms)\(gate.heldBy())")
            }
            throw Self.stillBlocked(options, for: ContinuousClock.now - reading)
        }
        let options = self.options
        let gotBus = OnceContinuation<Void>()
        // Set when the caller stopped waiting for the bus: the job then gives the bus back unread when it gets it, rather
        // than holding it for a conversion whose reading nobody takes.
        let gaveUp = AtomicFlag()
        // One job on the sensor's thread: wait for the bus, say so, read, give the bus back, whenever the caller gave up.
        let job = Task { [self, thread] () -> Result<Int, SensorError>? in
            let outcome = try? await thread.run { () -> Result<Int, SensorError>? in
                gate.take(for: options.address, timeout: options.readTimeout)
                defer {
                    gate.give()
                    self.state.withLock { $0 = State() }
                }
                guard !gaveUp.isSet, !self.closed.isSet else { return nil }
                self.state.withLock { $0.readingSince = .now }
                gotBus.resume(with: .success(()))
                return Self.readMillidegrees(options)
            }
            // The wait for the bus is always answered, even when the read never took it (given up, or the thread shut
            // down): a waiter left unresumed stays suspended for good, one per such read. After a success this is dropped.
            gotBus.resume(with: .failure(CancellationError()))
            return outcome ?? nil
        }
        guard await withDeadline(busWait, { try? await withCheckedThrowingContinuation { gotBus.install($0) } }) != nil else {
            gaveUp.set()
            throw SensorError(
                .timeout,
                "\(options.address) waited \(busWait) for its 1-Wire bus, which reads of other probes held: a read of one of them is blocked, or the bus has more probes than their interval allows (each conversion holds it up to 750 ms with parasite power); lengthen the interval or split the probes over two buses\(gate.heldBy())")
        }
        guard let outcome = await withDeadline(options.readTimeout, { await job.value }) ?? nil else {
            throw SensorError(.timeout, "no answer from \(options.address) within \(options.readTimeout)")
        }
        let millidegrees = try outcome.get()
        if let problem = W1Therm.check(millidegrees: millidegrees) { throw problem }
        return SensorValue(W1Therm.celsius(millidegrees: millidegrees))
    }

    /// The read refused because the one before has been blocked in the kernel for `elapsed`. No new read starts until
    /// that one returns, so a read that never returns fails the sensor for good, even once the device is healthy again.
    /// Past 10 × `read_timeout` (20 s by default, far beyond a 750 ms conversion) it is taken as one that never
    /// returns, and the message says that only a restart clears it.
    static func stillBlocked(_ options: Options, for elapsed: Duration) -> SensorError {
        let seconds = Int(elapsed / .seconds(1))
        return SensorError(
            .timeout,
            "the previous read of \(options.address) (started \(seconds) s ago) is still blocked; the 1-Wire bus may hang (check the wiring)"
                + SensorError.stuckForGood(elapsed: elapsed, timeout: options.readTimeout))
    }

    public func close() async {
        // Reads still waiting for the bus belong to services that are stopping (a stop, or a reload that replaces them):
        // their readings would be dropped, so they give the bus back unread instead of converting one after another
        // while the new services wait (a tester, 2026-12-07: 5–6 conversions for nobody after each reload of a busy bus).
        closed.set()
        thread.shutdown()
    }

    /// Where the kernel serves the sensor: its device directory under the w1 root, and the file a read takes, `w1_slave`
    /// (it carries the kernel's CRC verdict) or, when the kernel has only that, `temperature`. Blocking (stat).
    static func sysfsFile(_ options: Options) -> (directory: String, path: String, isSlave: Bool) {
        let directory = options.root + "/" + options.address
        let slave = directory + "/w1_slave"
        let temperature = directory + "/temperature"
        let useSlave = FileManager.default.fileExists(atPath: slave) || !FileManager.default.fileExists(atPath: temperature)
        return (directory, useSlave ? slave : temperature, useSlave)
    }

    /// One blocking read of the sensor's sysfs file. Runs on the sensor's thread.
    static func readMillidegrees(_ options: Options) -> Result<Int, SensorError> {
        let (directory, path, useSlave) = sysfsFile(options)
        guard FileSystem.isDirectory(directory) else {
            return .failure(missing(options))
        }
        switch readFile(path) {
        case .success(let text): return useSlave ? W1Therm.parseSlaveFile(text) : W1Therm.parseTemperatureFile(text)
        case .failure(let failure):
            let code = failure.code
            switch code {
            case ENOENT where FileSystem.isDirectory(directory):
                return .failure(notServed(options))
            case ENOENT, ENODEV, ENXIO:
                return .failure(missing(options))
            case EACCES, EPERM:
                return .failure(SensorError(.fault, "permission denied reading \(path); the agent's user must be able to read it"))
            case EIO:
                return .failure(SensorError(.fault, "the kernel reported an I/O error reading \(path) (CRC or bus error); check the wiring and pull-up"))
            default:
                return .failure(SensorError(.fault, "cannot read \(path): \(String(cString: strerror(code)))"))
            }
        }
    }

    /// Listed by the kernel, but without the w1-therm files: the device is there, its driver is not.
    static func notServed(_ options: Options) -> SensorError {
        SensorError(
            .fault,
            "1-Wire device \(options.address) is listed but has neither w1_slave nor temperature: the kernel's w1_therm driver does not serve it (load it: modprobe w1_therm), or it is no temperature sensor")
    }

    static func missing(_ options: Options) -> SensorError {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: options.root) else {
            return SensorError(
                .disconnected,
                "no 1-Wire bus at \(options.root): enable it (Raspberry Pi: dtoverlay=w1-gpio in /boot/firmware/config.txt, then reboot)")
        }
        let present = names.filter { $0.count == 15 && families.contains(String($0.prefix(2))) }.sorted()
        // At most ten named (a status line per sensor, and a bus may carry hundreds): the count says how many more.
        let named = present.prefix(10).joined(separator: ", ") + (present.count > 10 ? " and \(present.count - 10) more (`ls \(options.root)`)" : "")
        let listing = present.isEmpty ? "no temperature sensor is listed" : "present: \(named)"
        return SensorError(
            .disconnected, "1-Wire device \(options.address) is not on the bus (unplugged or a broken wire?); \(listing)")
    }

    /// The whole file, read with POSIX calls so that the kernel's error number survives.
    static func readFile(_ path: String) -> Result<String, Errno> {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return .failure(Errno(errno)) }
        defer { Glibc.close(fd) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 512)
        while bytes.count < 16_384 {
            let count = Glibc.read(fd, &buffer, buffer.count)
            if count < 0 {
                if errno == EINTR { continue }
                return .failure(Errno(errno))
            }
            if count == 0 { break }
            bytes.append(contentsOf: buffer[0..<count])
        }
        return .success(String(decoding: bytes, as: UTF8.self))
    }
}

/// An errno value as an error.
struct Errno: Error, Sendable {
    var code: Int32
    init(_ code: Int32) { self.code = code }
}
