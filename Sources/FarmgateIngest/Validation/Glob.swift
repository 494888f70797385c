/// Shell-style globs on identifiers (sensor and device ids, alert labels): `*` matches any run of characters (also none),
/// `?` exactly one; nothing else is special. Used by the `latest` sensor filter, alert rule selectors and silences.
public enum Glob {
    public static func matches(_ pattern: String, _ text: String) -> Bool {
        if pattern == "*" { return true }
        let p = Array(pattern.utf8)
        let t = Array(text.utf8)
        var pi = 0
        var ti = 0
        var star = -1
        var mark = 0
        while ti < t.count {
            if pi < p.count, p[pi] == UInt8(ascii: "?") || p[pi] == t[ti] {
                pi += 1
                ti += 1
            } else if pi < p.count, p[pi] == UInt8(ascii: "*") {
                star = pi
                mark = ti
                pi += 1
            } else if star >= 0 {
                pi = star + 1
                mark += 1
                ti = mark
            } else {
                return false
            }
        }
        while pi < p.count, p[pi] == UInt8(ascii: "*") { pi += 1 }
        return pi == p.count
    }
}
