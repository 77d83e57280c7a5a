// {{name}}: a wasmgate WAF. Requests whose path starts with `deny_prefix`
// are refused with 403; the others go on to the router.
//
// Settings (`[config]` in {{name}}.toml), checked by `init`:
// - `deny_prefix`: the path prefix refused (default `/admin`).
//
// gen/waf_plugin.h is written by `wit-bindgen c` from wit/ at build time.
// Values a function returns to the gateway are freed by the bindings after
// the call, so they are heap copies.

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "waf_plugin.h"

static waf_plugin_string_t deny_prefix;

// Runs on each new instance, before its first request; false refuses the
// plugin with the message in `err`.
bool exports_wasmgate_plugin_lifecycle_init(waf_plugin_string_t *err) {
    waf_plugin_string_t key;
    waf_plugin_string_set(&key, "deny_prefix");
    if (!wasmgate_plugin_host_config(&key, &deny_prefix)) waf_plugin_string_dup(&deny_prefix, "/admin");
    if (deny_prefix.len == 0 || deny_prefix.ptr[0] != '/') {
        waf_plugin_string_dup(err, "bad config: deny_prefix: it does not start with /");
        return false;
    }
    return true;
}

void exports_wasmgate_plugin_waf_inspect(exports_wasmgate_plugin_waf_borrow_request_t req,
                                         exports_wasmgate_plugin_waf_verdict_t *ret) {
    waf_plugin_string_t path;
    wasmgate_plugin_types_method_request_path(req, &path);
    bool denied = path.len >= deny_prefix.len && memcmp(path.ptr, deny_prefix.ptr, deny_prefix.len) == 0;
    waf_plugin_string_free(&path);
    // The borrowed request is given back by hand, before returning (the
    // gateway fails a call that keeps it).
    wasmgate_plugin_types_request_drop_borrow(req);
    if (!denied) {
        ret->tag = WASMGATE_PLUGIN_TYPES_VERDICT_ALLOW;
        return;
    }
    waf_plugin_string_t message;
    waf_plugin_string_set(&message, "refused a denied path");
    wasmgate_plugin_host_log(WASMGATE_PLUGIN_TYPES_LEVEL_INFO, &message);

    wasmgate_plugin_types_header_t *header = malloc(sizeof *header);
    waf_plugin_string_dup(&header->name, "content-type");
    waf_plugin_string_dup(&header->value, "text/plain; charset=utf-8");
    static const char body[] = "forbidden\n";
    uint8_t *bytes = malloc(sizeof body - 1);
    memcpy(bytes, body, sizeof body - 1);
    ret->tag = WASMGATE_PLUGIN_TYPES_VERDICT_DENY;
    ret->val.deny = (wasmgate_plugin_types_response_t){
        .status = 403,
        .headers = {.ptr = header, .len = 1},
        .body = {.ptr = bytes, .len = sizeof body - 1},
    };
}
