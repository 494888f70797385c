// libFuzzer harness for the FarmgateWire decoders that take untrusted bytes (what the ingest decodes from a device),
// plus encode -> decode round trips. The first input byte selects the sub-target (modulo 13), the rest is its input;
// FUZZ_TARGET=<n> pins the sub-target (the whole input is then its input).
//   0 BatchCodec.decodeFrame (binary v2/v3)   1 decodeStatefulHead -> decodeStateful (v4)   2 BatchJSON.decode
//   3 StrictJSON.topLevelMembers   4 Zstd.decompress   5 Gzip.decompress   6 RFC3339.parse / format
//   7 Resolution(parsing:) and quantize   8 RetryAfter   9 KeyFormat   10 SensorTable(encoded:)
//   11 generated batch -> BatchCodec.encode / BatchJSON.encode -> decode   12 generated batch over a WireSession
// Oracles (besides traps and ASan/leak/timeout reports): a decoded JSON batch re-encodes to the same readings;
// RFC 3339 parse -> format -> parse and format -> parse round-trip; a resolution round-trips through its description
// and quantize(decimal:) agrees with quantize(Double) within one step; SensorTable accepts canonical bytes only;
// binary, JSON and stateful-session round trips give the input back (at each sensor's resolution).
// FUZZ_DUMP=<dir> (sub-targets 11 and 12) writes the frames and JSON batches they encode, uncompressed, as seeds
// into <dir>/0, <dir>/1 and <dir>/2 (and <dir>/all with the selector byte); Tests/tools/fuzz.sh wire uses it.
// Build and run: Tests/tools/fuzz.sh wire [seconds per sub-target] (FARMGATE_FUZZ=1 adds this target to Package.swift).
@testable import FarmgateWire

#if canImport(Glibc)
import Glibc
#endif

private let dumpDir: String? = getenv("FUZZ_DUMP").map { String(cString: $0) }
private nonisolated(unsafe) var dumpCount = 0

/// Seed-dump mode (FUZZ_DUMP=dir): writes `bytes` as `<dir>/<selector>/<n>`, with selector byte prepended in `<dir>/all`.
private func dump(_ selector: Int, _ bytes: [UInt8]) {
    guard let dumpDir else { return }
    dumpCount += 1
    for (dir, content) in [("\(dumpDir)/\(selector)", bytes), ("\(dumpDir)/all", [UInt8(selector)] + bytes)] {
        mkdir(dir, 0o755)
        if let f = fopen("\(dir)/seed\(dumpCount)", "wb") {
            _ = content.withUnsafeBufferPointer { fwrite($0.baseAddress, 1, $0.count, f) }
            fclose(f)
        }
    }
}

/// The same frame with its body stored uncompressed (flags 0), so that mutations reach the decoder.
private func uncompressed(_ frame: [UInt8]) -> [UInt8]? {
    guard frame.count >= 5 else { return nil }
    let flags = frame[4]
    guard flags & 1 != 0 else { return frame }
    guard let body = try? Zstd.decompress(Array(frame[5...]), maxOutput: 1 << 24, magicless: flags & 2 != 0) else { return nil }
    return Array(frame[0..<4]) + [0] + body
}

private let pinned: Int? = getenv("FUZZ_TARGET").flatMap { Int(String(cString: $0)) }

private func fail(_ message: String) -> Never {
    print("PROPERTY VIOLATION: \(message)")
    fflush(nil)
    abort()
}

/// Reads little pieces out of the fuzz input (for generated batches).
private struct Bytes {
    var data: [UInt8]
    var i = 0
    mutating func u8() -> UInt8 { defer { i += 1 }; return i < data.count ? data[i] : 0 }
    mutating func u64() -> UInt64 { var v: UInt64 = 0; for k in 0..<8 { v |= UInt64(u8()) << UInt64(8 * k) }; return v }
    mutating func varSmall() -> Int64 {
        // Mostly small values, sometimes extreme.
        switch u8() % 4 {
        case 0: return Int64(Int8(bitPattern: u8()))
        case 1: return Int64(Int16(bitPattern: UInt16(u8()) | UInt16(u8()) << 8))
        case 2: return Int64(bitPattern: u64())
        default: return Int64(u8())
        }
    }
    var atEnd: Bool { i >= data.count }
}

private let quantities = Quantity.allCases
private let resolutions: [Resolution] = [.one, .tenth, .hundredth, .thousandth, .sixteenth]

private func canonical(_ readings: [Reading]) -> [Reading] {
    readings.sorted {
        ($0.sequence, $0.sensor.rawValue, $0.timestamp.microseconds, $0.value, $0.quality.rawValue)
            < ($1.sequence, $1.sensor.rawValue, $1.timestamp.microseconds, $1.value, $1.quality.rawValue)
    }
}

private func quantized(_ batch: Batch) -> [Reading] {
    let res = Dictionary(batch.sensors.map { ($0.id, $0.resolution) }, uniquingKeysWith: { a, _ in a })
    return batch.readings.map { r in
        var r = r
        if let resolution = res[r.sensor], let steps = resolution.quantize(r.value) { r.value = resolution.value(ofSteps: steps) }
        return r
    }
}

/// A batch generated from fuzz bytes: a few sensors, readings with random (often regular) timestamps/values/sequences.
private func generateBatch(_ b: inout Bytes, extremes: Bool) -> Batch? {
    guard let device = try? DeviceID("dev\(b.u8() % 4)") else { return nil }
    let sensorCount = Int(b.u8() % 6)
    var sensors: [SensorDescriptor] = []
    for k in 0..<sensorCount {
        let q = quantities[Int(b.u8()) % quantities.count]
        let r: Resolution? = b.u8() % 3 == 0 ? resolutions[Int(b.u8()) % resolutions.count] : nil
        guard let id = try? SensorID("s\(k)x\(b.u8() % 3)") else { return nil }
        if sensors.contains(where: { $0.id == id }) { continue }
        sensors.append(SensorDescriptor(id: id, quantity: q, resolution: r))
    }
    var readings: [Reading] = []
    if sensors.isEmpty { return Batch(device: device, sensors: [], readings: []) }
    let n = Int(b.u8()) % 40
    var seq = UInt64(b.u8())
    var ts: Int64 = 1_700_000_000_000_000 + Int64(b.u8()) * 1_000_000
    for _ in 0..<n {
        let s = sensors[Int(b.u8()) % sensors.count]
        let mode = b.u8()
        if extremes && mode % 7 == 0 { seq = b.u64() } else { seq &+= UInt64(mode % 3) }
        if extremes && mode % 11 == 0 { ts = Int64(bitPattern: b.u64()) } else { ts &+= b.varSmall() }
        let steps = b.varSmall() % 1_000_000_000_000
        let value = s.resolution.value(ofSteps: steps)
        let flags = QualityFlags(rawValue: b.u8() % 5 == 0 ? UInt16(b.u8()) : 0)
        readings.append(Reading(sensor: s.id, sequence: seq, timestamp: Timestamp(microseconds: ts), value: value, quality: flags))
    }
    return Batch(device: device, sensors: sensors, readings: readings)
}

private func context(for table: SensorTable) -> [SensorID: ContextReading] {
    var context: [SensorID: ContextReading] = [:]
    for (i, d) in table.sensors.enumerated() {
        context[d.id] = ContextReading(
            sequence: 1000 + UInt64(i), timestamp: Timestamp(microseconds: 1_700_000_000_000_000 + Int64(i) * 10_000_000),
            value: d.resolution.value(ofSteps: Int64(i) * 3))
    }
    return context
}

private let fallbackTable: SensorTable = {
    let sensors = [
        SensorDescriptor(id: try! SensorID("tank1.ph"), quantity: .ph),
        SensorDescriptor(id: try! SensorID("tank1.ec"), quantity: quantities[1 % quantities.count]),
        SensorDescriptor(id: try! SensorID("tank2.temp"), quantity: quantities[2 % quantities.count], resolution: .sixteenth),
    ]
    return try! SensorTable(sensors)
}()

private func sampleEvent(_ batch: Batch) -> CalibrationEvent {
    CalibrationEvent(
        id: "cal-1", sensor: batch.sensors.first?.id ?? (try! SensorID("tank1.ph")), time: Timestamp(microseconds: 1_700_000_000_000_000),
        circuit: "EZO-pH", firmware: "2.16",
        points: [.init(name: "mid", reference: 7.0, at: Timestamp(microseconds: 1_700_000_000_000_000), reading: 7.01)],
        calibratedPoints: 1, slope: .init(acidPercent: 99.5, basePercent: 100.2, offsetMillivolts: -1.5))
}

private func touch(_ batch: Batch) {
    // What the ingest does with a decoded batch: format timestamps, look at values.
    for r in batch.readings.prefix(2000) {
        _ = RFC3339.format(r.timestamp)
        _ = r.value.isFinite
    }
    _ = BatchJSON.encode(batch)
}

private func run(_ selector: Int, _ input: [UInt8]) {
    let limits = BatchLimits.default
    switch selector {
    case 0:  // binary frame, version 2/3
        if let frame = try? BatchCodec.decodeFrame(input, limits: limits) { touch(frame.batch) }
    case 1:  // stateful frame (version 4): head, then against the declared table (or a fixed one) and a context
        guard let head = try? BatchCodec.decodeStatefulHead(input, limits: limits) else { return }
        let table = head.declaredTable ?? fallbackTable
        let device = try! DeviceID("dev1")
        for ctx in [[:], context(for: table)] {
            if head.usesContext, !head.contextMatches(table: table, context: ctx) { continue }
            if let frame = try? BatchCodec.decodeStateful(head, table: table, context: ctx, device: device, limits: limits) {
                touch(frame.batch)
            }
        }
    case 2:  // JSON batch
        if let decoded = try? BatchJSON.decode(input, limits: limits) {
            touch(decoded.batch)
            // Re-encoding what was accepted must decode again to the same readings.
            let again = BatchJSON.encode(decoded.batch)
            guard let redecoded = try? BatchJSON.decode(again, limits: limits) else {
                fail("BatchJSON.encode of a decoded batch does not decode: \(String(decoding: again.prefix(400), as: UTF8.self))")
            }
            let a = canonical(decoded.batch.readings.filter { $0.value.isFinite })
            let b = canonical(redecoded.batch.readings.filter { $0.value.isFinite })
            if a != b { fail("JSON re-encode changes readings: \(a.prefix(3)) vs \(b.prefix(3))") }
        }
    case 3:
        _ = try? StrictJSON.topLevelMembers(input)
    case 4:
        _ = try? Zstd.decompress(input, maxOutput: 1 << 20)
    case 5:
        _ = try? Gzip.decompress(input, maxOutput: 1 << 20)
    case 6:  // RFC 3339 parse / format round trip
        let text = String(decoding: input, as: UTF8.self)
        if let t = RFC3339.parse(text) {
            let formatted = RFC3339.format(t)
            guard let back = RFC3339.parse(formatted) else { fail("format(parse(\(text))) = \(formatted) does not parse") }
            if back != t { fail("RFC3339 round trip: \(text) -> \(t.microseconds) -> \(formatted) -> \(back.microseconds)") }
        }
        if input.count >= 8 {
            var b = Bytes(data: input)
            let t = Timestamp(microseconds: Int64(bitPattern: b.u64()))
            let formatted = RFC3339.format(t)
            if let back = RFC3339.parse(formatted), back != t {
                fail("RFC3339 format/parse: \(t.microseconds) -> \(formatted) -> \(back.microseconds)")
            }
        }
    case 7:  // Resolution parsing and decimal quantization
        let text = String(decoding: input, as: UTF8.self)
        if let r = try? Resolution(parsing: text) {
            _ = r.step
            guard let back = try? Resolution(parsing: r.description) else { fail("resolution \(r) does not parse back") }
            if back != r { fail("resolution round trip \(text) -> \(r) -> \(back)") }
        }
        for r in resolutions {
            if let steps = r.quantize(decimal: text), let d = Double(text), let viaDouble = r.quantize(d) {
                if (steps - viaDouble).magnitude > 1 { fail("quantize(decimal: \(text)) = \(steps) but via double \(viaDouble) at \(r)") }
            }
        }
    case 8:
        let text = String(decoding: input, as: UTF8.self)
        _ = RetryAfter.delay(text, now: Timestamp(microseconds: 1_700_000_000_000_000), responseDate: text)
        _ = RetryAfter.httpDate(text)
    case 9:
        let text = String(decoding: input, as: UTF8.self)
        _ = KeyFormat.parts(of: text)
        _ = KeyFormat.deviceKeyProblem(text)
        _ = KeyFormat.isKeyID(text)
    case 10:  // sensor table encoding
        if let table = try? SensorTable(encoded: input, limits: limits) {
            if table.encoded != input { fail("SensorTable(encoded:) accepted non-canonical bytes") }
        }
    case 11:  // round trip: generated batch -> binary v2 -> decode == quantized input; and JSON
        var b = Bytes(data: input)
        let extremes = b.u8() & 1 == 1
        guard let batch = generateBatch(&b, extremes: extremes) else { return }
        guard let bytes = try? BatchCodec.encode(batch, compressionLevel: 1) else { return }
        let decoded: Batch
        do { decoded = try BatchCodec.decode(bytes, limits: limits) } catch { fail("decode(encode(batch)) failed: \(error)\n\(batch)") }
        let want = canonical(quantized(batch))
        let got = canonical(decoded.readings)
        if want != got { fail("binary round trip differs:\nwant \(want)\ngot  \(got)") }
        if decoded.device != batch.device || decoded.sensors != batch.sensors.sorted(by: { $0.id < $1.id }) {
            fail("binary round trip changes device/sensors")
        }
        if dumpDir != nil, let u = uncompressed(bytes) {
            dump(0, u)
            dump(0, bytes)
            if let v3 = try? BatchCodec.encode(batch, calibrations: [sampleEvent(batch)], compressionLevel: 1), let u3 = uncompressed(v3) { dump(0, u3) }
        }
        let json = BatchJSON.encode(batch)
        dump(2, json)
        guard let dj = try? BatchJSON.decode(json, limits: limits) else { fail("JSON decode(encode(batch)) failed\n\(String(decoding: json, as: UTF8.self))") }
        // JSON carries only the named flags (documented): compare those.
        let named = QualityFlags.names.reduce(into: QualityFlags()) { $0.formUnion($1.0) }
        let jwant = canonical(want.map { var r = $0; r.quality = r.quality.intersection(named); return r })
        let jgot = canonical(dj.batch.readings)
        if jgot != jwant { fail("JSON round trip differs:\nwant \(jwant)\ngot  \(jgot)\nrejected \(dj.rejected)") }
    case 12:  // stateful session round trip over several frames
        var b = Bytes(data: input)
        let extremes = b.u8() & 1 == 1
        guard let batch = generateBatch(&b, extremes: extremes), !batch.sensors.isEmpty,
            let table = try? SensorTable(batch.sensors)
        else { return }
        var session = WireSession()
        var tables: [UInt64: SensorTable] = [:]
        var latest: [SensorID: ContextReading] = [:]
        // An agent never sends one sequence twice with other content (the ingest refuses it as sequence_conflict):
        // readings tied on (timestamp, sequence) with other values made the sender's and receiver's `latest` differ
        // (F2, a harness artifact), so sequences are unique here.
        var seenSequences = Set<UInt64>()
        let sorted = batch.readings.filter { seenSequences.insert($0.sequence).inserted }.sorted { $0.sequence < $1.sequence }
        let partSize = max(1, Int(b.u8() % 8) + 1)
        var start = 0
        repeat {
            let part = Array(sorted[start..<min(start + partSize, sorted.count)])
            start += partSize
            guard let frame = try? session.encode(Batch(device: batch.device, sensors: [], readings: part), table: table, compressionLevel: 1)
            else { return }
            if dumpDir != nil, let u = uncompressed(frame.bytes) { dump(1, u) }
            let head: StatefulFrameHead
            do { head = try BatchCodec.decodeStatefulHead(frame.bytes) } catch { fail("stateful head of own frame: \(error)") }
            if let declared = head.declaredTable { tables[declared.hash] = declared }
            guard let t = tables[head.tableHash] else { fail("unknown table for own frame") }
            if head.usesContext, !head.contextMatches(table: t, context: latest) { fail("stale context on own frame\nbatch \(batch.readings)\npart \(part)\nreceiver latest \(latest)\nsession context \(session.context)") }
            let decoded: BatchFrame
            do { decoded = try BatchCodec.decodeStateful(head, table: t, context: latest, device: batch.device) } catch {
                fail("decodeStateful of own frame: \(error)\npart \(part)\ncontext \(latest)")
            }
            let want = canonical(quantized(Batch(device: batch.device, sensors: batch.sensors, readings: part)))
            let got = canonical(decoded.batch.readings)
            if want != got { fail("stateful round trip differs:\nwant \(want)\ngot  \(got)\ncontext \(latest)") }
            for r in got {
                let c = ContextReading(sequence: r.sequence, timestamp: r.timestamp, value: r.value)
                if let cur = latest[r.sensor], !c.isNewer(than: cur) { continue }
                latest[r.sensor] = c
            }
            session.delivered(frame, acknowledged: part)
        } while start < sorted.count
    default:
        break
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    if let pinned {
        run(pinned, bytes)
    } else {
        guard let first = bytes.first else { return 0 }
        run(Int(first) % 13, Array(bytes.dropFirst()))
    }
    return 0
}

// SwiftPM links executables with `main` aliased to `<Module>_main`: hand control to libFuzzer's driver from there
// (built with -parse-as-library, so the module has no `main` of its own).
@_silgen_name("LLVMFuzzerRunDriver")
private func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>, Int) -> CInt
) -> CInt

@_cdecl("FuzzWire_main")
public func fuzzWireMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var argc = argc
    var argv = argv
    return LLVMFuzzerRunDriver(&argc, &argv, fuzz)
}
