//! `wasmgate plugin new` and `wasmgate plugin build`: a plugin project in
//! Rust, JavaScript, Python or C, scaffolded from the templates embedded in
//! the binary (`host/templates/plugin/`), and built by the commands its
//! `wasmgate-plugin.toml` names.
//!
//! A project holds its source, `NAME.toml` (its settings), `tests/*.toml`
//! (described requests with the decision they expect, for `plugin test`),
//! a copy of `wit/plugin.wit`, a README and the manifest. `plugin build`
//! runs the manifest's commands in the project's directory and leaves the
//! component at `NAME.wasm`, beside `NAME.toml`, ready for a gateway's
//! plugin directory.

use std::ffi::OsString;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::config::PluginKind;

/// The languages `plugin new` has templates for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Rust,
    Js,
    Python,
    C,
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.template().title)
    }
}

/// One language's templates and what its README says about it.
struct Template {
    title: &'static str,
    /// The manifest, with the build commands.
    manifest: &'static str,
    /// Where the source goes, and its router and WAF versions.
    source: &'static str,
    router: &'static str,
    waf: &'static str,
    /// Other files of the project.
    extra: &'static [(&'static str, &'static str)],
    /// The README's paragraph on the toolchain.
    toolchain: &'static str,
    /// How the README shows reading the request.
    accessors: &'static str,
}

const CONTRACT: &str = include_str!("../../../wit/plugin.wit");
const README: &str = include_str!("../../templates/plugin/common/README.md");
const ROUTER_SETTINGS: &str = include_str!("../../templates/plugin/common/router.toml");
const WAF_SETTINGS: &str = include_str!("../../templates/plugin/common/waf.toml");
const ROUTER_TESTS: [(&str, &str); 2] = [
    ("tests/routed.toml", include_str!("../../templates/plugin/common/tests/router/routed.toml")),
    ("tests/unrouted.toml", include_str!("../../templates/plugin/common/tests/router/unrouted.toml")),
];
const WAF_TESTS: [(&str, &str); 2] = [
    ("tests/allowed.toml", include_str!("../../templates/plugin/common/tests/waf/allowed.toml")),
    ("tests/denied.toml", include_str!("../../templates/plugin/common/tests/waf/denied.toml")),
];

const RUST: Template = Template {
    title: "Rust",
    manifest: include_str!("../../templates/plugin/rust/wasmgate-plugin.toml"),
    source: "src/lib.rs",
    router: include_str!("../../templates/plugin/rust/router.rs"),
    waf: include_str!("../../templates/plugin/rust/waf.rs"),
    extra: &[
        ("Cargo.toml", include_str!("../../templates/plugin/rust/Cargo.toml")),
        (".gitignore", "/target\n/Cargo.lock\n*.wasm\n"),
    ],
    toolchain: "## Toolchain\n\n\
        Rust with the `wasm32-wasip2` target (`rustup target add wasm32-wasip2`).\n\
        The bindings are generated from `wit/` at build time by the\n\
        `wit-bindgen` crate, so this project stands alone. (Inside the wasmgate\n\
        repository, plugins use its `wasmgate-sdk` crate instead, which adds a\n\
        mock host for `cargo test` and the `log` facade.)",
    accessors: "req.path()`, `req.header(\"x-user\")`, `req.client_ip()",
};

const JS: Template = Template {
    title: "JavaScript",
    manifest: include_str!("../../templates/plugin/js/wasmgate-plugin.toml"),
    source: "plugin.js",
    router: include_str!("../../templates/plugin/js/router.js"),
    waf: include_str!("../../templates/plugin/js/waf.js"),
    extra: &[(".gitignore", "*.wasm\n")],
    toolchain: "## Toolchain\n\n\
        Node.js 18+ and `componentize-js` 0.23.0 (with `jco` 1.35.0) from npm.\n\
        `scripts/toolchains/js` in the wasmgate repository installs them under\n\
        `~/.cache/wasmgate/toolchains/`, where `plugin build` finds it (or put\n\
        `componentize-js` on your PATH). The component carries the JavaScript\n\
        engine: about 12 MB, compiled by the gateway once in a few seconds (off\n\
        the request path) and then loaded from its compiled-artifact cache.\n\
        Variants are `{ tag, val }`, the request's accessors are camel-cased,\n\
        and a string thrown from `init` refuses the plugin with that message.",
    accessors: "req.path()`, `req.header('x-user')`, `req.clientIp()",
};

const PYTHON: Template = Template {
    title: "Python",
    manifest: include_str!("../../templates/plugin/python/wasmgate-plugin.toml"),
    source: "app.py",
    router: include_str!("../../templates/plugin/python/router.py"),
    waf: include_str!("../../templates/plugin/python/waf.py"),
    extra: &[(".gitignore", "*.wasm\n__pycache__/\n")],
    toolchain: "## Toolchain\n\n\
        `componentize-py` 0.25.1 from PyPI. `scripts/toolchains/python` in the\n\
        wasmgate repository installs it into a virtual environment under\n\
        `~/.cache/wasmgate/toolchains/`, where `plugin build` finds it (or put\n\
        `componentize-py` on your PATH). The component carries CPython: about\n\
        18 MB, compiled by the gateway once in a few seconds (off the request\n\
        path) and then loaded from its compiled-artifact cache. Only the modules\n\
        `app.py` imports are bundled: a module the standard library imports\n\
        lazily must be imported by `app.py` too. To read the generated\n\
        bindings: `componentize-py -d wit -w {{world}} bindings /tmp/bindings`.",
    accessors: "req.path()`, `req.header(\"x-user\")`, `req.client_ip()",
};

const C: Template = Template {
    title: "C",
    manifest: include_str!("../../templates/plugin/c/wasmgate-plugin.toml"),
    source: "plugin.c",
    router: include_str!("../../templates/plugin/c/router.c"),
    waf: include_str!("../../templates/plugin/c/waf.c"),
    extra: &[(".gitignore", "/gen\n*.wasm\n")],
    toolchain: "## Toolchain\n\n\
        Debian's `clang-14`, `lld-14`, `wasi-libc` and\n\
        `libclang-rt-14-dev-wasm32`, with `wit-bindgen` 0.61.1 (its C generator)\n\
        and `wasm-tools` 1.263.0 from crates.io. `scripts/toolchains/c` in the\n\
        wasmgate repository installs all of them, the last two under\n\
        `~/.cache/wasmgate/toolchains/`, where `plugin build` finds them. The\n\
        plugin uses no libc function that does I/O, so the component imports no\n\
        WASI at all. Give the borrowed request back with\n\
        `wasmgate_plugin_types_request_drop_borrow(req)` before returning: the\n\
        gateway fails a call that keeps it.",
    accessors: "wasmgate_plugin_types_method_request_path(req, &path)`, \
        `..._request_header(req, &name, &value)`, `..._request_client_ip(req, &ip)",
};

impl Language {
    fn template(self) -> &'static Template {
        match self {
            Language::Rust => &RUST,
            Language::Js => &JS,
            Language::Python => &PYTHON,
            Language::C => &C,
        }
    }
}

/// The kinds of plugin `plugin new` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Router,
    Waf,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Router => "router",
            Kind::Waf => "WAF",
        })
    }
}

impl From<Kind> for PluginKind {
    fn from(kind: Kind) -> PluginKind {
        match kind {
            Kind::Router => PluginKind::Router,
            Kind::Waf => PluginKind::Waf,
        }
    }
}

/// The manifest's file name.
pub const MANIFEST: &str = "wasmgate-plugin.toml";

/// A plugin name `plugin new` accepts: what a gateway's plugin directory,
/// a Cargo package and every toolchain take as they are.
fn check_name(name: &str) -> anyhow::Result<()> {
    let valid = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && !name.contains("--")
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        bail!(
            "`{}`: a plugin name is 1-64 lowercase letters, digits and single hyphens, starting with a letter",
            name.escape_debug()
        );
    }
    if name == MANIFEST.trim_end_matches(".toml") {
        bail!("`{name}`: its settings file would be the project's manifest; choose another name");
    }
    Ok(())
}

/// What `plugin new` wrote.
pub struct Created {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
}

/// Scaffolds a `language` plugin of `kind` called `name` in `dir` (which
/// must not exist, or be empty).
pub fn new(language: Language, kind: Kind, name: &str, dir: &Path) -> anyhow::Result<Created> {
    check_name(name)?;
    if dir.exists() {
        let mut entries =
            std::fs::read_dir(dir).with_context(|| format!("{} exists and is not a directory", dir.display()))?;
        if entries.next().is_some() {
            bail!("{} exists and is not empty: give a new directory", dir.display());
        }
    }
    let template = language.template();
    let ident = name.replace('-', "_");
    let (world, call, config_line) = match kind {
        Kind::Router => ("router-plugin", "route", format!("router = \"{name}\"")),
        Kind::Waf => ("waf-plugin", "inspect", format!("waf = [\"{name}\"]")),
    };
    let fill = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{ident}}", &ident)
            .replace("{{kind}}", &PluginKind::from(kind).to_string())
            .replace("{{world}}", world)
            .replace("{{world_ident}}", &world.replace('-', "_"))
            .replace("{{language}}", template.title)
            .replace("{{source}}", template.source)
            .replace("{{call}}", call)
            .replace("{{config_line}}", &config_line)
            .replace("{{toolchain}}", template.toolchain)
            .replace("{{example_accessors}}", template.accessors)
            .replace("{{world}}", world)
            .replace("{{kind_title}}", &kind.to_string())
    };
    let (source, settings, tests) = match kind {
        Kind::Router => (template.router, ROUTER_SETTINGS, ROUTER_TESTS),
        Kind::Waf => (template.waf, WAF_SETTINGS, WAF_TESTS),
    };
    let settings_file = format!("{name}.toml");
    let mut files: Vec<(&str, String)> = vec![
        (MANIFEST, fill(template.manifest)),
        (template.source, fill(source)),
        (&settings_file, fill(settings)),
        ("README.md", fill(README)),
        ("wit/plugin.wit", CONTRACT.to_owned()),
    ];
    files.extend(tests.iter().map(|(path, text)| (*path, fill(text))));
    files.extend(template.extra.iter().map(|(path, text)| (*path, fill(text))));

    let mut written = Vec::with_capacity(files.len());
    for (relative, text) in files {
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(Created { dir: dir.to_owned(), files: written })
}

/// A project's `wasmgate-plugin.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    name: String,
    language: Language,
    kind: Kind,
    /// Commands run in order in the project's directory, each a program and
    /// its arguments (no shell).
    build: Vec<Vec<String>>,
    /// The component the commands write, relative to the project.
    output: String,
}

/// What `plugin build` produced.
pub struct Built {
    pub name: String,
    pub kind: PluginKind,
    pub component: PathBuf,
    pub size: u64,
}

/// Runs the build of the project in `dir` and leaves its component at
/// `dir/NAME.wasm`.
pub fn build(dir: &Path) -> anyhow::Result<Built> {
    // Absolute: the commands run inside it, whatever the caller's directory.
    let dir = &std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let manifest_path = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&manifest_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} has no {MANIFEST}: build a project made by `wasmgate plugin new`, or give its directory",
            dir.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", manifest_path.display())),
    };
    let manifest: Manifest = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", manifest_path.display()))?;
    check_name(&manifest.name).with_context(|| format!("{}: name", manifest_path.display()))?;
    let output: PathBuf = Path::new(&manifest.output).components().filter(|c| *c != Component::CurDir).collect();
    if output.as_os_str().is_empty() || !output.components().all(|c| matches!(c, Component::Normal(_))) {
        bail!("{}: output `{}` must be a path inside the project", manifest_path.display(), manifest.output);
    }
    if manifest.build.is_empty() || manifest.build.iter().any(|c| c.first().is_none_or(|p| p.is_empty())) {
        bail!("{}: build must list commands, each a program and its arguments", manifest_path.display());
    }

    let path = search_path();
    for program in
        toolchain_programs(manifest.language).iter().copied().chain(manifest.build.iter().map(|c| c[0].as_str()))
    {
        if find_program(program, dir, &path).is_none() {
            bail!("`{program}` is not installed: {}", install_hint(manifest.language));
        }
    }
    // The previous component goes first: a failed build leaves none behind
    // to be tested or deployed by mistake.
    let component = dir.join(format!("{}.wasm", manifest.name));
    match std::fs::remove_file(&component) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the previous {}", component.display())),
    }
    for (step, command) in manifest.build.iter().enumerate() {
        let program = find_program(&command[0], dir, &path).expect("checked above");
        let status = Command::new(&program)
            .args(&command[1..])
            .current_dir(dir)
            .env("PATH", &path)
            .status()
            .with_context(|| format!("running `{}`", command[0]))?;
        if !status.success() {
            bail!(
                "step {} of {}, `{}`, failed ({status}); if its toolchain is incomplete: {}",
                step + 1,
                manifest.build.len(),
                command.join(" "),
                install_hint(manifest.language)
            );
        }
    }

    // A regular file, not a link out of the project (a build tool that is
    // up to date, cargo say, may leave it as it was).
    let produced = dir.join(&output);
    if !std::fs::symlink_metadata(&produced).is_ok_and(|m| m.is_file()) {
        bail!("the build did not write {} (the manifest's `output`) as a file", produced.display());
    }
    if produced != component {
        std::fs::copy(&produced, &component)
            .with_context(|| format!("copying {} to {}", produced.display(), component.display()))?;
    }
    let size = std::fs::metadata(&component).with_context(|| format!("reading {}", component.display()))?.len();
    Ok(Built { name: manifest.name, kind: manifest.kind.into(), component, size })
}

/// Checks what [`build`] produced as the gateway would load it (compiled,
/// linked, instantiated and initialised with the project's `NAME.toml`):
/// a component of the manifest's kind that the gateway accepts.
pub async fn verify(built: &Built) -> anyhow::Result<()> {
    let inspection = crate::plugin::inspect::inspect(&built.component).await?;
    let world = match built.kind {
        PluginKind::Router => "wasmgate:plugin/router-plugin",
        PluginKind::Waf => "wasmgate:plugin/waf-plugin",
    };
    if let Some(reason) = &inspection.rejection {
        bail!("{} is built, but the gateway would refuse it: {reason}", built.component.display());
    }
    if inspection.world != Some(world) {
        bail!(
            "{} is built, but it is not a {} plugin (its world: {})",
            built.component.display(),
            built.kind,
            inspection.world.unwrap_or("none")
        );
    }
    Ok(())
}

/// Programs a language's build needs beyond those its commands name.
fn toolchain_programs(language: Language) -> &'static [&'static str] {
    match language {
        // componentize-js's command is a Node.js script.
        Language::Js => &["node"],
        _ => &[],
    }
}

/// Where a language's toolchain comes from, in one line.
fn install_hint(language: Language) -> String {
    match language {
        Language::Rust => "Rust comes from rustup (https://rustup.rs), with `rustup target add wasm32-wasip2`".into(),
        Language::Js => "the JavaScript toolchain (Node.js, componentize-js 0.23.0 and jco 1.35.0) is installed by \
                         scripts/toolchains/js in the wasmgate repository"
            .into(),
        Language::Python => "the Python toolchain (componentize-py 0.25.1) is installed by \
                             scripts/toolchains/python in the wasmgate repository"
            .into(),
        Language::C => "the C toolchain (clang 14, wasi-libc, wit-bindgen 0.61.1, wasm-tools 1.263.0) is installed by \
                        scripts/toolchains/c in the wasmgate repository"
            .into(),
    }
}

/// PATH, then the toolchains the repository's scripts install under the
/// machine's cache directory (newest version first): a program of the
/// user's own comes first.
fn search_path() -> OsString {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|d| !d.is_empty()).map(|home| PathBuf::from(home).join(".cache")));
    if let Some(toolchains) = cache.map(|c| c.join("wasmgate/toolchains"))
        && let Ok(entries) = std::fs::read_dir(&toolchains)
    {
        let mut installed: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        // By version, numbers compared as numbers (0.23 after 0.9).
        installed.sort_by_key(|p| version_key(&p.to_string_lossy()));
        for toolchain in installed.iter().rev() {
            for bin in ["bin", "node_modules/.bin"] {
                let dir = toolchain.join(bin);
                if dir.is_dir() {
                    dirs.push(dir);
                }
            }
        }
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

/// `text` as runs of digits (compared as numbers) and of other characters.
fn version_key(text: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits > 0 {
            key.push((rest[..digits].parse().unwrap_or(u64::MAX), String::new()));
            rest = &rest[digits..];
        } else {
            let other = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            key.push((0, rest[..other].to_owned()));
            rest = &rest[other..];
        }
    }
    key
}

/// The program a command names: a path (relative to the project) when it
/// has a slash, else the first executable of that name on `path`.
fn find_program(program: &str, dir: &Path, path: &OsString) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        let candidate = dir.join(program);
        return executable(&candidate).then_some(candidate);
    }
    std::env::split_paths(path).map(|d| d.join(program)).find(|p| executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["a", "my-guard", "edge2", "x-1-y"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "My", "-a", "a-", "a--b", "a_b", "2fa", "a/b", "../x", "wasmgate-plugin", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_template_placeholder_is_filled() {
        let dir = tempfile::tempdir().unwrap();
        for language in [Language::Rust, Language::Js, Language::Python, Language::C] {
            for kind in [Kind::Router, Kind::Waf] {
                let project = dir.path().join(format!("{language:?}-{kind:?}").to_lowercase());
                let created = new(language, kind, "my-plugin", &project).unwrap();
                for file in created.files {
                    let text = std::fs::read_to_string(&file).unwrap();
                    assert!(!text.contains("{{"), "{} keeps a placeholder", file.display());
                }
                let manifest: Manifest =
                    toml::from_str(&std::fs::read_to_string(project.join(MANIFEST)).unwrap()).unwrap();
                assert_eq!(manifest.language, language);
                assert_eq!(manifest.kind, kind);
            }
        }
    }

    #[test]
    fn toolchain_versions_sort_as_numbers() {
        let mut dirs = vec!["js-componentize-js-0.23.0", "js-componentize-js-0.9.1", "js-componentize-js-0.10.0"];
        dirs.sort_by_key(|d| version_key(d));
        assert_eq!(dirs, ["js-componentize-js-0.9.1", "js-componentize-js-0.10.0", "js-componentize-js-0.23.0"]);
    }

    #[test]
    fn new_refuses_a_directory_with_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keep.txt"), "mine").unwrap();
        let error = new(Language::C, Kind::Waf, "guard", dir.path()).err().unwrap();
        assert!(format!("{error}").contains("not empty"), "{error}");
        assert_eq!(std::fs::read_to_string(dir.path().join("keep.txt")).unwrap(), "mine");
    }

    #[test]
    fn build_refuses_an_output_outside_the_project() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(MANIFEST),
            "name = \"x\"\nlanguage = \"c\"\nkind = \"waf\"\nbuild = [[\"true\"]]\noutput = \"../x.wasm\"\n",
        )
        .unwrap();
        let error = build(dir.path()).err().unwrap();
        assert!(format!("{error}").contains("inside the project"), "{error}");
    }
}
