#!/usr/bin/env bash
# The project's one test command (README "Set up"): installs what the tests need on a fresh
# machine (Rust toolchain aside), then runs every test. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo test (workspace)"
cargo test --workspace --locked 2>&1
