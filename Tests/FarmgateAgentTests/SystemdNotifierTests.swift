import FarmgateSupport
import FarmgateTestSupport
import Foundation
import Testing

@Suite("systemd notify protocol")
struct SystemdNotifierTests {
    @Test("Only under systemd: no NOTIFY_SOCKET, no notifier; WATCHDOG_USEC counts only for this process")
    func environment() {
        #expect(SystemdNotifier(environment: [:]) == nil)
        #expect(SystemdNotifier(environment: ["NOTIFY_SOCKET": ""]) == nil)
        let plain = SystemdNotifier(environment: ["NOTIFY_SOCKET": "/run/systemd/notify"])
        #expect(plain?.watchdogTimeout == nil)
        let watched = SystemdNotifier(environment: ["NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "120000000"])
        #expect(watched?.watchdogTimeout == .seconds(120))
        #expect(watched?.watchdogPingInterval == .seconds(60))
        let mine = ["WATCHDOG_USEC": "1000000", "WATCHDOG_PID": String(getpid())]
        #expect(SystemdNotifier.watchdogTimeout(environment: mine) == .seconds(1))
        #expect(SystemdNotifier.watchdogTimeout(environment: ["WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"]) == nil)
        #expect(SystemdNotifier.watchdogTimeout(environment: ["WATCHDOG_USEC": "soon"]) == nil)
        #expect(SystemdNotifier.watchdogTimeout(environment: ["WATCHDOG_USEC": "0"]) == nil)
    }

    @Test("One datagram per message, to a path or an abstract @name; newlines inside a value cannot forge a field")
    func sends() throws {
        let dir = try Scratch(prefix: "fg-sd", in: URL(fileURLWithPath: "/tmp"))
        for address in [dir.file("notify.sock"), "@farmgate-notify-test-\(getpid())"] {
            let listener = try NotifyListener(address: address)
            defer { listener.stop() }
            let notifier = SystemdNotifier(socketPath: address)
            try notifier.send(["READY=1", "STATUS=line one\nWATCHDOG=1"])
            try notifier.send(["STOPPING=1"])
            let deadline = ContinuousClock.now + .seconds(5)
            while listener.received.count < 2, ContinuousClock.now < deadline { usleep(10_000) }
            #expect(listener.received.map(\.fields) == [["READY=1", "STATUS=line one WATCHDOG=1"], ["STOPPING=1"]], "\(address)")
        }
    }

    @Test("A socket nobody listens on, or an address that is no socket path, is an error naming it")
    func failures() {
        #expect {
            try SystemdNotifier(socketPath: "/tmp/farmgate-no-such-socket-\(getpid())").send(["READY=1"])
        } throws: { "\($0)".contains("farmgate-no-such-socket") }
        #expect {
            try SystemdNotifier(socketPath: "relative/notify").send(["READY=1"])
        } throws: { "\($0)".contains("relative/notify") }
        #expect {
            try SystemdNotifier(socketPath: "/" + String(repeating: "x", count: 200)).send(["READY=1"])
        } throws: { "\($0)".contains("fits sockaddr_un") }
    }
}
