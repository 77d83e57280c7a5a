//! The `wasmgate` command as an operator uses it.

use std::process::Command;

use crate::common::*;

fn wasmgate(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wasmgate")).args(args).output().expect("run wasmgate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn write_config(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

const CONFIG: &str = r#"
[plugins]
dir = "."

[[listener]]
name = "web"
bind = "127.0.0.1:0"
waf = ["handshake-guard"]
router = "path-router"

[[pool]]
name = "app"
servers = ["127.0.0.1:9001"]
"#;

#[test]
fn check_accepts_a_good_config_and_lists_its_plugins() {
    let plugins = PluginDir::new().add("path-router", "path-router", "[config]\nroutes = \"* / pool=app\"\n").add(
        "handshake-guard",
        "handshake-guard",
        "",
    );
    let path = write_config(plugins.path(), CONFIG);
    let (ok, out) = wasmgate(&["check", "--config", &path]);
    assert!(ok, "{out}");
    assert!(out.contains("plugin path-router (router)"), "{out}");
    assert!(out.contains("plugin handshake-guard (waf)"), "{out}");
}

#[test]
fn check_names_file_line_and_key_of_a_bad_config() {
    let plugins = PluginDir::new();
    let path = write_config(plugins.path(), &format!("{CONFIG}\n[websocket]\nidle_timeout = 5\n"));
    let (ok, out) = wasmgate(&["check", "--config", &path]);
    assert!(!ok);
    assert!(out.contains("gateway.toml"), "{out}");
    assert!(out.contains("line 16"), "{out}");
    assert!(out.contains("idle_timeout"), "{out}");
    assert!(!out.contains('\x1b'), "no terminal colour codes into a pipe: {out:?}");
}

#[test]
fn check_refuses_a_bad_plugin_settings_file_naming_file_line_and_key() {
    for (settings, expected) in [
        ("call_timeout_ms = 100\nmemory_limit = 8\n", "line 2"),
        ("call_timeout_ms = 100\nmemory_limit = 8\n", "unknown field `memory_limit`"),
        ("call_timeout_ms = 0\n", "path-router.toml:1: `call_timeout_ms`: must be 1-60000"),
        ("on_error = \"maybe\"\n", "unknown variant `maybe`, expected `deny` or `allow`"),
        ("\n\nmemory_limit_mb = 9999\n", "path-router.toml:3: `memory_limit_mb`: must be 1-4096"),
        ("[config]\nroutes = 7\n", "invalid type: integer `7`, expected a string"),
    ] {
        let plugins =
            PluginDir::new().add("path-router", "path-router", settings).add("handshake-guard", "handshake-guard", "");
        let path = write_config(plugins.path(), CONFIG);
        let (ok, out) = wasmgate(&["check", "--config", &path]);
        assert!(!ok, "{settings}: {out}");
        assert!(out.contains("rejected ") && out.contains("path-router.toml"), "{settings}: names the file: {out}");
        assert!(out.contains(expected), "{settings}: `{expected}` in {out}");
    }
}

#[test]
fn check_refuses_a_plugin_whose_init_refuses_naming_the_plugin_and_its_reason() {
    let plugins = PluginDir::new()
        .add("path-router", "head-echo", "[config]\nrefuse = \"no upstream named `billing`\"\n")
        .add("handshake-guard", "handshake-guard", "");
    let path = write_config(plugins.path(), CONFIG);
    let (ok, out) = wasmgate(&["check", "--config", &path]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("plugin `path-router` refused its configuration: no upstream named `billing`"),
        "names the plugin and its message: {out}"
    );
}

#[test]
fn plugin_inspect_shows_world_imports_exports_and_the_verdict() {
    // Inspected with the settings beside it, which its `init` checks.
    let plugins = PluginDir::new().add("path-router", "path-router", "[config]\nroutes = \"* / pool=app\"\n");
    let (ok, out) = wasmgate(&["plugin", "inspect", &plugins.path().join("path-router.wasm").to_string_lossy()]);
    assert!(ok, "{out}");
    for line in [
        "world:   wasmgate:plugin/router-plugin",
        "  wasmgate:plugin/host@0.3.0",
        "  wasmgate:plugin/router@0.3.0",
        "  wasmgate:plugin/lifecycle@0.3.0",
        "verdict: accepted",
    ] {
        assert!(out.lines().any(|l| l.starts_with(line)), "missing `{line}`:\n{out}");
    }
    // Without its route table, its `init` refuses, and inspect says why.
    let (ok, out) = wasmgate(&["plugin", "inspect", &plugin_wasm("path-router").to_string_lossy()]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(
            "verdict: rejected: plugin `path_router` refused its configuration: bad config: `routes`: no routes"
        ),
        "{out}"
    );
    let (ok, out) = wasmgate(&["plugin", "inspect", &plugin_wasm("handshake-guard").to_string_lossy()]);
    assert!(ok && out.contains("world:   wasmgate:plugin/waf-plugin"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm not a component").unwrap();
    let (ok, out) = wasmgate(&["plugin", "inspect", &garbage.to_string_lossy()]);
    assert!(!ok, "{out}");
    assert!(out.contains("verdict: rejected: not a valid WebAssembly component"), "{out}");
    let (ok, out) = wasmgate(&["plugin", "inspect", &plugin_wasm("init-trap").to_string_lossy()]);
    assert!(!ok, "{out}");
    assert!(out.contains("verdict: rejected") && out.contains("could not be instantiated"), "{out}");
}

#[test]
fn check_refuses_a_plugin_used_in_the_wrong_role() {
    let plugins =
        PluginDir::new().add("path-router", "handshake-guard", "").add("handshake-guard", "handshake-guard", "");
    let path = write_config(plugins.path(), CONFIG);
    let (ok, out) = wasmgate(&["check", "--config", &path]);
    assert!(!ok);
    assert!(out.contains("listener[0].router"), "{out}");
    assert!(out.contains("is a waf plugin"), "{out}");
    assert!(out.contains("uses `path-router` as a router"), "{out}");
}

#[test]
fn check_refuses_a_missing_or_broken_plugin_with_the_reason() {
    let plugins = PluginDir::new().add("handshake-guard", "handshake-guard", "");
    std::fs::write(plugins.path().join("path-router.wasm"), b"not wasm at all").unwrap();
    let path = write_config(plugins.path(), CONFIG);
    let (ok, out) = wasmgate(&["check", "--config", &path]);
    assert!(!ok);
    assert!(out.contains("plugin `path-router` is not loaded"), "{out}");
    assert!(out.contains("not a valid WebAssembly component"), "{out}");
}

#[test]
fn the_https_example_config_loads_with_its_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/https.toml");
    std::fs::copy(&example, dir.path().join("https.toml")).unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let pki = Pki::new();
    for (name, hosts) in [("app", &["app.example.test", "localhost"][..]), ("api", &["*.api.example.test"][..])] {
        let (cert, key) = pki.issue(name, hosts);
        std::fs::copy(cert, certs.join(format!("{name}.pem"))).unwrap();
        std::fs::copy(key, certs.join(format!("{name}.key"))).unwrap();
    }
    std::fs::copy(&pki.ca_pem, certs.join("ca.pem")).unwrap();
    let plugins = PluginDir::new().add("path-router", "path-router", "[config]\nroutes = \"* / pool=app\"\n").add(
        "handshake-guard",
        "handshake-guard",
        "",
    );
    std::fs::rename(plugins.dir.path(), dir.path().join("plugins")).unwrap();
    let (ok, out) = wasmgate(&["check", "--config", &dir.path().join("https.toml").to_string_lossy()]);
    assert!(ok, "{out}");
    assert!(out.contains("2 listener(s), 2 pool(s)"), "{out}");
}

#[test]
fn plugin_test_prints_the_decision_and_fails_on_an_unmet_expect() {
    let plugins = PluginDir::new()
        .add(
            "path-router",
            "path-router",
            "[config]\nroutes = \"* /api/ pool=api rewrite=/v1/ affinity=header:x-user\\n* /old redirect=/new\"\n",
        )
        .add("handshake-guard", "handshake-guard", "[config]\ndeny_paths = \"/admin*\"\n");
    let file = |name: &str| plugins.path().join(name).to_string_lossy().into_owned();
    let request = |name: &str, text: &str| {
        std::fs::write(plugins.path().join(name), text).unwrap();
        file(name)
    };
    let (router, guard) = (file("path-router.wasm"), file("handshake-guard.wasm"));

    let api = request(
        "api.toml",
        "path = \"/api/users\"\nheaders = [[\"x-user\", \"42\"]]\n\
         healthy_servers = { api = [\"10.0.0.1:80\"] }\nexpect = \"forward api\"\n",
    );
    let (ok, out) = wasmgate(&["plugin", "test", &router, "--request", &api]);
    assert!(ok, "{out}");
    for line in [
        "plugin:   path-router (router)",
        "request:  GET example.test/api/users from 192.0.2.1 on `web`",
        "decision: forward to pool `api`, rewrite `/v1/users`, affinity key `42`",
        "call:     ",
        "expect:   forward api: ok",
    ] {
        assert!(out.lines().any(|l| l.starts_with(line)), "missing `{line}`:\n{out}");
    }

    // The router answers /old itself: an `expect` of a forward fails.
    let old = request("old.toml", "path = \"/old\"\nexpect = \"forward api\"\n");
    let (ok, out) = wasmgate(&["plugin", "test", &router, "--request", &old]);
    assert!(!ok, "{out}");
    assert!(out.contains("decision: respond 308 location /new"), "{out}");
    assert!(out.contains("expect:   forward api: FAILED, the plugin decided `respond 308`"), "{out}");

    // A WAF: denied and allowed.
    let admin = request("admin.toml", "path = \"/admin/users\"\nexpect = \"deny 403\"\n");
    let (ok, out) = wasmgate(&["plugin", "test", &guard, "--request", &admin]);
    assert!(ok && out.contains("decision: deny 403 \"forbidden: path denied\""), "{out}");
    let fine = request("fine.toml", "path = \"/chat\"\nwebsocket = true\nexpect = \"allow\"\n");
    let (ok, out) = wasmgate(&["plugin", "test", &guard, "--request", &fine]);
    assert!(ok && out.contains("expect:   allow: ok"), "{out}");

    // Other settings through --config: a table its init refuses.
    let bad = request("bad-routes.toml", "[config]\nroutes = \"* /api\"\n");
    let (ok, out) = wasmgate(&["plugin", "test", &router, "--request", &api, "--config", &bad]);
    assert!(!ok, "{out}");
    assert!(out.contains("plugin `path-router` refused its configuration: bad config: `routes`: line 1"), "{out}");

    // A call that fails fails its file, and the other files still run.
    let looper = PluginDir::new().add("looper", "looper", "");
    let (trap, fine) = (looper.path().join("trap.toml"), looper.path().join("fine.toml"));
    std::fs::write(&trap, "path = \"/trap\"\nexpect = \"allow\"\n").unwrap();
    std::fs::write(&fine, "path = \"/fine\"\nexpect = \"allow\"\n").unwrap();
    let wasm = looper.path().join("looper.wasm").to_string_lossy().into_owned();
    let (ok, out) = wasmgate(&["plugin", "test", &wasm, "--request", &trap.to_string_lossy(), &fine.to_string_lossy()]);
    assert!(!ok, "{out}");
    assert!(out.contains("error:    plugin `looper` trapped"), "{out}");
    assert!(out.contains("expect:   allow: ok"), "the file after it ran: {out}");

    // A request the gateway would refuse is refused here too.
    let encoded = request("encoded.toml", "path = \"/a%2fb\"\n");
    let (ok, out) = wasmgate(&["plugin", "test", &router, "--request", &encoded]);
    assert!(!ok && out.contains("the gateway would refuse it"), "{out}");

    // A request file with a typo is refused with its key.
    let typo = request("typo.toml", "pth = \"/x\"\n");
    let (ok, out) = wasmgate(&["plugin", "test", &router, "--request", &typo]);
    assert!(!ok && out.contains("unknown field `pth`"), "{out}");
}
