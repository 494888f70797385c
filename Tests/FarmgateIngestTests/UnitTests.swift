import FarmgateWire
import Testing

@testable import FarmgateIngest

@Suite("Token bucket and validator")
struct UnitTests {
    @Test("a bucket allows its burst, then one request per 1/rate seconds")
    func tokenBucket() {
        let start = ContinuousClock.now
        var bucket = TokenBucket(rate: 2, capacity: 3, now: start)
        for _ in 0..<3 { #expect(bucket.take(now: start) == .allowed) }
        #expect(bucket.take(now: start) == .limited(retryAfter: .milliseconds(500)))
        // Half a token later: still limited, for the other half.
        #expect(bucket.take(now: start + .milliseconds(250)) == .limited(retryAfter: .milliseconds(250)))
        #expect(bucket.take(now: start + .milliseconds(500)) == .allowed)
        #expect(bucket.take(now: start + .milliseconds(500)) == .limited(retryAfter: .milliseconds(500)))
        // A long pause refills only up to the capacity.
        let later = start + .seconds(60)
        #expect(bucket.isFull(now: later))
        for _ in 0..<3 { #expect(bucket.take(now: later) == .allowed) }
        #expect(bucket.take(now: later) != .allowed)
    }

    @Test("the rate limiter keeps one bucket per device")
    func rateLimiter() {
        let limiter = RateLimiter(rate: 1, burst: 1)
        let now = ContinuousClock.now
        #expect(limiter.take(device: 1, now: now) == .allowed)
        #expect(limiter.take(device: 1, now: now) != .allowed)
        #expect(limiter.take(device: 2, now: now) == .allowed)
        #expect(limiter.take(device: 1, now: now + .seconds(1)) == .allowed)
    }

    @Test("the future tolerance is inclusive and the 2000-01-01 bound exclusive")
    func validatorBounds() throws {
        let validator = ReadingValidator(futureTolerance: .seconds(600))
        let sensor = try sensorID("a")
        let edge = testNow.microseconds + 600_000_000
        let batch = Batch(
            device: try deviceID("d1"), sensors: [SensorDescriptor(id: sensor, quantity: .state)],
            readings: [
                Reading(sensor: sensor, sequence: 1, timestamp: Timestamp(microseconds: edge), value: 1),
                Reading(sensor: sensor, sequence: 2, timestamp: Timestamp(microseconds: edge + 1), value: 1),
                Reading(sensor: sensor, sequence: 3, timestamp: Timestamp.earliestPlausible, value: 0),
                Reading(sensor: sensor, sequence: 4, timestamp: Timestamp(microseconds: Timestamp.earliestPlausible.microseconds - 1), value: 0),
                Reading(sensor: sensor, sequence: 5, timestamp: testNow, value: 1.5),
                Reading(sensor: sensor, sequence: UInt64(Int64.max) + 1, timestamp: testNow, value: 1),
                // A bit the wire format does not define (a tester, 2026-12-07: stored from a binary frame as "bit15").
                Reading(sensor: sensor, sequence: 7, timestamp: testNow, value: 1, quality: QualityFlags(rawValue: 1 << 15 | 1)),
                Reading(sensor: sensor, sequence: 8, timestamp: testNow, value: 1, quality: .known),
            ])
        let (valid, rejected) = validator.validate(batch, now: testNow)
        #expect(valid.readings.map(\.sequence) == [1, 3, 8])
        #expect(rejected.map(\.code) == ["timestamp_in_future", "timestamp_implausible", "out_of_range", "invalid_sequence", "invalid_reading"])
        #expect(rejected.last?.message.hasPrefix("quality flags 0x8000 are not defined by the wire format") == true)
        #expect(Timestamp.earliestPlausible.description == "2000-01-01T00:00:00Z")
    }

    @Test("flag names follow QualityFlags.names and show unnamed bits")
    func flags() {
        #expect(flagNames([]) == [])
        #expect(flagNames([.sensorFault, .clockUnsynchronized]) == ["clock_unsynchronized", "sensor_fault"])
        #expect(flagNames(QualityFlags(rawValue: 1 << 15 | 1)) == ["clock_unsynchronized", "bit15"])
    }

    @Test("values are written in their shortest exact form")
    func values() {
        #expect(formatValue(6.42) == "6.42")
        #expect(formatValue(21) == "21")
        #expect(formatValue(-0.0625) == "-0.0625")
        #expect(formatValue(1e20) == "1e+20")
    }
}
