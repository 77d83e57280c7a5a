//! `deploy/`: the Kubernetes manifests pass strict schema validation
//! (`kubernetes-validate`, pinned, its schemas bundled) and agree with the
//! config they carry, which this gateway accepts; the systemd unit passes
//! `systemd-analyze verify`; the Containerfile builds what exists.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_owned()
}

/// The directory of the validator's programs, installed on first use.
fn validator() -> PathBuf {
    let out = Command::new(repo().join("scripts/toolchains/kubernetes-validate")).output().expect("the install script");
    assert!(out.status.success(), "installing kubernetes-validate: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    files
}

/// Every document of every manifest, as JSON (read by the validator's own
/// PyYAML).
fn documents(bin: &Path) -> Vec<Value> {
    let out = Command::new(bin.join("python"))
        .args([
            "-c",
            "import json, sys, yaml\nprint(json.dumps([d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]))",
        ])
        .args(manifests())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    documents
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn the_kubernetes_manifests_pass_strict_schema_validation() {
    let bin = validator();
    let out = Command::new(bin.join("kubernetes-validate"))
        .args(["--strict", "--quiet", "--kubernetes-version", "1.34.0"])
        .args(manifests())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The validator does find mistakes: a misspelled field fails it.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    let deployment = std::fs::read_to_string(repo().join("deploy/kubernetes/deployment.yaml")).unwrap();
    std::fs::write(&broken, deployment.replace("readOnlyRootFilesystem", "readOnlyRootFilesytem")).unwrap();
    let out =
        Command::new(bin.join("kubernetes-validate")).args(["--strict", "--quiet"]).arg(&broken).output().unwrap();
    assert!(!out.status.success(), "a misspelled field passed");
}

/// The Deployment mounts what the ConfigMap's gateway.toml names, probes
/// and scrapes the ports it binds, and gives a stopping pod time to drain;
/// the config itself, with its plugin and settings, passes `wasmgate check`.
#[test]
fn the_deployment_agrees_with_its_config_and_the_gateway_accepts_it() {
    let documents = documents(&validator());
    let toml_text =
        find(&documents, "ConfigMap", "wasmgate-config")["data"]["gateway.toml"].as_str().unwrap().to_owned();
    let config: toml::Value = toml::from_str(&toml_text).unwrap();
    let pod = &find(&documents, "Deployment", "wasmgate")["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let mounts: Vec<(&str, &str)> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["mountPath"].as_str().unwrap()))
        .collect();
    let mounted = |path: &str| mounts.iter().any(|(_, at)| Path::new(path).starts_with(at));

    // Paths: the config where the args say, the plugin dir, the token and
    // the cache each on a volume (the root file system is read-only).
    let args: Vec<&str> = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let config_path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    assert!(mounts.contains(&("config", Path::new(config_path).parent().unwrap().to_str().unwrap())), "{mounts:?}");
    let plugins_dir = config["plugins"]["dir"].as_str().unwrap();
    assert!(mounts.contains(&("plugins", plugins_dir)), "{mounts:?}");
    for path in [config["admin"]["token_file"].as_str().unwrap(), config["plugins"]["cache_dir"].as_str().unwrap()] {
        assert!(mounted(path), "{path} is on no volume: {mounts:?}");
    }
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);

    // Ports: the container's named ports are the ones the config binds; the
    // probes, the scrape and the Service use them.
    let port = |name: &str| {
        container["ports"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap()["containerPort"].as_u64()
    };
    let bound = |addr: &str| addr.rsplit(':').next().unwrap().parse::<u64>().ok();
    assert_eq!(port("admin"), bound(config["admin"]["listen"].as_str().unwrap()));
    assert_eq!(port("web"), bound(config["listener"][0]["bind"].as_str().unwrap()));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "admin");
    let scrape = &pod["metadata"]["annotations"];
    assert_eq!(scrape["prometheus.io/port"].as_str().unwrap().parse::<u64>().ok(), port("admin"));
    assert_eq!(find(&documents, "Service", "wasmgate")["spec"]["ports"][0]["targetPort"], "web");

    // A stopping pod: preStop, then the whole drain and its close grace fit
    // in the grace period.
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().unwrap();
    let drain = config["websocket"]["drain_s"].as_integer().unwrap() as u64;
    let grace = pod["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > pre_stop + drain + 5, "grace {grace} s for preStop {pre_stop} s + drain {drain} s + 5 s");

    // The config, its plugin and the plugin's settings pass `wasmgate check`
    // (the pod's paths moved into a scratch directory).
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let scratch = toml_text.replace("/etc/wasmgate/", &format!("{root}/")).replace("/var/cache/", &format!("{root}/"));
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::create_dir_all(dir.path().join("admin")).unwrap();
    std::fs::write(dir.path().join("admin/token"), "a-token-of-the-secret\n").unwrap();
    for (name, settings) in find(&documents, "ConfigMap", "wasmgate-plugin-settings")["data"].as_object().unwrap() {
        std::fs::write(dir.path().join("plugins").join(name), settings.as_str().unwrap()).unwrap();
        let plugin = name.strip_suffix(".toml").unwrap();
        std::fs::copy(crate::common::plugin_wasm(plugin), dir.path().join("plugins").join(format!("{plugin}.wasm")))
            .unwrap();
    }
    let config_file = dir.path().join("gateway.toml");
    std::fs::write(&config_file, scratch).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
        .args(["check", "--config"])
        .arg(&config_file)
        .env("XDG_CACHE_HOME", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("plugin handshake-guard (waf)"), "{stdout}");
}

#[test]
fn the_systemd_unit_verifies_and_outlasts_the_drain() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/wasmgate.service")).unwrap();
    let value = |key: &str| {
        unit.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).unwrap_or_else(|| panic!("no {key}= in the unit"))
    };
    assert_eq!(value("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(value("KillSignal"), "SIGTERM");
    let stop: u64 = value("TimeoutStopSec").trim_end_matches('s').parse().unwrap();
    assert!(stop > 30 + 5, "TimeoutStopSec={stop}s does not outlast the default drain_s (30 s) and close grace (5 s)");

    // systemd's own check, with the binary where this build put it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wasmgate.service");
    std::fs::write(&file, unit.replace("/usr/local/bin/wasmgate", env!("CARGO_BIN_EXE_wasmgate"))).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&file).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
}

/// No image builder runs here, so the Containerfile is held to what can be
/// checked: the toolchain it builds with is the workspace's, and what it
/// builds and copies exists.
#[test]
fn the_containerfile_builds_what_exists() {
    let containerfile = std::fs::read_to_string(repo().join("deploy/Containerfile")).unwrap();
    let workspace = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let rust_version = workspace.lines().find_map(|l| l.strip_prefix("rust-version = ")).unwrap().trim_matches('"');
    assert!(containerfile.contains(&format!("FROM docker.io/library/rust:{rust_version}-")), "{containerfile}");
    for package in ["path-router", "handshake-guard"] {
        assert!(containerfile.contains(&format!("-p {package}")));
        assert!(repo().join("plugins").join(package).join("Cargo.toml").is_file(), "{package}");
    }
    assert!(containerfile.contains("USER 65532:65532"));
    let deployment = std::fs::read_to_string(repo().join("deploy/kubernetes/deployment.yaml")).unwrap();
    assert!(deployment.contains("runAsUser: 65532"), "the pod runs as the image's user");
}
