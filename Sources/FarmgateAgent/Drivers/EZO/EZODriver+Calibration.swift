import FarmgateWire

/// What a circuit says about its calibration: `Cal,?` and, on a pH circuit, `Slope,?`.
public struct CalibrationState: Sendable, Hashable, Codable {
    /// How many points the circuit holds (pH 0–3, EC 0–2, others 0–1); nil when it did not answer.
    public var calibratedPoints: Int?
    public var slope: CalibrationEvent.Slope?
    public var firmware: String?

    enum CodingKeys: String, CodingKey {
        case calibratedPoints = "calibrated_points"
        case slope, firmware
    }
}

/// A driver whose sensor can be calibrated through the control socket (the agent owns the port, so the CLI cannot talk
/// to the circuit itself).
public protocol CalibratableDriver: SensorDriver {
    /// The circuit, which decides the points and their order.
    var circuit: EZOCircuitKind { get }
    /// The quantity this sensor reads from the circuit (an EC circuit's `tds` output, say).
    var measuredQuantity: Quantity { get }
    /// The circuit's serial port: sensors on one port read one circuit.
    var circuitPort: String { get }
    /// Sends one calibration command (already checked by ``EZOCalibration/command(for:kind:after:)``).
    func sendCalibration(_ command: String) async throws(SensorError)
    /// Asks the circuit what it holds.
    func calibrationState() async throws(SensorError) -> CalibrationState
}

extension EZODriver: CalibratableDriver {
    public var circuit: EZOCircuitKind { kind }
    public var measuredQuantity: Quantity { quantity }
    public var circuitPort: String { line.path }

    /// A calibration point takes 1.2 s on pH and EC circuits and up to 1.3 s on DO (the datasheets' figures).
    static let calibrationTime: Duration = .milliseconds(1300)

    public func sendCalibration(_ command: String) async throws(SensorError) {
        _ = try await exchange(command, time: Self.calibrationTime, answer: nil)
    }

    public func calibrationState() async throws(SensorError) -> CalibrationState {
        let points = try await exchange("Cal,?", time: EZOCircuitKind.commandTime) { EZOCalibration.parseCalibrated($0) != nil }
        var slope: CalibrationEvent.Slope?
        if kind == .ph {
            // The slope is advice (a worn probe); a circuit that does not give it still holds its points.
            let answer = try? await exchange("Slope,?", time: EZOCircuitKind.commandTime) { EZOCalibration.parseSlope($0) != nil }
            slope = answer.flatMap(EZOCalibration.parseSlope)
        }
        return CalibrationState(calibratedPoints: points.flatMap(EZOCalibration.parseCalibrated), slope: slope, firmware: session.firmware)
    }

    /// One command on the port's thread, serialised with the sampler's reads.
    private func exchange(_ command: String, time: Duration, answer: (@Sendable (String) -> Bool)?) async throws(SensorError) -> String? {
        let session = self.session
        let outcome: Result<String?, SensorError>
        do {
            outcome = try await line.withPort { port, generation in
                try session.command(port: port, generation: generation, command, time: time, answer: answer)
            }
        } catch let error as SerialError {
            throw SensorError(error.kind == .timeout ? .timeout : .disconnected, error.message)
        } catch {
            throw SensorError(.disconnected, "\(line.path): \(error)")
        }
        return try outcome.get()
    }
}
