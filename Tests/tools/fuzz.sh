#!/bin/bash
# Rerunnable libFuzzer runs of the decoders that take untrusted bytes.
#   Tests/tools/fuzz.sh wire|site [seconds per sub-target, default 60]
# wire: Tests/Fuzz/FuzzWire (FarmgateWire: frames, JSON batches, compression, RFC 3339, ...; 13 sub-targets)
# site: Tests/Fuzz/FuzzSite (site agent: EZO, w1, Modbus, GPIO, configuration, network answers; 8 sub-targets)
# Builds with ASan + libFuzzer into .build-fuzz (release, -enable-testing for @testable import), then runs each
# sub-target in turn (FUZZ_TARGET=n) on the corpus .build-fuzz/corpus/<wire|site>/<n>, which grows from run to run.
# Crash, leak, timeout (-timeout=2) and out-of-memory (-rss_limit_mb=1024) inputs go to .build-fuzz/artifacts/;
# logs to .build-fuzz/logs/. Exits non-zero if any run found something. Reproduce one with
#   FUZZ_TARGET=<n> SWIFT_BACKTRACE=enable=no .build-fuzz/release/<FuzzWire|FuzzSite> <artifact>
# Environment: FUZZ_TARGETS="0 4" runs only those sub-targets; FUZZ_NICE (default 10) is the nice level.
set -u
cd "$(dirname "$0")/../.."

case "${1:-}" in
wire) product=FuzzWire; count=13 ;;
site) product=FuzzSite; count=8 ;;
*) echo "usage: $0 wire|site [seconds per sub-target, default 60]" >&2; exit 64 ;;
esac
name=$1
seconds=${2:-60}
scratch=.build-fuzz
nice_level=${FUZZ_NICE:-10}

# -parse-as-library: the harness defines <Module>_main itself and hands over to LLVMFuzzerRunDriver.
FARMGATE_FUZZ=1 nice -n "$nice_level" swift build -c release --scratch-path "$scratch" --product "$product" \
    -Xswiftc -sanitize=fuzzer,address -Xswiftc -enable-testing -Xswiftc -parse-as-library || exit 2

bin=$scratch/release/$product
corpus=$scratch/corpus/$name
artifacts=$scratch/artifacts
logs=$scratch/logs
mkdir -p "$corpus" "$artifacts" "$logs"
# The Swift backtracer fights ASan and can take 30 s per crash.
export SWIFT_BACKTRACE=enable=no

# Seeds for the wire decoders: frames and JSON batches made by the encoders (sub-targets 11 and 12), stored
# uncompressed so that mutations reach the decoder rather than zstd. Only when those corpora are still empty.
if [ "$name" = wire ] && [ -z "$(ls -A "$corpus/0" 2>/dev/null)" ]; then
    seeds=$scratch/seeds-wire
    rm -rf "$seeds"; mkdir -p "$seeds"
    for t in 11 12; do
        FUZZ_DUMP=$seeds FUZZ_TARGET=$t nice -n "$nice_level" "$bin" -runs=300 -seed=1 >"$logs/wire-seeds-$t.log" 2>&1
    done
    for t in 0 1 2; do
        mkdir -p "$corpus/$t"
        [ -d "$seeds/$t" ] && cp "$seeds/$t"/* "$corpus/$t/" 2>/dev/null
    done
    echo "seeds: $(ls "$corpus/0" | wc -l) binary frames, $(ls "$corpus/1" | wc -l) stateful frames, $(ls "$corpus/2" | wc -l) JSON batches"
fi

status=0
for ((t = 0; t < count; t++)); do
    if [ -n "${FUZZ_TARGETS:-}" ] && [[ " $FUZZ_TARGETS " != *" $t "* ]]; then continue; fi
    mkdir -p "$corpus/$t"
    log=$logs/$name-$t.log
    FUZZ_TARGET=$t nice -n "$nice_level" "$bin" -max_total_time="$seconds" -timeout=2 -rss_limit_mb=1024 \
        -print_final_stats=1 -artifact_prefix="$artifacts/$name-$t-" "$corpus/$t" >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1)
    if [ $rc -eq 0 ]; then
        echo "$name $t: ok, ${execs:-?} executions; $last"
    else
        status=1
        echo "$name $t: FAILED (exit $rc), see $log; $(grep -E '^(==[0-9]+==ERROR|SUMMARY|FUZZ ORACLE|PROPERTY VIOLATION|Fatal error)' "$log" | head -2 | tr '\n' ' ')"
        grep -E 'Test unit written to' "$log" | sed 's/^/    /'
    fi
done
exit $status
