import FarmgateWire
import Logging
import PostgresNIO

/// The notification a PostgreSQL write transaction sends for its device, so that every instance's ``LatestCache`` hears
/// of commits made elsewhere (``PostgresLatestListener``).
///
/// Sent with `pg_notify` inside the write transaction: PostgreSQL delivers it when, and only if, the transaction commits,
/// to sessions listening then; the rows it announces are visible to any query those sessions start after receiving it.
/// One per committed batch that stored something, whatever its size. The payload is `FARM_ID DEVICE_ROW_ID DEVICE_NAME`
/// (identifiers hold no space). Works behind PgBouncer in transaction mode (a notification is part of the transaction);
/// the listener's own connection must not go through it (see ``PostgresLatestListener``).
enum PostgresLatestNotice {
    /// The channel every instance listens on.
    static let channel = "farmgate_latest"

    /// Queues one notification per device of `devices` (each once) in the transaction running on `connection`: one
    /// statement for a whole group commit.
    static func send(on connection: PostgresConnection, devices: [DeviceIdentity], logger: Logger) async throws {
        var seen = Set<Int64>()
        let payloads = devices.filter { seen.insert($0.rowID).inserted }.map(payload)
        guard !payloads.isEmpty else { return }
        try await connection.query("SELECT pg_notify(\(channel), p) FROM unnest(\(payloads)::text[]) AS u(p)", logger: logger)
    }

    static func payload(_ device: DeviceIdentity) -> String {
        "\(device.farmID) \(device.rowID) \(device.device.rawValue)"
    }

    /// The device a payload names, or nil when it is not one ``payload(_:)`` wrote.
    static func parse(_ payload: String) -> (farmID: Int64, deviceRowID: Int64, device: DeviceID)? {
        let parts = payload.split(separator: " ", omittingEmptySubsequences: false)
        guard parts.count == 3, let farmID = Int64(parts[0]), let rowID = Int64(parts[1]), let device = try? DeviceID(String(parts[2])) else {
            return nil
        }
        return (farmID, rowID, device)
    }
}
