// {{name}}: a wasmgate router. Requests whose path starts with `prefix` go
// to the pool `pool`; the others get no route from it (the listener's
// `default_pool`, or 404).
//
// Settings (`[config]` in {{name}}.toml), checked by `init`:
// - `pool` (required): the pool to forward to.
// - `prefix`: the path prefix that matches (default `/`).
//
// gen/router_plugin.h is written by `wit-bindgen c` from wit/ at build
// time. Values a function returns to the gateway are freed by the bindings
// after the call, so they are heap copies.

#include <stdbool.h>
#include <string.h>

#include "router_plugin.h"

static router_plugin_string_t pool;
static router_plugin_string_t prefix;

static bool config_value(const char *key, router_plugin_string_t *value) {
    router_plugin_string_t name;
    router_plugin_string_set(&name, key);
    return wasmgate_plugin_host_config(&name, value);
}

// Runs on each new instance, before its first request; false refuses the
// plugin with the message in `err`.
bool exports_wasmgate_plugin_lifecycle_init(router_plugin_string_t *err) {
    if (!config_value("pool", &pool) || pool.len == 0) {
        router_plugin_string_dup(err, "bad config: pool: the pool to forward to is required");
        return false;
    }
    if (!config_value("prefix", &prefix)) router_plugin_string_dup(&prefix, "/");
    if (prefix.len == 0 || prefix.ptr[0] != '/') {
        router_plugin_string_dup(err, "bad config: prefix: it does not start with /");
        return false;
    }
    return true;
}

void exports_wasmgate_plugin_router_route(exports_wasmgate_plugin_router_borrow_request_t req,
                                          exports_wasmgate_plugin_router_route_decision_t *ret) {
    router_plugin_string_t path;
    wasmgate_plugin_types_method_request_path(req, &path);
    bool matches = path.len >= prefix.len && memcmp(path.ptr, prefix.ptr, prefix.len) == 0;
    router_plugin_string_free(&path);
    // The borrowed request is given back by hand, before returning (the
    // gateway fails a call that keeps it).
    wasmgate_plugin_types_request_drop_borrow(req);
    if (!matches) {
        ret->tag = WASMGATE_PLUGIN_TYPES_ROUTE_DECISION_NO_ROUTE;
        return;
    }
    ret->tag = WASMGATE_PLUGIN_TYPES_ROUTE_DECISION_FORWARD;
    ret->val.forward = (wasmgate_plugin_types_upstream_t){0};
    router_plugin_string_dup_n(&ret->val.forward.pool, (const char *)pool.ptr, pool.len);
}
