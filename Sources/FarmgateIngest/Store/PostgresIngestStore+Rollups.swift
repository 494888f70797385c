import PostgresNIO

extension PostgresIngestStore {
    /// Maintains the rollups from the readings a write transaction stores for the first time, inside that transaction
    /// (so that a rollup never counts a reading that was not committed, nor misses one that was).
    ///
    /// Called once per group transaction by ``PostgresIngestStore`` with every fresh reading of the group, after the
    /// readings were written and before `COMMIT`. A throw rolls the whole group back and fails its callers. No rollups
    /// yet: this does nothing.
    func rollups(_ fresh: [CommittedReading], on connection: PostgresConnection) async throws {}
}
