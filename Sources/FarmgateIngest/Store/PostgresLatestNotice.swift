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

    /// The payloads of one notification per device of `devices` (each once), which the write transaction sends with
    /// `pg_notify` (``PostgresBatchWriter``): one statement for a whole group commit.
    static func payloads(_ devices: [DeviceIdentity]) -> [String] {
        var seen = Set<Int64>()
        return devices.filter { seen.insert($0.rowID).inserted }.map(payload)
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
