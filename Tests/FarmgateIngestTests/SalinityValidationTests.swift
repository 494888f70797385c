import FarmgateWire
import Testing

@testable import FarmgateIngest

@Suite("Ingest ranges for salinity and specific gravity")
struct SalinityValidationTests {
    @Test("Plausible values are kept; values no probe reads are rejected out_of_range with the unit")
    func ranges() throws {
        let salinity = try sensorID("tank1.salinity")
        let gravity = try sensorID("tank1.sg")
        let batch = Batch(
            device: try deviceID("d1"),
            sensors: [SensorDescriptor(id: salinity, quantity: .salinity), SensorDescriptor(id: gravity, quantity: .specificGravity)],
            readings: [
                Reading(sensor: salinity, sequence: 1, timestamp: testNow, value: 0.72),
                Reading(sensor: salinity, sequence: 2, timestamp: testNow, value: 350),
                Reading(sensor: gravity, sequence: 3, timestamp: testNow, value: 1.024),
                Reading(sensor: gravity, sequence: 4, timestamp: testNow, value: 0),
                Reading(sensor: salinity, sequence: 5, timestamp: testNow, value: -1),
            ])
        let (valid, rejected) = ReadingValidator(futureTolerance: .seconds(600)).validate(batch, now: testNow)
        #expect(valid.readings.map(\.sequence) == [1, 3])
        #expect(rejected.map(\.sequence) == [2, 4, 5])
        #expect(rejected.allSatisfy { $0.code == "out_of_range" })
        #expect(rejected.first?.message.contains("PSU is outside the plausible range 0.0...300.0 for salinity") == true, "\(rejected)")
        #expect(rejected.dropFirst().first?.message.contains("for specific_gravity") == true)
    }
    // A tester, 2026-12-07: 9007199254740993 (2^53 + 1) reads as the double 2^53, which was in range, and was stored as
    // that other number.
    @Test("A count is refused from 2^53 on, where integers stop being doubles of their own, however it is written")
    func countsPastDoublePrecision() throws {
        for (written, kept) in [("9007199254740991", true), ("9007199254740992", false), ("9007199254740993", false), ("9007199254740992.6", false)] {
            let json = """
                {"device": "d1", "sensors": [{"id": "pulses", "quantity": "count"}],
                 "readings": [{"sensor": "pulses", "seq": 1, "ts": "\(RFC3339.format(testNow))", "value": \(written)}]}
                """
            let decoded = try BatchJSON.decode(Array(json.utf8))
            let (valid, rejected) = ReadingValidator(futureTolerance: .seconds(600)).validate(decoded.batch, now: testNow)
            let codes = (decoded.rejected + rejected).map(\.code)
            #expect(valid.readings.count == (kept ? 1 : 0), "\(written)")
            #expect(codes == (kept ? [] : ["out_of_range"]), "\(written): \(codes)")
        }
    }
}
