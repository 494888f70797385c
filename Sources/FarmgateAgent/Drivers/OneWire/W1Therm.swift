import FarmgateWire
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// What the Linux w1-therm driver's sysfs files say, parsed. Pure functions, so every fault signature is tested
/// without a 1-Wire bus.
///
/// `w1_slave` holds two lines, the scratchpad with the kernel's CRC verdict, then the scratchpad with the temperature
/// in millidegrees Celsius:
///
/// ```
/// 72 01 4b 46 7f ff 0e 10 57 : crc=57 YES
/// 72 01 4b 46 7f ff 0e 10 57 t=23125
/// ```
///
/// Newer kernels also have `temperature`: the millidegrees alone (`23125`), empty when the conversion failed.
enum W1Therm {
    /// The power-on reset value of the temperature register (85.000 °C): what the sensor holds when it was reset
    /// during the conversion (a brown-out, a loose VDD or ground) and so did not measure. Always refused, as
    /// w1thermsensor does: a hydroponic tank is never 85 °C, and a sensor that browns out at every conversion repeats it.
    static let powerOnMillidegrees = 85_000
    /// What a parasite-powered sensor reads when the bus cannot supply the conversion current: the register stays
    /// 0x07FF, 127.9375 °C, which the kernel prints as 127937 (truncated); 127.94 in datasheets and forum posts, 127984
    /// from clones in 14-bit mode. Every value of 127.9xx °C is taken as that signature (all are beyond the range anyway),
    /// so that the message says what to fix rather than only "out of range".
    static let insufficientPowerMillidegrees = 127_900...127_999
    /// The DS18B20's measuring range.
    static let validMillidegrees = -55_000...125_000

    /// The temperature in millidegrees from the text of `w1_slave`, or why there is none.
    static func parseSlaveFile(_ text: String) -> Result<Int, SensorError> {
        let lines = text.split(whereSeparator: \.isNewline).map { $0.trimming(" \t") }.filter { !$0.isEmpty }
        guard let first = lines.first else {
            return .failure(
                SensorError(.fault, "the sensor returned nothing (the conversion failed); check the data wire, the 4.7 kΩ pull-up and the sensor's power"))
        }
        guard let crcRange = first.firstRange(of: "crc=") else {
            return .failure(SensorError(.invalidResponse, "w1_slave does not look like w1-therm output: \"\(shown(first))\""))
        }
        let verdict = first[crcRange.upperBound...].split(separator: " ").last.map(String.init) ?? ""
        let scratchpad = first[..<crcRange.lowerBound].replacing(":", with: "")
            .split(separator: " ").compactMap { UInt8($0, radix: 16) }
        switch verdict.uppercased() {
        case "YES": break
        case "NO":
            return .failure(
                SensorError(.fault, "CRC check failed (\(shown(first[crcRange.lowerBound...]))): noise on the cable; check the pull-up, cable length and shielding"))
        default:
            return .failure(SensorError(.invalidResponse, "w1_slave has no CRC verdict: \"\(shown(first))\""))
        }
        if scratchpad.count == 9, scratchpad.allSatisfy({ $0 == 0 }) {
            return .failure(SensorError(.fault, "the scratchpad reads all zeros (the sensor did not answer); check its wiring and power"))
        }
        guard lines.count >= 2, let t = lines[1].firstRange(of: "t=") else {
            return .failure(SensorError(.invalidResponse, "w1_slave has no temperature line (t=...)"))
        }
        return parseMillidegrees(String(lines[1][t.upperBound...]), file: "w1_slave")
    }

    /// The temperature in millidegrees from the text of `temperature`.
    static func parseTemperatureFile(_ text: String) -> Result<Int, SensorError> {
        let trimmed = text.trimming(" \t\n\r")
        guard !trimmed.isEmpty else {
            return .failure(
                SensorError(.fault, "the sensor returned nothing (the conversion failed); check the data wire, the 4.7 kΩ pull-up and the sensor's power"))
        }
        return parseMillidegrees(trimmed, file: "temperature")
    }

    /// File content as a message shows it: at most 80 characters, control characters (a NUL-filled file, binary noise)
    /// escaped, so that a bad file neither floods the status and the log nor writes raw bytes to a terminal (a tester,
    /// 2026-12-07: 16.5 KB of NULs in one message).
    static func shown(_ text: some StringProtocol) -> String {
        let head = String(text.prefix(80)).escapingControlCharacters
        return text.count > 80 ? head + "… (\(text.utf8.count) bytes)" : head
    }

    static func parseMillidegrees(_ text: String, file: String) -> Result<Int, SensorError> {
        guard let value = Int(text.trimming(" \t\n\r")) else {
            return .failure(SensorError(.invalidResponse, "\(file) holds \"\(shown(text))\", not a temperature in millidegrees"))
        }
        return .success(value)
    }

    /// Checks a value against what a DS18B20 can mean: the power-on value, starved parasite power, the measuring range.
    static func check(millidegrees: Int) -> SensorError? {
        if millidegrees == powerOnMillidegrees {
            return SensorError(
                .fault,
                "85.000 °C is the DS18B20's power-on reset value, not a measurement: the sensor was reset during the conversion (a brown-out); check its VDD and ground wiring and the supply (3.3 V at the probe)")
        }
        if insufficientPowerMillidegrees.contains(millidegrees) {
            return SensorError(.fault, "127.94 °C means the sensor lacked power for the conversion (parasite power?); wire its VDD to 3.3 V")
        }
        if !validMillidegrees.contains(millidegrees) {
            return SensorError(.invalidResponse, "\(Double(millidegrees) / 1000) °C is outside the DS18B20's range (-55 to 125 °C)")
        }
        return nil
    }

    /// Degrees Celsius: the kernel's millidegrees over 1000, as w1thermsensor computes them. Not rounded to the
    /// DS18B20's 1/16 °C here: other w1-therm sensors and resolutions (a clone's 1/64 °C) are finer, and the reading
    /// is quantized to the sensor's configured `resolution` (1/16 °C by default for temperature) when it is stored.
    static func celsius(millidegrees: Int) -> Double {
        Double(millidegrees) / 1000
    }
}

extension StringProtocol {
    fileprivate func trimming(_ set: String) -> String {
        let characters = Set(set)
        var slice = self[...]
        while let first = slice.first, characters.contains(first) { slice = slice.dropFirst() }
        while let last = slice.last, characters.contains(last) { slice = slice.dropLast() }
        return String(slice)
    }
}
