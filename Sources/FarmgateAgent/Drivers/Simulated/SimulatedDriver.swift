import FarmgateSupport
import FarmgateWire
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif
import Logging
import Synchronization

/// A sensor that does not exist: realistic pH, EC and water-temperature series for demos and tests.
///
/// The value is `base + amplitude·sin(2π·t/period) + random walk + noise`, so it drifts slowly through the day, wanders,
/// and jitters the way a real probe does. With `fault_rate` > 0 a read occasionally fails, as real sensors do.
/// Options (all optional; defaults depend on the quantity, see ``Profile``):
/// `base`, `amplitude`, `period`, `noise`, `walk` (standard deviation per hour), `fault_rate` (0–1), `latency`, `seed`.
public final class SimulatedDriver: SensorDriver {
    /// Defaults per quantity, chosen to look like a healthy lettuce system.
    public struct Profile: Sendable {
        public var base: Double
        public var amplitude: Double
        public var noise: Double
        public var walk: Double

        public static func forQuantity(_ quantity: Quantity) -> Profile {
            switch quantity {
            case .ph: Profile(base: 6.0, amplitude: 0.15, noise: 0.006, walk: 0.03)
            case .electricalConductivity: Profile(base: 1400, amplitude: 60, noise: 1.5, walk: 8)
            case .temperature: Profile(base: 20.5, amplitude: 1.2, noise: 0.02, walk: 0.1)
            case .orp: Profile(base: 350, amplitude: 20, noise: 1, walk: 5)
            case .dissolvedOxygen: Profile(base: 8, amplitude: 0.5, noise: 0.05, walk: 0.1)
            case .tds: Profile(base: 700, amplitude: 30, noise: 1, walk: 4)
            case .humidity: Profile(base: 65, amplitude: 10, noise: 0.3, walk: 1)
            case .pressure: Profile(base: 1013, amplitude: 3, noise: 0.1, walk: 0.5)
            case .salinity: Profile(base: 0.7, amplitude: 0.03, noise: 0.002, walk: 0.005)
            case .specificGravity: Profile(base: 1.001, amplitude: 0, noise: 0.0002, walk: 0.0001)
            case .flowRate: Profile(base: 12, amplitude: 1, noise: 0.1, walk: 0.3)
            case .state, .count: Profile(base: 0, amplitude: 0, noise: 0, walk: 0)
            }
        }
    }

    public static let optionKeys: Set<String> = ["base", "amplitude", "period", "noise", "walk", "fault_rate", "latency", "seed"]

    public static let description = DriverDescription(
        kind: "simulated",
        summary: "A realistic pH, EC or temperature series with drift, noise and occasional faults; for demos and tests.",
        optionKeys: optionKeys,
        sampleConfiguration: """
            [[sensor]]
            id = "tank1.ph"
            driver = "simulated"
            quantity = "ph"
            interval = "10s"
            # base = 6.0        # centre of the series
            # amplitude = 0.15  # daily swing
            # noise = 0.006     # standard deviation of each reading's noise
            # fault_rate = 0.001
            """,
        validate: { configuration throws(ConfigurationError) in _ = try Options(configuration) },
        make: { configuration, context in try SimulatedDriver(configuration: configuration, logger: context.logger) })

    struct Options {
        var profile: Profile
        var period: Duration
        var faultRate: Double
        var latency: Duration
        var seed: UInt64

        init(_ configuration: SensorConfiguration) throws(ConfigurationError) {
            let table = configuration.options
            var profile = Profile.forQuantity(configuration.descriptor.quantity)
            if let base = try table.double("base") { profile.base = base }
            if let amplitude = try table.double("amplitude", in: 0...1e9) { profile.amplitude = amplitude }
            if let noise = try table.double("noise", in: 0...1e9) { profile.noise = noise }
            if let walk = try table.double("walk", in: 0...1e9) { profile.walk = walk }
            self.profile = profile
            period = try table.duration("period", in: .seconds(1)...(.seconds(365 * 86_400))) ?? .seconds(86_400)
            faultRate = try table.double("fault_rate", in: 0...1) ?? 0.001
            latency = try table.duration("latency", in: .zero...(.seconds(60))) ?? .milliseconds(20)
            if let seed = try table.int("seed") {
                self.seed = UInt64(bitPattern: Int64(seed))
            } else {
                // Stable per sensor id, so restarts continue a similar series.
                self.seed = configuration.id.rawValue.utf8.reduce(UInt64(14_695_981_039_346_656_037)) { ($0 ^ UInt64($1)) &* 1_099_511_628_211 }
            }
        }
    }

    private struct State {
        var random: SplitMix64
        var walk: Double = 0
        var lastWalkUpdate: Double?
        var state: Double = 0
    }

    private let options: Options
    private let quantity: Quantity
    private let state: Mutex<State>

    public init(configuration: SensorConfiguration, logger: Logger) throws {
        self.options = try Options(configuration)
        self.quantity = configuration.descriptor.quantity
        self.state = Mutex(State(random: SplitMix64(seed: options.seed)))
    }

    public func read() async throws(SensorError) -> SensorValue {
        if options.latency > .zero {
            do { try await Task.sleep(for: options.latency) } catch { throw SensorError(.timeout, "read cancelled") }
        }
        let now = Date().timeIntervalSince1970
        return try value(at: now)
    }

    /// The value the simulated probe shows at `time` (seconds since 1970); advances the random state.
    func value(at time: Double) throws(SensorError) -> SensorValue {
        let options = self.options
        let quantity = self.quantity
        let outcome: Result<SensorValue, SensorError> = state.withLock { state in
            if options.faultRate > 0, state.random.nextUnit() < options.faultRate {
                return .failure(SensorError(.timeout, "simulated sensor did not answer (fault_rate \(options.faultRate))"))
            }
            if quantity == .state {
                if state.random.nextUnit() < 0.01 { state.state = state.state == 0 ? 1 : 0 }
                return .success(SensorValue(state.state))
            }
            if quantity == .count {
                state.state += Double(Int(state.random.nextUnit() * 10))
                return .success(SensorValue(state.state))
            }
            let profile = options.profile
            if let last = state.lastWalkUpdate {
                let hours = max(0, time - last) / 3600
                state.walk += state.random.nextGaussian() * profile.walk * hours.squareRoot()
                // Mean reversion keeps the walk within a few standard deviations over weeks.
                state.walk *= max(0, 1 - hours / 12)
            }
            state.lastWalkUpdate = time
            let periodSeconds = Double(options.period.components.seconds)
            let phase = 2 * Double.pi * time.truncatingRemainder(dividingBy: periodSeconds) / periodSeconds
            let value = profile.base + profile.amplitude * sin(phase) + state.walk + state.random.nextGaussian() * profile.noise
            let range = quantity.plausibleRange
            return .success(SensorValue(min(max(value, range.lowerBound), range.upperBound)))
        }
        return try outcome.get()
    }
}
