import FarmgateWire
import Hummingbird
import Logging

/// `GET /v1/farms/{farm}/devices/{device}/sensors/{sensor}/calibrations?limit=`: one sensor's calibration events, newest
/// first, for a farm's read tokens. Registered only when the store keeps calibrations (``CalibrationStore``).
struct CalibrationController: Sendable {
    let store: any IngestStore
    let calibrations: any CalibrationStore
    let gate: AuthenticationGate
    let rateLimiter: KeyedRateLimiter<String>
    let logger: Logger

    static let maxLimit = 1_000
    static let defaultLimit = 100

    struct Answer: Encodable {
        var farm: String
        var device: String
        var sensor: String
        var calibrations: [CalibrationEvent]
    }

    func addRoutes(to router: Router<IngestRequestContext>) {
        let farms = router.group("/v1/farms/{farm}").add(middleware: ReaderAuthMiddleware(gate: gate, rateLimiter: rateLimiter))
        farms.get("devices/{device}/sensors/{sensor}/calibrations") { request, context in try await self.list(request, context: context) }
    }

    func list(_ request: Request, context: IngestRequestContext) async throws -> Response {
        guard let farm = context.readerFarm else { throw APIError.unauthorized("send `Authorization: Bearer <key>` with a read token (fgr_...)") }
        let device: DeviceID
        let sensor: SensorID
        do {
            device = try DeviceID(context.parameters.decoded("device") ?? "")
            sensor = try SensorID(context.parameters.decoded("sensor") ?? "")
        } catch {
            throw APIError(.badRequest, code: "invalid_parameter", message: error.description)
        }
        try ReadController.checkParameters(request.uri.queryParameters, known: ["limit"])
        var limit = Self.defaultLimit
        if let text = request.uri.queryParameters.get("limit") {
            guard let value = Int(text), (1...Self.maxLimit).contains(value) else {
                throw APIError(
                    .badRequest, code: "invalid_parameter",
                    message: "limit '\(text.prefix(40))' must be a whole number from 1 to \(Self.maxLimit) (default \(Self.defaultLimit))")
            }
            limit = value
        }
        let identity: DeviceIdentity?
        let events: [CalibrationEvent]
        do {
            identity = try await store.devices(farmID: farm.id).first { $0.device == device }
            if let identity {
                events = try await calibrations.calibrations(deviceRowID: identity.rowID, sensor: sensor, limit: limit)
            } else {
                events = []
            }
        } catch {
            logger.storeFailure("store failed to read calibrations", error: error)
            throw APIError.unavailable()
        }
        guard identity != nil else {
            throw APIError(.notFound, code: "not_found", message: "farm '\(farm.name)' has no device '\(device)'")
        }
        return jsonResponse(Answer(farm: farm.name, device: device.rawValue, sensor: sensor.rawValue, calibrations: events))
    }
}
