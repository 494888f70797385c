@testable import FarmgateIngest
import Testing

@Suite("Ingest activity for systemd's status line")
struct IngestActivityTests {
    @Test("Requests and batches are summed from the Prometheus text, whatever their labels")
    func totals() {
        let text = """
            # TYPE farmgate_ingest_batches_total counter
            farmgate_ingest_batches_total{result="stored"} 7
            farmgate_ingest_batches_total{result="malformed"} 2
            # TYPE farmgate_ingest_http_request_duration_seconds histogram
            farmgate_ingest_http_request_duration_seconds_bucket{route="/v1/batches",status="2xx",le="0.001"} 3
            farmgate_ingest_http_request_duration_seconds_count{route="/v1/batches",status="2xx"} 9
            farmgate_ingest_http_request_duration_seconds_count{route="/readyz",status="2xx"} 4
            farmgate_ingest_readings_total{outcome="accepted"} 7000

            """
        #expect(IngestActivity.totals(fromPrometheusText: text) == IngestActivity(requests: 13, batches: 9, storedBatches: 7))
    }

    @Test("The window counts what happened in the last minute only")
    func window() {
        var window = ActivityWindow(span: .seconds(60))
        let start = ContinuousClock.now
        #expect(window.record(IngestActivity(requests: 10, batches: 5, storedBatches: 5), at: start) == IngestActivity(requests: 10, batches: 5, storedBatches: 5))
        #expect(window.record(IngestActivity(requests: 30, batches: 9, storedBatches: 8), at: start + .seconds(30)) == IngestActivity(requests: 20, batches: 4, storedBatches: 3))
        #expect(window.record(IngestActivity(requests: 50, batches: 9, storedBatches: 8), at: start + .seconds(60)) == IngestActivity(requests: 40, batches: 4, storedBatches: 3))
        #expect(window.record(IngestActivity(requests: 50, batches: 9, storedBatches: 8), at: start + .seconds(125)) == IngestActivity(requests: 0, batches: 0, storedBatches: 0))
    }
}
