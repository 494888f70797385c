import FarmgateSupport
import Foundation
import Synchronization
import Testing

/// The few things the site binary does without full Foundation (FoundationEssentials has no ICU, which saves a Pi
/// megabytes): they must behave as the Foundation calls they replace.
@Suite("Site support without Foundation")
struct PlainSupportTests {
    @Test("trimmingWhitespace matches Foundation's trimming of whitespace and newlines")
    func trimming() {
        for text in ["", "   ", "a", "  a b  ", "\t\r\n pH 6.1 \r\n", "x\n", "\u{00A0}y\u{2003}", "é "] {
            #expect(text.trimmingWhitespace() == text.trimmingCharacters(in: .whitespacesAndNewlines), "\(text.debugDescription)")
        }
        #expect("  tank1 ".dropFirst().trimmingWhitespace() == "tank1")
    }

    // A tester, 2026-12-07: `--ttl 99999999999d` and `raw = "99999999999d"` were called "not a duration"; the limit
    // broken is the range's, which the callers' checks name once the text is a duration.
    @Test("parseDuration reads a duration however long, at most the longest one; only what is no duration is nil")
    func parseDurationSaturates() {
        #expect(ConfigTable.parseDuration("90s") == .seconds(90))
        let longest = Duration.milliseconds(Int64(ConfigTable.maximumDurationMilliseconds) - 1)
        #expect(ConfigTable.parseDuration("99999999999d") == longest)
        #expect(ConfigTable.parseDuration("1e300s") == nil)  // no exponents: not a duration
        for text in ["24x", "-1h", "", "h", "nan s"] { #expect(ConfigTable.parseDuration(text) == nil, "\(text)") }
    }

    @Test("padded(to:) fills or cuts to exactly the width")
    func padding() {
        #expect("disk".padded(to: 6) == "disk  ")
        #expect("serial-ports".padded(to: 6) == "serial")
        #expect("".padded(to: 2) == "  ")
        #expect("abc".padded(to: 3) == "abc")
    }

    @Test("fixedPoint matches printf's %.Nf for the values a status shows")
    func fixedPointFormatting() {
        // No exact binary ties here: printf rounds those half to even, fixedPoint half away from zero (checked below).
        let values: [Double] = [0, 6.08, -6.08, 1413, 20.0624, 0.3, -0.6, 999.9996, 1e-9, 123456.789, -1, 1_099_511_627_776]
        for value in values {
            for places in 0...6 {
                #expect(fixedPoint(value, places: places) == String(format: "%.\(places)f", value), "\(value) at \(places) places")
            }
        }
        #expect(fixedPoint(2.5, places: 0) == "3")
        #expect(fixedPoint(-0.125, places: 2) == "-0.13")
        #expect(fixedPoint(-0.0004, places: 3) == "0.000", "no negative zero")
        #expect(fixedPoint(.infinity, places: 2) == "inf")
        #expect(fixedPoint(.nan, places: 2) == "nan")
        #expect(fixedPoint(1e300, places: 1) == "1e+300")
        #expect(fixedPoint(0.96, places: 1) == "1.0", "a carry into the whole part")
        #expect(fixedPoint(-0.96, places: 0) == "-1")
    }

    @Test("FileSystem reads files, makes directories and says why it cannot")
    func fileSystem() throws {
        let base = NSTemporaryDirectory() + "fg-fs-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: base) }
        let nested = base + "/a/b/c"
        try FileSystem.createDirectories(nested, mode: 0o750)
        #expect(FileSystem.isDirectory(nested))
        try FileSystem.createDirectories(nested)  // existing: fine
        let mode = try FileManager.default.attributesOfItem(atPath: nested)[.posixPermissions] as? Int
        #expect(mode.map { $0 & 0o700 } == 0o700)

        let file = base + "/a/key"
        try Data("secret\n".utf8).write(to: URL(fileURLWithPath: file))
        #expect(try FileSystem.text(file) == "secret\n")
        #expect(FileSystem.size(file) == 7)
        #expect(FileSystem.isFile(file) && !FileSystem.isDirectory(file))
        #expect(!FileSystem.isFile(nested))

        #expect(throws: FileSystem.Failure.self) { try FileSystem.createDirectories(file + "/below") }
        do {
            _ = try FileSystem.text(base + "/missing")
            Issue.record("a missing file was read")
        } catch {
            #expect(error.code == ENOENT)
            #expect(error.description == "cannot read \(base)/missing: No such file or directory")
        }
        try Data([0x66, 0xFF, 0xFE]).write(to: URL(fileURLWithPath: file))
        #expect((try? FileSystem.text(file)) == nil, "not UTF-8")
        do {
            _ = try FileSystem.bytes(file, limit: 2)
            Issue.record("a file over the limit was read")
        } catch {
            #expect(error.reason == "larger than 2 bytes")
        }
    }

    @Test("startOSThread runs the body on a named thread; sleepBlocking sleeps at least the duration")
    func threads() async throws {
        let seen = Mutex<String?>(nil)
        let done = DispatchSemaphore(value: 0)
        let started = startOSThread(name: "farmgate-test-thread-name") {
            let name = (try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8)) ?? ""
            seen.withLock { $0 = name.trimmingWhitespace() }
            done.signal()
        }
        #expect(started)
        #expect(done.wait(timeout: .now() + 10) == .success)
        #expect(seen.withLock { $0 } == "farmgate-test-t", "the kernel keeps 15 bytes of a thread's name")

        let start = ContinuousClock.now
        sleepBlocking(.milliseconds(120))
        #expect(ContinuousClock.now - start >= .milliseconds(120))
        sleepBlocking(.zero)
        sleepBlocking(.milliseconds(-5))
    }

    @Test("redactingCredentials keeps the kind and key id of a credential and cuts its secret, wherever it stands")
    func redactingCredentials() {
        let secret = String(repeating: "0123456789abcdef", count: 4)
        #expect("cannot read /etc/fgd_abcdefgh_\(secret): missing".redactingCredentials() == "cannot read /etc/fgd_abcdefgh…: missing")
        #expect("`fgr_abcdefgh_\(secret)` and fge_zz_\(secret)x".redactingCredentials() == "`fgr_abcdefgh…` and fge_zz…")
        #expect("fgd_0123456789abcdef0123456789".redactingCredentials() == "fgd_01234567…")
        #expect("they start with fgd_ (the key) or fgd_…".redactingCredentials() == "they start with fgd_ (the key) or fgd_…")
        #expect("no key here, fg_x, ffgd".redactingCredentials() == "no key here, fg_x, ffgd")
        #expect("fgd_abc".redactingCredentials() == "fgd_abc")
    }
}
