"""api-key-guard: a WAF that lets a WebSocket handshake through only with a
valid API key, and rate-limits each key through the gateway's `count`.

A client proves its key in one of two ways:
- the `x-api-key` header (name set by `header`), for programs;
- a signed query token (`?token=NAME.EXPIRY.SIGNATURE`, parameter set by
  `token_param`), for browsers, which cannot set headers on a WebSocket
  handshake. SIGNATURE is the hex HMAC-SHA256 of `NAME.EXPIRY` under NAME's
  key, and EXPIRY a Unix time in seconds.

Settings (`[config]` in api-key-guard.toml), checked by `init`:
- `api_keys` (required): `name=key` pairs, comma-separated; keys of at
  least 16 characters.
- `rate_limit`: `N/Ws`, at most N requests per key per W seconds (429 past
  it, with Retry-After). Default: none.
- `scope`: `websocket` (default: handshakes only) or `all`.
- `header`, `token_param`: where the key and the token are read.

Answers: 401 without a key, 403 with a wrong key or a bad or expired token,
429 over the rate; anything else is allowed.
"""

import hmac
import time
import warnings  # noqa: F401  hmac imports it lazily; importing it here bundles it
from hashlib import sha256

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import Header, Level, Response, Verdict_Allow, Verdict_Deny


class Settings:
    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}
        self.limit: tuple[int, int] | None = None
        self.websocket_only = True
        self.header = "x-api-key"
        self.token_param = "token"


SETTINGS = Settings()


def parse_settings() -> Settings:
    settings = Settings()
    pairs = host.config("api_keys") or ""
    for pair in filter(None, (p.strip() for p in pairs.split(","))):
        name, sep, key = pair.partition("=")
        name, key = name.strip(), key.strip()
        if not sep or not name or "." in name:
            raise ValueError(f"api_keys: `{pair}` is not name=key (a name without dots)")
        if len(key) < 16:
            raise ValueError(f"api_keys: the key of `{name}` is shorter than 16 characters")
        settings.keys[name] = key.encode()
    if not settings.keys:
        raise ValueError("api_keys: no keys (write name=key pairs, comma-separated)")
    rate = host.config("rate_limit")
    if rate is not None:
        count, sep, window = rate.strip().partition("/")
        if not sep or not window.endswith("s") or not count.isdigit() or not window[:-1].isdigit():
            raise ValueError(f"rate_limit: `{rate}` is not N/Ws (like 20/10s)")
        if int(window[:-1]) == 0:
            raise ValueError("rate_limit: the window must be at least 1s")
        settings.limit = (int(count), int(window[:-1]) * 1000)
    scope = (host.config("scope") or "websocket").strip()
    if scope not in ("websocket", "all"):
        raise ValueError(f"scope: `{scope}` is not `websocket` or `all`")
    settings.websocket_only = scope == "websocket"
    settings.header = (host.config("header") or settings.header).strip().lower()
    settings.token_param = (host.config("token_param") or settings.token_param).strip()
    return settings


def deny(status: int, text: str, *headers: Header) -> Verdict_Deny:
    return Verdict_Deny(
        Response(status, [Header("content-type", "text/plain; charset=utf-8"), *headers], (text + "\n").encode())
    )


def query_param(query: str | None, name: str) -> str | None:
    for pair in (query or "").split("&"):
        key, _, value = pair.partition("=")
        if key == name:
            return value
    return None


def key_name(req, settings: Settings) -> str | Verdict_Deny:
    """The name of the key the request proves, or the denial."""
    presented = req.header(settings.header)
    if presented is not None:
        for name, key in settings.keys.items():
            if hmac.compare_digest(presented.encode(), key):
                return name
        return deny(403, "forbidden: unknown API key")
    token = query_param(req.query(), settings.token_param)
    if token is None:
        return deny(401, "an API key is required", Header("www-authenticate", "ApiKey"))
    name, expiry, signature = (token.split(".") + ["", ""])[:3]
    key = settings.keys.get(name)
    if key is None or not expiry.isdigit():
        return deny(403, "forbidden: bad token")
    expected = hmac.new(key, f"{name}.{expiry}".encode(), sha256).hexdigest()
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        return deny(403, "forbidden: bad token")
    if int(expiry) < time.time():
        return deny(403, "forbidden: expired token")
    return name


class Lifecycle(exports.Lifecycle):
    def init(self) -> None:
        global SETTINGS
        try:
            SETTINGS = parse_settings()
        except ValueError as problem:
            raise Err(f"bad config: {problem}")


class Waf(exports.Waf):
    def inspect(self, req):
        settings = SETTINGS
        if settings.websocket_only and req.websocket() is None:
            return Verdict_Allow()
        name = key_name(req, settings)
        if isinstance(name, Verdict_Deny):
            return name
        if settings.limit is not None:
            limit, window_ms = settings.limit
            if host.count(f"key:{name}", window_ms) > limit:
                retry = str(max(1, window_ms // 1000))
                host.log(Level.INFO, f"key `{name}` over its rate")
                return deny(429, "too many requests", Header("retry-after", retry))
        return Verdict_Allow()
