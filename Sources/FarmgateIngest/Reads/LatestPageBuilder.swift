import FarmgateWire
import Foundation
import NIOCore

/// Encodes `latest` answers: `{"farm": NAME, "sensors": [ITEM, ...], "next": CURSOR or null}`, the items in (device,
/// sensor) byte order, each `{"device", "sensor", "quantity", "unit", "sequence", "timestamp", "value", "flags"}`.
///
/// Items are encoded by hand, once per reading (identifiers are plain ASCII by construction, see ``SensorID``; units and
/// flag names are constants), and pages are their concatenation.
enum LatestPageBuilder {
    /// One reading as an item of `sensors`.
    static func json(_ reading: LatestReading) -> [UInt8] {
        var w = JSONWriter(capacity: 192)
        w.raw(#"{"device":"#)
        w.string(reading.device.rawValue)
        w.raw(#","sensor":"#)
        w.string(reading.sensor.rawValue)
        w.raw(#","quantity":"#)
        w.string(reading.quantity.rawValue)
        w.raw(#","unit":"#)
        w.string(reading.quantity.unit)
        w.raw(#","sequence":"#)
        w.number(reading.sequence)
        w.raw(#","timestamp":"#)
        w.timestamp(reading.timestamp)
        // Finite by validation; Swift's shortest round-trip form is valid JSON ("6.5", "1e-05").
        w.raw(#","value":"#)
        w.number(reading.value)
        w.raw(#","flags":["#)
        for (index, name) in flagNames(reading.quality).enumerated() {
            if index > 0 { w.raw(",") }
            w.string(name)
        }
        w.raw("]}")
        return w.bytes
    }

    /// The page `selection` asks for, from `farm` (whose sort orders and cached device answers it fills in).
    static func page(of farm: inout LatestCache.Farm, farm name: String, selection: LatestSelection) -> ByteBuffer {
        // The hot path: one device's whole answer, kept encoded until the device changes.
        if let id = selection.device, selection.isUnfiltered, selection.after == nil, let device = farm.devices[id],
            device.sensors.count <= selection.limit
        {
            if let answer = device.answer { return answer }
            var answer = ByteBuffer()
            let items = sensorOrder(of: id, in: &farm).compactMap { farm.devices[id]?.sensors[$0]?.json }
            write(farm: name, items: items, next: nil, into: &answer)
            farm.devices[id]?.answer = answer
            return answer
        }
        let devices: [DeviceID]
        if let id = selection.device {
            devices = farm.devices[id] == nil ? [] : [id]
        } else {
            if farm.order == nil { farm.order = farm.devices.keys.sorted() }
            devices = farm.order ?? []
        }
        var items: [[UInt8]] = []
        var last: LatestCursor?
        var more = false
        // Start at the cursor by binary search: a page deep into a 10,000-sensor farm must not walk the ones before it.
        let first = selection.after.map { after in firstIndex(in: devices) { !($0 < after.device) } } ?? 0
        scan: for id in devices[first...] {
            let order = sensorOrder(of: id, in: &farm)
            guard let device = farm.devices[id] else { continue }
            var start = 0
            if let after = selection.after, id == after.device { start = firstIndex(in: order) { after.sensor < $0 } }
            for sensor in order[start...] {
                guard let entry = device.sensors[sensor], selection.includes(entry.reading) else { continue }
                if items.count == selection.limit {
                    more = true
                    break scan
                }
                items.append(entry.json)
                last = LatestCursor(device: id, sensor: sensor)
            }
        }
        var buffer = ByteBuffer()
        write(farm: name, items: items, next: more ? last : nil, into: &buffer)
        return buffer
    }

    /// The index of the first element of sorted `elements` for which `isAtOrAfter` holds (`elements.count` if none).
    private static func firstIndex<T>(in elements: [T], where isAtOrAfter: (T) -> Bool) -> Int {
        var (low, high) = (0, elements.count)
        while low < high {
            let middle = (low + high) / 2
            if isAtOrAfter(elements[middle]) { high = middle } else { low = middle + 1 }
        }
        return low
    }

    private static func sensorOrder(of id: DeviceID, in farm: inout LatestCache.Farm) -> [SensorID] {
        if let order = farm.devices[id]?.order { return order }
        let order = farm.devices[id]?.sensors.keys.sorted() ?? []
        farm.devices[id]?.order = order
        return order
    }

    private static func write(farm: String, items: [[UInt8]], next: LatestCursor?, into buffer: inout ByteBuffer) {
        buffer.reserveCapacity(items.reduce(64 + farm.utf8.count) { $0 + $1.count + 1 })
        buffer.writeString(#"{"farm":""#)
        buffer.writeString(farm)
        buffer.writeString(#"","sensors":["#)
        for (index, item) in items.enumerated() {
            if index > 0 { buffer.writeInteger(UInt8(ascii: ",")) }
            buffer.writeBytes(item)
        }
        buffer.writeString(#"],"next":"#)
        if let next {
            buffer.writeString("\"" + next.text + "\"")
        } else {
            buffer.writeString("null")
        }
        buffer.writeString("}")
    }
}

/// A position in a farm's `latest` listing: after this device's sensor. Opaque to clients (`next`, then `cursor=`).
public struct LatestCursor: Sendable, Hashable {
    public var device: DeviceID
    public var sensor: SensorID

    public init(device: DeviceID, sensor: SensorID) {
        self.device = device
        self.sensor = sensor
    }

    /// base64url of "2 DEVICE SENSOR CHECK" (identifiers hold no space), without padding; CHECK is the FNV-1a hash of
    /// "DEVICE SENSOR" in hex, so that a cursor edited by hand (cut short, a character changed) is refused rather than
    /// read as another position (a tester, 2026-12-07: a cursor without its last character restarted the page before).
    public var text: String {
        Data("2 \(device.rawValue) \(sensor.rawValue) \(Self.check(device, sensor))".utf8).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
    }

    private static func check(_ device: DeviceID, _ sensor: SensorID) -> String {
        String(fnv1a64("\(device.rawValue) \(sensor.rawValue)".utf8), radix: 16)
    }

    /// Parses ``text``; nil when it is not a cursor this ingest wrote.
    public init?(text: String) {
        guard text.utf8.count <= 300 else { return nil }
        var base64 = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while base64.utf8.count % 4 != 0 { base64 += "=" }
        guard let data = Data(base64Encoded: base64) else { return nil }
        let parts = String(decoding: data, as: UTF8.self).split(separator: " ", omittingEmptySubsequences: false)
        guard parts.count == 4, parts[0] == "2", let device = try? DeviceID(String(parts[1])), let sensor = try? SensorID(String(parts[2])),
            parts[3] == Self.check(device, sensor)
        else {
            return nil
        }
        self.init(device: device, sensor: sensor)
    }
}
