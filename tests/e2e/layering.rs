//! The house rules of `host/src`: every module imports only from the
//! folders ARCHITECTURE.md's layering table allows its folder, and the table
//! itself has no circle, so every arrow points to a lower floor.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

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

/// The room of a file under `host/src`: its top folder, or its own name.
fn room_of(relative: &Path) -> String {
    let first = relative.components().next().expect("a path").as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_owned()
}

/// Every `crate::ROOM` a file names in its code (comments left out).
fn rooms_named(source: &str) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        for (at, _) in code.match_indices("crate::") {
            let preceded = code[..at].chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$');
            if preceded {
                continue;
            }
            let rest = &code[at + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                named.insert(name);
            }
        }
    }
    named
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
        for named in rooms_named(&source) {
            if named != room && rules.contains_key(&named) && !allowed.contains(&named) {
                broken.push(format!("{}: imports `crate::{named}`, which `{room}` may not", relative.display()));
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
fn a_reaching_import_is_caught() {
    // The check itself can fail: an upward import is found, a comment is not.
    let source = "use crate::request::Route;\n// see crate::control\nfn f() { crate::http::x(); }\n";
    let named = rooms_named(source);
    assert_eq!(named, BTreeSet::from(["http".to_owned(), "request".to_owned()]));
}
