import FarmgateWire
import Hummingbird
import Logging

extension BatchController {
    /// `GET /v1/device` (``IngestProtocol/deviceStatePath``) with the device key: what the ingest holds for the calling
    /// device (``DeviceState``). The agent asks at start and after a `sequence_conflict`, and numbers new readings above
    /// `highest_sequence`, so that a site whose buffer was lost never reuses a sequence the ingest already holds.
    /// Authenticated exactly like a batch (a revoked key is 401 `revoked`; failed attempts count against the address).
    func deviceState(_ request: Request, client: ClientAddress) async throws(APIError) -> Response {
        let device = try await gate.device(request, client: client)
        try ReadController.checkParameters(request.uri.queryParameters, known: [])
        let highest: UInt64?
        do {
            highest = try await store.highestSequence(device: device)
        } catch {
            logger.storeFailure("store failed to read a device's highest sequence", level: .warning, error: error, metadata: ["device.id": "\(device.device)"])
            throw APIError.unavailable(error)
        }
        return jsonResponse(DeviceState(device: device.device.rawValue, highestSequence: highest, acceptedVersions: acceptedVersions.map(Int.init)))
    }
}
