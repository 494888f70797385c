import FarmgateAgent
import FarmgateSupport
import FarmgateWire
import Foundation
import Testing

@Suite("Upload backoff and Retry-After")
struct UploadBackoffTests {
    @Test func ceilingDoublesUpToTheCap() {
        var backoff = Backoff(initial: .seconds(1), maximum: .seconds(60))
        var generator = SplitMix64(seed: 1)
        var ceilings: [Duration] = []
        for _ in 0..<10 {
            ceilings.append(backoff.ceiling)
            _ = backoff.nextDelay(using: &generator)
        }
        #expect(ceilings == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60].map { Duration.seconds($0) })
        #expect(backoff.failures == 10)
        backoff.reset()
        #expect(backoff.failures == 0)
        #expect(backoff.ceiling == .seconds(1))
    }

    @Test func delaysAreFullyJitteredBelowTheCeiling() {
        var generator = SplitMix64(seed: 42)
        var delaysAtCap: [Duration] = []
        for _ in 0..<200 {
            var backoff = Backoff(initial: .milliseconds(100), maximum: .seconds(10))
            for _ in 0..<12 {
                let ceiling = backoff.ceiling
                let delay = backoff.nextDelay(using: &generator)
                #expect(delay >= .zero && delay <= ceiling)
                if ceiling == .seconds(10) { delaysAtCap.append(delay) }
            }
        }
        // Full jitter: spread over the whole range, not clustered near the ceiling.
        #expect(delaysAtCap.count > 500)
        #expect(delaysAtCap.contains { $0 < .seconds(1) })
        #expect(delaysAtCap.contains { $0 > .seconds(9) })
        let mean = delaysAtCap.map { Double($0.components.seconds) + Double($0.components.attoseconds) / 1e18 }.reduce(0, +)
            / Double(delaysAtCap.count)
        #expect(mean > 4 && mean < 6)
    }

    @Test func manyFailuresDoNotOverflow() {
        var backoff = Backoff(initial: .seconds(1), maximum: .seconds(300))
        for _ in 0..<5000 { backoff.recordFailure() }
        #expect(backoff.ceiling == .seconds(300))
        #expect(backoff.nextDelay() <= .seconds(300))
    }

    @Test func retryAfterInSeconds() {
        #expect(RetryAfter.delay("120") == .seconds(120))
        #expect(RetryAfter.delay(" 0 ") == .zero)
        #expect(RetryAfter.delay("99999999999999999999999") != nil)
        // Leading zeros are not digits of the value: cutting the text to 12 characters once read 0 here.
        #expect(RetryAfter.delay("000000000000005") == .seconds(5))
        #expect(RetryAfter.delay("0000000000000000000000000000120") == .seconds(120))
        // Too many digits saturate: a wait longer than any cap, never a short one.
        #expect(RetryAfter.delay("99999999999999999999999") == .seconds(Int64.max))
        #expect(RetryAfter.delay("10000000000000") == .seconds(10_000_000_000_000))
        #expect(RetryAfter.delay("-5") == nil)
        #expect(RetryAfter.delay("1.5") == nil)
        #expect(RetryAfter.delay("") == nil)
        #expect(RetryAfter.delay("soon") == nil)
    }

    @Test func retryAfterAsHTTPDateInEveryForm() throws {
        let now = Timestamp(microseconds: 784_111_747_000_000)  // Sun, 06 Nov 1994 08:49:07 GMT
        #expect(RetryAfter.delay("Sun, 06 Nov 1994 08:49:37 GMT", now: now) == .seconds(30))
        #expect(RetryAfter.delay("Sunday, 06-Nov-94 08:49:37 GMT", now: now) == .seconds(30))
        #expect(RetryAfter.delay("Sun Nov  6 08:49:37 1994", now: now) == .seconds(30))
        #expect(RetryAfter.delay("Sun, 06 Nov 1994 08:00:00 GMT", now: now) == .zero)
        #expect(RetryAfter.delay("Sun, 06 Foo 1994 08:49:37 GMT", now: now) == nil)
        #expect(RetryAfter.delay("Sun, 06 Nov 1994 25:49:37 GMT", now: now) == nil)
        #expect(RetryAfter.delay("Sun, 06 Nov 1994 08:49 GMT", now: now) == nil)
        #expect(RetryAfter.delay("Fri, 31 Dec 9999 23:59:59 GMT", now: now) == .seconds(253_402_300_799 - 784_111_747))
    }

    @Test func retryAfterDateIsMeasuredAgainstTheResponsesDate() {
        // The agent's clock is years ahead (no RTC, no NTP yet): the answer's Date header is the ingest's "now".
        let agentNow = Timestamp(microseconds: 1_900_000_000_000_000)
        let retry = "Sun, 06 Nov 1994 08:49:37 GMT"
        #expect(RetryAfter.delay(retry, now: agentNow, responseDate: "Sun, 06 Nov 1994 08:49:07 GMT") == .seconds(30))
        #expect(RetryAfter.delay(retry, now: agentNow, responseDate: "Sunday, 06-Nov-94 08:49:07 GMT") == .seconds(30))
        // Without a readable Date header, the agent's clock is all there is.
        #expect(RetryAfter.delay(retry, now: agentNow, responseDate: "yesterday") == .zero)
        #expect(RetryAfter.delay(retry, now: agentNow, responseDate: nil) == .zero)
        // Delta-seconds need no clock at all.
        #expect(RetryAfter.delay("7", now: agentNow, responseDate: "Sun, 06 Nov 1994 08:49:07 GMT") == .seconds(7))
    }
}
