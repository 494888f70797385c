@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `farmgate doctor` looks at every configured 1-Wire probe where its driver reads it (a black-box tester found it did
/// not look at them at all).
@Suite("Doctor: 1-Wire probes")
struct DoctorOneWireTests {
    /// A site of ds18b20 sensors on `root` (the fake tree), with no agent, no upload and no clock check.
    func configuration(_ scratch: Scratch, root: String, addresses: [String]) throws -> AgentConfiguration {
        var text = """
            [device]
            id = "w1-site"
            [buffer]
            path = "\(scratch.file("buffer.sqlite"))"
            [control]
            socket = "\(scratch.file("control.sock"))"
            [clock]
            check = false

            """
        for (index, address) in addresses.enumerated() {
            text += """

                [[sensor]]
                id = "tank\(index + 1).temp"
                driver = "ds18b20"
                quantity = "temperature"
                address = "\(address)"
                w1_root = "\(root)"
                read_timeout = "30s"  # a loaded test machine is no hung bus

                """
        }
        let file = try scratch.write("agent.toml", text)
        return try AgentConfiguration.parse(ConfigDocument.parse(text, file: file))
    }

    func oneWireFindings(_ configuration: AgentConfiguration, user: UnixUser) async -> [DoctorFinding] {
        let quiet = Logger(label: "test.doctor") { _ in SwiftLogNoOpLogHandler() }
        let report = await Doctor.run(
            configuration: configuration, user: user, clock: SystemClockSource(checkSynchronization: false, logger: quiet), unitDirectories: [],
            logger: quiet)
        return report.findings.filter { $0.check == "1-wire" }
    }

    @Test("a probe that reads is ok; a failed CRC is a warning; a missing probe and a file the agent's user may not read are problems with what to do")
    func probes() async throws {
        let tree = try FakeW1Tree()
        let scratch = try Scratch(prefix: "fg-doctor-w1")
        let nobody = try #require(UnixUser.named("nobody"))
        let good = "28-000000000001", noisy = "28-000000000002", missing = "28-000000000003", locked = "28-000000000004"
        let fenced = "28-000000000005"
        try tree.slave(good, millidegrees: 21_437)
        try tree.slave(noisy, millidegrees: 21_500, crc: false)
        try tree.slave(locked, millidegrees: 20_000)
        try tree.slave(fenced, millidegrees: 19_000)
        #expect(chmod(tree.scratch.file(locked) + "/w1_slave", 0o600) == 0)
        // Readable by all, in a directory only its owner may pass (a tester, 2026-12-07: called readable).
        #expect(chmod(tree.scratch.file(fenced), 0o700) == 0)
        let findings = await oneWireFindings(
            try configuration(scratch, root: tree.root, addresses: [good, noisy, missing, locked, fenced]), user: nobody)
        func finding(_ address: String) -> DoctorFinding? { findings.first { $0.subject.contains(address) } }

        let ok = try #require(finding(good), "\(findings)")
        #expect(ok.status == .ok && ok.message.contains("21.437"), "\(ok)")
        #expect(ok.subject.contains("w1_slave") && ok.subject.contains("tank1.temp"), "\(ok)")

        let crc = try #require(finding(noisy), "\(findings)")
        #expect(crc.status == .warning && crc.message.contains("CRC"), "\(crc)")
        #expect(crc.fix?.contains("pull-up") == true, "\(crc)")

        let gone = try #require(finding(missing), "\(findings)")
        #expect(gone.status == .problem, "\(gone)")
        #expect(gone.message.contains("not on the bus") && gone.message.contains(good), "lists the probes present: \(gone)")
        let fix = gone.fix ?? ""
        #expect(fix.contains("wiring") && fix.contains("dtoverlay=w1-gpio") && fix.contains("w1-gpio") && fix.contains("w1-therm"), "\(gone)")

        let unreadable = try #require(finding(locked), "\(findings)")
        #expect(unreadable.status == .problem && unreadable.message.contains("nobody cannot read"), "\(unreadable)")
        #expect(unreadable.message.contains("mode 600"), "\(unreadable)")

        let unreachable = try #require(finding(fenced), "\(findings)")
        #expect(unreachable.status == .problem, "\(unreachable)")
        #expect(unreachable.message.contains("nobody cannot reach it: it may not pass the directory \(tree.scratch.file(fenced)) (mode 700"), "\(unreachable)")
    }

    @Test("no 1-Wire bus at all is a problem saying how to enable it")
    func noBus() async throws {
        let scratch = try Scratch(prefix: "fg-doctor-w1")
        let root = try #require(UnixUser.named("root"))
        let findings = await oneWireFindings(
            try configuration(scratch, root: scratch.file("no-w1-here"), addresses: ["28-0316a2791aff"]), user: root)
        let bus = try #require(findings.first, "\(findings)")
        #expect(findings.count == 1)
        #expect(bus.status == .problem && bus.message.contains("no 1-Wire bus"), "\(bus)")
        #expect(bus.fix?.contains("dtoverlay=w1-gpio") == true && bus.fix?.contains("modprobe") == true, "\(bus)")
    }
}

/// `farmgate doctor` on GPIO sensors that follow an events file (`backend = "events"`): a tester (2026-12-07) found a
/// missing file, which makes the sensors read `disconnected` like a missing chip, reported as "No problem found".
@Suite("Doctor: GPIO events files")
struct DoctorGPIOEventsTests {
    @Test("an events file that exists and is readable is ok; a missing one and one the agent's user may not read are problems")
    func eventsFiles() throws {
        let scratch = try Scratch(prefix: "fg-doctor-gpio")
        let present = try scratch.write("present.events", "level 0\n")
        let locked = try scratch.write("locked.events", "level 0\n")
        #expect(chmod(locked, 0o600) == 0)
        var text = "[device]\nid = \"gpio-site\"\n[buffer]\npath = \"\(scratch.file("buffer.sqlite"))\"\n"
        for (index, file) in [present, scratch.file("missing.events"), locked].enumerated() {
            text += "\n[[sensor]]\nid = \"s\(index)\"\ndriver = \"gpio\"\nquantity = \"state\"\nline = \(17 + index)\nbackend = \"events\"\nevents_file = \"\(file)\"\n"
        }
        let configuration = try AgentConfiguration.parse(ConfigDocument.parse(text, file: try scratch.write("agent.toml", text)))
        let nobody = try #require(UnixUser.named("nobody"))
        let findings = Doctor.deviceFindings(configuration, user: nobody)
        #expect(findings.count == 3, "\(findings)")
        func finding(_ sensor: String) -> DoctorFinding? { findings.first { $0.subject.contains("(\(sensor), backend") } }
        #expect(finding("s0")?.status == .ok, "\(findings)")
        #expect(finding("s1")?.status == .problem && finding("s1")?.message.contains("does not exist") == true, "\(findings)")
        #expect(finding("s2")?.status == .problem && finding("s2")?.message.contains("nobody cannot read it (mode 600") == true, "\(findings)")
    }
}
