public import FarmgateWire
import Foundation

/// An e-mail notification as RFC 5322 text: plain text in UTF-8, quoted-printable, CRLF line ends.
///
/// `Message-ID` is derived from the idempotency key, so a notification sent twice (a crash between the server's
/// acceptance and the outbox's update) carries the same id, which mail clients and many servers collapse into one.
public struct EmailMessage: Sendable, Hashable {
    public var from: String
    public var recipients: [String]
    public var subject: String
    /// The whole message, headers and body, as sent in SMTP `DATA` (before dot-stuffing, which libcurl does).
    public var bytes: [UInt8]

    public init(_ notification: AlertNotification, idempotencyKey: String, from: String, to recipients: [String], externalURL: String, now: Timestamp) {
        self.from = from
        self.recipients = recipients
        subject = NotificationText.subject(notification)
        let date = Date(timeIntervalSince1970: Double(now.microseconds) / 1_000_000)
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "UTC")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss '+0000'"
        let domain = from.split(separator: "@").last.map(String.init) ?? "farmgate"
        var headers = [
            "From: \(EmailMessage.headerSafe(from))",
            "To: \(recipients.map(EmailMessage.headerSafe).joined(separator: ", "))",
            "Subject: \(EmailMessage.encodedWords(subject))",
            "Date: \(formatter.string(from: date))",
            "Message-ID: <\(idempotencyKey)@\(EmailMessage.headerSafe(domain))>",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: quoted-printable",
            "Auto-Submitted: auto-generated",
            "X-Farmgate-Idempotency-Key: \(idempotencyKey)",
        ]
        if notification.late { headers.append("X-Farmgate-Late: true") }
        let body = NotificationText.emailBody(notification, idempotencyKey: idempotencyKey, externalURL: externalURL, now: now)
        bytes = Array((headers.joined(separator: "\r\n") + "\r\n\r\n").utf8) + EmailMessage.quotedPrintable(body)
    }

    /// Control characters (CR, LF) out of a header value: nothing a rule or receiver holds can add a header.
    static func headerSafe(_ text: String) -> String {
        NotificationText.singleLine(text)
    }

    /// The subject as is when it is printable ASCII (folded at spaces when long, ``folded(_:)``), else as RFC 2047 encoded
    /// words (UTF-8, base64), folded.
    static func encodedWords(_ text: String) -> String {
        if text.utf8.allSatisfy({ $0 >= 32 && $0 < 127 }), let folded = folded(text) { return folded }
        var words: [String] = []
        var chunk = ""
        for character in text {
            if chunk.utf8.count + character.utf8.count > 45 {
                words.append(chunk)
                chunk = ""
            }
            chunk.append(character)
        }
        if !chunk.isEmpty { words.append(chunk) }
        return words.map { "=?UTF-8?B?\(Data($0.utf8).base64EncodedString())?=" }.joined(separator: "\r\n ")
    }

    /// Printable ASCII as one line when the header fits in 998 characters (RFC 5322 §2.1.1); longer (a summary filled
    /// with long names can be kilobytes, and servers refuse or cut such a line), folded before spaces (§2.2.3) into lines
    /// of at most 78 where a space allows. Unfolding (dropping each CRLF) gives `text` back. Nil when a word alone is too
    /// long for a line, which encoded words, split anywhere, carry instead.
    static func folded(_ text: String, header: String = "Subject: ") -> String? {
        if header.count + text.count <= 998 { return text }
        var lines: [String] = []
        var line = ""
        var width = header.count
        for (index, word) in text.split(separator: " ", omittingEmptySubsequences: false).enumerated() {
            guard header.count + 1 + word.count <= 998 else { return nil }
            if !line.isEmpty, width + 1 + word.count > 78 {
                lines.append(line)
                line = ""
                width = 0
            }
            // Every word but the first follows a space; on a new line that space is the fold's whitespace.
            if index > 0 { line += " " }
            line += word
            width += word.count + 1
        }
        lines.append(line)
        return lines.joined(separator: "\r\n")
    }

    /// Quoted-printable (RFC 2045) of `text`, whose lines end in CRLF: readable where it is ASCII, lines at most 76.
    static func quotedPrintable(_ text: String) -> [UInt8] {
        var output: [UInt8] = []
        let hex = Array("0123456789ABCDEF".utf8)
        for line in text.components(separatedBy: "\r\n").dropLast(text.hasSuffix("\r\n") ? 1 : 0) {
            var width = 0
            let bytes = Array(line.utf8)
            for (index, byte) in bytes.enumerated() {
                let last = index == bytes.count - 1
                var encoded: [UInt8]
                if (byte >= 33 && byte <= 126 && byte != UInt8(ascii: "=")) || ((byte == 32 || byte == 9) && !last) {
                    encoded = [byte]
                } else {
                    encoded = [UInt8(ascii: "="), hex[Int(byte >> 4)], hex[Int(byte & 15)]]
                }
                if width + encoded.count > 75 {
                    output += Array("=\r\n".utf8)
                    width = 0
                }
                output += encoded
                width += encoded.count
            }
            output += Array("\r\n".utf8)
        }
        return output
    }
}
