import FarmgateWire
import Metrics
import PostgresNIO
import Synchronization

/// Group commit: concurrent ``PostgresIngestStore/store(_:for:receivedAt:)`` calls (many devices at once) share
/// transactions, so that the cost of a commit (a WAL flush) and of a transaction's round trips is paid once per group,
/// not once per batch.
///
/// A call queues its batch and waits. While fewer than ``Limits/concurrency`` groups run, a new worker starts at once
/// and takes what is queued (at most ``Limits/maximumBatches`` batches and ``Limits/maximumReadings`` readings), so an
/// idle store adds no wait; under load the batches that arrive while groups run are gathered into the next ones. Every
/// caller is answered only after its group's `COMMIT` (or with the group's error: then nothing of it was stored).
///
/// A batch that fails on its own (its device deleted meanwhile, data the server refuses) must not fail the others: the
/// group is rolled back and written again without it (``PostgresBatchWriter/MemberFailure``); a refusal that a bulk
/// statement cannot attribute to one batch is retried one batch per transaction. A failure of the connection, the
/// server or a timeout fails the whole group: each of its callers gets the error, and their sites send again.
///
/// A caller that is cancelled (its request's `query_timeout`) is answered at once with `CancellationError`: it leaves
/// the queue, or, when its group already runs, its answer is no longer waited for (the group may still commit it; the
/// site, not acknowledged, sends again and gets duplicates). So no caller waits past its deadline for a transaction that
/// hangs (a connection that died without the client noticing).
final class PostgresGroupCommit: Sendable {
    struct Limits: Sendable {
        /// The most batches in one transaction.
        var maximumBatches = 64
        /// The most readings in one transaction (a group stops before a batch that would pass it, but always takes one).
        var maximumReadings = 64_000
        /// The most group transactions at once (each holds one pooled connection while it runs).
        var concurrency = 4
    }

    typealias Member = PostgresBatchWriter.Member
    /// Writes one group in one transaction and commits it; returns one result per member.
    typealias Commit = @Sendable ([Member]) async throws -> [Result<StoreOutcome, any Error>]

    private struct Waiter {
        var id: UInt64
        var member: Member
        var commit: Commit
    }

    private struct State {
        var queue: [Waiter] = []
        /// The callers not answered yet, queued or in a running group.
        var owed: [UInt64: CheckedContinuation<StoreOutcome, any Error>] = [:]
        var running = 0
        var nextID: UInt64 = 0
        var groups = 0
    }

    let limits: Limits
    private let state = Mutex(State())
    private let groupBatches = Recorder(label: "farmgate_ingest_group_commit_batches")
    private let groupsCommitted = Counter(label: "farmgate_ingest_group_commits_total")

    init(limits: Limits) {
        self.limits = limits
    }

    /// How many group transactions ran (for tests).
    var groupCount: Int { state.withLock { $0.groups } }

    /// How many batches wait for a group (for tests).
    var queuedCount: Int { state.withLock { $0.queue.count } }

    /// Queues `member` and returns its outcome once its group committed.
    ///
    /// - Parameter commit: how a group is written and committed (the same function for every call on one instance; it
    ///   is passed here rather than kept, so that the committer holds no reference to the store that owns it).
    func submit(_ member: Member, commit: @escaping Commit) async throws -> StoreOutcome {
        let id = state.withLock { state in
            state.nextID += 1
            return state.nextID
        }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<StoreOutcome, any Error>) in
                // Under the lock: a cancellation handler that ran before this saw nothing to remove, but the task's
                // cancelled flag was set before it ran.
                let start = state.withLock { state -> Bool? in
                    if Task.isCancelled { return nil }
                    state.queue.append(Waiter(id: id, member: member, commit: commit))
                    state.owed[id] = continuation
                    guard state.running < limits.concurrency else { return false }
                    state.running += 1
                    return true
                }
                switch start {
                case nil: continuation.resume(throwing: CancellationError())
                case true?: Task { await self.drain() }
                case false?: break
                }
            }
        } onCancel: {
            state.withLock { state in state.queue.removeAll { $0.id == id } }
            answer(id, with: .failure(CancellationError()))
        }
    }

    /// Resumes the caller `id` unless it was answered already.
    private func answer(_ id: UInt64, with result: Result<StoreOutcome, any Error>) {
        let continuation = state.withLock { $0.owed.removeValue(forKey: id) }
        continuation?.resume(with: result)
    }

    /// One worker: takes groups from the queue until it is empty.
    private func drain() async {
        while let group = takeGroup() {
            groupBatches.record(group.count)
            await run(group)
            groupsCommitted.increment()
        }
    }

    private func takeGroup() -> [Waiter]? {
        state.withLock { state in
            guard !state.queue.isEmpty else {
                state.running -= 1
                return nil
            }
            var readings = 0
            var count = 0
            for waiter in state.queue {
                guard count < limits.maximumBatches else { break }
                let size = waiter.member.batch.readings.count
                if count > 0 && readings + size > limits.maximumReadings { break }
                readings += size
                count += 1
            }
            let group = Array(state.queue.prefix(count))
            state.queue.removeFirst(count)
            state.groups += 1
            return group
        }
    }

    /// Commits `group`, leaving out batches that fail on their own, and answers every caller.
    private func run(_ group: [Waiter]) async {
        var remaining = group
        while let commit = remaining.first?.commit {
            do {
                let results = try await commit(remaining.map(\.member))
                for (waiter, result) in zip(remaining, results) { answer(waiter.id, with: result) }
                return
            } catch let failure as PostgresBatchWriter.MemberFailure where remaining.indices.contains(failure.index) {
                answer(remaining.remove(at: failure.index).id, with: .failure(failure.error))
            } catch let error as PSQLError where PostgresBatchWriter.isCausedByData(error) && remaining.count > 1 {
                // Refused by a statement of the whole group: find the batch by writing each alone.
                for waiter in remaining { await run([waiter]) }
                return
            } catch {
                for waiter in remaining { answer(waiter.id, with: .failure(error)) }
                return
            }
        }
    }
}
