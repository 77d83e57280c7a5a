# What the end-to-end bench scripts share (sourced, not run): ApacheBench
# installed, release binaries built, a scratch directory cleaned up on exit,
# the demo backend on CPU 1, gateways on CPU 0, and the measurement: two
# interleaved rounds of requests/s and the gateway's CPU time per request
# (from /proc, the figure that holds steady on a noisy machine).
#
# WASMGATE_BIN and PLUGIN_DIR (the directory with handshake_guard.wasm and
# path_router.wasm) point a bench at another build, to compare versions.

cd "$(dirname "$0")/.."
root=$(pwd)
if ! command -v ab >/dev/null; then
    scripts/toolchains/apt-install apache2-utils
fi
if [ -z "${WASMGATE_BIN:-}" ]; then
    cargo build --release -q -p wasmgate -p demo-backend
    scripts/build-plugins >/dev/null
fi
target="${CARGO_TARGET_DIR:-$root/target}"
wasmgate=${WASMGATE_BIN:-$target/release/wasmgate}
plugins=${PLUGIN_DIR:-$target/wasm32-wasip2/release}
backend=$target/release/demo-backend
[ -x "$backend" ] || cargo build --release -q -p demo-backend

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
declare -A pid port

# start_backend PORT: the demo backend on CPU 1.
start_backend() {
    taskset -c 1 "$backend" app "127.0.0.1:$1" >"$work/backend.log" 2>&1 &
    pids+=($!)
}

# start_gateway NAME PORT: `wasmgate run` on CPU 0 with $work/NAME.toml.
start_gateway() {
    port[$1]=$2
    (cd "$work" && exec taskset -c 0 "$wasmgate" run --config "$1.toml" >"$1.log" 2>&1) &
    pid[$1]=$!
    pids+=($!)
}

# wait_listening NAME...: until each gateway logs that it listens.
wait_listening() {
    for name in "$@"; do
        for _ in $(seq 100); do
            grep -q listening "$work/$name.log" 2>/dev/null && break
            sleep 0.1
        done
    done
}

# measure CONNECTIONS REQUESTS PATH NAME...: two interleaved rounds over
# the named gateways, after a warm-up each time.
measure() {
    local connections=$1 requests=$2 path=$3
    shift 3
    local hz
    hz=$(getconf CLK_TCK)
    echo "gateway $("$wasmgate" --version 2>/dev/null || echo "$wasmgate"), $connections connections, $requests requests per run"
    for round in 1 2; do
        for name in "$@"; do
            local url="http://127.0.0.1:${port[$name]}$path"
            taskset -c 1 ab -q -k -c "$connections" -n 2000 "$url" >/dev/null 2>&1
            local before after out rps failed bad us
            before=$(awk '{print $14 + $15}' "/proc/${pid[$name]}/stat")
            out=$(taskset -c 1 ab -k -c "$connections" -n "$requests" "$url" 2>&1)
            after=$(awk '{print $14 + $15}' "/proc/${pid[$name]}/stat")
            rps=$(awk '/Requests per second/ {print $4}' <<<"$out")
            failed=$(awk '/Failed requests/ {print $3}' <<<"$out")
            bad=$(awk '/Non-2xx/ {print $3}' <<<"$out")
            us=$(awk -v t=$((after - before)) -v hz="$hz" -v n="$requests" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}')
            echo "round $round, ${name}: $rps requests/s, gateway CPU $us µs per request (failed ${failed:-?}, non-2xx ${bad:-0})"
        done
    done
}
