#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// A decoded binary frame of any version this build reads: the readings, and the calibration events of a version 3 frame.
public struct BatchFrame: Hashable, Sendable {
    public var version: UInt8
    public var batch: Batch
    public var calibrations: [CalibrationEvent]

    public init(version: UInt8, batch: Batch, calibrations: [CalibrationEvent]) {
        self.version = version
        self.batch = batch
        self.calibrations = calibrations
    }
}

/// Format version 3: a version 2 frame whose body starts with an events section.
///
/// ```
/// "FGB"  version=3  flags       as in version 2
/// body   events section, then the version 2 body (header, tables, streams) unchanged
/// events section   E (uvarint, at most maxEvents), then E times: length L (uvarint, at most maxEventBytes), then L bytes
///                  of one calibration event as JSON (the `calibrations` member's element of the JSON form)
/// ```
/// A batch without events is written as version 2, so an ingest that reads only version 2 keeps taking readings; a
/// version 3 frame is sent only to an ingest that lists 3 in `accepted_versions` (GET /v1/device). Events are rare and
/// small: JSON inside the compressed body costs little and keeps one definition of an event for both forms.
extension BatchCodec {
    /// The format version that carries calibration events.
    public static let eventsFormatVersion: UInt8 = 3
    /// The versions ``decodeFrame(_:limits:)`` reads.
    public static let readableVersions: [UInt8] = [formatVersion, eventsFormatVersion]
    /// The most events one frame may carry.
    public static let maxEvents = 1_000
    /// The largest encoded event.
    public static let maxEventBytes = 16 << 10

    /// Encodes `batch` with `calibrations`: version 2 when there are none, else version 3.
    /// - Throws: ``BatchEncodingError`` for what ``encode(_:compressionLevel:)`` refuses, too many events, or an event
    ///   that cannot be encoded.
    public static func encode(_ batch: Batch, calibrations: [CalibrationEvent], compressionLevel: Int32 = 19) throws(BatchEncodingError) -> [UInt8] {
        guard !calibrations.isEmpty else { return try encode(batch, compressionLevel: compressionLevel) }
        guard calibrations.count <= maxEvents else {
            throw BatchEncodingError("\(calibrations.count) calibration events in one batch, more than \(maxEvents)")
        }
        var events = ByteWriter()
        try writeEvents(calibrations, to: &events)
        let streams = [("events", events.bytes)] + (try encodeStreams(batch))
        let body = compressBody(streams: streams, level: compressionLevel)
        return magic + [eventsFormatVersion, flagZstd | (body.magicless ? flagMagicless : 0)] + body.bytes
    }

    /// Each event's JSON text, as both forms carry it (sorted keys, so that an event is always the same bytes).
    /// - Throws: ``BatchEncodingError`` for more than ``maxEvents`` events, an invalid id, an event that cannot be encoded
    ///   or one larger than ``maxEventBytes``.
    static func encodeEvents(_ calibrations: [CalibrationEvent]) throws(BatchEncodingError) -> [[UInt8]] {
        guard calibrations.count <= maxEvents else {
            throw BatchEncodingError("\(calibrations.count) calibration events in one batch, more than \(maxEvents)")
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var texts: [[UInt8]] = []
        texts.reserveCapacity(calibrations.count)
        for event in calibrations {
            guard CalibrationEvent.isValidID(event.id) else {
                throw BatchEncodingError("calibration event id \"\(event.id.prefix(80))\" is not 1 to 64 of A-Z, a-z, 0-9, - and _")
            }
            let json: Data
            do { json = try encoder.encode(event) } catch {
                throw BatchEncodingError("calibration event \(event.id) cannot be encoded: \(error)")
            }
            guard json.count <= maxEventBytes else {
                throw BatchEncodingError("calibration event \(event.id) is \(json.count) bytes, more than \(maxEventBytes)")
            }
            texts.append(Array(json))
        }
        return texts
    }

    /// Decodes one event's JSON text and checks it (``CalibrationEvent/problem``), for both forms.
    /// - Parameter what: how an error names the event (`calibration event 3`, `calibrations[2]`).
    static func decodeEvent(_ json: ArraySlice<UInt8>, what: String) throws(BatchDecodingError) -> CalibrationEvent {
        let event: CalibrationEvent
        do { event = try JSONDecoder().decode(CalibrationEvent.self, from: Data(json)) } catch {
            throw BatchDecodingError("\(what) is not a calibration event: \(JSONErrorText.describe(error))")
        }
        if let problem = event.problem { throw BatchDecodingError("\(what): \(problem)") }
        return event
    }

    /// Decodes a frame of version 2 or 3. Total, like ``decode(_:limits:)``: any bytes give a frame or an error naming
    /// what was wrong.
    public static func decodeFrame(_ bytes: [UInt8], limits: BatchLimits = .default) throws(BatchDecodingError) -> BatchFrame {
        let (version, body) = try self.body(of: bytes, versions: Set(readableVersions), limits: limits)
        guard version == eventsFormatVersion else {
            return BatchFrame(version: version, batch: try decodeBody(body, limits: limits), calibrations: [])
        }
        var reader = ByteReader(body)
        let calibrations = try readEvents(&reader)
        let batch = try decodeBody(Array(body[reader.offset...]), limits: limits)
        return BatchFrame(version: version, batch: batch, calibrations: calibrations)
    }

    /// Reads the events section that opens a version 3 or 4 body.
    static func readEvents(_ reader: inout ByteReader) throws(BatchDecodingError) -> [CalibrationEvent] {
        let count = try reader.count("calibration event count", limit: maxEvents)
        // Each event takes at least two bytes (a length and a brace).
        guard count <= reader.remaining / 2 else {
            throw BatchDecodingError("the frame declares \(count) calibration events but only \(reader.remaining) bytes remain", kind: .truncated)
        }
        var calibrations: [CalibrationEvent] = []
        calibrations.reserveCapacity(count)
        for index in 0..<count {
            let length = try reader.count("length of calibration event \(index + 1)", limit: maxEventBytes)
            let json = try reader.bytes(count: length, "calibration event \(index + 1)")
            calibrations.append(try decodeEvent(json[...], what: "calibration event \(index + 1)"))
        }
        return calibrations
    }

    /// Writes the events section: their count, then each one's JSON text with its length.
    static func writeEvents(_ calibrations: [CalibrationEvent], to writer: inout ByteWriter) throws(BatchEncodingError) {
        writer.uvarint(calibrations.count)
        for json in try encodeEvents(calibrations) {
            writer.uvarint(json.count)
            writer.bytes(json)
        }
    }
}

extension CalibrationEvent {
    /// What makes a decoded event unusable, or nil: the checks JSON decoding alone does not make.
    public var problem: String? {
        guard Self.isValidID(id) else { return "id \"\(id.prefix(80))\" is not 1 to 64 of A-Z, a-z, 0-9, - and _" }
        guard !points.isEmpty, points.count <= Self.maximumPoints else {
            return "event \(id) has \(points.count) points; 1 to \(Self.maximumPoints) expected"
        }
        guard !circuit.isEmpty, circuit.utf8.count <= 16 else { return "event \(id): circuit \"\(circuit.prefix(40))\" is not a circuit name" }
        if let firmware, firmware.utf8.count > 32 { return "event \(id): firmware version longer than 32 bytes" }
        for point in points {
            guard !point.name.isEmpty, point.name.utf8.count <= 16 else { return "event \(id): a point name is empty or longer than 16 bytes" }
        }
        if let calibratedPoints, !(0...16).contains(calibratedPoints) { return "event \(id): calibrated_points \(calibratedPoints) is out of range" }
        // Names a circuit reported, never free text: no control character at all. Taken, a NUL made PostgreSQL refuse the
        // batch (503, sent again for ever) and SQLite store the text cut short.
        let texts = [("circuit", circuit), ("firmware", firmware ?? "")] + points.enumerated().map { ("points[\($0.offset)].name", $0.element.name) }
        for (field, text) in texts {
            if let problem = text.controlCharacterProblem() { return "event \(id): \(field) \(problem)" }
        }
        return nil
    }
}

/// Short descriptions of JSON decoding errors (the default ones run to paragraphs).
enum JSONErrorText {
    /// A decoding error in the API's own words: `points[0].reference: expected a number`, not the decoder's
    /// "points.Index 0.reference: Expected to decode Double but found a string instead".
    static func describe(_ error: any Error) -> String {
        switch error {
        case DecodingError.keyNotFound(let key, let context): "\(prefix(context.codingPath))member \(key.stringValue) is missing"
        case DecodingError.typeMismatch(let type, let context): "\(path(context.codingPath)): expected \(kind(type))"
        case DecodingError.valueNotFound(let type, let context): "\(path(context.codingPath)): is null; expected \(kind(type))"
        case DecodingError.dataCorrupted(let context): "\(prefix(context.codingPath))\(context.debugDescription.prefix(120))"
        default: "\(error)".prefix(160).description
        }
    }

    /// `points[0].reference`: members joined by dots, array positions in brackets.
    static func path(_ codingPath: [any CodingKey]) -> String {
        var text = ""
        for key in codingPath {
            if let index = key.intValue {
                text += "[\(index)]"
            } else {
                text += (text.isEmpty ? "" : ".") + key.stringValue
            }
        }
        return text.isEmpty ? "the event" : text
    }

    private static func prefix(_ codingPath: [any CodingKey]) -> String { codingPath.isEmpty ? "" : path(codingPath) + ": " }

    private static func kind(_ type: Any.Type) -> String {
        switch type {
        case is Double.Type, is Float.Type, is Int.Type, is Int64.Type, is UInt64.Type, is Int32.Type, is UInt32.Type: "a number"
        case is String.Type: "a string"
        case is Bool.Type: "true or false"
        default:
            "\(type)".hasPrefix("Array") ? "an array" : "\(type)".hasPrefix("Dictionary") ? "an object" : "a value of another kind"
        }
    }
}
