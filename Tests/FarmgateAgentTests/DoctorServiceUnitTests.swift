import FarmgateSupport
import FarmgateTestSupport
import Foundation
import Testing

@testable import FarmgateAgent

/// `farmgate doctor` reads the agent's systemd unit as systemd would, so that a group the unit grants the service
/// (`SupplementaryGroups=dialout gpio` in the installed one) is not reported as missing.
@Suite("Doctor: the agent's systemd unit")
struct DoctorServiceUnitTests {
    /// Two unit directories as on a real system: `etc` first (local changes), `lib` after (the package's).
    final class UnitDirectories {
        let scratch: Scratch
        var etc: String { scratch.file("etc") }
        var lib: String { scratch.file("lib") }
        var search: [String] { [etc, lib] }

        init() throws {
            scratch = try Scratch(prefix: "fg-unit")
            for directory in [etc, lib] { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) }
        }

        @discardableResult
        func write(_ directory: String, _ name: String, _ text: String) throws -> String {
            let path = "\(directory)/\(name)"
            try FileManager.default.createDirectory(
                atPath: URL(fileURLWithPath: path).deletingLastPathComponent().path, withIntermediateDirectories: true)
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            return path
        }
    }

    /// The unit this repository installs.
    static var installedUnit: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("systemd/farmgate.service").path
    }

    @Test("a buffer or metrics directory the unit's ProtectSystem=strict leaves read-only is a problem, with the ReadWritePaths= that fixes it")
    func sandboxedPaths() throws {
        let units = try UnitDirectories()
        try units.write(units.lib, "farmgate.service", try String(contentsOfFile: Self.installedUnit, encoding: .utf8))
        var unit = try #require(ServiceUnit.load(directories: units.search))
        #expect(unit.protectSystem == "strict")
        // The state directory, node_exporter's textfile directories (upstream's and Debian's): writable.
        for path in ["/var/lib/farmgate", "/var/lib/node_exporter/textfile_collector", "/var/lib/prometheus/node-exporter"] {
            #expect(Doctor.sandboxProblem(path, unit: unit, what: "the metrics file's directory") == nil, "\(path)")
        }
        // A buffer on a USB stick: read-only for the service, whatever its mode bits say.
        let problem = try #require(Doctor.sandboxProblem("/srv/farm", unit: unit, what: "the buffer's directory"))
        #expect(problem.status == .problem && problem.check == "buffer access")
        #expect(problem.message.contains("ProtectSystem=strict"), "\(problem.message)")
        #expect(problem.fix?.contains("ReadWritePaths=/srv/farm") == true, "\(problem.fix ?? "")")
        // `/srv/farmhouse` is not inside `/srv/farm`; a drop-in that adds the path makes it writable.
        try units.write(units.etc, "farmgate.service.d/paths.conf", "[Service]\nReadWritePaths=-/srv/farm\n")
        unit = try #require(ServiceUnit.load(directories: units.search))
        #expect(Doctor.sandboxProblem("/srv/farm", unit: unit, what: "the buffer's directory") == nil)
        #expect(Doctor.sandboxProblem("/srv/farmhouse", unit: unit, what: "the buffer's directory") != nil)
        // A unit without ProtectSystem=strict makes nothing read-only.
        try units.write(units.etc, "farmgate.service.d/paths.conf", "[Service]\nProtectSystem=full\n")
        unit = try #require(ServiceUnit.load(directories: units.search))
        #expect(Doctor.sandboxProblem("/srv/anything", unit: unit, what: "the buffer's directory") == nil)
    }

    @Test("a directory on a file system mounted read-only is a problem, though its mode bits allow writing", .enabled(if: geteuid() == 0, "needs root to mount"))
    func readOnlyMount() throws {
        let scratch = try Scratch(prefix: "fg-romount")
        let mountPoint = scratch.file("ro")
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        let root = try #require(UnixUser.named("root"))
        #expect(Doctor.directoryProblem(mountPoint, user: root, what: "the buffer's directory") == nil)
        let mount = Process()
        mount.executableURL = URL(fileURLWithPath: "/bin/mount")
        mount.arguments = ["-t", "tmpfs", "-o", "ro,size=1m,mode=0777", "tmpfs", mountPoint]
        try mount.run()
        mount.waitUntilExit()
        try #require(mount.terminationStatus == 0, "cannot mount a read-only tmpfs (CI runs as root)")
        defer {
            let umount = Process()
            umount.executableURL = URL(fileURLWithPath: "/bin/umount")
            umount.arguments = ["-l", mountPoint]
            try? umount.run()
            umount.waitUntilExit()
        }
        let problem = try #require(Doctor.directoryProblem(mountPoint, user: root, what: "the buffer's directory"))
        #expect(problem.message.contains("mounted read-only"), "\(problem.message)")
        #expect(problem.fix?.contains("remount") == true)
    }

    @Test func theFirstUnitOnThePathAndEveryDropInCountAsSystemdReadsThem() throws {
        let units = try UnitDirectories()
        // The package's unit is shadowed by the local copy.
        try units.write(units.lib, "farmgate.service", "[Service]\nUser=someone-else\nSupplementaryGroups=lp\n")
        let main = try units.write(
            units.etc, "farmgate.service",
            """
            # Serial ports and GPIO chips.
            [Unit]
            Description=not a group: SupplementaryGroups=cdrom
            [Service]
            User=farmgate
            Group=farmgate
            SupplementaryGroups=dialout \\
              gpio
            ; SupplementaryGroups=floppy
            ExecStart=/usr/local/bin/farmgate agent
            [Install]
            WantedBy=multi-user.target
            """)
        // Drop-ins: a name in both directories counts once, from the first; all in name order, after the unit.
        let local = try units.write(units.etc, "farmgate.service.d/10-groups.conf", "[Service]\nSupplementaryGroups=audio\n")
        try units.write(units.lib, "farmgate.service.d/10-groups.conf", "[Service]\nSupplementaryGroups=video\n")
        let later = try units.write(units.lib, "farmgate.service.d/20-more.conf", "[Service]\nSupplementaryGroups=\"plugdev\"\n")
        try units.write(units.lib, "farmgate.service.d/README", "[Service]\nSupplementaryGroups=games\n")

        let unit = try #require(ServiceUnit.load(directories: units.search))
        #expect(unit.files == [main, local, later])
        #expect(unit.user == "farmgate")
        #expect(unit.group == "farmgate")
        #expect(unit.supplementaryGroups == ["dialout", "gpio", "audio", "plugdev"])
        #expect(unit.grantedBy["dialout"] == "SupplementaryGroups= in \(main)")
        #expect(unit.grantedBy["plugdev"] == "SupplementaryGroups= in \(later)")
        #expect(unit.grantedBy["farmgate"] == "Group= in \(main)")

        // An empty assignment clears the list, as in systemd; a later User= replaces the earlier one.
        try units.write(units.etc, "farmgate.service.d/30-reset.conf", "[Service]\nSupplementaryGroups=\nSupplementaryGroups=tty\nUser=nobody\n")
        let reset = try #require(ServiceUnit.load(directories: units.search))
        #expect(reset.supplementaryGroups == ["tty"])
        #expect(reset.user == "nobody")
        #expect(reset.grantedBy["dialout"] == nil)
    }

    @Test func noUnitOrAMaskedOneGrantsNothing() throws {
        let units = try UnitDirectories()
        #expect(ServiceUnit.load(directories: units.search) == nil)
        try FileManager.default.createSymbolicLink(atPath: "\(units.etc)/farmgate.service", withDestinationPath: "/dev/null")
        try units.write(units.lib, "farmgate.service", "[Service]\nUser=farmgate\nSupplementaryGroups=dialout\n")
        #expect(ServiceUnit.load(directories: units.search) == nil, "masked: systemd would not run it")
    }

    @Test func theSearchPathFollowsSystemdUnitPath() {
        #expect(ServiceUnit.directories(environment: [:]) == ServiceUnit.standardDirectories)
        #expect(ServiceUnit.standardDirectories.prefix(3).contains("/etc/systemd/system"))
        #expect(ServiceUnit.standardDirectories.contains("/lib/systemd/system") && ServiceUnit.standardDirectories.contains("/usr/lib/systemd/system"))
        #expect(ServiceUnit.directories(environment: ["SYSTEMD_UNIT_PATH": "/a:/b"]) == ["/a", "/b"])
        #expect(ServiceUnit.directories(environment: ["SYSTEMD_UNIT_PATH": "/a:"]) == ["/a"] + ServiceUnit.standardDirectories)
    }

    /// A serial port of group dialout (as on a Pi), mode 660, that `nobody` may not open by its own groups. Root only: the
    /// node must belong to someone else, which only root can arrange.
    @Test(.enabled(if: geteuid() == 0, "needs root to give the port to group dialout"))
    func aGroupTheUnitGrantsIsNoProblemAndOneItDoesNotGrantStaysOne() throws {
        let nobody = try #require(UnixUser.named("nobody"))
        let dialout = try #require(getgrnam("dialout")).pointee.gr_gid
        let port = try PseudoTerminal.open()
        defer { close(port.master) }
        chown(port.path, 0, dialout)
        chmod(port.path, 0o660)
        func finding(_ unit: ServiceUnit?) -> DoctorFinding {
            Doctor.deviceFinding(check: "serial", path: port.path, sensor: "tank1.ph", user: nobody, usualGroup: "dialout", unit: unit)
        }
        let units = try UnitDirectories()

        // No unit: the user's own groups decide.
        let alone = finding(nil)
        #expect(alone.status == .problem && alone.message.contains("not in group dialout"), "\(alone)")
        #expect(alone.fix?.contains("usermod -aG dialout nobody") == true)

        // The unit runs the agent as nobody and grants dialout: fine, and the finding says where the group comes from.
        let main = try units.write(units.lib, "farmgate.service", "[Service]\nUser=nobody\nSupplementaryGroups=dialout gpio\n")
        let granted = finding(ServiceUnit.load(directories: units.search))
        #expect(granted.status == .ok, "\(granted)")
        #expect(granted.message.contains("its systemd unit grants") && granted.message.contains("SupplementaryGroups= in \(main)"), "\(granted)")
        #expect(granted.fix == nil)

        // A drop-in that clears the list takes the grant away again: a problem, with both ways to fix it.
        try units.write(units.etc, "farmgate.service.d/override.conf", "[Service]\nSupplementaryGroups=\nSupplementaryGroups=gpio\n")
        let cleared = finding(ServiceUnit.load(directories: units.search))
        #expect(cleared.status == .problem && cleared.message.contains("nor does its systemd unit grant it"), "\(cleared)")
        #expect(cleared.fix?.contains("usermod -aG dialout nobody") == true && cleared.fix?.contains("SupplementaryGroups=dialout") == true)

        // A unit that runs the agent as another user grants nobody nothing.
        try FileManager.default.removeItem(atPath: "\(units.etc)/farmgate.service.d/override.conf")
        try units.write(units.etc, "farmgate.service", "[Service]\nUser=farmgate\nSupplementaryGroups=dialout\n")
        let otherUser = finding(ServiceUnit.load(directories: units.search))
        #expect(otherUser.status == .problem, "\(otherUser)")
    }
}
