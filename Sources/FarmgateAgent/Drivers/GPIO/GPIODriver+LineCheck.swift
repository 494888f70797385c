import FarmgateSupport
import FarmgateWire

extension GPIODriver {
    /// Resolves every GPIO sensor's line through its backend and refuses one line used twice however it is written
    /// (offset 17 in one sensor, `"GPIO17"` in another), which the configuration alone cannot see: `farmgate config
    /// check` runs it on the machine that has the chips.
    ///
    /// A sensor whose chip does not exist here (a laptop, a container, a Pi whose overlay is not loaded) is not
    /// compared: the returned notes say so, one per sensor, and what was resolved. A chip that exists without the line
    /// is a located error.
    ///
    /// - Returns: one line per GPIO sensor for the installer: what its line resolved to, or that the check was skipped.
    /// - Throws: the located error for a missing line or a line used twice.
    public static func checkLinesOnChips(_ sensors: [SensorConfiguration]) throws(ConfigurationError) -> [String] {
        var notes: [String] = []
        var first: [String: (claim: ResourceClaim, sensor: SensorConfiguration, written: String)] = [:]
        for sensor in sensors where sensor.driver == Self.description.kind {
            var options = try Options(sensor)
            let written = options.request.name
            switch Self.backend(for: options).lookUp(chip: options.request.chip, line: options.request.line) {
            case .noChip(let why):
                notes.append(
                    "sensor \(sensor.id): GPIO line check skipped: \(why); lines are compared by offset only when the chip exists")
                continue
            case .noLine(let why):
                throw sensor.options.error("line", why)
            case .found(let chip, let offset):
                options.request.chip = .name(chip)
                options.request.line = .offset(offset)
                let resolved = options.request.name
                notes.append("sensor \(sensor.id): GPIO line \(written) " + (resolved == written ? "found" : "is \(resolved)"))
            }
            for claim in options.claims {
                let identity = claim.identity ?? claim.resource
                guard let earlier = first[identity] else {
                    first[identity] = (claim, sensor, written)
                    continue
                }
                let earlierLine = earlier.sensor.options.error(earlier.claim.key, "").line.map { " (line \($0))" } ?? ""
                let other = "sensor \"\(earlier.sensor.id)\"\(earlierLine), which names it \(earlier.written)"
                if !claim.shareable || !earlier.claim.shareable {
                    throw sensor.options.error(
                        claim.key, "\(claim.resource) (written \(written) here) is already used by \(other); only one sensor may use it")
                }
                if claim.settings != earlier.claim.settings {
                    throw sensor.options.error(
                        claim.key,
                        "\(claim.resource) (written \(written) here) is also used by \(other) with \(earlier.claim.settings); every sensor on it must use the same settings (this one has \(claim.settings))")
                }
            }
        }
        return notes
    }
}
