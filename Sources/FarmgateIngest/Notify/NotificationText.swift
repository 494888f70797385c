public import FarmgateWire
import Foundation

/// The words of a notification, shared by the webhook's `description` and the e-mail: what fired, since when and for
/// how long, and, for a backlog that arrived after an outage, that it is reported late and what happened meanwhile.
public enum NotificationText {
    /// `[FIRING] pH below 5.5 on site-1 tank1.ph (farm f1)`, `[RESOLVED] ... after 2h 28m`, with `, changed 37 times`
    /// for a flapping alert's merged notification and `, reported late`.
    public static func subject(_ notification: AlertNotification) -> String {
        var subject = "[\(notification.status.rawValue.uppercased())] \(notification.summary)"
        if notification.status == .resolved, let ends = notification.endsAt {
            subject += " after \(duration(from: notification.startsAt, to: ends))"
        }
        subject += " (farm \(notification.farm)"
        if let coalesced = notification.coalesced { subject += ", changed \(coalesced.transitions) times" }
        if notification.late { subject += ", reported late" }
        subject += ")"
        return singleLine(subject)
    }

    /// The alert's situation in one paragraph, for the webhook's `description` annotation and the e-mail's first lines.
    /// The rule's own description (what the engine wrote, e.g. for a backlog) comes first when there is one.
    public static func description(_ notification: AlertNotification, now: Timestamp) -> String {
        var parts: [String] = []
        // A sentence of its own: the engine's text has no full stop ("… from 03:12 to 05:40, reported late"), and ran
        // into the next ("reported late Resolved at …", a tester, 2026-12-07).
        if let text = notification.description, !text.isEmpty { parts.append(text.hasSuffix(".") ? text : text + ".") }
        parts.append(situation(notification, now: now))
        if let note = coalescedNote(notification) { parts.append(note) }
        if notification.late { parts.append(lateNote(notification)) }
        return parts.joined(separator: " ")
    }

    /// `Firing since 2026-01-01T03:12:00Z (2h 28m so far).` or `Resolved at ...; it fired from ... for 2h 28m.`
    public static func situation(_ notification: AlertNotification, now: Timestamp) -> String {
        let since = RFC3339.format(notification.startsAt)
        switch notification.status {
        case .firing:
            return "Firing since \(since) (\(duration(from: notification.startsAt, to: max(now, notification.startsAt))) so far)."
        case .resolved:
            let ends = notification.endsAt ?? now
            return "Resolved at \(RFC3339.format(ends)); it fired from \(since) for \(duration(from: notification.startsAt, to: ends))."
        }
    }

    /// What a flapping alert's merged notification says: `Fired 19 times and resolved 18 times since
    /// 2026-01-01T10:02:00Z while this notification waited to be sent; this is the newest state.` Nil for one that
    /// stands for itself alone.
    public static func coalescedNote(_ notification: AlertNotification) -> String? {
        guard let coalesced = notification.coalesced else { return nil }
        func times(_ count: Int) -> String { count == 1 ? "once" : count == 2 ? "twice" : "\(count) times" }
        return "Fired \(times(coalesced.fired)) and resolved \(times(coalesced.resolved)) since \(RFC3339.format(coalesced.since))"
            + " while this notification waited to be sent; this is the newest state."
    }

    /// What a backlog notification says: that the readings arrived late, and the transitions folded into it.
    public static func lateNote(_ notification: AlertNotification) -> String {
        var note = "Reported late: the readings behind this notification arrived after the site was offline"
        if !notification.transitions.isEmpty {
            note += "; meanwhile: " + notification.transitions.map { "\($0.state) at \(RFC3339.format($0.at))" }.joined(separator: ", ")
        }
        return note + "."
    }

    /// The plain-text body of an e-mail.
    public static func emailBody(_ notification: AlertNotification, idempotencyKey: String, externalURL: String, now: Timestamp) -> String {
        var lines: [String] = [notification.summary, ""]
        lines.append("Status: \(notification.status.rawValue.uppercased()), severity \(notification.severity)")
        lines.append(situation(notification, now: now))
        if let value = notification.value { lines.append("Value: \(number(value))") }
        if let note = coalescedNote(notification) { lines.append(note) }
        if let text = notification.description, !text.isEmpty {
            lines.append("")
            lines.append(text)
        }
        if notification.late {
            lines.append("")
            lines.append(lateNote(notification))
        }
        lines.append("")
        lines.append("Labels:")
        for (name, value) in notification.labels.sorted(by: { $0.key < $1.key }) { lines.append("  \(name) = \(value)") }
        lines.append("")
        lines.append("Farm \(notification.farm), rule \(notification.rule), alert \(notification.alertID), transition \(notification.transitionID).")
        if !externalURL.isEmpty { lines.append("\(externalURL)/v1/farms/\(notification.farm)/alerts") }
        lines.append("Notification \(idempotencyKey), sent by farmgate-ingest.")
        return lines.joined(separator: "\r\n") + "\r\n"
    }

    /// `45s`, `12m 5s`, `2h 28m`, `3d 4h`: the two largest units.
    public static func duration(from start: Timestamp, to end: Timestamp) -> String {
        let seconds = max(0, (end.microseconds - start.microseconds) / 1_000_000)
        let units: [(Int64, String)] = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")]
        for (index, (size, name)) in units.enumerated() where seconds >= size {
            var text = "\(seconds / size)\(name)"
            if index + 1 < units.count {
                let (smaller, smallerName) = units[index + 1]
                let rest = (seconds % size) / smaller
                if rest > 0 { text += " \(rest)\(smallerName)" }
            }
            return text
        }
        return "0s"
    }

    /// A value in its shortest decimal form.
    static func number(_ value: Double) -> String {
        formatValue(value)
    }

    /// Newlines and other control characters become spaces: a summary must never start a new mail header.
    static func singleLine(_ text: String) -> String {
        String(text.unicodeScalars.map { $0.properties.generalCategory == .control ? " " : Character($0) })
    }
}
