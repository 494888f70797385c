import FarmgateSupport
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

/// Listing and revoking tokens (`enroll-token list`, `enroll-token revoke`), on SQLite and PostgreSQL alike.
@Suite struct EnrollmentTokenRevocationStoreTests {
    typealias Support = EnrollmentStoreTests

    static func at(hours: Int64) -> Timestamp { Timestamp(microseconds: testNow.microseconds + hours * Support.hour) }

    @Test(arguments: StoreKind.allCases)
    func listsUsableTokensByDefaultAndEveryTokenOnRequest(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let enrollment = try #require(store as? any EnrollmentStore)
            #expect(try await enrollment.enrollmentTokens(farm: nil, usableAt: testNow).isEmpty)
            let used = try await Support.token(in: store, device: "site-1", keyID: "tok00001")
            _ = try await Support.redeem(store, used, keyID: "devkey01")
            _ = try await Support.token(in: store, device: "site-2", keyID: "tok00002")
            _ = try await Support.token(in: store, device: "site-3", keyID: "tok00003")
            _ = try await enrollment.revokeEnrollmentToken(keyID: "tok00003", at: testNow)
            _ = try await store.createFarm(name: "f2", createdAt: testNow)
            _ = try await enrollment.createEnrollmentToken(
                farm: "f2", device: try deviceID("site-4"), keyID: "tok00004", secretHash: [4], createdAt: Self.at(hours: 1),
                expiresAt: Self.at(hours: 3))

            // Usable now: the unused, unrevoked ones of every farm, newest first.
            #expect(try await enrollment.enrollmentTokens(farm: nil, usableAt: testNow).map(\.keyID) == ["tok00004", "tok00002"])
            #expect(try await enrollment.enrollmentTokens(farm: "f1", usableAt: testNow).map(\.keyID) == ["tok00002"])
            #expect(try await enrollment.enrollmentTokens(farm: "f2", usableAt: testNow).map(\.keyID) == ["tok00004"])
            // An hour later the f1 tokens have expired; f2's has not.
            #expect(try await enrollment.enrollmentTokens(farm: nil, usableAt: Self.at(hours: 1)).map(\.keyID) == ["tok00004"])

            let all = try await enrollment.enrollmentTokens(farm: "f1", usableAt: nil)
            #expect(Set(all.map(\.keyID)) == ["tok00001", "tok00002", "tok00003"])
            let states = Dictionary(uniqueKeysWithValues: all.map { ($0.keyID, $0.state(at: Self.at(hours: 1))) })
            #expect(states["tok00001"] == .used(at: testNow, by: "192.0.2.7"))
            #expect(states["tok00002"] == .expired)
            #expect(states["tok00003"] == .revoked(at: testNow))
            #expect(try await enrollment.enrollmentTokens(farm: nil, usableAt: nil).count == 4)
            let listed = try #require(all.first { $0.keyID == "tok00001" })
            #expect(listed == (try await enrollment.enrollmentToken(keyID: "tok00001")), "a listed token is the stored one")

            await #expect(throws: IngestStoreError.notFound("farm 'nowhere'")) {
                _ = try await enrollment.enrollmentTokens(farm: "nowhere", usableAt: nil)
            }
        }
    }

    @Test(arguments: StoreKind.allCases)
    func aRevokedTokenIsRefusedAndCreatesNothing(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let enrollment = try #require(store as? any EnrollmentStore)
            let record = try await Support.token(in: store, device: "site-1")
            let later = Timestamp(microseconds: testNow.microseconds + 5_000_000)
            guard case .revoked(let revoked) = try await enrollment.revokeEnrollmentToken(keyID: "tok00001", at: later) else {
                Issue.record("an unused token was not revoked")
                return
            }
            #expect(revoked.revokedAt == later && revoked.usedAt == nil && revoked.keyID == "tok00001")
            #expect(try await enrollment.enrollmentToken(keyID: "tok00001")?.revokedAt == later)

            #expect(try await Support.redeem(store, record, keyID: "devkey01", at: later) == .notRedeemable)
            #expect(try await store.deviceCredential(keyID: "devkey01") == nil, "no device key for a revoked token")
            let farm = try #require(try await store.farm(named: "f1"))
            #expect(try await store.devices(farmID: farm.id).isEmpty)
            #expect(try await enrollment.enrollmentToken(keyID: "tok00001")?.usedAt == nil)

            // Again: a no-op that says when it was revoked.
            #expect(try await enrollment.revokeEnrollmentToken(keyID: "tok00001", at: Self.at(hours: 0)) == .alreadyRevoked(revoked))
            await #expect(throws: IngestStoreError.notFound("enrollment token 'unknown1'")) {
                _ = try await enrollment.revokeEnrollmentToken(keyID: "unknown1", at: testNow)
            }
        }
    }

    @Test(arguments: StoreKind.allCases)
    func revokingAUsedTokenLeavesItsDeviceKeyAndForgetsTheSealedKey(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let enrollment = try #require(store as? any EnrollmentStore)
            let record = try await Support.token(in: store, device: "site-1")
            guard case .redeemed(let identity, _) = try await Support.redeem(store, record, keyID: "devkey01") else {
                Issue.record("the exchange failed")
                return
            }
            guard case .alreadyUsed(let used, forgotSealedKey: true) = try await enrollment.revokeEnrollmentToken(keyID: "tok00001", at: testNow)
            else {
                Issue.record("a used token was not reported as used, or its sealed key was not forgotten")
                return
            }
            #expect(used.revokedAt == nil && used.usedAt == testNow && used.sealedKey == nil && used.action == .created)
            let credential = try #require(try await store.deviceCredential(keyID: "devkey01"), "the device key keeps working")
            #expect(credential.identity == identity && !credential.revoked)
            // Again: nothing left to forget.
            #expect(try await enrollment.revokeEnrollmentToken(keyID: "tok00001", at: testNow) == .alreadyUsed(used, forgotSealedKey: false))
        }
    }

    @Test(arguments: StoreKind.allCases)
    func anExpiredTokenIsNotMarkedRevoked(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let enrollment = try #require(store as? any EnrollmentStore)
            _ = try await Support.token(in: store)
            guard case .expired(let expired) = try await enrollment.revokeEnrollmentToken(keyID: "tok00001", at: Self.at(hours: 1)) else {
                Issue.record("an expired token was not reported as expired")
                return
            }
            #expect(expired.revokedAt == nil && expired.usedAt == nil)
            #expect(try await enrollment.enrollmentToken(keyID: "tok00001")?.revokedAt == nil)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func revocationAndExchangeRacingLeaveTheTokenRevokedOrUsedNeverBoth(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let enrollment = try #require(store as? any EnrollmentStore)
            for round in 0..<6 {
                let keyID = "race000\(round)"
                let record = try await Support.token(in: store, device: "site-\(round)", keyID: keyID)
                async let redemption = Support.redeem(store, record, keyID: "devkey0\(round)")
                async let revocation = enrollment.revokeEnrollmentToken(keyID: keyID, at: testNow)
                let (redeemed, revoked) = try await (redemption, revocation)
                let stored = try #require(try await enrollment.enrollmentToken(keyID: keyID))
                if redeemed == .notRedeemable {
                    guard case .revoked = revoked else { Issue.record("round \(round): neither used nor revoked: \(revoked)"); continue }
                    #expect(stored.revokedAt != nil && stored.usedAt == nil)
                    #expect(try await store.deviceCredential(keyID: "devkey0\(round)") == nil)
                } else {
                    guard case .alreadyUsed = revoked else { Issue.record("round \(round): used and revoked: \(revoked)"); continue }
                    #expect(stored.revokedAt == nil && stored.usedAt != nil)
                    #expect(try await store.deviceCredential(keyID: "devkey0\(round)") != nil)
                }
            }
        }
    }

    @Test func sqliteMigrationKeepsTheTokensOfAnOlderStoreUsable() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path + "/ingest.sqlite"
        // The schema before revocation (migrations up to 9), with an outstanding token in it.
        try await runOffPool {
            let db = try sqliteIngestFile(at: path, migratedTo: 9)
            try db.execute(
                """
                INSERT INTO farms(id, name, created_at_us) VALUES (1, 'f1', 0);
                INSERT INTO enrollment_tokens(farm_id, device_name, key_id, secret_sha256, created_at_us, expires_at_us)
                    VALUES (1, 'site-1', 'old00001', x'03', \(testNow.microseconds), \(testNow.microseconds + Support.hour));
                """)
        }
        let store = try SQLiteIngestStore(path: path, logger: testLogger)
        defer { store.close() }
        #expect(try await store.migrate().map(\.version) == Array(10...SQLiteSchema.currentVersion))
        let listed = try await store.enrollmentTokens(farm: "f1", usableAt: testNow)
        #expect(listed.map(\.keyID) == ["old00001"] && listed.first?.revokedAt == nil)
        guard case .revoked = try await store.revokeEnrollmentToken(keyID: "old00001", at: testNow) else {
            Issue.record("a token from before the migration could not be revoked")
            return
        }
        #expect(try await store.enrollmentTokens(farm: "f1", usableAt: testNow).isEmpty)
    }

    // Before the fix (a tester, 2026-12-05) every admin command took the write lock to migrate, so `export` beside a
    // process holding a long write transaction failed after the busy timeout (exit 74).
    @Test func aCurrentSQLiteStoreMigratesWithoutTheWriteLock() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path + "/ingest.sqlite"
        let first = try SQLiteIngestStore(path: path, logger: testLogger)
        #expect(try await first.migrate().count == SQLiteSchema.currentVersion)
        first.close()
        let holder = try SQLiteConnection(path: path, mode: .readWrite, busyTimeoutMilliseconds: 100)
        try holder.execute("BEGIN IMMEDIATE")
        defer { try? holder.execute("ROLLBACK") }
        let store = try SQLiteIngestStore(path: path, busyTimeoutMilliseconds: 300, logger: testLogger)
        defer { store.close() }
        #expect(try await store.migrate().isEmpty)
        #expect(try await store.farms().isEmpty)
    }
}
