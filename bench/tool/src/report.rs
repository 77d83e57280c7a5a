//! `report RESULTS.tsv ...`: bench/compare's figures (one `round target
//! measure value` line each) as a Markdown table of medians and spreads,
//! ratios against nginx and HAProxy, the issue's budgets, and an SVG chart
//! of the ratios.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A measure: its key in the results, its name, and whether more is better.
struct Measure {
    key: &'static str,
    name: &'static str,
    higher_is_better: bool,
    /// Shown in the chart.
    headline: bool,
}

const fn m(key: &'static str, name: &'static str, higher_is_better: bool, headline: bool) -> Measure {
    Measure { key, name, higher_is_better, headline }
}

const MEASURES: &[Measure] = &[
    m("http-64-rps", "HTTP 64 B GET, requests/s", true, true),
    m("http-64-p99-us", "HTTP 64 B GET, p99 µs", false, false),
    m("http-64-cpu-us", "HTTP 64 B GET, CPU µs per request", false, true),
    m("http-1k-rps", "HTTP 1 KiB GET, requests/s", true, false),
    m("http-1k-p99-us", "HTTP 1 KiB GET, p99 µs", false, false),
    m("http-1k-cpu-us", "HTTP 1 KiB GET, CPU µs per request", false, false),
    m("echo-mps", "WebSocket echo 128 B, messages/s", true, false),
    m("echo-p50-us", "WebSocket echo 128 B, p50 µs", false, false),
    m("echo-p99-us", "WebSocket echo 128 B, p99 µs", false, false),
    m("echo-cpu-us", "WebSocket echo 128 B, CPU µs per message", false, true),
    m("bulk-mbps", "WebSocket 1 MiB messages, MB/s", true, true),
    m("bulk-cpu-us-per-mb", "WebSocket 1 MiB messages, CPU µs per MB", false, false),
    m("handshake-ps", "WebSocket handshakes/s", true, false),
    m("handshake-cpu-us", "WebSocket handshake, CPU µs each", false, true),
    m("idle-kib-each", "idle WebSocket, proxy RSS KiB each", false, true),
    m("idle-rss-before-mib", "proxy RSS before the idle load, MiB", false, false),
    m("idle-rss-open-mib", "proxy RSS with the idle WebSockets open, MiB", false, false),
    m("idle-rss-after-mib", "proxy RSS once they closed and settled, MiB", false, true),
];

const TARGETS: &[&str] = &["direct", "wasmgate", "wasmgate+plugins", "nginx", "haproxy"];

/// Median, least and most of one target's rounds of one measure.
#[derive(Clone, Copy)]
struct Figure {
    median: f64,
    min: f64,
    max: f64,
}

fn figure(values: &[f64]) -> Option<Figure> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let (first, last) = (*sorted.first()?, *sorted.last()?);
    let mid = sorted.len() / 2;
    let median = if sorted.len().is_multiple_of(2) { (sorted[mid - 1] + sorted[mid]) / 2.0 } else { sorted[mid] };
    Some(Figure { median, min: first, max: last })
}

fn number(value: f64) -> String {
    match value.abs() {
        v if v >= 1000.0 => format!("{value:.0}"),
        v if v >= 10.0 => format!("{value:.1}"),
        _ => format!("{value:.2}"),
    }
}

pub fn report(args: &[String]) -> Result<(), String> {
    let path = args.first().ok_or("usage: wasmgate-bench report RESULTS.tsv --markdown F --chart F [--date ..]")?;
    let mut flags = BTreeMap::new();
    let mut rest = args[1..].iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().ok_or_else(|| format!("{flag} needs a value"))?;
        flags.insert(flag.trim_start_matches("--").to_string(), value.clone());
    }
    let flag = |name: &str| flags.get(name).cloned().unwrap_or_else(|| "unknown".into());
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut values: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut rounds = 0usize;
    for (n, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split('\t').collect();
        let [round, target, measure, value] = fields[..] else {
            return Err(format!("{path}:{}: expected round, target, measure and value", n + 1));
        };
        let value: f64 = value.parse().map_err(|e| format!("{path}:{}: `{value}`: {e}", n + 1))?;
        rounds = rounds.max(round.parse().map_err(|e| format!("{path}:{}: round `{round}`: {e}", n + 1))?);
        values.entry((target.to_string(), measure.to_string())).or_default().push(value);
    }
    let get = |target: &str, key: &str| values.get(&(target.to_string(), key.to_string())).and_then(|v| figure(v));

    let mut md = String::new();
    let _ = writeln!(md, "# wasmgate, nginx and HAProxy side by side\n");
    let _ = writeln!(
        md,
        "Written by `bench/compare` on {} at commit {}.\n\n- Machine: {}\n- Versions: {}\n- Run: {}\n",
        flag("date"),
        flag("commit"),
        flag("machine"),
        flag("versions"),
        flag("setup")
    );
    let _ = writeln!(
        md,
        "Each proxy runs alone on CPU 0 with one worker; the backend (`wasmgate-bench backend`) and the \
         loads (wrk, `wasmgate-bench`) share CPU 1. CPU time is the proxy's own, read from /proc. \
         Each cell is the median of the rounds, with the least and most in brackets; the targets were \
         interleaved within every round. `direct` is the backend without a proxy (its CPU is the \
         backend's). Ratios are wasmgate's median over the other's.\n"
    );
    let _ = writeln!(
        md,
        "| measure | direct | wasmgate | wasmgate + WAF and router | nginx | HAProxy | wasmgate ÷ nginx | wasmgate ÷ HAProxy |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for measure in MEASURES {
        let _ = write!(md, "| {} {} |", measure.name, if measure.higher_is_better { "↑" } else { "↓" });
        for target in TARGETS {
            match get(target, measure.key) {
                Some(f) => {
                    let _ = write!(md, " {} [{}–{}] |", number(f.median), number(f.min), number(f.max));
                }
                None => md.push_str(" – |"),
            }
        }
        for other in ["nginx", "haproxy"] {
            match (get("wasmgate", measure.key), get(other, measure.key)) {
                (Some(ours), Some(theirs)) if theirs.median > 0.0 => {
                    let _ = write!(md, " {:.2}× |", ours.median / theirs.median);
                }
                _ => md.push_str(" – |"),
            }
        }
        md.push('\n');
    }
    let _ = writeln!(md, "\n↑ more is better, ↓ less is better.\n");

    let median = |target: &str, key: &str| get(target, key).map(|f| f.median);
    let best = |key: &str| match (median("nginx", key), median("haproxy", key)) {
        (Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    };
    // (budget, wasmgate's figure, the bound, met)
    let budgets: Vec<(&str, Option<f64>, Option<f64>, bool)> = vec![
        (
            "HTTP CPU per request, no plugins ≤ 0.8× nginx",
            median("wasmgate", "http-64-cpu-us"),
            median("nginx", "http-64-cpu-us").map(|v| 0.8 * v),
            false,
        ),
        (
            "HTTP CPU per request, WAF + router ≤ 1.0× nginx",
            median("wasmgate+plugins", "http-64-cpu-us"),
            median("nginx", "http-64-cpu-us"),
            false,
        ),
        ("HTTP requests/s ≥ nginx", median("wasmgate", "http-64-rps"), median("nginx", "http-64-rps"), true),
        (
            "WebSocket echo CPU per message ≤ 0.8× HAProxy",
            median("wasmgate", "echo-cpu-us"),
            median("haproxy", "echo-cpu-us").map(|v| 0.8 * v),
            false,
        ),
        (
            "Bulk 1 MiB relay ≥ 1.5× the best of nginx and HAProxy",
            median("wasmgate", "bulk-mbps"),
            best("bulk-mbps").map(|v| 1.5 * v),
            true,
        ),
        (
            "Handshake CPU ≤ HAProxy's",
            median("wasmgate", "handshake-cpu-us"),
            median("haproxy", "handshake-cpu-us"),
            false,
        ),
        ("Idle WebSocket ≤ 2 KiB of RSS each", median("wasmgate", "idle-kib-each"), Some(2.0), false),
        (
            "RSS within 10% of its start once the idle WebSockets closed (30 s)",
            median("wasmgate", "idle-rss-after-mib"),
            median("wasmgate", "idle-rss-before-mib").map(|v| 1.1 * v),
            false,
        ),
    ]
    .into_iter()
    .map(|(name, ours, bound, at_least)| {
        let met = match (ours, bound) {
            (Some(ours), Some(bound)) => {
                if at_least {
                    ours >= bound
                } else {
                    ours <= bound
                }
            }
            _ => false,
        };
        (name, ours, bound, met)
    })
    .collect();
    let _ = writeln!(md, "## Budgets\n\n| budget | wasmgate | bound | met |\n|---|---|---|---|");
    for (name, ours, bound, met) in &budgets {
        let show = |v: &Option<f64>| v.map(number).unwrap_or_else(|| "–".into());
        let _ = writeln!(md, "| {name} | {} | {} | {} |", show(ours), show(bound), if *met { "yes" } else { "**no**" });
    }
    let _ = writeln!(md, "\n![wasmgate's figures as multiples of nginx's and HAProxy's](ratios.svg)");
    let _ = writeln!(md, "\nThe rounds' figures are in `results.tsv` (round, target, measure, value).");

    let markdown = flags.get("markdown").ok_or("--markdown FILE is needed")?;
    std::fs::write(markdown, md).map_err(|e| format!("{markdown}: {e}"))?;
    let chart = flags.get("chart").ok_or("--chart FILE is needed")?;
    std::fs::write(chart, svg(&get)).map_err(|e| format!("{chart}: {e}"))?;
    if rounds == 0 {
        return Err("no figures in the results".into());
    }
    Ok(())
}

/// Horizontal bars of wasmgate's headline figures over nginx's and
/// HAProxy's, with a line at 1×.
fn svg(get: &dyn Fn(&str, &str) -> Option<Figure>) -> String {
    let rows: Vec<(&Measure, [Option<f64>; 2])> = MEASURES
        .iter()
        .filter(|m| m.headline)
        .map(|m| {
            let ratio = |other: &str| match (get("wasmgate", m.key), get(other, m.key)) {
                (Some(ours), Some(theirs)) if theirs.median > 0.0 => Some(ours.median / theirs.median),
                _ => None,
            };
            (m, [ratio("nginx"), ratio("haproxy")])
        })
        .collect();
    let top = rows.iter().flat_map(|(_, r)| r.iter().flatten()).fold(2.0f64, |a, &b| a.max(b)).ceil();
    let (left, width, row_height) = (330.0, 420.0, 46.0);
    let height = 70.0 + row_height * rows.len() as f64;
    let x = |v: f64| left + width * v / top;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="12">"#,
        left + width + 60.0
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r##"<text x="10" y="20" font-size="14">wasmgate ÷ nginx (blue) and ÷ HAProxy (orange); 1× = the same</text>"##
    );
    for (i, (measure, ratios)) in rows.iter().enumerate() {
        let y = 40.0 + row_height * i as f64;
        let direction = if measure.higher_is_better { "more is better" } else { "less is better" };
        let _ = writeln!(out, r#"<text x="10" y="{}">{}</text>"#, y + 14.0, escape(measure.name));
        let _ = writeln!(out, r##"<text x="10" y="{}" fill="#666">({direction})</text>"##, y + 30.0);
        for (j, (ratio, colour)) in ratios.iter().zip(["#3b73b9", "#e08a2c"]).enumerate() {
            let Some(ratio) = ratio else { continue };
            let bar_y = y + 4.0 + 17.0 * j as f64;
            let _ = writeln!(
                out,
                r#"<rect x="{left}" y="{bar_y}" width="{:.1}" height="14" fill="{colour}"/><text x="{:.1}" y="{}">{ratio:.2}×</text>"#,
                x(*ratio) - left,
                x(*ratio) + 4.0,
                bar_y + 11.0
            );
        }
    }
    let _ = writeln!(
        out,
        r##"<line x1="{0}" x2="{0}" y1="30" y2="{1}" stroke="black" stroke-dasharray="4 3"/><text x="{0}" y="{2}" text-anchor="middle">1×</text>"##,
        x(1.0),
        height - 20.0,
        height - 6.0
    );
    out.push_str("</svg>\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_is_the_median_with_its_spread() {
        let odd = figure(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((odd.median, odd.min, odd.max), (2.0, 1.0, 3.0));
        let even = figure(&[4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((even.median, even.min, even.max), (3.0, 1.0, 10.0));
        assert!(figure(&[]).is_none());
    }
}
