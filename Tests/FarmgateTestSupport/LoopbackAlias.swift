import Foundation

/// A name other than localhost that /etc/hosts maps to 127.0.0.1 (nil when there is none): the test cluster's
/// certificate names only localhost and 127.0.0.1, so connecting by this name is a host-name mismatch on the same address.
public let loopbackAlias: String? = {
    guard let hosts = try? String(contentsOfFile: "/etc/hosts", encoding: .utf8) else { return nil }
    for line in hosts.split(separator: "\n") {
        let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
        guard fields.first == "127.0.0.1" else { continue }
        if let name = fields.dropFirst().first(where: { $0 != "localhost" && !$0.hasPrefix("#") }) { return String(name) }
    }
    return nil
}()
