//! The README's claims against `CLAIMS.md`: every claim listed there is
//! still in the README and names tests that exist, and every README
//! paragraph that says it was tested or measured has a row.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_owned()
}

/// Text with every run of whitespace made one space.
fn flat(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The rows of CLAIMS.md: the README's words and the tests named for them.
fn claims() -> Vec<(String, Vec<String>)> {
    let text = std::fs::read_to_string(repo().join("tests/e2e/CLAIMS.md")).expect("tests/e2e/CLAIMS.md");
    let rows: Vec<(String, Vec<String>)> = text
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| README says"))
        .map(|row| {
            let (claim, tests) = row.trim_matches('|').rsplit_once('|').expect("two cells");
            let tests = tests.split(',').map(|t| t.trim().trim_matches('`').to_owned()).collect();
            (claim.trim().to_owned(), tests)
        })
        .collect();
    assert!(rows.len() >= 50, "CLAIMS.md lists the README's claims: {} rows", rows.len());
    rows
}

/// Whether `name` (`module::test` or `host/src/FILE.rs::test`) is a test.
fn test_exists(name: &str) -> bool {
    let (file, test) = name.rsplit_once("::").expect("a module and a test name");
    let path = if file.ends_with(".rs") { repo().join(file) } else { repo().join(format!("tests/e2e/{file}.rs")) };
    let Ok(source) = std::fs::read_to_string(&path) else { return false };
    let lines: Vec<&str> = source.lines().collect();
    lines.iter().enumerate().any(|(i, line)| {
        let declared = line.trim_start().starts_with(&format!("async fn {test}("))
            || line.trim_start().starts_with(&format!("fn {test}("));
        declared && i > 0 && lines[i - 1].trim_start().starts_with("#[") && lines[i - 1].contains("test")
    })
}

#[test]
fn every_listed_claim_is_in_the_readme_and_names_real_tests() {
    let readme = flat(&std::fs::read_to_string(repo().join("README.md")).expect("README.md"));
    let mut problems = Vec::new();
    for (claim, tests) in claims() {
        if !readme.contains(&flat(&claim)) {
            problems.push(format!("no longer in the README: {claim}"));
        }
        for test in tests.iter().filter(|t| !test_exists(t)) {
            problems.push(format!("`{claim}`: no test `{test}`"));
        }
    }
    assert!(problems.is_empty(), "CLAIMS.md is out of step:\n{}", problems.join("\n"));
}

#[test]
fn every_readme_paragraph_that_says_tested_has_its_claims_listed() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let claims: Vec<String> = claims().into_iter().map(|(claim, _)| flat(&claim)).collect();
    let says_tested = ["test suite", "Measured", "Tested with", "in the tests", "tested"];
    let mut unlisted = Vec::new();
    // Paragraphs and list items, each as one line of text.
    for paragraph in readme.split("\n\n").flat_map(|p| p.split("\n- ")).map(flat) {
        if says_tested.iter().any(|word| paragraph.contains(word)) && !claims.iter().any(|c| paragraph.contains(c)) {
            unlisted.push(paragraph.chars().take(120).collect::<String>());
        }
    }
    assert!(
        unlisted.is_empty(),
        "README paragraphs that say they were tested, with no row in CLAIMS.md:\n{}",
        unlisted.join("\n")
    );
}

#[test]
fn a_missing_test_or_claim_is_caught() {
    assert!(test_exists("claims::a_missing_test_or_claim_is_caught"));
    assert!(test_exists("host/src/plugin/breaker.rs::one_trial_call_at_a_time_after_the_backoff"));
    assert!(!test_exists("claims::no_such_test"));
    assert!(!test_exists("claims::flat"), "a helper is not a test");
}
