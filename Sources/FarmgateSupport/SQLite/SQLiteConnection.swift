import CSQLite

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// An error from SQLite, with the statement that failed.
///
/// `description` is safe to log: it holds SQLite's message and the SQL text, never bound values.
public struct SQLiteError: Error, CustomStringConvertible, Sendable {
    /// SQLite's primary result code (`SQLITE_BUSY`, `SQLITE_CORRUPT`, ...).
    public let code: Int32
    /// SQLite's extended result code.
    public let extendedCode: Int32
    public let message: String
    public let sql: String?

    public init(code: Int32, extendedCode: Int32? = nil, message: String, sql: String? = nil) {
        self.code = code & 0xFF
        self.extendedCode = extendedCode ?? code
        self.message = message
        self.sql = sql
    }

    /// The file is not a database or is damaged.
    public var isCorruption: Bool { code == SQLITE_CORRUPT || code == SQLITE_NOTADB }
    /// The database may not be written by this process (`SQLITE_READONLY`: the file, its directory or its WAL belong to
    /// another user, or the file system is read-only).
    public var isReadOnly: Bool { code == SQLITE_READONLY }
    /// The file cannot be opened or written (permissions, a read-only file or file system).
    public var isAccessDenied: Bool { code == SQLITE_READONLY || code == SQLITE_CANTOPEN || code == SQLITE_PERM }
    /// The disk (or the database's size limit) is full.
    public var isDiskFull: Bool { code == SQLITE_FULL }
    /// A full disk found before SQLite was asked (a write that would use room kept for another).
    public static func diskFull(_ message: String) -> SQLiteError { SQLiteError(code: SQLITE_FULL, message: message) }
    /// Another connection holds a lock for longer than the busy timeout.
    public var isBusy: Bool { code == SQLITE_BUSY || code == SQLITE_LOCKED }
    /// A UNIQUE, PRIMARY KEY, CHECK or NOT NULL constraint failed.
    public var isConstraint: Bool { code == SQLITE_CONSTRAINT }

    public var description: String {
        var text = "SQLite error \(extendedCode): \(message)"
        if let sql { text += " (in: \(sql.prefix(200)))" }
        return text
    }
}

/// A value bound to or read from a statement.
public enum SQLiteValue: Sendable, Hashable {
    case null
    case integer(Int64)
    case real(Double)
    case text(String)
    case blob([UInt8])
}

/// One open `sqlite3*` handle. Not thread-safe: give it one owner, normally a ``ThreadOwned`` on a ``DedicatedThread``,
/// because every call into it may block on disk.
public final class SQLiteConnection {
    public enum Mode: Sendable {
        case readOnly
        case readWrite
        case readWriteCreate
    }

    let handle: OpaquePointer
    public let path: String
    /// How long a statement waits for another connection's lock.
    private let busyTimeoutMilliseconds: Int32
    /// The state of the busy handler ``retryBusyLockEveryMillisecond()`` installs; the handler gets it unretained, and
    /// it lives as long as the handle (closed in `deinit`, before the stored properties go).
    private var busyWait: BusyWait?

    /// Opens (and with `.readWriteCreate`, creates) the database at `path`.
    ///
    /// - Parameter busyTimeoutMilliseconds: how long a statement waits for another connection's lock before failing with
    ///   `SQLITE_BUSY` (`sqlite3_busy_timeout`: it tries again after growing sleeps, up to 100 ms; see
    ///   ``retryBusyLockEveryMillisecond()``).
    public init(path: String, mode: Mode = .readWriteCreate, busyTimeoutMilliseconds: Int32 = 5_000) throws(SQLiteError) {
        var flags: Int32 = SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_EXRESCODE
        switch mode {
        case .readOnly: flags |= SQLITE_OPEN_READONLY
        case .readWrite: flags |= SQLITE_OPEN_READWRITE
        case .readWriteCreate: flags |= SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE
        }
        var db: OpaquePointer?
        let rc = sqlite3_open_v2(path, &db, flags, nil)
        guard rc == SQLITE_OK, let db else {
            let message = db.map { String(cString: sqlite3_errmsg($0)) } ?? "cannot open"
            if let db { sqlite3_close_v2(db) }
            throw SQLiteError(code: rc, message: "\(message): \(path)")
        }
        self.handle = db
        self.path = path
        self.busyTimeoutMilliseconds = busyTimeoutMilliseconds
        sqlite3_busy_timeout(db, busyTimeoutMilliseconds)
        sqlite3_extended_result_codes(db, 1)
    }

    /// Waits for another connection's lock by trying it again every millisecond (``BusyWait``), up to the same busy
    /// timeout, instead of `sqlite3_busy_timeout`'s growing sleeps (1, 2, 5 ... 100 ms), which let another process that
    /// frees the lock only briefly between its transactions (a retention run beside the ingest's `serve`) take it again
    /// first, time after time. The ingest's store uses it; the agent's buffer keeps SQLite's own.
    public func retryBusyLockEveryMillisecond() {
        let wait = BusyWait(timeoutMilliseconds: busyTimeoutMilliseconds)
        busyWait = wait
        sqlite3_busy_handler(
            handle,
            { context, attempt in
                guard let context else { return 0 }
                return Unmanaged<BusyWait>.fromOpaque(context).takeUnretainedValue().tryAgain(attempt: attempt) ? 1 : 0
            }, Unmanaged.passUnretained(wait).toOpaque())
    }

    deinit {
        sqlite3_close_v2(handle)
    }

    func error(_ rc: Int32, sql: String?) -> SQLiteError {
        SQLiteError(code: rc, extendedCode: sqlite3_extended_errcode(handle), message: String(cString: sqlite3_errmsg(handle)), sql: sql)
    }

    /// Runs one or more statements that take no parameters and return no rows (DDL, PRAGMA, BEGIN/COMMIT).
    public func execute(_ sql: String) throws(SQLiteError) {
        var errorMessage: UnsafeMutablePointer<CChar>?
        let rc = sqlite3_exec(handle, sql, nil, nil, &errorMessage)
        if rc != SQLITE_OK {
            let message = errorMessage.map { String(cString: $0) } ?? String(cString: sqlite3_errmsg(handle))
            sqlite3_free(errorMessage)
            throw SQLiteError(code: rc, extendedCode: sqlite3_extended_errcode(handle), message: message, sql: sql)
        }
    }

    /// Compiles `sql` into a statement that can be bound and stepped many times.
    public func prepare(_ sql: String) throws(SQLiteError) -> SQLiteStatement {
        var statement: OpaquePointer?
        let rc = sqlite3_prepare_v3(handle, sql, -1, UInt32(SQLITE_PREPARE_PERSISTENT), &statement, nil)
        guard rc == SQLITE_OK, let statement else { throw error(rc, sql: sql) }
        return SQLiteStatement(connection: self, handle: statement, sql: sql)
    }

    /// Runs `sql` with `values` bound and returns every row.
    @discardableResult
    public func query(_ sql: String, _ values: [SQLiteValue] = []) throws(SQLiteError) -> [[SQLiteValue]] {
        let statement = try prepare(sql)
        try statement.bind(values)
        var rows: [[SQLiteValue]] = []
        while try statement.step() { rows.append(statement.row()) }
        return rows
    }

    /// Runs `sql` with `values` bound and returns the first column of the first row as an integer, or nil.
    public func queryInt(_ sql: String, _ values: [SQLiteValue] = []) throws(SQLiteError) -> Int64? {
        let statement = try prepare(sql)
        try statement.bind(values)
        guard try statement.step() else { return nil }
        return statement.isNull(0) ? nil : statement.int64(0)
    }

    /// Runs `body` inside `BEGIN IMMEDIATE ... COMMIT`, rolling back if it throws.
    public func transaction<T>(_ body: () throws -> T) throws -> T {
        try execute("BEGIN IMMEDIATE")
        do {
            let result = try body()
            try execute("COMMIT")
            return result
        } catch {
            try? execute("ROLLBACK")
            throw error
        }
    }

    /// Rows changed by the last INSERT, UPDATE or DELETE.
    public var changes: Int { Int(sqlite3_changes64(handle)) }

    /// The rowid of the last successful INSERT.
    public var lastInsertRowID: Int64 { sqlite3_last_insert_rowid(handle) }

    /// Runs `PRAGMA integrity_check` (or the faster `quick_check`) and returns the problems found; empty means healthy.
    public func integrityProblems(quick: Bool = true) throws(SQLiteError) -> [String] {
        let rows = try query(quick ? "PRAGMA quick_check" : "PRAGMA integrity_check")
        let messages = rows.compactMap { row -> String? in
            if case .text(let text) = row.first { return text }
            return nil
        }
        return messages == ["ok"] ? [] : messages
    }
}

/// How a connection waits for a lock another connection holds: it tries again every ``interval`` until
/// `timeoutMilliseconds` have passed since the first refusal, then gives up (`SQLITE_BUSY`).
///
/// `sqlite3_busy_timeout` sleeps 1, 2, 5, 10, ... then 100 ms between attempts. A writer that commits and begins its next
/// transaction within a millisecond (a retention run's deletes, one after another) then keeps the lock for as long as it
/// has work, and a waiter asleep for 100 ms rarely looks while it is free: an upload waited seconds beside a retention
/// run of another process. Trying every millisecond finds every pause the other writer leaves (see
/// `SQLiteIngestStore.runRetention`); an attempt costs a lock call on the WAL index. Installed by
/// ``SQLiteConnection/retryBusyLockEveryMillisecond()``.
///
/// Touched only by the connection's busy handler, on the connection's one thread.
final class BusyWait {
    /// Between two attempts.
    static let intervalMicroseconds: UInt32 = 1_000

    let timeout: Duration
    /// When the current wait began (the handler's first call for one lock request).
    var started = ContinuousClock.now

    init(timeoutMilliseconds: Int32) {
        self.timeout = .milliseconds(max(0, timeoutMilliseconds))
    }

    /// Whether to try again: `attempt` is SQLite's count of earlier calls for this lock request (0 on the first).
    func tryAgain(attempt: Int32) -> Bool {
        let now = ContinuousClock.now
        if attempt == 0 { started = now }
        guard now - started < timeout else { return false }
        usleep(Self.intervalMicroseconds)
        return true
    }
}

/// A compiled statement. Holds its connection alive; finalised in `deinit`.
public final class SQLiteStatement {
    let connection: SQLiteConnection
    let handle: OpaquePointer
    public let sql: String

    init(connection: SQLiteConnection, handle: OpaquePointer, sql: String) {
        self.connection = connection
        self.handle = handle
        self.sql = sql
    }

    deinit {
        sqlite3_finalize(handle)
    }

    /// Resets the statement and binds `values` to parameters 1...n.
    public func bind(_ values: [SQLiteValue]) throws(SQLiteError) {
        sqlite3_reset(handle)
        sqlite3_clear_bindings(handle)
        for (offset, value) in values.enumerated() {
            try bind(value, at: Int32(offset + 1))
        }
    }

    /// Binds one value to the 1-based parameter `index`.
    public func bind(_ value: SQLiteValue, at index: Int32) throws(SQLiteError) {
        let rc: Int32
        switch value {
        case .null: rc = sqlite3_bind_null(handle, index)
        case .integer(let v): rc = sqlite3_bind_int64(handle, index, v)
        case .real(let v): rc = sqlite3_bind_double(handle, index, v)
        case .text(let v):
            // With its byte count, not -1 (up to the first NUL): text holding U+0000 is bound whole, never cut short.
            rc = v.withCString { pointer in
                sqlite3_bind_text64(handle, index, pointer, sqlite3_uint64(v.utf8.count), sqliteTransient, UInt8(SQLITE_UTF8))
            }
        case .blob(let v):
            rc = v.withUnsafeBytes { raw in
                sqlite3_bind_blob64(handle, index, raw.baseAddress ?? UnsafeRawPointer(bitPattern: 1), sqlite3_uint64(raw.count), sqliteTransient)
            }
        }
        guard rc == SQLITE_OK else { throw connection.error(rc, sql: sql) }
    }

    /// Advances to the next row. Returns true when a row is available, false when the statement is done.
    public func step() throws(SQLiteError) -> Bool {
        let rc = sqlite3_step(handle)
        switch rc {
        case SQLITE_ROW: return true
        case SQLITE_DONE: return false
        default:
            sqlite3_reset(handle)
            throw connection.error(rc, sql: sql)
        }
    }

    /// Binds `values`, runs to completion and resets. For INSERT, UPDATE and DELETE.
    public func run(_ values: [SQLiteValue] = []) throws(SQLiteError) {
        try bind(values)
        while try step() {}
        sqlite3_reset(handle)
    }

    /// Resets the statement so it can be stepped again (bindings are kept).
    public func reset() { sqlite3_reset(handle) }

    public var columnCount: Int32 { sqlite3_column_count(handle) }
    public func isNull(_ column: Int32) -> Bool { sqlite3_column_type(handle, column) == SQLITE_NULL }
    public func int64(_ column: Int32) -> Int64 { sqlite3_column_int64(handle, column) }
    public func double(_ column: Int32) -> Double { sqlite3_column_double(handle, column) }

    public func text(_ column: Int32) -> String {
        guard let pointer = sqlite3_column_text(handle, column) else { return "" }
        let count = Int(sqlite3_column_bytes(handle, column))
        return String(decoding: UnsafeBufferPointer(start: pointer, count: count), as: UTF8.self)
    }

    public func blob(_ column: Int32) -> [UInt8] {
        let count = Int(sqlite3_column_bytes(handle, column))
        guard count > 0, let pointer = sqlite3_column_blob(handle, column) else { return [] }
        return Array(UnsafeRawBufferPointer(start: pointer, count: count))
    }

    /// The current row as values.
    public func row() -> [SQLiteValue] {
        (0..<columnCount).map { column in
            switch sqlite3_column_type(handle, column) {
            case SQLITE_INTEGER: .integer(int64(column))
            case SQLITE_FLOAT: .real(double(column))
            case SQLITE_TEXT: .text(text(column))
            case SQLITE_BLOB: .blob(blob(column))
            default: .null
            }
        }
    }
}

/// SQLITE_TRANSIENT: SQLite copies the bound bytes before the call returns.
private let sqliteTransient = unsafeBitCast(Int(-1), to: sqlite3_destructor_type.self)

extension SQLiteValue {
    public var int64: Int64? {
        switch self {
        case .integer(let v): v
        case .real(let v): Int64(exactly: v)
        default: nil
        }
    }
    public var double: Double? {
        switch self {
        case .integer(let v): Double(v)
        case .real(let v): v
        default: nil
        }
    }
    public var string: String? {
        if case .text(let v) = self { return v }
        return nil
    }
}
