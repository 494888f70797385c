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
}
