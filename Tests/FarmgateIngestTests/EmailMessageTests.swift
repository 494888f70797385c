import Foundation
import Testing

@testable import FarmgateIngest

/// The e-mail's `Subject:` header: ASCII as is up to 998 characters, longer folded at spaces, anything else as encoded words; no
/// line of it passes 998 characters (RFC 5322 §2.1.1), and unfolding gives the subject back.
@Suite("E-mail subject header")
struct EmailMessageTests {
    /// The header's lines as sent, and the subject a reader gets by unfolding them (RFC 5322 §2.2.3: drop each CRLF).
    func lines(_ subject: String) -> (lines: [String], unfolded: String) {
        let header = "Subject: " + EmailMessage.encodedWords(subject)
        return (header.components(separatedBy: "\r\n"), String(header.dropFirst("Subject: ".count)).replacingOccurrences(of: "\r\n", with: ""))
    }

    @Test("An ASCII subject that fits a line is that line, as it is")
    func short() {
        let subject = "[FIRING] pH below 5.5 on site-1 tank3.ph (farm f1)"
        #expect(EmailMessage.encodedWords(subject) == subject)
        let longest = String(repeating: "ab ", count: 329) + "xy"
        #expect(("Subject: " + longest).count == 998)
        #expect(EmailMessage.encodedWords(longest) == longest)
        #expect(EmailMessage.encodedWords(longest + "z") != longest + "z")
    }

    @Test("A long ASCII subject is folded at spaces: lines of at most 78, unfolded it is the subject")
    func long() {
        let words = (0..<400).map { "tank\($0).ph" }
        let subject = "[FIRING] pH below 5.5 on " + words.joined(separator: " ") + " (farm f1)"
        #expect(subject.count > 3000)
        let (lines, unfolded) = lines(subject)
        #expect(lines.count > 40)
        #expect(lines.allSatisfy { $0.count <= 78 }, "\(lines.map(\.count).max() ?? 0)")
        #expect(lines.dropFirst().allSatisfy { $0.hasPrefix(" ") })
        #expect(unfolded == subject)
    }

    @Test("Spaces side by side and at the ends survive folding")
    func spaces() {
        let subject = " a  b " + String(repeating: "word ", count: 300) + " "
        let (lines, unfolded) = lines(subject)
        #expect(lines.count > 1)
        #expect(unfolded == subject)
    }

    @Test("A word too long for any line goes as encoded words, none over 998")
    func unbreakable() {
        let subject = "[FIRING] " + String(repeating: "x", count: 3000)
        let (lines, _) = lines(subject)
        #expect(lines.count > 1)
        #expect(lines.allSatisfy { $0.count <= 998 })
        #expect(lines.first?.hasPrefix("Subject: =?UTF-8?B?") == true)
    }
}

/// The words of a notification.
@Suite("Notification text")
struct NotificationTextTests {
    // A tester, 2026-12-07: "…, reported late Resolved at …": the engine's description ran into the next sentence.
    @Test("The engine's description is a sentence of its own before the situation")
    func descriptionIsASentence() {
        var notification = testNotification(7, status: .resolved, late: true)
        notification.description = "tank7.ph below 5.5 from 03:12 to 05:40 UTC, reported late"
        let text = NotificationText.description(notification, now: testNow)
        #expect(text.hasPrefix("tank7.ph below 5.5 from 03:12 to 05:40 UTC, reported late. Resolved at "), "\(text)")
        notification.description = "Already a sentence."
        #expect(NotificationText.description(notification, now: testNow).hasPrefix("Already a sentence. Resolved at "))
    }
}
