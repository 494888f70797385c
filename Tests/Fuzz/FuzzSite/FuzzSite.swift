// libFuzzer harness for what the site agent parses from devices, files and the network (FarmgateAgent,
// FarmgateSupport, FarmgateWire). The first input byte selects the sub-target (modulo 8), the rest is its input;
// FUZZ_TARGET=<n> pins the sub-target (the first byte is then still consumed).
//   0 EZO UART answers: EZOLineSplitter.feed (any chunking), EZOResponse, EZOParse.*, EZOCalibration.*
//   1 DS18B20 w1-therm files: W1Therm.parseSlaveFile / parseTemperatureFile / check / celsius
//   2 Modbus: ModbusPoint.decode / faultSentinel / implausibleFloat, ModbusLink.answerStart
//   3 GPIO line-event protocol: ScriptedGPIOBackend.feed / time
//   4 configuration: ConfigDocument.parse (TOML) -> AgentConfiguration.parse
//   5 network answers: RetryAfter, IngestReceipt (compact and JSON), APIErrorBody, DeviceState,
//     SiteEnrollment.answer, StrictJSON.topLevelMembers
//   6 GPIO debounce and pulse counting: GPIOLineMonitor
//   7 configuration value syntaxes: durations, byte sizes, TOML scalars, endpoints, device keys
// Oracles (besides traps and ASan/leak/timeout reports): line splitting is independent of chunking and bounded;
// EZO readings are plain finite decimals; w1 temperatures lie in -55...125 C; Modbus values are finite and
// answerStart stays in bounds; GPIO times are never negative and pulse counts never go down; Retry-After delays
// and receipt counts are never negative; the compact receipt round-trips (by value); an enrollment answer that
// SiteEnrollment.answer accepts carries a key the agent accepts (KeyFormat.deviceKeyProblem == nil).
// Build and run: Tests/tools/fuzz.sh site [seconds per sub-target] (FARMGATE_FUZZ=1 adds this target to Package.swift).
@testable import FarmgateAgent
@testable import FarmgateSupport
@testable import FarmgateWire
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

let fixedTarget: Int? = getenv("FUZZ_TARGET").flatMap { Int(String(cString: $0)) }
let targetCount = 8
/// A plan as `farmgate enroll` makes it, for SiteEnrollment.answer (which only reads it; nothing is written).
let enrollmentPlan = SiteEnrollment.Plan(
    request: SiteEnrollment.Request(endpoint: "https://ingest.example.net", token: "fge_abcdefgh_" + String(repeating: "1", count: 64), configPath: "/nonexistent/agent.toml"),
    endpoint: "https://ingest.example.net", keyFile: "/nonexistent/device.key", originalText: "", configExists: false,
    device: nil, caFile: nil, configTarget: "/nonexistent/agent.toml")

func fail(_ message: String) -> Never {
    let text = "FUZZ ORACLE: \(message)\n"
    _ = text.withCString { write(2, $0, strlen($0)) }
    abort()
}

@_cdecl("LLVMFuzzerTestOneInput") public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 1 else { return 0 }
    let selector = fixedTarget ?? Int(data[0])
    let bytes = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    switch selector % targetCount {
    case 0: fuzzEZO(bytes)
    case 1: fuzzW1(bytes)
    case 2: fuzzModbus(bytes)
    case 3: fuzzGPIOScript(bytes)
    case 4: fuzzTOML(bytes)
    case 5: fuzzNetwork(bytes)
    case 6: fuzzGPIOMonitor(bytes)
    default: fuzzConfigValues(bytes)
    }
    return 0
}

// MARK: 0 EZO: line splitter (any chunking), response classification, answer parsers.

/// A reading as an EZO circuit writes it: -?digits(.digits)?, no leading zero before another digit.
func isPlainDecimal(_ s: Substring) -> Bool {
    var body = s[...]
    if body.first == "-" { body = body.dropFirst() }
    let parts = body.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false)
    guard let intPart = parts.first, !intPart.isEmpty, intPart.allSatisfy({ $0 >= "0" && $0 <= "9" }) else { return false }
    if intPart.count > 1 && intPart.first == "0" { return false }
    if parts.count == 2 {
        guard !parts[1].isEmpty, parts[1].allSatisfy({ $0 >= "0" && $0 <= "9" }) else { return false }
    }
    return true
}

func fuzzEZO(_ bytes: [UInt8]) {
    guard !bytes.isEmpty else { return }
    // Chunking from the first byte: the same bytes cut differently must give the same lines.
    let step = Int(bytes[0] % 7) + 1
    let stream = Array(bytes.dropFirst())
    var whole = EZOLineSplitter()
    let all = whole.feed(stream)
    var chunked = EZOLineSplitter()
    var pieces: [EZOLine] = []
    var i = 0
    while i < stream.count {
        pieces += chunked.feed(stream[i..<min(stream.count, i + step)])
        i += step
    }
    if all != pieces { fail("EZO splitter: chunking changed the lines") }
    if whole.pending != chunked.pending { fail("EZO splitter: chunking changed the pending bytes") }
    if whole.pending.count > EZOLineSplitter.maxLine { fail("EZO splitter: pending grew past maxLine") }
    for line in all {
        let response = EZOResponse(line: line)
        guard case .data(let text) = response else { continue }
        if text.utf8.contains(where: { $0 < 0x20 || $0 >= 0x7F }) { fail("EZO data line with non-printable bytes: \(Array(text.utf8))") }
        if let values = EZOParse.reading(text) {
            // Oracle: every field of an accepted reading is a plain decimal as the circuit writes it.
            for field in text.split(separator: ",", omittingEmptySubsequences: false) {
                if !isPlainDecimal(Substring(field.trimmingWhitespace())) {
                    fail("EZO reading accepted with a field that is no plain decimal: \(text.debugDescription) -> \(values)")
                }
            }
            if values.contains(where: { !$0.isFinite }) { fail("EZO reading not finite") }
        }
        _ = EZOParse.identity(text)
        _ = EZOParse.outputs(text)
        _ = EZOParse.oxygenOutputs(text)
        _ = EZOParse.scale(text)
        _ = EZOParse.responseCodes(text)
        if let kind = EZOParse.identity(text).flatMap({ EZOCircuitKind(identity: $0.type) }) { _ = kind.description }
        _ = EZOCalibration.parseCalibrated(text)
        if let slope = EZOCalibration.parseSlope(text) {
            _ = EZOCalibration.slopeWarning(slope)
            _ = EZOCalibration.format(slope.acidPercent)
            _ = EZOCalibration.format(slope.basePercent)
            if let offset = slope.offsetMillivolts { _ = EZOCalibration.format(offset) }
        }
        _ = EZOSession.show(Array(text.utf8))
    }
    // Arbitrary text straight into the parsers too (not only splitter lines).
    let raw = String(decoding: stream, as: UTF8.self)
    if let values = EZOParse.reading(raw) {
        for field in raw.split(separator: ",", omittingEmptySubsequences: false) where !isPlainDecimal(Substring(field.trimmingWhitespace())) {
            fail("EZO reading (raw) accepted a non-decimal field: \(raw.debugDescription) -> \(values)")
        }
    }
    _ = EZOCalibration.parseSlope(raw)
    _ = EZOCalibration.parseCalibrated(raw)
    _ = EZOSession.show(stream)
}

// MARK: 1 DS18B20 w1_slave / temperature text.

func fuzzW1(_ bytes: [UInt8]) {
    let text = String(decoding: bytes, as: UTF8.self)
    if case .success(let milli) = W1Therm.parseSlaveFile(text) {
        if W1Therm.check(millidegrees: milli) == nil {
            _ = W1Therm.celsius(millidegrees: milli)
            // Oracle: an accepted reading came from a file with a YES verdict whose t= value is an integer.
            let lines = text.split(whereSeparator: \.isNewline)
            guard lines.count >= 2 else { fail("w1_slave accepted with fewer than two lines: \(text.debugDescription)") }
            if !(-55_000...125_000).contains(milli) { fail("w1_slave value out of range accepted") }
        }
    }
    if case .success(let milli) = W1Therm.parseTemperatureFile(text) {
        _ = W1Therm.check(millidegrees: milli)
    }
}

// MARK: 2 Modbus register decoding and the discarded-bytes scanner.

func fuzzModbus(_ bytes: [UInt8]) {
    guard bytes.count >= 4 else { return }
    let flags = bytes[0]
    let types = ModbusDataType.allCases
    let type = types[Int(flags & 0x7) % types.count]
    let scales: [Double] = [1, 0.1, 0.01, 0.001, 0.0001, 10, -1, 1e-6, 1e30]
    let offsets: [Double] = [0, -40, 273.15, 1e308, -1e308]
    let point = ModbusPoint(
        slave: Int(bytes[1] % 247) + 1, address: 0, dataType: type,
        lowWordFirst: flags & 0x8 != 0, swapBytes: flags & 0x10 != 0,
        scale: scales[Int(bytes[2]) % scales.count], offset: offsets[Int(bytes[3]) % offsets.count])
    let payload = Array(bytes.dropFirst(4))
    var registers: [UInt16] = []
    var j = 0
    while j + 1 < payload.count && registers.count < 8 {
        registers.append(UInt16(payload[j]) << 8 | UInt16(payload[j + 1]))
        j += 2
    }
    // A slice that does not start at 0, as the bus hands over.
    let slice = registers.dropFirst(registers.isEmpty ? 0 : 1)
    for regs in [registers[...], slice] {
        let sentinel = point.faultSentinel(regs)
        let problem = point.implausibleFloat(regs)
        if let value = point.decode(regs) {
            if !value.isFinite { fail("Modbus decode returned a non-finite value") }
        }
        _ = (sentinel, problem)
        _ = ModbusDriver.hex(Array(regs))
    }
    let start = ModbusLink.answerStart(in: payload, slave: Int(bytes[1]), function: bytes[2])
    if let start {
        if start < 0 || start >= payload.count { fail("answerStart out of bounds") }
    }
    _ = ModbusPoint.exactResolution(scale: scales[Int(bytes[2]) % scales.count], offset: offsets[Int(bytes[3]) % offsets.count], quantity: .ph)
    _ = ModbusLink.exceptionName(Int(bytes[3]))
    _ = ModbusLink.functionName(bytes[3])
}

// MARK: 3 GPIO line-event protocol (the events_file).

func fuzzGPIOScript(_ bytes: [UInt8]) {
    let text = String(decoding: bytes, as: UTF8.self)
    let backend = ScriptedGPIOBackend()
    for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
        do { try backend.feed(String(line)) } catch {}
    }
    _ = backend.now()
    _ = backend.undelivered
    for word in text.split(separator: " ").prefix(16) {
        if let t = try? ScriptedGPIOBackend.time(String(word), line: text) {
            if t < 0 { fail("GPIO time negative: \(word) -> \(t)") }
        }
    }
}

// MARK: 4 TOML document + agent configuration validation.

func fuzzTOML(_ bytes: [UInt8]) {
    let text = String(decoding: bytes, as: UTF8.self)
    guard let root = try? ConfigDocument.parse(text, file: "/nonexistent-fuzz/farmgate.toml") else { return }
    _ = try? AgentConfiguration.parse(root)
}

// MARK: 5 What the agent parses from the network.

func fuzzNetwork(_ bytes: [UInt8]) {
    guard !bytes.isEmpty else { return }
    let mode = bytes[0] % 6
    let body = Array(bytes.dropFirst())
    let text = String(decoding: body, as: UTF8.self)
    switch mode {
    case 0:
        // Retry-After (with and without a Date header).
        let halves = text.split(separator: "\n", maxSplits: 1, omittingEmptySubsequences: false)
        let value = String(halves[0])
        let date = halves.count > 1 ? String(halves[1]) : nil
        if let delay = RetryAfter.delay(value, now: Timestamp(microseconds: 1_780_000_000_000_000), responseDate: date) {
            if delay < .zero { fail("negative Retry-After") }
        }
        _ = RetryAfter.httpDate(value)
    case 1:
        // Compact receipt.
        if let receipt = IngestReceipt(compact: body) {
            if receipt.accepted < 0 || receipt.duplicates < 0 { fail("negative compact counts") }
            for batch in [0, 1, 7, 500] {
                _ = Uploader.rejectedTotal(receipt, batch: batch)
                if let c = receipt.calibrations { _ = Uploader.countsEvents(c, sent: batch) }
            }
            // Overlong LEB128 (0x80 0x00 for 0) is accepted and harmless: compare the decoded values, not the bytes.
            if let again = receipt.compact, IngestReceipt(compact: again) != receipt { fail("compact receipt does not round-trip") }
        }
    case 2:
        // JSON receipt, as acknowledge() reads it.
        if let receipt = try? JSONDecoder().decode(IngestReceipt.self, from: Data(body)) {
            for batch in [0, 1, 7, 500] {
                _ = Uploader.rejectedTotal(receipt, batch: batch)
                if let c = receipt.calibrations { _ = Uploader.countsEvents(c, sent: batch) }
            }
            for seq in [UInt64(0), 1, 2, 17, 1 << 40, UInt64.max] { _ = receipt.rejection(of: seq) }
            for group in receipt.rejected { for run in group.sequences { _ = run.count } }
        }
    case 3:
        if let error = try? JSONDecoder().decode(APIErrorBody.self, from: Data(body)) { _ = error.error.message }
        if let state = try? JSONDecoder().decode(DeviceState.self, from: Data(body)) { _ = state.effectiveAcceptedVersions }
    case 4:
        // A 200 enrollment answer: whatever SiteEnrollment.answer accepts is written to the key file, so its key must be one
        // the agent accepts.
        if let answer = try? SiteEnrollment.answer(HTTPResponse(status: 200, headers: [], body: body), plan: enrollmentPlan),
            let problem = KeyFormat.deviceKeyProblem(answer.key)
        {
            fail("enrollment answer accepted with a key the agent refuses: \(answer.key.debugDescription) \(problem)")
        }
    default:
        _ = try? StrictJSON.topLevelMembers(body)
    }
}

// MARK: 6 GPIO edge debouncing / pulse counting state machine.

func fuzzGPIOMonitor(_ bytes: [UInt8]) {
    guard bytes.count >= 3 else { return }
    let debounce = Int64(bytes[1]) * 1_000_000
    let mode: GPIOLineMonitor.Mode = bytes[0] & 1 == 0
        ? .input(debounce: debounce) : .pulses(edge: bytes[0] & 2 == 0 ? .rising : .falling, debounce: debounce)
    var monitor = GPIOLineMonitor(mode: mode, activeLow: bytes[0] & 4 != 0, physicalLevel: Int(bytes[2] & 1), at: 1_000_000_000)
    var t: Int64 = 1_000_000_000
    var lastPulses: UInt64 = 0
    var k = 3
    while k + 1 < bytes.count {
        let op = bytes[k]
        let arg = bytes[k + 1]
        k += 2
        // Times mostly forward, sometimes backwards (a lost/reordered timestamp).
        if op & 0x80 != 0 { t -= Int64(arg) * 100_000 } else { t += Int64(arg) * 1_000_000 }
        switch op & 0x7 {
        case 0, 1: monitor.apply(GPIOEdgeEvent(.rising, at: t))
        case 2, 3: monitor.apply(GPIOEdgeEvent(.falling, at: t))
        case 4:
            let p = monitor.pulses(at: t)
            if p < lastPulses { fail("pulse count went down") }
            lastPulses = p
        case 5: _ = monitor.state(at: t); _ = monitor.takeChanges()
        case 6:
            let w = monitor.takeFlowWindow(at: t)
            if w.pulses < 0 { fail("negative flow window") }
        default: monitor.restart(physicalLevel: Int(arg & 1), at: t)
        }
    }
}

// MARK: 7 configuration value syntaxes (durations, byte sizes, endpoints, TOML scalars).

func fuzzConfigValues(_ bytes: [UInt8]) {
    let text = String(decoding: bytes, as: UTF8.self)
    _ = ConfigTable.parseDuration(text)
    _ = ConfigTable.parseByteSize(text)
    _ = TOMLParser.integer(text)
    _ = TOMLParser.double(text)
    _ = AgentConfiguration.endpointProblem(text)
    _ = AgentConfiguration.endpointQueryOrFragment(text)
    _ = AgentConfiguration.redactingUserInfo(text)
    _ = AgentConfiguration.lexicalPath(text)
    _ = KeyFormat.deviceKeyProblem(text)
}

// SwiftPM links executables with `main` aliased to `<Module>_main`: hand control to libFuzzer's driver from there
// (built with -parse-as-library, so the module has no `main` of its own).
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>, Int) -> CInt) -> CInt

@_cdecl("FuzzSite_main") public func fuzzSiteMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var count = argc
    var vector = argv
    return LLVMFuzzerRunDriver(&count, &vector, { fuzz($0, $1) })
}
