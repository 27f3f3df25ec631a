"""Drive the real crp-mcp binary with `@modelcontextprotocol/inspector --cli` (a client nobody
here wrote). The inspector starts a fresh crp-mcp for every call, so in embedded mode a
`crp-provider serve` on the same vault holds the proxy (crp-mcp relies on it) and leases made
by one crp-mcp process are honoured by that proxy.

Flow: tools/list (+ --strict schema lint) -> vault_store -> vault_list (no values)
-> credential_use -> proxied request -> credential_lease renew -> credential_revoke -> proxy
refuses -> audit_log -> a denied export (exit 5, isError). The stored secret never appears in
any inspector output.

Run by mcp-adapter/tests/clients.rs; see crptest.py for the environment, plus
CRP_INSPECTOR_BIN (node_modules/.bin/mcp-inspector).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import crptest as t
from crptest import check, log

INSPECTOR = os.environ["CRP_INSPECTOR_BIN"]
OUTPUT: list[str] = []


def server_env() -> list[str]:
    env = {"CRP_HOME": t.CLIENT_HOME if t.MODE == "remote" else t.CRP_HOME, "CRP_LOG": "info"}
    if t.MODE == "remote":
        env["CRP_PROVIDER_URL"] = t.PROVIDER_URL
        env["CRP_AGENT_ID"] = t.AGENT_ID
    else:
        # The provider already serving this vault holds the proxy port: crp-mcp relies on it.
        env["CRP_LISTEN"] = t.PROVIDER_URL.removeprefix("http://")
    out: list[str] = []
    for k, v in env.items():
        out += ["-e", f"{k}={v}"]
    return out


def inspector(method: str, *extra: str, expect_rc: int = 0) -> Any:
    cmd = [INSPECTOR, "--cli", t.MCP_BIN, *server_env(), "--method", method, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    OUTPUT.append(r.stdout)
    OUTPUT.append(r.stderr)
    check(r.returncode == expect_rc,
          f"inspector {method} {' '.join(extra)}: exit {r.returncode}, expected {expect_rc}\n"
          f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-3000:]}")
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError:
        return r.stdout


def call(tool: str, args: dict[str, Any], expect_rc: int = 0) -> Any:
    extra = ["--tool-name", tool]
    for k, v in args.items():
        extra += ["--tool-arg", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    return inspector("tools/call", *extra, expect_rc=expect_rc)


def structured(result: Any) -> dict[str, Any]:
    check(isinstance(result, dict), f"tools/call output is not JSON: {str(result)[:500]}")
    sc = result.get("structuredContent")
    if sc is None:
        text = "".join(c.get("text", "") for c in result.get("content", []))
        sc = json.loads(text)
    return sc


def main() -> int:
    canary = t.new_canary("inspector")
    key, service = "insp/upstream", "insp.upstream"
    upstream = t.Upstream()
    try:
        listed = inspector("tools/list")
        names = {x["name"] for x in listed["tools"]}
        check(len(names) == 10 and "credential_use" in names and "audit_log" in names, f"tools {sorted(names)}")
        inspector("tools/list", "--strict")
        lint = OUTPUT[-1]
        check("Warning: tool" not in lint and "Error: tool" not in lint, f"inspector --strict schema lint: {lint[-3000:]}")
        log("inspector tools/list ok (--strict schema lint: no errors, no warnings)")

        st = structured(call("vault_store", {"key": key, "value": canary, "service": service, "upstream": upstream.url,
                                             "metadata": {"environment": "test"}}))
        check(st["stored"] is True, f"vault_store {st}")
        t.operator_allow_loopback(key, service, "CRP_TEST_VALUE", canary, upstream.url)

        ls = structured(call("vault_list", {"prefix": "insp/"}))
        check([c["key"] for c in ls["credentials"]] == [key], f"vault_list {ls}")
        modern = structured(inspector("tools/call", "--protocol-era", "modern", "--tool-name", "vault_list",
                                      "--tool-arg", "prefix=insp/"))
        check([c["key"] for c in modern["credentials"]] == [key], f"vault_list over server/discover {modern}")
        log("inspector vault_store / vault_list ok (also over MCP 2026-07-28 server/discover)")

        h = structured(call("credential_use", {"service": service, "ttl": 300, "purpose": "inspector test"}))
        status, body = t.http("GET", f"{h['proxy_base_url']}/v1/ping?q=1", h["session_token"])
        check(status == 200, f"proxied GET answered {status}: {body[:300]}")
        check(upstream.seen and upstream.seen[-1]["authorization"] == f"Bearer {canary}",
              "upstream did not receive the injected credential")
        log("inspector credential_use + proxied request ok")

        rn = structured(call("credential_lease", {"lease_id": h["lease_id"], "action": "renew", "ttl": 300}))
        check(rn["action"] == "renew" and rn.get("expires_at"), f"renew {rn}")
        status, _ = t.http("GET", f"{h['proxy_base_url']}/v1/after-renew", h["session_token"])
        check(status == 200, f"proxy after renew answered {status}")
        rv = structured(call("credential_revoke", {"lease_id": h["lease_id"]}))
        check(rv["revoked"] is True, f"revoke {rv}")
        status, _ = t.http("GET", f"{h['proxy_base_url']}/v1/after-revoke", h["session_token"])
        check(status in (403, 410), f"proxy after revoke answered {status}")
        log("inspector credential_lease renew / credential_revoke ok; proxy refuses the revoked lease")

        ev = structured(call("audit_log", {"key": key, "limit": 50}))["events"]
        actions = {e["action"] for e in ev}
        check(any("used" in a for a in actions), f"audit actions {sorted(actions)}")
        log(f"inspector audit_log ok: {sorted(actions)}")

        denied = call("vault_retrieve", {"key": key, "purpose": "inspector"}, expect_rc=5)
        text = json.dumps(denied)
        check("policy denied" in text, f"vault_retrieve denial {text[:500]}")
        log("inspector denied export ok (exit 5, isError)")

        everything = "\n".join(OUTPUT)
        check(canary not in everything, "the stored secret appeared in inspector output")
        log(f"canary check passed over {len(OUTPUT) // 2} inspector runs")
    finally:
        upstream.close()
    log("MCP inspector flow: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
