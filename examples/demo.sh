#!/usr/bin/env bash
# The whole Farmgate pipeline on this machine, on the embedded defaults:
#   farmgate-ingest on an embedded SQLite file (examples/ingest.toml), and
#   farmgate agent with simulated pH, EC and temperature sensors (examples/agent.toml).
# Run it with `make demo` (it builds first). Everything it writes goes to demo-data/ at the top of the checkout.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=$(swift build --show-bin-path)
ingest="$bin/farmgate-ingest"
agent="$bin/farmgate"
ingest_config="$root/examples/ingest.toml"
agent_config="$root/examples/agent.toml"
data="$root/demo-data"
seconds=${DEMO_SECONDS:-40}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

rm -rf "$data"
mkdir -p "$data"

say "Creating a farm, a device and a read token on the ingest"
"$ingest" farm create demo-farm --config "$ingest_config"
# device.txt holds the device key and device.key is it: both only for this user (0600), like `farmgate enroll` writes it.
(
  umask 077
  "$ingest" device create --farm demo-farm --device demo-greenhouse --config "$ingest_config" | tee "$data/device.txt"
  grep -o 'fgd_[A-Za-z0-9_]*' "$data/device.txt" | head -n1 > "$data/device.key"
)
token=$("$ingest" token create --farm demo-farm --role viewer --config "$ingest_config" | grep -o 'fgr_[A-Za-z0-9_]*' | head -n1)

pids=()
cleanup() {
  # The agent first (it sends what is pending on SIGTERM), then the ingest.
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT

say "Starting farmgate-ingest (log: demo-data/ingest.log)"
"$ingest" serve --config "$ingest_config" > "$data/ingest.log" 2>&1 &
ingest_pid=$!
pids+=("$ingest_pid")
port=$(sed -n 's/^port *= *\([0-9]*\).*/\1/p' "$ingest_config" | head -n1)
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 "$ingest_pid" 2>/dev/null || { cat "$data/ingest.log"; echo "the ingest did not start" >&2; exit 1; }
  sleep 0.2
done

say "Starting farmgate agent with simulated sensors (log: demo-data/agent.log)"
"$agent" agent --config "$agent_config" > "$data/agent.log" 2>&1 &
agent_pid=$!
pids=("$agent_pid" "${pids[@]}")

elapsed=0
while [ "$elapsed" -lt "$seconds" ]; do
  sleep 10
  elapsed=$((elapsed + 10))
  kill -0 "$agent_pid" 2>/dev/null || { cat "$data/agent.log"; echo "the agent stopped" >&2; exit 1; }
  say "After ${elapsed}s: farmgate status"
  "$agent" status --config "$agent_config" || true
  say "After ${elapsed}s: latest readings at the ingest (GET /v1/farms/demo-farm/latest)"
  curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:$port/v1/farms/demo-farm/latest" | head -c 1500 || true
  echo
done

say "Stopping the agent (SIGTERM: it commits and finishes its upload) and the ingest"
cleanup
pids=()
trap - EXIT

stored=$("$ingest" export --farm demo-farm --format csv --config "$ingest_config" | tail -n +2 | wc -l)
say "The ingest stored $stored readings from demo-greenhouse"
"$ingest" export --farm demo-farm --format csv --config "$ingest_config" | head -n 6
echo "..."
echo "Data, logs and the device key are in demo-data/. Read token for the API: $token"
