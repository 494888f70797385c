import Testing

@testable import FarmgateWire

/// `salinity` and `specific_gravity`, the EZO-EC circuit's `S` and `SG` outputs, in both wire forms.
@Suite("Salinity and specific gravity on the wire")
struct SalinityQuantityTests {
    static func batch() throws -> Batch {
        let salinity = try SensorID("tank1.salinity")
        let gravity = try SensorID("tank1.sg")
        return Batch(
            device: try DeviceID("greenhouse-2"),
            sensors: [SensorDescriptor(id: salinity, quantity: .salinity), SensorDescriptor(id: gravity, quantity: .specificGravity)],
            readings: [
                Reading(sensor: salinity, sequence: 1, timestamp: Timestamp(microseconds: 1_795_428_000_000_000), value: 0.72),
                Reading(sensor: gravity, sequence: 2, timestamp: Timestamp(microseconds: 1_795_428_000_001_000), value: 1.024),
                Reading(sensor: salinity, sequence: 3, timestamp: Timestamp(microseconds: 1_795_428_010_000_000), value: 41.99),
            ])
    }

    @Test("Names, units, default resolutions, wire codes and physical ranges")
    func properties() {
        #expect(Quantity(rawValue: "salinity") == .salinity)
        #expect(Quantity(rawValue: "specific_gravity") == .specificGravity)
        #expect(Quantity.salinity.unit == "PSU" && Quantity.specificGravity.unit == "SG")
        #expect(Quantity.salinity.defaultResolution == .hundredth)
        #expect(Quantity.specificGravity.defaultResolution == .thousandth)
        #expect(Quantity(code: 12) == .salinity && Quantity(code: 13) == .specificGravity)
        #expect(Set(Quantity.allCases.map(\.code)).count == Quantity.allCases.count, "wire codes are unique")
        #expect(Quantity.salinity.plausibleRange.contains(42) && !Quantity.salinity.plausibleRange.contains(-0.01))
        #expect(Quantity.specificGravity.plausibleRange.contains(1.3) && !Quantity.specificGravity.plausibleRange.contains(0.5))
    }

    @Test("The binary codec carries them exactly at their resolutions")
    func binary() throws {
        let batch = try Self.batch()
        let decoded = try BatchCodec.decode(try BatchCodec.encode(batch))
        #expect(decoded.sensors == batch.sensors)
        #expect(decoded.readings == batch.readings)
    }

    @Test("The JSON form names them and carries them exactly")
    func json() throws {
        let batch = try Self.batch()
        let bytes = BatchJSON.encode(batch)
        let text = String(decoding: bytes, as: UTF8.self)
        #expect(text.contains("\"quantity\":\"salinity\"") && text.contains("\"quantity\":\"specific_gravity\""), "\(text)")
        let decoded = try BatchJSON.decode(bytes)
        #expect(decoded.rejected.isEmpty)
        #expect(decoded.batch.sensors == batch.sensors)
        #expect(decoded.batch.readings == batch.readings)
    }

    /// What an ingest does with a quantity it does not know (an older ingest with these two): the whole request is
    /// refused as malformed, naming the quantity, in both forms.
    @Test("A quantity the decoder does not know refuses the batch, naming it")
    func unknownQuantity() throws {
        do {
            _ = try BatchJSON.decode(Array(#"{"device":"d","sensors":[{"id":"a","quantity":"brix"}],"readings":[]}"#.utf8))
            Issue.record("an unknown quantity was accepted")
        } catch {
            #expect(error.description.contains("unknown quantity 'brix'"), "\(error)")
        }
        #expect(Quantity(code: 14) == nil)
    }

    @Test("A binary batch with a quantity code the decoder does not know is refused naming the sensor and what to do")
    func unknownQuantityCode() throws {
        // Two batches that differ only in the quantity byte (both at 1/10, the default of neither): the differing byte is the quantity's.
        func body(_ quantity: Quantity) throws -> [UInt8] {
            let id = try SensorID("tank1.salinity")
            let batch = Batch(
                device: try DeviceID("d"), sensors: [SensorDescriptor(id: id, quantity: quantity, resolution: .tenth)],
                readings: [Reading(sensor: id, sequence: 1, timestamp: Timestamp(microseconds: 1_795_428_000_000_000), value: 1.1)])
            return try BatchCodec.encode(batch, compressionLevel: 3, compressed: false)
        }
        let salinity = try body(.salinity)
        let gravity = try body(.specificGravity)
        let differing = zip(salinity.indices, zip(salinity, gravity)).filter { $0.1.0 != $0.1.1 }.map(\.0)
        #expect(salinity.count == gravity.count && differing.count == 1)
        let position = try #require(differing.first)
        #expect(salinity[position] == 12 && gravity[position] == 13)
        var patched = salinity
        patched[position] = 200
        do {
            _ = try BatchCodec.decode(patched)
            Issue.record("an unknown quantity code was accepted")
        } catch {
            #expect(
                error.description.contains("sensor 'tank1.salinity' has quantity code 200, which this ingest does not know (known: 1-13); upgrade the ingest"),
                "\(error)")
        }
    }
}
