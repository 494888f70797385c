import FarmgateWire
import Foundation
import Testing

@testable import FarmgateIngest

/// A receiver gets an alert's notifications in the order they were written: a newer one waits while an older one of the
/// same alert is claimed (an instance killed while sending it) or waits for its retry.
@Suite("Outbox keeps each alert's notifications in order at a receiver")
struct AlertOutboxOrderTests {
    func claim(_ store: any NotificationOutboxStore, _ claimant: String, at seconds: Int64) async throws -> [ClaimedNotification] {
        try await store.claimNotifications(
            OutboxClaimRequest(
                claimant: claimant, now: Timestamp(microseconds: testNow.microseconds + seconds * 1_000_000), claimDuration: .seconds(20),
                lookahead: .seconds(1), limit: 50, perReceiver: 50, maxAttempts: 5))
    }

    func at(_ seconds: Int64) -> Timestamp { Timestamp(microseconds: testNow.microseconds + seconds * 1_000_000) }

    @Test("a claim of a killed instance: the alert's newer notification is not sent before the older one is sent again", arguments: StoreKind.allCases)
    func newerWaitsForAClaimedOlderOne(kind: StoreKind) async throws {
        try await withOutboxStore(kind) { store in
            let receiver = try await addWebhook(store, name: "r1", url: "http://127.0.0.1:9/")
            let other = try await addWebhook(store, name: "r2", url: "http://127.0.0.1:9/")
            let fired = try #require(try await store.enqueueNotification(testNotification(1), receiverID: receiver.id, dueAt: testNow))
            // Instance A claims the firing and is killed while it sends it.
            #expect(try await claim(store, "a", at: 0).map(\.entry.id) == [fired])
            // The alert resolves; the resolved notification is written. Another alert's row, and this alert's row to
            // another receiver, are not held.
            var resolved = testNotification(1, status: .resolved)
            resolved.transitionID = 11
            let ended = try #require(try await store.enqueueNotification(resolved, receiverID: receiver.id, dueAt: at(1)))
            let unrelated = try #require(try await store.enqueueNotification(testNotification(2), receiverID: receiver.id, dueAt: at(1)))
            let elsewhere = try #require(try await store.enqueueNotification(resolved, receiverID: other.id, dueAt: at(1)))
            let claimed = try await claim(store, "b", at: 2)
            let meanwhile = claimed.map(\.entry.id)
            #expect(Set(meanwhile) == [unrelated, elsewhere], "the resolved notification went out while its firing was still being sent: \(meanwhile)")
            for row in claimed { #expect(try await store.completeNotification(id: row.entry.id, claim: row.claim, outcome: .delivered(at: at(3)))) }
            // A's claim expires: the firing goes out again first, and only once it is delivered the resolved one.
            let again = try await claim(store, "b", at: 21)
            #expect(again.map(\.entry.id) == [fired])
            #expect(try await claim(store, "b", at: 22).isEmpty)
            let firing = try #require(again.first)
            #expect(try await store.completeNotification(id: fired, claim: firing.claim, outcome: .delivered(at: at(22))))
            #expect(try await claim(store, "b", at: 23).map(\.entry.id) == [ended])
        }
    }

    @Test("an older notification waiting for its retry holds the alert's newer one; a dead one does not", arguments: StoreKind.allCases)
    func newerWaitsForAnOlderRetry(kind: StoreKind) async throws {
        try await withOutboxStore(kind) { store in
            let receiver = try await addWebhook(store, name: "r1", url: "http://127.0.0.1:9/")
            let fired = try #require(try await store.enqueueNotification(testNotification(1), receiverID: receiver.id, dueAt: testNow))
            let first = try #require(try await claim(store, "a", at: 0).first)
            // The receiver answers 500: retried in 10 s.
            #expect(try await store.completeNotification(id: fired, claim: first.claim, outcome: .retry(at: at(10), error: "HTTP 500")))
            var resolved = testNotification(1, status: .resolved)
            resolved.transitionID = 11
            let ended = try #require(try await store.enqueueNotification(resolved, receiverID: receiver.id, dueAt: at(1)))
            #expect(try await claim(store, "a", at: 2).isEmpty, "the resolved notification overtook the firing waiting for its retry")
            // The retry fails for good: the firing is dead, and the resolved one goes.
            let retried = try #require(try await claim(store, "a", at: 10).first)
            #expect(retried.entry.id == fired)
            #expect(try await store.completeNotification(id: fired, claim: retried.claim, outcome: .dead(at: at(10), error: "HTTP 404")))
            #expect(try await claim(store, "a", at: 11).map(\.entry.id) == [ended])
        }
    }
}
