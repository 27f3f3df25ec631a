"""Shared helpers for the crp-mcp client tests (Python mcp SDK and MCP inspector flows).

The Rust test mcp-adapter/tests/clients.rs prepares a vault and, in remote mode, a running
`crp-provider serve` with an approved agent, then runs these scripts with:

  CRP_MCP_BIN        path of crp-mcp
  CRP_PROVIDER_BIN   path of crp-provider (operator commands)
  CRP_HOME           the vault home (keyfile vault)
  CRP_TEST_MODE      "embedded" or "remote"
  CRP_PROVIDER_URL   remote mode, and embedded mode with a provider already serving the vault
  CRP_AGENT_ID       remote mode: the approved agent
  CRP_EXPORT_KEY     a key the policy lets this agent export (retrieve) with a purpose
  CRP_CLIENT_HOME    remote mode: crp-mcp's own CRP_HOME holding the installed identity
  CRP_TEST_CANARY_*  the secrets to store (so the harness can scan logs and the database too)

Everything runs on loopback. Every check raises AssertionError with a message; the script
exits non-zero on the first failure.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MCP_BIN = os.environ["CRP_MCP_BIN"]
PROVIDER_BIN = os.environ["CRP_PROVIDER_BIN"]
CRP_HOME = os.environ["CRP_HOME"]
MODE = os.environ.get("CRP_TEST_MODE", "embedded")
PROVIDER_URL = os.environ.get("CRP_PROVIDER_URL", "")
AGENT_ID = os.environ.get("CRP_AGENT_ID", "")
EXPORT_KEY = os.environ.get("CRP_EXPORT_KEY", "test/export")
# Remote mode: where crp-mcp keeps its agent identity (not the provider's vault home).
CLIENT_HOME = os.environ.get("CRP_CLIENT_HOME", CRP_HOME)

# No HTTP proxy from the environment may sit between the test and loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(msg: str) -> None:
    print(f"[{MODE}] {msg}", file=sys.stderr, flush=True)


def new_canary(tag: str) -> str:
    return os.environ.get(f"CRP_TEST_CANARY_{tag.upper()}") or f"sk-canary-{tag}-{secrets.token_hex(16)}"


class Upstream:
    """A loopback HTTP API that records the Authorization header it receives and answers
    without echoing any header."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.seen.append(
                    {"method": self.command, "path": self.path, "authorization": self.headers.get("Authorization", "")}
                )
                body = json.dumps({"ok": True, "method": self.command, "path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = _answer
            do_POST = _answer

            def log_message(self, *args: Any) -> None:  # keep stderr quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def http(method: str, url: str, token: str | None, body: bytes | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(req, timeout=20) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def operator_allow_loopback(key: str, service: str, value_env: str, value: str, upstream: str) -> None:
    """The operator's explicit loopback allowance for one credential (agents cannot grant it)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "allow.toml")
        with open(path, "w") as f:
            f.write(
                "[[credential]]\n"
                f"key = {json.dumps(key)}\n"
                f"service = {json.dumps(service)}\n"
                'type = "api_key"\n'
                f"value_env = {json.dumps(value_env)}\n"
                f"upstream = {json.dumps(upstream)}\n"
                'inject = "header:Authorization:Bearer"\n'
                'allow_private_hosts = ["127.0.0.1"]\n'
            )
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRP_TEST")}
        env["CRP_HOME"] = CRP_HOME
        env[value_env] = value
        r = subprocess.run([PROVIDER_BIN, "apply", path], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"crp-provider apply failed ({r.returncode}): {r.stderr}"
        assert value not in r.stdout + r.stderr, "crp-provider apply echoed the value"


class Transcript:
    """Everything the MCP server said, for the canary check."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.exports: list[str] = []

    def add(self, obj: Any) -> Any:
        self.parts.append(dump(obj))
        return obj

    def add_export(self, obj: Any) -> Any:
        self.exports.append(dump(obj))
        return obj

    def assert_clean(self, *canaries: str, extra: str = "") -> None:
        text = "\n".join(self.parts) + "\n" + extra
        for c in canaries:
            assert c not in text, "a stored secret appeared in MCP output outside a permitted export"
        log(f"canary check passed over {len(self.parts)} MCP outputs")


def dump(obj: Any) -> str:
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json", by_alias=True)
    return json.dumps(obj, default=str, sort_keys=True)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)
