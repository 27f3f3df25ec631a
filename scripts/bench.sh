#!/usr/bin/env bash
# Benchmark harness (README "Performance"): every figure and ratio measured in one run.
#
#   scripts/bench.sh                 full run: release build, ~10 minutes on 2 vCPU; the report
#                                    goes to stdout and to target/bench/results-<UTC time>.md
#   scripts/bench.sh --quick         smoke mode (debug binaries, tiny sizes, a few seconds of
#                                    load): exercises every part; fails only on errors, never on
#                                    a figure. scripts/test.sh runs it after `cargo test`.
#   scripts/bench.sh --only proxy,leases,audit,scale,mcp,conformance   a subset
#
# Parts:
#   proxy        wrk at 1/16/64 connections: the upstream directly, through `crp-provider serve`
#                (lease from crp/use, session token, injection, durable audit), and through
#                nginx proxy_pass + proxy_set_header Authorization (1 worker and auto, upstream
#                keepalive); req/s, p50/p99, CPU µs/req of the proxy process, ratios
#   leases       crp/use + release over HTTP (Ed25519-signed) at 1 and 64 clients, and in process
#   audit        the audit writer alone, in process: appends/s and CPU per entry at 1, 8 and 64
#                concurrent appenders, with fsync and with os durability
#   scale        use/renew/delegate/release/revoke latency with 10^4..10^6 credentials and
#                active leases; cascade revoke of a ~10^5-lease delegation tree
#   mcp          hyperfine: crp-mcp cold start to an answered tools/list (keyfile vault), and
#                vault_list over 10^4 credentials
#   conformance  hyperfine: a Full-tier crp-conformance run against `crp-provider serve --dev`
#
# Environment (full mode): BENCH_PROXY_REPS (default 2), BENCH_PROXY_SECONDS and
# BENCH_LEASE_SECONDS (per run, default 10), BENCH_SCALE_SIZES (default 10000,100000,1000000),
# BENCH_OUT (report file).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export CARGO_TERM_COLOR=never

MODE=full
ONLY=proxy,leases,audit,scale,mcp,conformance
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --only) ONLY="$2"; shift ;;
    --only=*) ONLY="${1#--only=}" ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# --- tools (Debian packages), installed once ------------------------------------------------
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v hyperfine >/dev/null || need+=(hyperfine)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  echo "== apt-get install ${need[*]}" >&2
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"

# --- binaries --------------------------------------------------------------------------------
BUILD=(-p crp-provider -p mcp-adapter -p crp-conformance --bins --example crp_bench --example bench_upstream --example bench_floor_proxy --locked)
if [ "$MODE" = quick ]; then
  PROFILE=debug
  echo "== cargo build (debug: the binaries cargo test already built)" >&2
  cargo build "${BUILD[@]}" >&2
else
  PROFILE=release
  echo "== cargo build --release" >&2
  cargo build --release "${BUILD[@]}" >&2
fi
BIN="$ROOT/target/$PROFILE"
DRV="$BIN/examples/crp_bench"
UPSTREAM="$BIN/examples/bench_upstream"
FLOOR="$BIN/examples/bench_floor_proxy"
# The server under test is `crp-provider serve`; the driver's own `serve` (the same library
# entry point, crp_provider::http::run) stands in only when the binary has no serve command.
SERVER="$BIN/crp-provider"
SERVER_NOTE="crp-provider serve"
if ! "$SERVER" serve --help >/dev/null 2>&1; then
  SERVER="$DRV"
  SERVER_NOTE="crp_bench serve (crp_provider::http::run; crp-provider has no serve command in this build)"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/crp-bench.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ "$MODE" = quick ]; then
  OUT="${BENCH_OUT:-$WORK/results.md}"
  PROXY=(--duration 1 --warmup 0 --conns 1,4 --nginx-workers 1 --reps 1)
  LEASES=(--duration 1 --clients 1,4)
  AUDIT=(--duration 0.5 --concurrency 1,8)
  SCALE=(--sizes 1000,3000 --iters 5 --tree 1000)
  MCP_CREDS=200; HF=(--runs 2 --warmup 0)
else
  mkdir -p target/bench
  OUT="${BENCH_OUT:-target/bench/results-$(date -u +%Y%m%dT%H%M%SZ).md}"
  PROXY=(--duration "${BENCH_PROXY_SECONDS:-10}" --warmup 2 --conns 1,16,64 --nginx-workers 1,auto --reps "${BENCH_PROXY_REPS:-2}")
  LEASES=(--duration "${BENCH_LEASE_SECONDS:-10}" --clients 1,64)
  AUDIT=(--duration 4 --concurrency 1,8,64)
  SCALE=(--sizes "${BENCH_SCALE_SIZES:-10000,100000,1000000}" --iters 200 --tree 100000)
  MCP_CREDS=10000; HF=(--runs 20 --warmup 3)
fi
: > "$OUT"
say() { printf '%s\n' "$*" | tee -a "$OUT"; }
FAIL=0

# --- the machine -------------------------------------------------------------------------------
say "## CRP benchmark report ($MODE mode)"
say ""
say "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' + uncommitted changes')"
say "- machine: $(nproc) vCPU, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM, kernel $(uname -r)"
say "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
say "- build: $PROFILE, $(rustc --version 2>/dev/null); server under test: $SERVER_NOTE"
say "- tools: $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $(nginx -v 2>&1 | cut -d' ' -f3), $(hyperfine --version)"
say "- everything on loopback, plain HTTP (no TLS), unpinned: load generator, proxy and upstream share the vCPUs"
say ""

run_part() { # name, command...
  local name=$1; shift
  echo "== $name" >&2
  if "$@" > "$WORK/$name.md"; then
    tee -a "$OUT" < "$WORK/$name.md"
  else
    tee -a "$OUT" < "$WORK/$name.md"
    say "- **$name: ERROR** (see stderr)"
    say ""
    FAIL=1
  fi
}

want proxy && run_part proxy "$DRV" proxy --work "$WORK/proxy" --upstream-bin "$UPSTREAM" --floor-bin "$FLOOR" --server-bin "$SERVER" "${PROXY[@]}"
want leases && run_part leases "$DRV" leases --work "$WORK/leases" --server-bin "$SERVER" "${LEASES[@]}"
if want audit; then
  run_part audit-fsync "$DRV" audit --work "$WORK/audit" --durability fsync "${AUDIT[@]}"
  run_part audit-os "$DRV" audit --work "$WORK/audit" --durability os "${AUDIT[@]}"
fi
want scale && run_part scale "$DRV" scale --work "$WORK/scale" "${SCALE[@]}"

# hyperfine JSON → "mean ± sd (min … max)" in ms
hf_summary() {
  python3 - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
ms = lambda s: s * 1000
print(f'{ms(r["mean"]):.1f} ms ± {ms(r["stddev"] or 0):.1f} (median {ms(r["median"]):.1f}, min {ms(r["min"]):.1f}, max {ms(r["max"]):.1f}; {len(r["times"])} runs)')
PY
}
hf_mean_ms() { python3 -c 'import json,sys; print("%.1f" % (json.load(open(sys.argv[1]))["results"][0]["mean"]*1000))' "$1"; }
hf_median_ms() { python3 -c 'import json,sys; print("%.1f" % (json.load(open(sys.argv[1]))["results"][0]["median"]*1000))' "$1"; }

# --- MCP -------------------------------------------------------------------------------------
if want mcp; then
  echo "== mcp" >&2
  M="$WORK/mcp"; mkdir -p "$M"
  if "$DRV" mcp-home --home "$M/small" --credentials 0 && "$DRV" mcp-home --home "$M/big" --credentials "$MCP_CREDS"; then
    INIT='{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"crp-bench","version":"0"}}}'
    INITD='{"jsonrpc":"2.0","method":"notifications/initialized"}'
    printf '%s\n' "$INIT" "$INITD" '{"jsonrpc":"2.0","id":2,"method":"tools/list"}' > "$M/tools_list.jsonl"
    printf '%s\n' "$INIT" "$INITD" '{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"vault_list","arguments":{}}}' > "$M/vault_list.jsonl"
    MCP="$BIN/crp-mcp"
    # Each command must see its answer (grep), so a crash or an unanswered request fails the run.
    C1="CRP_HOME=$M/small CRP_LOG=warn $MCP --listen 127.0.0.1:0 < $M/tools_list.jsonl 2>>$M/err.log | grep -q '\"vault_list\"'"
    C2="CRP_HOME=$M/big CRP_LOG=warn $MCP --listen 127.0.0.1:0 < $M/tools_list.jsonl 2>>$M/err.log | grep -q '\"vault_list\"'"
    C3="CRP_HOME=$M/big CRP_LOG=warn $MCP --listen 127.0.0.1:0 < $M/vault_list.jsonl 2>>$M/err.log | grep -q 'fill/'"
    if hyperfine "${HF[@]}" --style none --export-json "$M/h1.json" "$C1" >/dev/null 2>"$M/hf1.err" &&
       hyperfine "${HF[@]}" --style none --export-json "$M/h2.json" "$C2" >/dev/null 2>"$M/hf2.err" &&
       hyperfine "${HF[@]}" --style none --export-json "$M/h3.json" "$C3" >/dev/null 2>"$M/hf3.err"; then
      say "### MCP (hyperfine; each run is a fresh crp-mcp process on a keyfile vault, embedded mode)"
      say ""
      say "| what | wall time |"
      say "|---|---|"
      say "| cold start → initialize → tools/list answered (1 credential) | $(hf_summary "$M/h1.json") |"
      say "| same, vault with $MCP_CREDS credentials | $(hf_summary "$M/h2.json") |"
      say "| cold start → initialize → vault_list over $MCP_CREDS credentials | $(hf_summary "$M/h3.json") |"
      say ""
      T1=$(hf_median_ms "$M/h1.json"); T2=$(hf_median_ms "$M/h2.json"); T3=$(hf_median_ms "$M/h3.json")
      say "- vault_list over $MCP_CREDS credentials ≈ $(python3 -c "print('%.1f' % ($T3 - $T2))") ms beyond the cold start (difference of the medians)"
      say "- target: cold start to tools/list ≤ 50 ms: **$(python3 -c "print('met' if $T1 <= 50 else 'missed')")** (median $T1 ms, mean $(hf_mean_ms "$M/h1.json") ms)"
      say ""
    else
      cat "$M"/hf*.err >&2 || true; tail -20 "$M/err.log" >&2 || true
      say "- **mcp: ERROR** (crp-mcp did not answer; see stderr)"; say ""; FAIL=1
    fi
  else
    say "- **mcp: ERROR** (could not prepare the vault homes)"; say ""; FAIL=1
  fi
fi

# --- conformance -------------------------------------------------------------------------------
if want conformance; then
  echo "== conformance" >&2
  C="$WORK/conformance"; mkdir -p "$C"
  CONF="$BIN/crp-conformance"
  ECHO_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$CONF" fixtures --upstream "127.0.0.1:$ECHO_PORT" > "$C/fixtures.json"
  if [ "$SERVER" = "$DRV" ]; then
    "$DRV" serve --dev --fixtures "$C/fixtures.json" --listen 127.0.0.1:0 > "$C/server.out" 2> "$C/server.err" &
  else
    "$SERVER" serve --dev --fixtures "$C/fixtures.json" --listen 127.0.0.1:0 > "$C/server.out" 2> "$C/server.err" &
  fi
  SPID=$!; PIDS+=("$SPID")
  URL=
  for _ in $(seq 1 300); do
    URL=$(grep -o 'http://[0-9.:]*' "$C/server.out" 2>/dev/null | head -1 || true)
    [ -n "$URL" ] && break
    kill -0 "$SPID" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$URL" ]; then
    cat "$C/server.err" >&2
    say "- **conformance: ERROR** (the --dev server did not start)"; say ""; FAIL=1
  else
    RUN="$CONF run --http $URL --tier full --upstream 127.0.0.1:$ECHO_PORT --format json --output $C/report.json"
    if [ "$MODE" = quick ]; then CRUNS=(--runs 1 --warmup 0); RUN="$RUN --only capability"; else CRUNS=(--runs 5 --warmup 1); fi
    # -i: a failing case must not hide the timing; the verdict is reported separately.
    hyperfine "${CRUNS[@]}" -i --style none --export-json "$C/h.json" "$RUN" >/dev/null 2>"$C/hf.err" || true
    set +e; $RUN >/dev/null 2>"$C/run.err"; RC=$?; set -e
    VERDICT=$(python3 - "$C/report.json" <<'PY' 2>/dev/null || echo "report unreadable"
import json, sys
r = json.load(open(sys.argv[1]))
t = r.get("totals", {})
slow = sorted(r.get("cases", []), key=lambda c: -c.get("duration_ms", 0))[:3]
s = f'{t.get("pass")} passed, {t.get("fail")} failed, {t.get("skip")} skipped, {t.get("error")} errors'
s += "; slowest: " + ", ".join(f"{c.get('id')} {c.get('duration_ms')} ms" for c in slow)
print(s)
PY
)
    if [ -s "$C/h.json" ]; then
      TC=$(hf_mean_ms "$C/h.json")
      say "### Conformance (hyperfine; Full tier over HTTP against serve --dev with the fixtures$([ "$MODE" = quick ] && echo '; quick mode: the capability cases only'))"
      say ""
      say "| what | wall time | result |"
      say "|---|---|---|"
      say "| crp-conformance run --tier full | $(hf_summary "$C/h.json") | exit $RC; $VERDICT |"
      say ""
      say "- target: Full-tier run ≤ 5 s: **$(python3 -c "print('met' if $TC <= 5000 else 'missed')")** ($TC ms)"
      say ""
      # Exit 1 means a failing case: the conformance suite's business, not an error of the harness.
      [ "$RC" -le 1 ] || { say "- **conformance: ERROR** (exit $RC: the runner could not run)"; FAIL=1; cat "$C/run.err" >&2; }
    else
      cat "$C/hf.err" >&2
      say "- **conformance: ERROR** (hyperfine failed)"; say ""; FAIL=1
    fi
  fi
fi

echo "== report: $OUT" >&2
if [ "$FAIL" != 0 ]; then
  echo "bench.sh: errors (not performance misses) occurred; see above" >&2
  exit 1
fi
