import CSQLite

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Tells whether a file named as a program's own SQLite database plainly belongs to something else, before the program
/// opens it: opening runs `PRAGMA journal_mode=WAL`, migrations and page-size conversions, and the agent moves a file it
/// cannot read aside, so a mistyped path (`/etc/hostname`, the ingest's store given as the agent's buffer) would change
/// or move another program's file.
public enum SQLiteFileCheck {
    /// Why `path` must not be opened as the program's database, or nil: it does not exist, is empty, or is a SQLite
    /// database with no table or with `ownTable` (the table every version of the program's schema has).
    ///
    /// - Parameter requireHeader: whether a regular file that does not start with SQLite's header is refused, and a
    ///   database is opened to look at its tables. The agent passes false when its own sidecar lies beside the file: then
    ///   the file was its buffer, a damaged header is damage, moved aside and recovered from, and nothing is opened.
    /// - Returns: the problem as a phrase that follows the path ("is a directory", "is not a SQLite database", ...).
    public static func foreignFileProblem(path: String, ownTable: String, requireHeader: Bool = true) -> String? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }  // absent (or unreadable: opening says why)
        switch info.st_mode & S_IFMT {
        case S_IFREG: break
        case S_IFDIR: return "is a directory"
        default: return "is not a regular file (a device, a socket or a pipe)"
        }
        guard info.st_size > 0 else { return nil }
        guard let header = readHeader(path) else { return nil }
        guard header == sqliteHeader else {
            return requireHeader ? "is not a SQLite database" : nil
        }
        // The program's own sidecar lies beside it (`requireHeader` false): it is the program's file, and it is not
        // opened. Opening even read only makes SQLite open the `-wal` and `-shm` files read-write and, as root, fchown
        // them: on a file system stuck under the running program (a frozen or failing SD card) that blocked every
        // command that loads the configuration (`status`, `doctor`, `config check`, `reload`) in the kernel.
        guard requireHeader else { return nil }
        // Read only: nothing is written, not even the WAL mode. A file that cannot be read this way is left to the
        // opening, which reports it.
        guard let connection = try? SQLiteConnection(path: path, mode: .readOnly),
            let rows = try? connection.query(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        else { return nil }
        let tables = rows.compactMap { $0.first?.string }
        guard !tables.isEmpty, !tables.contains(ownTable) else { return nil }
        let shown = tables.prefix(5).joined(separator: ", ") + (tables.count > 5 ? ", …" : "")
        return "is a SQLite database of another program (its tables: \(shown))"
    }

    /// "SQLite format 3" and a NUL: the first 16 bytes of every SQLite database file.
    static let sqliteHeader: [UInt8] = Array("SQLite format 3".utf8) + [0]

    private static func readHeader(_ path: String) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: 16)
        let count = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, 16) }
        guard count >= 0 else { return nil }
        return Array(bytes.prefix(count))
    }
}
