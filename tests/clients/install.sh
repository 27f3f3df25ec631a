#!/usr/bin/env bash
# Install the MCP clients the crp-mcp tests drive (idempotent; called by scripts/test.sh):
#  - Python `mcp` SDK, pinned in requirements.txt, into tests/clients/.venv
#  - @modelcontextprotocol/inspector, pinned in package.json + package-lock.json, via `npm ci`
# mcp-adapter/tests/clients.rs finds them there.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v python3 >/dev/null || ! command -v npm >/dev/null; then
  echo "tests/clients/install.sh: python3 and npm are required" >&2
  exit 1
fi

# Python: recreate the venv only when requirements.txt changed.
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -rf .venv
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check --no-input -r requirements.txt
  echo "$want" > "$stamp"
fi
.venv/bin/python -c 'import mcp' >/dev/null

# Node: npm ci only when the lockfile changed.
lock_stamp=node_modules/.package-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -x node_modules/.bin/mcp-inspector ] || [ "$(cat "$lock_stamp" 2>/dev/null)" != "$want" ]; then
  INSPECTOR_SKIP_CLIENT_INSTALL=1 npm ci --no-audit --no-fund --loglevel=error
  echo "$want" > "$lock_stamp"
fi
echo "test clients ready: $(.venv/bin/python -c 'import importlib.metadata as m; print("mcp", m.version("mcp"))'), inspector $(node -p 'require("./node_modules/@modelcontextprotocol/inspector/package.json").version')"
