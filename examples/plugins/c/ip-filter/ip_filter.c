// ip-filter: a WAF that refuses requests by client address and by path,
// before anything else looks at them.
//
// Settings (`[config]` in ip-filter.toml), checked by `init`:
// - `deny_cidrs`: addresses or CIDR blocks (IPv4 or IPv6), comma- or
//   space-separated, that are refused.
// - `allow_cidrs`: when set, only clients in these blocks get through.
// - `deny_paths`: path prefixes refused for everyone (`/admin` refuses
//   `/admin` and `/admin/x`, not `/administrator`).
// Refusals are 403 with a one-line reason; at most 64 entries per list.
//
// Built with clang for wasm32-wasi against wasi-libc, with the bindings
// `wit-bindgen c` generates from wit/ (waf-plugin world); see
// scripts/build-plugins. It uses nothing of libc that does I/O (no stdio),
// so the component imports no WASI at all.

#include <arpa/inet.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "waf_plugin.h"

#define MAX_ENTRIES 64
#define MAX_TEXT 256

typedef struct {
    int family;          // AF_INET or AF_INET6
    uint8_t addr[16];
    unsigned prefix;     // bits that must match
} cidr_t;

typedef struct {
    cidr_t deny[MAX_ENTRIES];
    size_t deny_len;
    cidr_t allow[MAX_ENTRIES];
    size_t allow_len;
    char paths[MAX_ENTRIES][MAX_TEXT];
    size_t paths_len;
} settings_t;

static settings_t settings;

// `text` (not NUL-terminated, `len` bytes) as a C string in `out`, or false
// when it does not fit.
static bool copy_text(char *out, size_t size, const uint8_t *text, size_t len) {
    if (len >= size) return false;
    memcpy(out, text, len);
    out[len] = '\0';
    return true;
}

// Parses `a.b.c.d`, `a.b.c.d/n`, `x::y` or `x::y/n` into `cidr`.
static bool parse_cidr(const char *text, cidr_t *cidr) {
    char addr[MAX_TEXT];
    const char *slash = strchr(text, '/');
    size_t len = slash ? (size_t)(slash - text) : strlen(text);
    if (!copy_text(addr, sizeof addr, (const uint8_t *)text, len)) return false;
    memset(cidr->addr, 0, sizeof cidr->addr);
    unsigned max;
    if (inet_pton(AF_INET, addr, cidr->addr) == 1) {
        cidr->family = AF_INET;
        max = 32;
    } else if (inet_pton(AF_INET6, addr, cidr->addr) == 1) {
        cidr->family = AF_INET6;
        max = 128;
    } else {
        return false;
    }
    cidr->prefix = max;
    if (slash) {
        char *end;
        long bits = strtol(slash + 1, &end, 10);
        if (slash[1] == '\0' || *end != '\0' || bits < 0 || bits > (long)max) return false;
        cidr->prefix = (unsigned)bits;
    }
    return true;
}

static bool cidr_contains(const cidr_t *cidr, int family, const uint8_t *addr) {
    if (cidr->family != family) return false;
    unsigned whole = cidr->prefix / 8, rest = cidr->prefix % 8;
    if (memcmp(cidr->addr, addr, whole) != 0) return false;
    if (rest == 0) return true;
    uint8_t mask = (uint8_t)(0xff << (8 - rest));
    return (cidr->addr[whole] & mask) == (addr[whole] & mask);
}

static bool config_value(const char *key, waf_plugin_string_t *value) {
    waf_plugin_string_t name;
    waf_plugin_string_set(&name, key);
    return wasmgate_plugin_host_config(&name, value);
}

// Appends the C strings in `parts` (NULL-terminated) to `out`, cut to fit.
static void join(char *out, size_t size, const char *const *parts) {
    size_t len = 0;
    for (; *parts != NULL; parts++) {
        size_t add = strlen(*parts);
        if (add > size - 1 - len) add = size - 1 - len;
        memcpy(out + len, *parts, add);
        len += add;
    }
    out[len] = '\0';
}

// Fills `err` with "bad config: KEY: `ENTRY` WHY" and returns false.
static bool refuse(waf_plugin_string_t *err, const char *key, const char *entry, const char *why) {
    char message[MAX_TEXT * 2];
    join(message, sizeof message, (const char *const[]){"bad config: ", key, ": `", entry, "` ", why, NULL});
    waf_plugin_string_dup(err, message);
    return false;
}

// Reads the list setting `key` entry by entry into `parse`.
static bool read_list(const char *key, waf_plugin_string_t *err, bool (*parse)(const char *entry, void *into, size_t index),
                      void *into, size_t *count) {
    waf_plugin_string_t value;
    *count = 0;
    if (!config_value(key, &value)) return true;
    size_t i = 0;
    bool ok = true;
    while (ok && i < value.len) {
        while (i < value.len && (value.ptr[i] == ',' || value.ptr[i] == ' ' || value.ptr[i] == '\n')) i++;
        size_t start = i;
        while (i < value.len && value.ptr[i] != ',' && value.ptr[i] != ' ' && value.ptr[i] != '\n') i++;
        if (i == start) break;
        char entry[MAX_TEXT];
        if (!copy_text(entry, sizeof entry, value.ptr + start, i - start)) {
            ok = refuse(err, key, "(an entry)", "is longer than 255 bytes");
        } else if (*count == MAX_ENTRIES) {
            ok = refuse(err, key, entry, "is one entry too many (64 at most)");
        } else if (!parse(entry, into, *count)) {
            ok = refuse(err, key, entry, "is not valid here");
        } else {
            (*count)++;
        }
    }
    waf_plugin_string_free(&value);
    return ok;
}

static bool parse_cidr_entry(const char *entry, void *into, size_t index) {
    return parse_cidr(entry, &((cidr_t *)into)[index]);
}

static bool parse_path_entry(const char *entry, void *into, size_t index) {
    if (entry[0] != '/') return false;
    strcpy(((char (*)[MAX_TEXT])into)[index], entry);
    return true;
}

bool exports_wasmgate_plugin_lifecycle_init(waf_plugin_string_t *err) {
    return read_list("deny_cidrs", err, parse_cidr_entry, settings.deny, &settings.deny_len) &&
           read_list("allow_cidrs", err, parse_cidr_entry, settings.allow, &settings.allow_len) &&
           read_list("deny_paths", err, parse_path_entry, settings.paths, &settings.paths_len);
}

static void deny(exports_wasmgate_plugin_waf_verdict_t *ret, const char *reason) {
    char body[MAX_TEXT];
    join(body, sizeof body, (const char *const[]){"forbidden: ", reason, "\n", NULL});
    wasmgate_plugin_types_header_t *header = malloc(sizeof *header);
    waf_plugin_string_dup(&header->name, "content-type");
    waf_plugin_string_dup(&header->value, "text/plain; charset=utf-8");
    size_t len = strlen(body);
    uint8_t *bytes = malloc(len);
    memcpy(bytes, body, len);
    ret->tag = WASMGATE_PLUGIN_TYPES_VERDICT_DENY;
    ret->val.deny = (wasmgate_plugin_types_response_t){
        .status = 403,
        .headers = {.ptr = header, .len = 1},
        .body = {.ptr = bytes, .len = len},
    };
}

// Whether `path` starts with `prefix` at a segment boundary.
static bool under(const waf_plugin_string_t *path, const char *prefix) {
    size_t len = strlen(prefix);
    if (path->len < len || memcmp(path->ptr, prefix, len) != 0) return false;
    return path->len == len || prefix[len - 1] == '/' || path->ptr[len] == '/';
}

static void decide(exports_wasmgate_plugin_waf_borrow_request_t req, exports_wasmgate_plugin_waf_verdict_t *ret) {
    ret->tag = WASMGATE_PLUGIN_TYPES_VERDICT_ALLOW;
    if (settings.paths_len > 0) {
        waf_plugin_string_t path;
        wasmgate_plugin_types_method_request_path(req, &path);
        bool denied = false;
        for (size_t i = 0; i < settings.paths_len && !denied; i++) denied = under(&path, settings.paths[i]);
        waf_plugin_string_free(&path);
        if (denied) return deny(ret, "path denied");
    }
    if (settings.deny_len == 0 && settings.allow_len == 0) return;
    waf_plugin_string_t ip;
    wasmgate_plugin_types_method_request_client_ip(req, &ip);
    char text[64];
    uint8_t addr[16] = {0};
    int family = 0;
    if (copy_text(text, sizeof text, ip.ptr, ip.len)) {
        if (inet_pton(AF_INET, text, addr) == 1) family = AF_INET;
        else if (inet_pton(AF_INET6, text, addr) == 1) family = AF_INET6;
    }
    waf_plugin_string_free(&ip);
    if (family == 0) return deny(ret, "unreadable client address");
    for (size_t i = 0; i < settings.deny_len; i++) {
        if (cidr_contains(&settings.deny[i], family, addr)) return deny(ret, "client address denied");
    }
    if (settings.allow_len == 0) return;
    for (size_t i = 0; i < settings.allow_len; i++) {
        if (cidr_contains(&settings.allow[i], family, addr)) return;
    }
    deny(ret, "client address not allowed");
}

void exports_wasmgate_plugin_waf_inspect(exports_wasmgate_plugin_waf_borrow_request_t req,
                                         exports_wasmgate_plugin_waf_verdict_t *ret) {
    decide(req, ret);
    // In C the borrowed request is given back by hand, before returning.
    wasmgate_plugin_types_request_drop_borrow(req);
}
