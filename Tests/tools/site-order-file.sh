#!/bin/bash
# Regenerates Sources/farmgate/farmgate.order: the functions of the site binary that `farmgate agent` runs, found by
# running the release agent under valgrind's callgrind inside `farmgate-bench footprint` (50 simulated sensors at 1 Hz,
# uploading to a local ingest). `make install` and `make deb` link the site binary with lld in this order, so that the
# code the agent runs sits together and the kernel maps fewer pages of the binary (see README "Site footprint").
# Needs valgrind (apt install valgrind). A stale list still links and runs: names no longer in the binary are ignored.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

swift build -c release --product farmgate-bench
swift build -c release --product farmgate --static-swift-stdlib
bin=$(swift build -c release --static-swift-stdlib --show-bin-path)/farmgate
cat > "$work/agent" <<WRAP
#!/bin/sh
exec valgrind --tool=callgrind --demangle=no --dump-instr=no --callgrind-out-file=$work/callgrind.%p "$bin" "\$@"
WRAP
chmod +x "$work/agent"
"$(swift build -c release --show-bin-path)/farmgate-bench" footprint --agent "$work/agent" --warmup 20 --seconds 40

# callgrind names each object (ob=) and function (fn=, cfn=) once in full and by its number after that; every function
# that ran has its own fn= entry in the object it belongs to. Keep the site binary's, without callgrind's recursion
# suffix ('2) and unnamed addresses, sorted by name: every function in the list is mapped anyway, so their order among
# themselves matters little, and a sorted list changes only where the code did.
awk '
function named(spec, table,    id, rest) {
    if (match(spec, /^\([0-9]+\)/)) {
        id = substr(spec, 2, RLENGTH - 2)
        rest = substr(spec, RLENGTH + 2)
        if (rest != "") table[id] = rest
        return table[id]
    }
    return spec
}
/^ob=/  { object = named(substr($0, 4), objects); next }
/^cob=/ { named(substr($0, 5), objects); next }
/^cfn=/ { named(substr($0, 5), functions); next }
/^fn=/  {
    name = named(substr($0, 4), functions)
    if (object !~ /\/farmgate$/) next
    sub(/'"'"'[0-9]+$/, "", name)
    if (name ~ /^0x/ || name in seen) next
    seen[name] = 1
    print name
}' "$work"/callgrind.* | LC_ALL=C sort > Sources/farmgate/farmgate.order
echo "Sources/farmgate/farmgate.order: $(wc -l < Sources/farmgate/farmgate.order) functions"
