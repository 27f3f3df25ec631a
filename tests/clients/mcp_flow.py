"""Drive the real crp-mcp binary with the Python `mcp` SDK (a client nobody here wrote).

Flow: initialize (experimental.crp) -> tools/list -> vault_store -> vault_list (no values)
-> crp/use custom request -> proxied HTTP request (credential injected upstream) -> credential_use
-> credential_lease renew (tool) and crp/lease (custom) -> credential_revoke -> proxy refuses
-> crp/revoke, crp/list -> audit_log -> policy checks, denials, a permitted export -> a second
session over `server/discover` (MCP 2026-07-28). The stored secrets never appear in any MCP
output except the permitted export.

Run by mcp-adapter/tests/clients.rs; see crptest.py for the environment.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from typing import Any, Literal

from pydantic import ConfigDict

import crptest as t
from crptest import check, log
from mcp import ClientSession, StdioServerParameters, stdio_client, types
from mcp.shared.exceptions import MCPError


class CrpUseRequest(types.Request[dict[str, Any], Literal["crp/use"]]):
    method: Literal["crp/use"] = "crp/use"


class CrpLeaseRequest(types.Request[dict[str, Any], Literal["crp/lease"]]):
    method: Literal["crp/lease"] = "crp/lease"


class CrpRevokeRequest(types.Request[dict[str, Any], Literal["crp/revoke"]]):
    method: Literal["crp/revoke"] = "crp/revoke"


class CrpListRequest(types.Request[dict[str, Any], Literal["crp/list"]]):
    method: Literal["crp/list"] = "crp/list"


class CrpResolveRequest(types.Request[dict[str, Any], Literal["crp/resolve"]]):
    method: Literal["crp/resolve"] = "crp/resolve"


class CrpResult(types.Result):
    model_config = ConfigDict(extra="allow")


EXPECTED_TOOLS = {
    "vault_store", "vault_retrieve", "vault_delete", "vault_list", "credential_use", "credential_resolve",
    "credential_lease", "credential_revoke", "policy_check", "audit_log",
}


def server_params() -> StdioServerParameters:
    env = {"CRP_HOME": t.CLIENT_HOME if t.MODE == "remote" else t.CRP_HOME, "CRP_LOG": "info"}
    if t.MODE == "remote":
        args = ["serve", "--provider", t.PROVIDER_URL]
        env["CRP_AGENT_ID"] = t.AGENT_ID
    else:
        args = ["serve", "--listen", "127.0.0.1:0"]
    return StdioServerParameters(command=t.MCP_BIN, args=args, env=env)


async def tool(s: ClientSession, tr: t.Transcript, name: str, args: dict[str, Any], *, error: bool = False,
               export: bool = False) -> types.CallToolResult:
    r = await s.call_tool(name, args)
    (tr.add_export if export else tr.add)(r)
    text = " ".join(c.text for c in r.content if isinstance(c, types.TextContent))
    check(r.is_error == error, f"{name}: is_error={r.is_error}, expected {error}: {text}")
    if not error:
        check(isinstance(r.structured_content, dict), f"{name}: no structured content")
    return r


def text_of(r: types.CallToolResult) -> str:
    return " ".join(c.text for c in r.content if isinstance(c, types.TextContent))


async def crp(s: ClientSession, tr: t.Transcript, req: types.Request[Any, Any]) -> dict[str, Any]:
    r = await s.send_request(req, CrpResult)
    tr.add(r)
    return r.model_dump(mode="json", by_alias=True)


async def main_flow(errlog: Any) -> None:
    canary = t.new_canary("main")
    canary_export = t.new_canary("export")
    key, service = "test/upstream", "test.upstream"
    upstream = t.Upstream()
    tr = t.Transcript()
    try:
        async with stdio_client(server_params(), errlog=errlog) as (r, w), ClientSession(r, w, read_timeout_seconds=60) as s:
            init = await s.initialize()
            tr.add(init)
            crp_cap = (init.capabilities.experimental or {}).get("crp")
            check(crp_cap is not None, "initialize result lacks capabilities.experimental.crp")
            check(crp_cap["version"] == "0.2", f"negotiated CRP version {crp_cap['version']}")
            check("use" in crp_cap["features"], f"features {crp_cap['features']}")
            check(crp_cap.get("conformance") in ("basic", "standard", "full"), f"conformance {crp_cap}")
            check(init.server_info.name == "crp-mcp", f"server name {init.server_info.name}")
            log(f"initialize ok: experimental.crp = {crp_cap}")

            listed = await s.list_tools()
            tr.add(listed)
            names = {x.name for x in listed.tools}
            check(names == EXPECTED_TOOLS, f"tools {sorted(names)}")
            by_name = {x.name: x for x in listed.tools}
            check(by_name["vault_list"].annotations.read_only_hint is True, "vault_list readOnlyHint")
            check(by_name["vault_delete"].annotations.destructive_hint is True, "vault_delete destructiveHint")
            check("`use`" in (by_name["credential_use"].description or ""), "credential_use names its policy action")
            log("tools/list ok: 10 tools with annotations")

            # store -> operator allows loopback for this credential only
            st = await tool(s, tr, "vault_store", {
                "key": key, "value": canary, "service": service, "upstream": upstream.url,
                "metadata": {"environment": "test"}, "tags": ["ci"],
            })
            check(st.structured_content["stored"] is True and st.structured_content["key"] == key, "vault_store result")
            t.operator_allow_loopback(key, service, "CRP_TEST_VALUE", canary, upstream.url)
            log("vault_store ok; operator allowed 127.0.0.1 for this credential")

            # list: no values
            ls = await tool(s, tr, "vault_list", {"prefix": "test/"})
            keys = [c["key"] for c in ls.structured_content["credentials"]]
            check(key in keys, f"vault_list keys {keys}")
            log(f"vault_list ok: {keys}")

            # crp/use on the MCP connection, then a proxied request
            used = await crp(s, tr, CrpUseRequest(params={"service": service, "ttl": 300,
                                                          "context": {"purpose": "client test"}}))
            lease_id = used["lease"]["id"]
            base, token = used["proxyBaseUrl"], used["sessionToken"]
            check(base.startswith("http://127.0.0.1:"), f"proxyBaseUrl {base}")
            status, body = t.http("GET", f"{base}/hello?x=1", token)
            check(status == 200, f"proxied GET answered {status}: {body[:200]}")
            check(upstream.seen and upstream.seen[-1]["authorization"] == f"Bearer {canary}",
                  "upstream did not receive the injected credential")
            check(upstream.seen[-1]["path"] == "/hello?x=1", f"upstream path {upstream.seen[-1]['path']}")
            check(canary not in body, "proxy response carried the secret")
            status, _ = t.http("GET", f"{base}/hello", "wrong-token")
            check(status == 401, f"proxy with a wrong session token answered {status}")
            log(f"crp/use + proxy ok: lease {lease_id[:8]}…, upstream saw the injected credential")

            # the tool path: credential_use, renew, revoke
            h = (await tool(s, tr, "credential_use", {"service": service, "ttl": 120, "purpose": "tool test"})).structured_content
            for field in ("proxy_base_url", "session_token", "lease_id", "expires_at", "descriptor"):
                check(field in h, f"credential_use lacks {field}")
            status, _ = t.http("POST", f"{h['proxy_base_url']}/items", h["session_token"], b'{"a":1}')
            check(status == 200, f"proxied POST via credential_use answered {status}")
            renewed = (await tool(s, tr, "credential_lease", {"lease_id": h["lease_id"], "action": "renew", "ttl": 120})).structured_content
            check(renewed["action"] == "renew" and renewed.get("expires_at"), f"renew result {renewed}")
            status, _ = t.http("GET", f"{h['proxy_base_url']}/after-renew", h["session_token"])
            check(status == 200, f"proxy after renew answered {status}")
            lr = await crp(s, tr, CrpLeaseRequest(params={"action": "renew", "leaseId": lease_id, "ttl": 60}))
            check(lr["lease"]["id"] == lease_id, f"crp/lease renew {lr}")
            rv = (await tool(s, tr, "credential_revoke", {"lease_id": h["lease_id"]})).structured_content
            check(rv["revoked"] is True, f"credential_revoke {rv}")
            status, _ = t.http("GET", f"{h['proxy_base_url']}/after-revoke", h["session_token"])
            check(status in (403, 410), f"proxy after revoke answered {status}")
            log("credential_use / credential_lease renew / credential_revoke ok; revoked lease refused by the proxy")

            # crp/revoke and crp/list on the connection
            rr = await crp(s, tr, CrpRevokeRequest(params={"leaseId": lease_id, "reason": "manual_revocation"}))
            check(rr["revoked"] is True, f"crp/revoke {rr}")
            status, _ = t.http("GET", f"{base}/after-revoke", token)
            check(status in (403, 410), f"proxy after crp/revoke answered {status}")
            services = [x["service"] for x in (await crp(s, tr, CrpListRequest(params={})))["services"]]
            check(service in services, f"crp/list services {services}")
            log("crp/revoke + crp/list ok")

            # audit trail
            ev = (await tool(s, tr, "audit_log", {"key": key, "limit": 100})).structured_content["events"]
            actions = {e["action"] for e in ev}
            check(len(ev) > 0, "audit_log returned no events")
            check(any("used" in a for a in actions), f"no credential.used event in {sorted(actions)}")
            log(f"audit_log ok: {sorted(actions)}")

            # read-blind: denials are actionable, never carry the value
            pc = (await tool(s, tr, "policy_check", {"key": key, "action": "retrieve"})).structured_content
            check(pc["allowed"] is False, f"policy_check retrieve {pc}")
            pc = (await tool(s, tr, "policy_check", {"key": key, "action": "use"})).structured_content
            check(pc["allowed"] is True, f"policy_check use {pc}")
            r = await tool(s, tr, "vault_retrieve", {"key": key, "purpose": "test"}, error=True)
            check("policy denied" in text_of(r) and "operator" in text_of(r), f"vault_retrieve denial: {text_of(r)}")
            r = await tool(s, tr, "vault_retrieve", {"key": key}, error=True)
            check("purpose" in text_of(r), f"vault_retrieve without purpose: {text_of(r)}")
            res = (await tool(s, tr, "credential_resolve", {"service": service, "scope": [], "requester": "cursor/ws"})).structured_content
            check(res["exported"] is False and "session_token" in res["credential"], f"credential_resolve handle {res}")
            await tool(s, tr, "credential_resolve", {"service": service, "export": True, "purpose": "x"}, error=True)
            r = await tool(s, tr, "vault_store", {"key": "bad key!", "value": canary}, error=True)
            check(canary not in text_of(r), "argument error echoed the value")
            r = await tool(s, tr, "vault_store", {"key": key, "value": 12345, "extra": canary}, error=True)
            check(canary not in text_of(r), "unknown-field error echoed the value")
            try:
                await s.call_tool("no_such_tool", {})
                raise AssertionError("unknown tool did not raise a JSON-RPC error")
            except MCPError as e:
                tr.add({"error": e.code, "message": e.message})
                check(e.code == -32602, f"unknown tool code {e.code}")
            try:
                await s.send_request(CrpResolveRequest(params={"service": service}), CrpResult)
                raise AssertionError("crp/resolve under 0.2 succeeded")
            except MCPError as e:
                tr.add({"error": e.code, "message": e.message, "data": e.data})
                check(e.code == -33011, f"crp/resolve under 0.2 code {e.code}")
            try:
                await s.send_request(CrpUseRequest(params={"service": "no.such.service"}), CrpResult)
                raise AssertionError("crp/use of an unknown service succeeded")
            except MCPError as e:
                tr.add({"error": e.code, "message": e.message, "data": e.data})
                check(e.code in (-33002, -33003), f"crp/use unknown service code {e.code}")
            log("denials, argument errors and protocol errors ok")

            # a permitted export (policy allows `retrieve` on CRP_EXPORT_KEY with a purpose)
            await tool(s, tr, "vault_store", {"key": t.EXPORT_KEY, "value": canary_export})
            ex = (await tool(s, tr, "vault_retrieve", {"key": t.EXPORT_KEY, "purpose": "client test export"},
                             export=True)).structured_content
            check(ex["value"] == canary_export, "permitted export did not return the stored value")
            ev = (await tool(s, tr, "audit_log", {"key": t.EXPORT_KEY})).structured_content["events"]
            check(any("export" in e["action"] or e.get("detail", {}).get("export") for e in ev),
                  f"export not audited: {[e['action'] for e in ev]}")
            rs = (await tool(s, tr, "credential_resolve", {"service": t.EXPORT_KEY, "export": True,
                                                           "purpose": "client test export"}, export=True)).structured_content
            check(rs["exported"] is True and rs["credential"].get("key") == canary_export,
                  "credential_resolve export did not return the material")
            dl = (await tool(s, tr, "vault_delete", {"key": t.EXPORT_KEY})).structured_content
            check(dl["deleted"] is True, f"vault_delete {dl}")
            log("permitted exports (vault_retrieve, credential_resolve export) ok and audited")

        # MCP 2026-07-28: server/discover instead of initialize
        async with stdio_client(server_params(), errlog=errlog) as (r, w), ClientSession(r, w, read_timeout_seconds=60) as s:
            d = await s.discover()
            tr.add(d)
            crp_cap = (d.capabilities.experimental or {}).get("crp")
            check(crp_cap is not None and crp_cap["version"] == "0.2", f"discover experimental.crp {crp_cap}")
            listed = await s.list_tools()
            check({x.name for x in listed.tools} == EXPECTED_TOOLS, "tools/list after discover")
            ls = await tool(s, tr, "vault_list", {})
            check(any(c["key"] == key for c in ls.structured_content["credentials"]), "vault_list after discover")
            log("server/discover session ok")

        errlog.flush()
        with open(errlog.name) as f:
            logs = f.read()
        tr.assert_clean(canary, canary_export, extra=logs)
    finally:
        upstream.close()


def main() -> int:
    with tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False) as errlog:
        try:
            asyncio.run(main_flow(errlog))
        except BaseException:
            errlog.flush()
            errlog.seek(0)
            sys.stderr.write("---- crp-mcp stderr ----\n" + errlog.read()[-6000:] + "\n")
            raise
    log("python mcp SDK flow: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
