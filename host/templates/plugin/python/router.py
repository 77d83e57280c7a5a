"""{{name}}: a wasmgate router. Requests whose path starts with `prefix` go
to the pool `pool`; the others get no route from it (the listener's
`default_pool`, or 404).

Settings (`[config]` in {{name}}.toml), checked by `init`:
- `pool` (required): the pool to forward to.
- `prefix`: the path prefix that matches (default `/`).
"""

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import RouteDecision_Forward, RouteDecision_NoRoute, Upstream

POOL = ""
PREFIX = "/"


class Lifecycle(exports.Lifecycle):
    def init(self) -> None:
        """Runs on each new instance, before its first request; `Err`
        refuses the plugin with its message."""
        global POOL, PREFIX
        POOL = host.config("pool") or ""
        if not POOL:
            raise Err("bad config: pool: the pool to forward to is required")
        PREFIX = host.config("prefix") or "/"
        if not PREFIX.startswith("/"):
            raise Err(f"bad config: prefix: `{PREFIX}` does not start with /")


class Router(exports.Router):
    def route(self, req):
        if not req.path().startswith(PREFIX):
            return RouteDecision_NoRoute()
        return RouteDecision_Forward(Upstream(POOL, None, [], None))
