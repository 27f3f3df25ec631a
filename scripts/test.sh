#!/usr/bin/env bash
# The project's one test command (README "Set up"): installs what the tests need on a fresh
# machine (the Rust toolchain aside), starts a throwaway PostgreSQL server, then runs every
# test. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export CARGO_TERM_COLOR=never

# --- 1. System tools the tests drive (curl for README examples, PostgreSQL server) ---------
need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== apt-get install ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# --- 2. Test clients nobody here wrote (Python mcp SDK, MCP inspector) ----------------------
# (installed by tests/clients/install.sh when present)
if [ -x tests/clients/install.sh ]; then
  echo "== installing test clients"
  tests/clients/install.sh
fi

# --- 3. A real PostgreSQL server on loopback -------------------------------------------------
echo "== starting PostgreSQL"
eval "$(scripts/pg.sh start)"
trap 'scripts/pg.sh stop "$CRP_TEST_PG_DIR"' EXIT
export CRP_TEST_POSTGRES_URL

# --- 4. Every test ---------------------------------------------------------------------------
echo "== cargo test (workspace)"
cargo test --workspace --locked 2>&1

# --- 5. Benchmark smoke: every part of scripts/bench.sh at tiny sizes (a few seconds of load,
# the debug binaries built above), so the harness never rots. It fails on errors only (a setup
# that breaks, a non-2xx proxied response, a failed lease operation), never on a figure.
echo "== benchmark smoke (scripts/bench.sh --quick)"
scripts/bench.sh --quick
