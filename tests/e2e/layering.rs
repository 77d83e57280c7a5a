//! The house rules of `host/src`: every module imports only from the
//! folders ARCHITECTURE.md's layering table allows its folder, and the table
//! itself has no circle, so every arrow points to a lower floor.
//!
//! Sources are parsed as Rust (`syn`), so every path counts wherever it is
//! written: `use` trees with groups, `crate::`, `super::` chains resolved
//! against the module they are written in (inline `mod` blocks included),
//! paths in expressions and types, `crate::`/`$crate::` inside macro
//! bodies, and `wasmgate::` in the binary.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_owned()
}

/// The table between the layering markers of ARCHITECTURE.md: each room
/// (a folder of `host/src`, or a file at its root) and the rooms it may
/// import from.
fn rules() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(repo().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let start = text.find("<!-- layering:start -->").expect("ARCHITECTURE.md has a layering table");
    let end = text.find("<!-- layering:end -->").expect("the layering table ends");
    let mut rules = BTreeMap::new();
    for row in text[start..end].lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let room = cells[0].trim_matches('`').trim_end_matches('/').to_owned();
        let allowed = cells[1]
            .split(',')
            .map(|s| s.trim().trim_matches('`').trim_end_matches('/').to_owned())
            .filter(|s| !s.is_empty() && s != "nothing")
            .collect();
        rules.insert(room, allowed);
    }
    assert!(rules.len() >= 10, "the layering table lists the rooms of host/src: {rules:?}");
    rules
}

/// The module path of a file under `host/src` (`request/proxy.rs` →
/// `[request, proxy]`, `request/mod.rs` → `[request]`, `lib.rs` → `[]`).
fn module_of(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let file = parts.pop().expect("a file name");
    match file.as_str() {
        "mod.rs" | "lib.rs" | "main.rs" => {}
        other => parts.push(other.trim_end_matches(".rs").to_owned()),
    }
    parts
}

/// The room of a file: its top folder, or its own name at the root.
fn room_of(relative: &Path) -> String {
    let first = relative.iter().next().expect("a path").to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_owned()
}

/// Collects the first segment (the room) of every crate path a file names.
struct Imports {
    /// The module the visitor is in (inline `mod` blocks push onto it).
    module: Vec<String>,
    /// The crate's own name as other crates write it (`wasmgate`), for the binary.
    crate_alias: Option<&'static str>,
    rooms: BTreeSet<String>,
}

impl Imports {
    /// Resolves a path written in `self.module` to its room, if it is a path
    /// into this crate.
    fn resolve<'a>(&mut self, mut segments: impl Iterator<Item = &'a str>) {
        let Some(first) = segments.next() else { return };
        let mut at: Vec<String> = match first {
            "crate" | "$crate" => Vec::new(),
            name if Some(name) == self.crate_alias => Vec::new(),
            "self" => self.module.clone(),
            "super" => {
                let mut at = self.module.clone();
                at.pop();
                at
            }
            _ => return, // another crate, or a name in scope here
        };
        let mut next = segments.next();
        while next == Some("super") {
            at.pop();
            next = segments.next();
        }
        if let Some(room) = at.first().map(String::as_str).or(next) {
            self.rooms.insert(room.to_owned());
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(path) => {
                prefix.push(path.ident.to_string());
                self.use_tree(prefix, &path.tree);
                prefix.pop();
            }
            syn::UseTree::Group(group) => {
                for item in &group.items {
                    self.use_tree(prefix, item);
                }
            }
            syn::UseTree::Name(syn::UseName { ident }) | syn::UseTree::Rename(syn::UseRename { ident, .. }) => {
                let full: Vec<String> = prefix.iter().cloned().chain([ident.to_string()]).collect();
                self.resolve(full.iter().map(String::as_str));
            }
            syn::UseTree::Glob(_) => self.resolve(prefix.clone().iter().map(String::as_str)),
        }
    }

    /// `crate :: name` and `$crate :: name` in a macro's tokens.
    fn tokens(&mut self, tokens: TokenStream) {
        let flat: Vec<TokenTree> = tokens.into_iter().collect();
        for (i, token) in flat.iter().enumerate() {
            match token {
                TokenTree::Group(group) => self.tokens(group.stream()),
                TokenTree::Ident(ident) if ident == "crate" || Some(ident.to_string().as_str()) == self.crate_alias => {
                    let colons = flat
                        .get(i + 1..i + 3)
                        .is_some_and(|t| t.iter().all(|t| matches!(t, TokenTree::Punct(p) if p.as_char() == ':')));
                    if let (true, Some(TokenTree::Ident(room))) = (colons, flat.get(i + 3)) {
                        self.rooms.insert(room.to_string());
                    }
                }
                _ => {}
            }
        }
    }
}

impl<'ast> Visit<'ast> for Imports {
    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        self.module.push(item.ident.to_string());
        syn::visit::visit_item_mod(self, item);
        self.module.pop();
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.resolve(segments.iter().map(String::as_str));
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.tokens(mac.tokens.clone());
        syn::visit::visit_macro(self, mac);
    }
}

/// The rooms a source file (at `relative` under `host/src`) names.
fn rooms_named(relative: &Path, source: &str) -> BTreeSet<String> {
    let file = syn::parse_file(source).unwrap_or_else(|e| panic!("{}: not Rust: {e}", relative.display()));
    let is_binary = relative == Path::new("main.rs");
    let mut imports =
        Imports { module: module_of(relative), crate_alias: is_binary.then_some("wasmgate"), rooms: BTreeSet::new() };
    imports.visit_file(&file);
    imports.rooms
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read host/src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn host_modules_import_only_from_lower_floors() {
    let rules = rules();
    let src = repo().join("host/src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut broken = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under host/src");
        let room = room_of(relative);
        let Some(allowed) = rules.get(&room) else {
            broken.push(format!("{}: room `{room}` is not in ARCHITECTURE.md's layering table", relative.display()));
            continue;
        };
        let source = std::fs::read_to_string(file).expect("read source");
        for named in rooms_named(relative, &source) {
            if named != room && rules.contains_key(&named) && !allowed.contains(&named) {
                broken.push(format!("{}: imports `{named}`, which `{room}` may not", relative.display()));
            }
        }
    }
    assert!(broken.is_empty(), "imports against the layering rules:\n{}", broken.join("\n"));
}

#[test]
fn the_layering_table_has_no_circle() {
    let rules = rules();
    // Depth-first: a room met again while still on the path closes a circle.
    fn visit<'a>(
        room: &'a str,
        rules: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(room) {
            return;
        }
        assert!(!path.contains(&room), "circle in the layering table: {} -> {room}", path.join(" -> "));
        path.push(room);
        for below in rules.get(room).into_iter().flatten() {
            assert!(rules.contains_key(below), "`{room}` may import `{below}`, which the table does not list");
            visit(below, rules, path, done);
        }
        path.pop();
        done.insert(room);
    }
    let mut done = BTreeSet::new();
    for room in rules.keys() {
        visit(room, &rules, &mut Vec::new(), &mut done);
    }
}

#[test]
fn every_way_of_naming_another_folder_is_caught() {
    let cases: [(&str, &str, &[&str]); 9] = [
        ("upstream/pool.rs", "use crate::request::Route;", &["request"]),
        ("upstream/pool.rs", "use crate::{http::X, request::{self, Route}};", &["http", "request"]),
        ("upstream/mod.rs", "pub use super::request::Route;", &["request"]),
        ("upstream/pool.rs", "use super::super::request::Route;", &["request"]),
        ("upstream/pool.rs", "fn f() { let _ = crate::control::admin::post; }", &["control"]),
        ("upstream/pool.rs", "macro_rules! m { () => { $crate::plugin::X }; }", &["plugin"]),
        ("main.rs", "use wasmgate::request::proxy;", &["request"]),
        // Same folder, comments and strings: nothing to report.
        ("upstream/pool.rs", "use super::connect; // crate::control\nconst S: &str = \"crate::edge\";", &["upstream"]),
        ("upstream/mod.rs", "mod tests { use super::*; use super::pool::Pool; }", &["upstream"]),
    ];
    for (file, source, expected) in cases {
        let named = rooms_named(Path::new(file), source);
        let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        assert_eq!(named, expected, "{file}: {source}");
    }
}
