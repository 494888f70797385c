import FarmgateWire
import NIOCore

/// The answer of the range query (`GET /v1/farms/{farm}/devices/{device}/sensors/{sensor}/readings`):
///
///     {"buckets": [BUCKET, ...] (rollups only), "device", "farm", "from" (if any), "limit", "next_from" (if truncated), "quantity",
///      "readings": [READING, ...] (raw only), "resolution", "sensor", "to" (if any), "truncated", "unit"}
///     READING: {"flags": [NAME, ...], "sequence", "timestamp", "value"}
///     BUCKET:  {"count", "faults", "last", "last_timestamp", "max", "mean", "min", "start"}
///              (`last` to `min` absent when every reading of the bucket was flagged `sensor_fault`)
///
/// Written by hand, keys in that (sorted) order: through `JSONEncoder` a day at 1-minute resolution (1,440 buckets,
/// 206 kB) spent 43 % of its request's CPU in the encoder and another 10 % formatting timestamps.
struct RangeAnswer {
    enum Content {
        case readings([StoredReading])
        case buckets([RollupPoint])
    }

    var farm: String
    var device: String
    var sensor: String
    var quantity: String
    var unit: String
    var from: Timestamp?
    var to: Timestamp?
    var limit: Int
    /// `raw`, `1m`, `1h` or `1d`: what the answer holds (what `auto` chose).
    var resolution: String
    var content: Content
    /// Whether the span holds more than the answer (the oldest `limit` readings or buckets, whole instants).
    var truncated = false
    /// Where the next answer starts when truncated: just after the last reading's timestamp, or the end of the last
    /// bucket.
    var nextFrom: Timestamp?

    var json: ByteBuffer {
        var w: JSONWriter
        switch content {
        case .readings(let readings): w = JSONWriter(capacity: 256 + readings.count * 96)
        case .buckets(let buckets): w = JSONWriter(capacity: 256 + buckets.count * 160)
        }
        w.raw("{")
        if case .buckets(let buckets) = content {
            w.raw("\"buckets\":[")
            for (index, bucket) in buckets.enumerated() {
                if index > 0 { w.raw(",") }
                Self.write(bucket, to: &w)
            }
            w.raw("],")
        }
        w.raw("\"device\":")
        w.string(device)
        w.raw(",\"farm\":")
        w.string(farm)
        if let from {
            w.raw(",\"from\":")
            w.timestamp(from)
        }
        w.raw(",\"limit\":")
        w.number(limit)
        if let nextFrom {
            w.raw(",\"next_from\":")
            w.timestamp(nextFrom)
        }
        w.raw(",\"quantity\":")
        w.string(quantity)
        if case .readings(let readings) = content {
            w.raw(",\"readings\":[")
            for (index, reading) in readings.enumerated() {
                if index > 0 { w.raw(",") }
                w.raw("{\"flags\":[")
                for (k, name) in flagNames(reading.quality).enumerated() {
                    if k > 0 { w.raw(",") }
                    w.string(name)
                }
                w.raw("],\"sequence\":")
                w.number(reading.sequence)
                w.raw(",\"timestamp\":")
                w.timestamp(reading.timestamp)
                w.raw(",\"value\":")
                w.number(reading.value)
                w.raw("}")
            }
            w.raw("]")
        }
        w.raw(",\"resolution\":")
        w.string(resolution)
        w.raw(",\"sensor\":")
        w.string(sensor)
        if let to {
            w.raw(",\"to\":")
            w.timestamp(to)
        }
        w.raw(truncated ? ",\"truncated\":true" : ",\"truncated\":false")
        w.raw(",\"unit\":")
        w.string(unit)
        w.raw("}")
        return ByteBuffer(bytes: w.bytes)
    }

    private static func write(_ bucket: RollupPoint, to w: inout JSONWriter) {
        w.raw("{\"count\":")
        w.number(bucket.count)
        w.raw(",\"faults\":")
        w.number(bucket.count - bucket.validCount)
        if let last = bucket.last { Self.field(",\"last\":", last, to: &w) }
        if let lastTimestamp = bucket.lastTimestamp {
            w.raw(",\"last_timestamp\":")
            w.timestamp(lastTimestamp)
        }
        if let max = bucket.max { Self.field(",\"max\":", max, to: &w) }
        if let mean = bucket.mean { Self.field(",\"mean\":", mean, to: &w) }
        if let min = bucket.min { Self.field(",\"min\":", min, to: &w) }
        w.raw(",\"start\":")
        w.timestamp(bucket.start)
        w.raw("}")
    }

    /// `key` (with its leading comma and colon) and a number.
    private static func field(_ key: String, _ value: Double, to w: inout JSONWriter) {
        w.raw(key)
        w.number(value)
    }
}
