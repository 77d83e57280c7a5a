//! `wasmgate plugin new` and `plugin build`, as a plugin author runs them:
//! for each language and kind, a project made from the binary's templates,
//! built with its pinned toolchain (installed by `scripts/build-plugins
//! --languages`, which `scripts/test` runs), accepted by `plugin inspect`,
//! deciding its own request tests right in `plugin test`, and refusing a bad
//! setting with its own message.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs the binary in `cwd`: (success, stdout, stderr).
fn wasmgate_in(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().copied())
        .output()
        .expect("run wasmgate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One project of `language` and `kind`, from `plugin new` to `plugin test`.
fn new_build_inspect_test(language: &str, kind: &str) {
    let root = tempfile::tempdir().unwrap();
    let name = format!("my-{language}-{kind}");
    let (ok, out, err) = wasmgate_in(root.path(), &["plugin", "new", "--lang", language, "--kind", kind, &name], &[]);
    assert!(ok, "{out}{err}");
    let dir = root.path().join(&name);
    // The three commands it prints are the ones that follow.
    let next: Vec<&str> = out.lines().skip_while(|l| *l != "next:").skip(1).map(str::trim).collect();
    assert_eq!(next.len(), 3, "{out}");
    assert_eq!(next[0], format!("cd {name}"));
    assert!(next[1].ends_with("plugin build"), "{out}");
    assert!(next[2].ends_with(&format!("plugin test {name}.wasm --request tests/*.toml")), "{out}");

    if language == "rust" {
        // Rust projects of every run share one target directory, so
        // wit-bindgen and its dependencies are compiled once.
        let shared = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-new-rust-target");
        std::fs::create_dir_all(&shared).unwrap();
        std::os::unix::fs::symlink(&shared, dir.join("target")).unwrap();
    }
    let (ok, out, err) = wasmgate_in(&dir, &["plugin", "build"], &[]);
    assert!(ok, "{language} {kind}: plugin build failed:\n{out}{err}");
    assert!(err.contains("accepted by the gateway"), "{err}");
    if language == "rust" || language == "c" {
        // Built again with nothing changed (cargo has nothing to do): fine.
        let (ok, out, err) = wasmgate_in(&dir, &["plugin", "build"], &[]);
        assert!(ok, "{language} {kind}: an up-to-date build failed:\n{out}{err}");
    }
    let component = dir.join(out.lines().last().expect("the component's path"));
    assert_eq!(
        std::fs::canonicalize(&component).unwrap(),
        std::fs::canonicalize(dir.join(format!("{name}.wasm"))).unwrap()
    );

    let component = component.to_string_lossy().into_owned();
    let (ok, out, err) = wasmgate_in(&dir, &["plugin", "inspect", &component], &[]);
    assert!(ok, "{out}{err}");
    assert!(out.contains(&format!("world:   wasmgate:plugin/{kind}-plugin\n")), "{out}");
    assert!(out.contains("verdict: accepted"), "{out}");

    let mut requests: Vec<PathBuf> = std::fs::read_dir(dir.join("tests")).unwrap().map(|e| e.unwrap().path()).collect();
    requests.sort();
    assert_eq!(requests.len(), 2, "an allowed and a refused request: {requests:?}");
    let mut args = vec!["plugin".to_owned(), "test".into(), component.clone(), "--request".into()];
    args.extend(requests.iter().map(|p| p.to_string_lossy().into_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = wasmgate_in(&dir, &args, &[]);
    assert!(ok, "{language} {kind}:\n{out}{err}");
    let expected: &[&str] = match kind {
        "router" => &["expect:   forward api: ok", "expect:   no-route: ok"],
        _ => &["expect:   allow: ok", "expect:   deny 403: ok"],
    };
    for line in expected {
        assert!(out.lines().any(|l| l == *line), "{language} {kind}: missing `{line}`:\n{out}");
    }

    // A bad setting is refused with the plugin's own message.
    let (setting, settings) = match kind {
        "router" => ("prefix", "pool = \"api\"\nprefix = \"api\"\n"),
        _ => ("deny_prefix", "deny_prefix = \"admin\"\n"),
    };
    std::fs::write(dir.join(format!("{name}.toml")), format!("[config]\n{settings}")).unwrap();
    let (ok, out, err) = wasmgate_in(&dir, &["plugin", "inspect", &component], &[]);
    assert!(!ok, "{out}{err}");
    assert!(
        out.contains(&format!("plugin `{name}` refused its configuration: bad config: {setting}:")),
        "{language} {kind}:\n{out}{err}"
    );
}

#[test]
fn a_new_rust_router_and_waf_build_and_decide_their_tests() {
    new_build_inspect_test("rust", "router");
    new_build_inspect_test("rust", "waf");
}

#[test]
fn a_new_javascript_router_and_waf_build_and_decide_their_tests() {
    new_build_inspect_test("js", "router");
    new_build_inspect_test("js", "waf");
}

#[test]
fn a_new_python_router_and_waf_build_and_decide_their_tests() {
    new_build_inspect_test("python", "router");
    new_build_inspect_test("python", "waf");
}

#[test]
fn a_new_c_router_and_waf_build_and_decide_their_tests() {
    new_build_inspect_test("c", "router");
    new_build_inspect_test("c", "waf");
}

#[test]
fn plugin_build_without_its_toolchain_names_the_script_that_installs_it() {
    let root = tempfile::tempdir().unwrap();
    let (ok, out, err) =
        wasmgate_in(root.path(), &["plugin", "new", "--lang", "python", "--kind", "waf", "guard"], &[]);
    assert!(ok, "{out}{err}");
    // No toolchain cache, and a PATH without componentize-py.
    let empty = root.path().join("empty-cache");
    std::fs::create_dir(&empty).unwrap();
    let env = [("PATH", "/usr/bin:/bin"), ("XDG_CACHE_HOME", empty.to_str().unwrap())];
    let (ok, out, err) = wasmgate_in(&root.path().join("guard"), &["plugin", "build"], &env);
    assert!(!ok, "{out}{err}");
    assert_eq!(
        err.trim(),
        "error: `componentize-py` is not installed: the Python toolchain (componentize-py 0.25.1) is installed by \
         scripts/toolchains/python in the wasmgate repository"
    );

    // A manifest that names the wrong kind: the build says what it made,
    // and leaves no component behind.
    let (ok, out, err) =
        wasmgate_in(root.path(), &["plugin", "new", "--lang", "c", "--kind", "waf", "wrong-kind"], &[]);
    assert!(ok, "{out}{err}");
    let manifest = root.path().join("wrong-kind/wasmgate-plugin.toml");
    let text = std::fs::read_to_string(&manifest).unwrap().replace("kind = \"waf\"", "kind = \"router\"");
    std::fs::write(&manifest, text).unwrap();
    let (ok, _, err) = wasmgate_in(&root.path().join("wrong-kind"), &["plugin", "build"], &[]);
    assert!(!ok && err.contains("is not a router plugin (its world: wasmgate:plugin/waf-plugin)"), "{err}");

    // Not a project: said so, and nothing is run.
    let (ok, _, err) = wasmgate_in(root.path(), &["plugin", "build"], &[]);
    assert!(!ok && err.contains("has no wasmgate-plugin.toml"), "{err}");
    // An existing directory with files is not overwritten.
    let (ok, _, err) = wasmgate_in(root.path(), &["plugin", "new", "--lang", "c", "--kind", "router", "guard"], &[]);
    assert!(!ok && err.contains("exists and is not empty"), "{err}");
    // A name that is not a plugin name.
    let (ok, _, err) = wasmgate_in(root.path(), &["plugin", "new", "--lang", "c", "--kind", "router", "../up"], &[]);
    assert!(!ok && err.contains("a plugin name is"), "{err}");
}
