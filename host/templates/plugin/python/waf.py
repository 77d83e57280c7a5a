"""{{name}}: a wasmgate WAF. Requests whose path starts with `deny_prefix`
are refused with 403; the others go on to the router.

Settings (`[config]` in {{name}}.toml), checked by `init`:
- `deny_prefix`: the path prefix refused (default `/admin`).
"""

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import Header, Level, Response, Verdict_Allow, Verdict_Deny

DENY_PREFIX = "/admin"


class Lifecycle(exports.Lifecycle):
    def init(self) -> None:
        """Runs on each new instance, before its first request; `Err`
        refuses the plugin with its message."""
        global DENY_PREFIX
        DENY_PREFIX = host.config("deny_prefix") or "/admin"
        if not DENY_PREFIX.startswith("/"):
            raise Err(f"bad config: deny_prefix: `{DENY_PREFIX}` does not start with /")


class Waf(exports.Waf):
    def inspect(self, req):
        if not req.path().startswith(DENY_PREFIX):
            return Verdict_Allow()
        host.log(Level.INFO, f"refused {req.path()} from {req.client_ip()}")
        headers = [Header("content-type", "text/plain; charset=utf-8")]
        return Verdict_Deny(Response(403, headers, b"forbidden\n"))
