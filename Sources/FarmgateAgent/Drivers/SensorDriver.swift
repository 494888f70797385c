import FarmgateSupport
import FarmgateWire
import Logging

/// A value a driver read, with what it knows about its quality.
public struct SensorValue: Sendable, Hashable {
    public var value: Double
    public var quality: QualityFlags

    public init(_ value: Double, quality: QualityFlags = []) {
        self.value = value
        self.quality = quality
    }
}

/// Why a read failed. `description` says what happened and, where it can, what to check.
public struct SensorError: Error, Sendable, Hashable, CustomStringConvertible {
    public enum Kind: String, Sendable, Hashable, Codable {
        /// The sensor did not answer in time.
        case timeout
        /// The sensor answered with a fault (EZO `*ER`, Modbus exception, DS18B20 CRC NO, RTD -1023 ...).
        case fault
        /// The bus or device is gone (USB adapter unplugged, 1-Wire device missing).
        case disconnected
        /// The sensor answered with bytes that are not a reading.
        case invalidResponse = "invalid_response"
    }

    public var kind: Kind
    public var message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { "\(kind.rawValue): \(message)" }
}

extension SensorError {
    /// What to add to "the previous read is still running" once it has run `elapsed`, ten times `timeout` or more: it may
    /// never end (a kernel read that never returns), no new read of the sensor starts until it does, and then only a
    /// restart frees the sensor, whatever is done to the device. Empty before that.
    static func stuckForGood(elapsed: Duration, timeout: Duration) -> String {
        guard elapsed >= timeout * 10 else { return "" }
        return ". Stuck for over 10 × its timeout (\(ConfigTable.format(timeout))), it may never finish, and no new read starts until it "
            + "does: once the device is fixed, only restarting the agent (systemctl restart farmgate) clears this"
    }
}

/// Reads one sensor. The sampler, not the driver, owns scheduling (as in Telegraf): it calls ``read()`` on the sensor's
/// interval and stores what comes back.
///
/// Drivers that block (serial, 1-Wire sysfs) do their blocking on a ``DedicatedThread``, never on the caller's task.
public protocol SensorDriver: Sendable {
    /// Takes one reading.
    func read() async throws(SensorError) -> SensorValue
    /// The sampler's read on the sensor's schedule: a reading, or nil when this read only began what the next one
    /// measures (a flow meter's first window after a start, when no time has passed on its line's clock yet): nothing is
    /// stored for it and it is no failed read. One-off reads (`farmgate sensor read`) call ``read()``. Default: ``read()``.
    func scheduledRead() async throws(SensorError) -> SensorValue?
    /// Releases the hardware (ports, lines). Called once, at shutdown.
    func close() async
    /// Whether the sampler reads the sensor once more when it stops (SIGTERM, or a reload that restarts the services),
    /// after its last scheduled read: a sensor that accumulates between reads (a GPIO pulse count or flow meter) would
    /// otherwise lose what it counted since the last read.
    var readsAtStop: Bool { get }
    /// How much longer than the sampler's bound (the interval, at least 5 s) a read may take because the driver may have
    /// to set its device up first: an EZO circuit initialised at the first read, or again after it restarted, waits
    /// for its boot and sends its settings a command at a time. The driver's own timeouts still bound each exchange.
    var setupAllowance: Duration { get }
}

extension SensorDriver {
    public func scheduledRead() async throws(SensorError) -> SensorValue? { try await read() }
    public func close() async {}
    public var readsAtStop: Bool { false }
    public var setupAllowance: Duration { .zero }
}

/// The latest value another sensor read, for drivers that depend on it (an EZO pH or EC circuit compensates with the
/// water temperature another sensor measures).
public protocol LatestValues: Sendable {
    /// The last value `sensor` read successfully and when, or nil when it has not read one yet.
    func latest(_ sensor: SensorID) -> (value: Double, at: Timestamp)?
}

/// What a driver may use besides its own configuration; given to ``DriverDescription/make`` so that new needs add a field
/// here rather than a parameter to every driver.
public struct DriverContext: Sendable {
    /// Every sensor of the site, in configuration order (drivers that share a port or a circuit look at their siblings).
    public var sensors: [SensorConfiguration]
    /// Other sensors' latest values (the sensor status board in the agent).
    public var latestValues: any LatestValues
    /// One owner per serial port: sensors on the same port share it and their requests are serialised through it.
    public var serialPorts: SerialPortRegistry
    public var logger: Logger
    /// Where drivers keep small state files that must survive a restart (a flow meter's running count): a path prefix
    /// to which each appends its own suffix, the buffer's path in the agent. Nil: no state survives (one-off reads).
    public var stateFilePrefix: String?

    public init(
        sensors: [SensorConfiguration] = [], latestValues: any LatestValues = NoLatestValues(),
        serialPorts: SerialPortRegistry = SerialPortRegistry(), logger: Logger, stateFilePrefix: String? = nil
    ) {
        self.sensors = sensors
        self.latestValues = latestValues
        self.serialPorts = serialPorts
        self.logger = logger
        self.stateFilePrefix = stateFilePrefix
    }
}

/// No other sensor's value is known (tools that build a single driver).
public struct NoLatestValues: LatestValues {
    public init() {}
    public func latest(_ sensor: SensorID) -> (value: Double, at: Timestamp)? { nil }
}

/// What the registry knows about a kind of driver: its name, its options, how to validate and build it.
public struct DriverDescription: Sendable {
    /// The `driver = "..."` value that selects it.
    public var kind: String
    /// One line for `farmgate sensor drivers` and the README.
    public var summary: String
    /// Keys the driver reads from its `[[sensor]]` table, on top of ``SensorConfiguration/commonKeys``.
    public var optionKeys: Set<String>
    /// A `[[sensor]]` table an installer can copy.
    public var sampleConfiguration: String
    /// Checks the driver's own keys when the configuration is loaded, so that mistakes fail at start, not at the first read.
    public var validate: @Sendable (SensorConfiguration) throws(ConfigurationError) -> Void
    /// Checks what one sensor's table cannot: rules across sensors (two sensors claiming one port with different settings,
    /// a compensation source that does not exist). Called once with every sensor of the site, after each was validated.
    public var validateSite: @Sendable ([SensorConfiguration]) throws(ConfigurationError) -> Void
    /// The hardware a configured sensor uses (serial port, GPIO line), so that loading the configuration refuses two
    /// sensors that would fight over it. Called after ``validate``.
    public var claims: @Sendable (SensorConfiguration) throws(ConfigurationError) -> [ResourceClaim]
    /// Builds a driver for one configured sensor. It must not fail because the hardware is missing (an unplugged USB
    /// adapter): that is a read error shown in `farmgate status` until the device comes back.
    public var make: @Sendable (SensorConfiguration, DriverContext) throws -> any SensorDriver
    /// Common keys the driver does not use for this sensor (a GPIO switch stores every change: `interval` and
    /// `deadband` mean nothing to it), by key, with why. `farmgate config check` and the agent warn about each one set.
    public var ignoredKeys: @Sendable (SensorConfiguration) -> [String: String] = { _ in [:] }
    /// The resolution a sensor of this driver gets when its table names none, when the quantity's default would not
    /// hold what the device sends (an EZO RTD answers 25.104 °C, a 0.1 °C Modbus register −0.1 °C: at the DS18B20's
    /// 1/16 °C they would be stored as 25.125 and −0.125). nil: the quantity's default.
    public var nativeResolution: @Sendable (Quantity, ConfigTable) -> Resolution? = { _, _ in nil }

    public init(
        kind: String, summary: String, optionKeys: Set<String>, sampleConfiguration: String,
        validate: @escaping @Sendable (SensorConfiguration) throws(ConfigurationError) -> Void,
        validateSite: @escaping @Sendable ([SensorConfiguration]) throws(ConfigurationError) -> Void = { _ throws(ConfigurationError) in },
        claims: @escaping @Sendable (SensorConfiguration) throws(ConfigurationError) -> [ResourceClaim] = { _ throws(ConfigurationError) in [] },
        make: @escaping @Sendable (SensorConfiguration, DriverContext) throws -> any SensorDriver,
        nativeResolution: @escaping @Sendable (Quantity, ConfigTable) -> Resolution? = { _, _ in nil }
    ) {
        self.nativeResolution = nativeResolution
        self.kind = kind
        self.summary = summary
        self.optionKeys = optionKeys
        self.sampleConfiguration = sampleConfiguration
        self.validate = validate
        self.validateSite = validateSite
        self.claims = claims
        self.make = make
    }
}

/// A piece of hardware one sensor uses: a serial port, a GPIO line. Every driver names what its sensors use, and
/// ``AgentConfiguration`` refuses a configuration in which two sensors claim one resource with different settings, or
/// claim a resource that cannot be shared, whatever their drivers (an EZO circuit and a Modbus bus on one port).
public struct ResourceClaim: Sendable, Hashable {
    /// What is claimed, the way an installer names it: `serial port /dev/ttyUSB0`, `GPIO line gpiochip0:17`.
    public var resource: String
    /// The key of the sensor's table that names it; a conflict is reported there.
    public var key: String
    /// What every sensor sharing the resource must agree on, as shown in the error (`Modbus RTU 9600 8N1`).
    public var settings: String
    /// Whether other sensors may claim the resource too (when their settings are equal).
    public var shareable: Bool
    /// What the resource is when one thing can be written several ways (the device a serial port's path opens, see
    /// ``SerialDevice/identity(of:)``): claims with one identity are one resource, however their `resource` reads.
    /// nil: the resource's text is its identity.
    public var identity: String?

    public init(resource: String, key: String, settings: String = "", shareable: Bool, identity: String? = nil) {
        self.resource = resource
        self.key = key
        self.settings = settings
        self.shareable = shareable
        self.identity = identity
    }
}

/// The explicit list of drivers the agent can use.
public struct DriverRegistry: Sendable {
    public private(set) var descriptions: [DriverDescription]

    public init(_ descriptions: [DriverDescription]) {
        self.descriptions = descriptions
    }

    /// Every driver that ships with Farmgate.
    public static let standard = DriverRegistry([
        SimulatedDriver.description, EZODriver.description, ModbusDriver.description, DS18B20Driver.description, GPIODriver.description,
    ])

    public var names: [String] { descriptions.map(\.kind).sorted() }

    public func driver(named name: String) -> DriverDescription? {
        descriptions.first { $0.kind == name.lowercased() }
    }
}
