#!/usr/bin/env bash
# Fan-out benchmark suite behind BENCHMARKS.md "## Fan-out".
#
# Usage: scripts/bench-fanout.sh [quick|compare|targets|stall|scan|all] [OUT_DIR]
#   quick    one short run of every phase (smoke test, about 3 minutes)
#   compare  raw wire, everyone takes everything: sluice vs websocat, Redis pub/sub and a Redis rebroadcaster, 3 runs
#   targets  issue 4's load: 2,000 frames/s x 1,000 realistic subscribers, raw, v1 and v2
#   scan     the same rate with fewer subscribers, to find the largest load that holds
#   stall    10% of subscribers stop reading for 300 s; RSS sampled every second
#   all      compare, targets, scan, stall
#
# Needs: target/release/sluice and target/release/sluice-bench (cargo build --release),
# websocat (cargo install websocat) and redis-server (apt-get install redis-server) on PATH.
# Every step is bounded by `timeout`. Only 127.0.0.1 is used.
# SLUICE overrides the binary under test (e.g. a build of a clean checkout).
set -euo pipefail

cd "$(dirname "$0")/.."
MODE="${1:-quick}"
OUT="${2:-/tmp/sluice-bench-out}"
SLUICE="${SLUICE:-target/release/sluice}"
BENCH="${BENCH:-target/release/sluice-bench}"
mkdir -p "$OUT"

for bin in "$SLUICE" "$BENCH"; do
    [ -x "$bin" ] || { echo "missing $bin: run cargo build --release" >&2; exit 1; }
done
# Private copies: a concurrent `cargo build` must not replace the binaries mid-run (the
# Redis baseline re-executes the bench binary as its relay process).
cp "$SLUICE" "$OUT/sluice.bin"
cp "$BENCH" "$OUT/sluice-bench.bin"
SLUICE_SHOWN="$SLUICE"
SLUICE="$OUT/sluice.bin"
BENCH="$OUT/sluice-bench.bin"
command -v websocat >/dev/null || echo "warning: websocat not on PATH (cargo install websocat)" >&2
command -v redis-server >/dev/null || echo "warning: redis-server not on PATH (apt-get install redis-server)" >&2

# 1,000 subscribers need about 2,100 descriptors in the bench and as many in sluice.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

machine() {
    echo "nproc: $(nproc)"
    grep -m1 'model name' /proc/cpuinfo || true
    grep MemTotal /proc/meminfo
    echo "loadavg: $(cat /proc/loadavg)"
    echo "sluice: $SLUICE_SHOWN ($("$SLUICE" --version 2>/dev/null || true)); work tree at $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo ' (src dirty)')"
}

run() { # name timeout-seconds args...
    local name="$1" limit="$2"
    shift 2
    echo "### $name: sluice-bench fanout --sluice $SLUICE_SHOWN $*" | tee -a "$OUT/summary.md"
    timeout "$limit" "$BENCH" fanout --sluice "$SLUICE" --json "$OUT/$name.jsonl" "$@" \
        2> >(tee "$OUT/$name.log" >&2) | tee -a "$OUT/summary.md"
}

machine | tee "$OUT/machine.txt"

case "$MODE" in
quick)
    run quick 600 --subscribers 50 --rate 500 --duration 5 --warmup 2 --stall-secs 5 \
        --wire raw,v1,v2
    ;;
compare | targets | scan | stall | all) ;;
*)
    echo "unknown mode $MODE" >&2
    exit 2
    ;;
esac

if [ "$MODE" = compare ] || [ "$MODE" = all ]; then
    run compare 1800 --subscribers 100 --rate 1000 --duration 20 --warmup 5 --mix all \
        --wire raw --stall-secs 0 --runs 3
fi
if [ "$MODE" = targets ] || [ "$MODE" = all ]; then
    run targets 2400 --subscribers 1000 --rate 2000 --duration 20 --warmup 5 --mix realistic \
        --wire raw,v1,v2 --baselines none --stall-secs 0 --runs 3
fi
if [ "$MODE" = scan ] || [ "$MODE" = all ]; then
    for n in 100 250 500; do
        run "scan-$n" 1200 --subscribers "$n" --rate 2000 --duration 20 --warmup 5 \
            --mix realistic --wire raw,v1 --baselines none --stall-secs 0
    done
fi
if [ "$MODE" = stall ] || [ "$MODE" = all ]; then
    # 90 s of warmup first fills the hot tail (default 256 MiB at ~4.5 MB/s of events), so
    # the stall window measures what stalled subscribers cost, not the tail filling up.
    run stall 1800 --subscribers 200 --rate 1000 --duration 10 --warmup 90 --mix realistic \
        --wire raw --baselines none --stall-fraction 0.1 --stall-secs 300
fi
