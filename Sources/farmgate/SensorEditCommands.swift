import ArgumentParser
import FarmgateAgent
import FarmgateSupport
#if canImport(Glibc)
import Glibc
#endif

/// `farmgate sensor add ID key=value…`: appends a `[[sensor]]` table to the configuration, checked first.
struct SensorAdd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "add",
        abstract: "Add a [[sensor]] table to the configuration, checked as the agent would load it.",
        discussion: """
            Each setting is key=value, as in the table: numbers, true/false and quoted strings are written as given, \
            anything else as a string (farmgate sensor add tank1.ph driver=ezo quantity=ph port=/dev/serial/by-id/usb-… \
            interval=10s). `farmgate sensor drivers --samples` shows each driver's keys; `farmgate scan` prints tables \
            for the sensors it finds. The rest of the file (comments, order) is kept; the file is replaced atomically, \
            with its mode and owner. Nothing is written when the result would not load. The running agent reads the \
            sensor after a reload (farmgate reload). Exit codes: 0 added, 64 a bad id or setting (the message names it), \
            73 the file cannot be written, 78 the file does not load as it is.
            """)

    @OptionGroup var options: ConfigOption

    @Argument(help: ArgumentHelp("The new sensor's id (letters, digits, . _ -), e.g. tank1.ph.", valueName: "id"))
    var id: String

    @Argument(help: ArgumentHelp("The table's keys, key=value: driver, quantity, port, interval, …", valueName: "key=value"))
    var settings: [String] = []

    func run() throws {
        let edit = try SensorTableFile.edit(options.config) { text, file throws(SensorTables.Refusal) in
            try SensorTables.adding(id: id, settings: settings, to: text, file: file)
        }
        print("Added to \(options.config):\n\n\(edit.table)")
        for warning in edit.configuration.warnings { print("warning: \(warning.description)") }
        print("Reload the agent to start reading it (farmgate reload), then check it: farmgate sensor read \(id)")
    }
}

/// `farmgate sensor remove ID`: removes the sensor's `[[sensor]]` table, checked first.
struct SensorRemove: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "remove",
        abstract: "Remove a sensor's [[sensor]] table from the configuration, checked as the agent would load it.",
        discussion: """
            The table and the tables under it go; the rest of the file is kept. Refused when another sensor depends on \
            it (an EZO circuit's temperature_sensor). Its readings already buffered are still sent. Exit codes: 0 \
            removed, 64 no such sensor (or others depend on it), 73 the file cannot be written, 78 the file does not load.
            """)

    @OptionGroup var options: ConfigOption

    @Argument(help: ArgumentHelp("The sensor's id.", valueName: "id"))
    var id: String

    func run() throws {
        let edit = try SensorTableFile.edit(options.config) { text, file throws(SensorTables.Refusal) in
            try SensorTables.removing(id: id, from: text, file: file)
        }
        print("Removed from \(options.config):\n\n\(edit.table)\n")
        for note in edit.notes { print("warning: \(note)") }
        print("Reload the agent to stop reading it (farmgate reload).")
    }
}

/// Reads the configuration file, applies an edit and writes the result in its place (the file a link names, with its
/// mode and owner), or exits with the refusal. The file's directory is locked (flock) from the read to the write, so that
/// two edits at once (a provisioning script's parallel `sensor add`s) both land instead of one replacing the other.
enum SensorTableFile {
    static func edit(_ path: String, _ change: (String, String) throws(SensorTables.Refusal) -> SensorTables.Edit) throws -> SensorTables.Edit {
        let target = FileSystem.resolvedPath(path)
        let directory = target.lastIndex(of: "/").map { $0 == target.startIndex ? "/" : String(target[..<$0]) } ?? "."
        let lock = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard lock >= 0 else {
            throw CleanExit.message(
                "farmgate sensor: cannot open \(path): its directory \(directory) cannot be opened (\(String(cString: strerror(errno)))); check -c (or FARMGATE_CONFIG)",
                code: 78)
        }
        defer { close(lock) }  // closing releases the lock
        while flock(lock, LOCK_EX) != 0 {
            guard errno == EINTR else { throw CleanExit.message("farmgate sensor: cannot lock \(directory): \(String(cString: strerror(errno)))", code: 73) }
        }
        let text: String
        do { text = try FileSystem.text(path) } catch {
            throw CleanExit.message("farmgate sensor: \(error); check -c (or FARMGATE_CONFIG)", code: 78)
        }
        var info = stat()
        guard stat(target, &info) == 0 else { throw CleanExit.message("farmgate sensor: \(path) is gone", code: 73) }
        // Replacing it through a rename would write a file its owner made read-only (root and the owner can).
        guard info.st_mode & 0o222 != 0 else {
            let mode = String(info.st_mode & 0o7777, radix: 8)
            throw CleanExit.message("farmgate sensor: \(path) is read-only (mode \(mode)); make it writable (chmod u+w) to edit it", code: 73)
        }
        let edit: SensorTables.Edit
        do { edit = try change(text, path) } catch {
            throw CleanExit.message("farmgate sensor: \(error.description)", code: error.exitCode)
        }
        do {
            try AtomicFile.write(
                Array(edit.text.utf8), to: target, mode: info.st_mode & 0o7777,
                owner: AtomicFile.Owner(uid: info.st_uid, gid: info.st_gid, name: "the file's owner"))
        } catch {
            throw CleanExit.message("farmgate sensor: cannot write \(target): \(error.description) (run as root, or as the file's owner)", code: 73)
        }
        return edit
    }
}
