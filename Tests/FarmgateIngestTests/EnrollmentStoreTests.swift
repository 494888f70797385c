import FarmgateWire
import Testing

@testable import FarmgateIngest

/// What enrollment relies on from a store (``EnrollmentStore``), on SQLite and PostgreSQL alike.
@Suite struct EnrollmentStoreTests {
    static let hour: Int64 = 3_600_000_000

    /// Farm `f1` and a token for `device` valid for an hour from ``testNow``.
    static func token(in store: any IngestStore, device: String = "site-1", keyID: String = "tok00001") async throws -> EnrollmentTokenRecord {
        if try await store.farm(named: "f1") == nil { _ = try await store.createFarm(name: "f1", createdAt: testNow) }
        let enrollment = try #require(store as? any EnrollmentStore)
        return try await enrollment.createEnrollmentToken(
            farm: "f1", device: try deviceID(device), keyID: keyID, secretHash: Array(repeating: 3, count: 32), createdAt: testNow,
            expiresAt: Timestamp(microseconds: testNow.microseconds + hour))
    }

    static func redeem(
        _ store: any IngestStore, _ record: EnrollmentTokenRecord, keyID: String, at: Timestamp = testNow, client: String = "192.0.2.7"
    ) async throws -> EnrollmentRedemption {
        let enrollment = try #require(store as? any EnrollmentStore)
        return try await enrollment.redeemEnrollmentToken(
            rowID: record.rowID, farmID: record.farmID, device: record.device, deviceKeyID: keyID, deviceSecretHash: Array(repeating: 9, count: 32),
            sealedKey: [1, 2, 3], client: client, at: at)
    }

    @Test(arguments: StoreKind.allCases)
    func keepsTokensByIDWithOnlyTheirHash(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let enrollment = try #require(store as? any EnrollmentStore)
            await #expect(throws: IngestStoreError.notFound("farm 'nowhere'")) {
                try await enrollment.createEnrollmentToken(
                    farm: "nowhere", device: try deviceID("d"), keyID: "tok0000x", secretHash: [1], createdAt: testNow, expiresAt: testNow)
            }
            let created = try await Self.token(in: store)
            let found = try #require(try await enrollment.enrollmentToken(keyID: "tok00001"))
            #expect(found == created)
            #expect(found.farm == "f1" && found.device.rawValue == "site-1" && found.usedAt == nil && found.sealedKey == nil)
            #expect(found.expiresAt.microseconds == testNow.microseconds + Self.hour)
            #expect(try await enrollment.enrollmentToken(keyID: "unknown1") == nil)
            await #expect(throws: IngestStoreError.self) { _ = try await Self.token(in: store, device: "other", keyID: "tok00001") }
        }
    }

    @Test(arguments: StoreKind.allCases)
    func firstExchangeCreatesTheDeviceALaterTokenRotatesItsKey(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let first = try await Self.token(in: store)
            guard case .redeemed(let identity, .created) = try await Self.redeem(store, first, keyID: "devkey01") else {
                Issue.record("the first exchange did not create the device")
                return
            }
            #expect(identity.device.rawValue == "site-1" && identity.farm == "f1")
            #expect(try await store.deviceCredential(keyID: "devkey01")?.identity == identity)
            _ = try await store.store(try phBatch(device: "site-1", sequences: 1...5), for: identity, receivedAt: testNow)
            try await store.revokeDevice(farm: "f1", device: identity.device, revokedAt: testNow)

            let used = try #require(try await (store as? any EnrollmentStore)?.enrollmentToken(keyID: "tok00001"))
            #expect(used.usedAt == testNow && used.usedBy == "192.0.2.7" && used.action == .created && used.sealedKey == [1, 2, 3])

            let second = try await Self.token(in: store, keyID: "tok00002")
            guard case .redeemed(let again, .rotated) = try await Self.redeem(store, second, keyID: "devkey02") else {
                Issue.record("a token for an existing device did not rotate its key")
                return
            }
            #expect(again.rowID == identity.rowID, "the same device, never a second one")
            #expect(try await store.deviceCredential(keyID: "devkey01") == nil, "the old key stops working")
            let credential = try #require(try await store.deviceCredential(keyID: "devkey02"))
            #expect(!credential.revoked, "a revocation is lifted")
            #expect(try await store.highestSequence(device: again) == 5, "readings are kept")
            let farm = try #require(try await store.farm(named: "f1"))
            #expect(try await store.devices(farmID: farm.id).count == 1)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func aTokenIsRedeemedOnceAndNeverAfterItExpires(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let record = try await Self.token(in: store)
            #expect(try await Self.redeem(store, record, keyID: "devkey01") != .notRedeemable)
            #expect(try await Self.redeem(store, record, keyID: "devkey02") == .notRedeemable)
            #expect(try await store.deviceCredential(keyID: "devkey02") == nil)

            let late = try await Self.token(in: store, device: "site-2", keyID: "tok00002")
            let afterExpiry = Timestamp(microseconds: testNow.microseconds + Self.hour)
            #expect(try await Self.redeem(store, late, keyID: "devkey03", at: afterExpiry) == .notRedeemable)
            #expect(try await store.deviceCredential(keyID: "devkey03") == nil, "no device for an expired token")
            #expect(try await (store as? any EnrollmentStore)?.enrollmentToken(keyID: "tok00002")?.usedAt == nil)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func concurrentExchangesOfOneTokenYieldOneDevice(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let record = try await Self.token(in: store)
            let outcomes = try await withThrowingTaskGroup(of: EnrollmentRedemption.self) { group in
                for index in 0..<8 { group.addTask { try await Self.redeem(store, record, keyID: "devkey0\(index)") } }
                return try await group.reduce(into: [EnrollmentRedemption]()) { $0.append($1) }
            }
            #expect(outcomes.filter { $0 != .notRedeemable }.count == 1)
            let farm = try #require(try await store.farm(named: "f1"))
            #expect(try await store.devices(farmID: farm.id).count == 1)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func aTakenKeyIDLeavesTheTokenUnused(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            _ = try await StoreConformanceTests.device(in: store, name: "d1")  // key id "kd1"
            let record = try await Self.token(in: store)
            await #expect(throws: IngestStoreError.alreadyExists("API key id 'kd1'")) {
                _ = try await Self.redeem(store, record, keyID: "kd1")
            }
            #expect(try await (store as? any EnrollmentStore)?.enrollmentToken(keyID: "tok00001")?.usedAt == nil)
            #expect(try await Self.redeem(store, record, keyID: "devkey01") != .notRedeemable, "the token still works")
        }
    }

    @Test(arguments: StoreKind.allCases)
    func sealedKeysAreForgottenAfterTheGraceWindow(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let enrollment = try #require(store as? any EnrollmentStore)
            let record = try await Self.token(in: store)
            _ = try await Self.redeem(store, record, keyID: "devkey01")
            #expect(try await enrollment.forgetSealedEnrollmentKeys(usedBefore: testNow) == 0)
            #expect(try await enrollment.forgetSealedEnrollmentKeys(usedBefore: Timestamp(microseconds: testNow.microseconds + 1)) == 1)
            let after = try #require(try await enrollment.enrollmentToken(keyID: "tok00001"))
            #expect(after.sealedKey == nil && after.usedAt == testNow && after.action == .created)
        }
    }
}
