//! Reports: human text, JSON, JUnit XML (for CI) and a self-contained HTML page.
//!
//! Evidence in a [`RunReport`] is already masked; these writers only format it. The HTML page
//! has no external resources (inline CSS, no scripts) so it can be attached to a CI run.

use std::fmt::Write as _;

use crate::catalog::Level;
use crate::runner::{CaseReport, Outcome, RunReport};

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Human text.
    Text,
    /// JSON.
    Json,
    /// JUnit XML.
    Junit,
    /// Self-contained HTML.
    Html,
}

impl Format {
    /// Parse a name.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "text" => Some(Self::Text),
            "json" => Some(Self::Json),
            "junit" => Some(Self::Junit),
            "html" => Some(Self::Html),
            _ => None,
        }
    }
}

/// Render `r` as `f`.
pub fn render(r: &RunReport, f: Format, verbose: bool) -> String {
    match f {
        Format::Text => text(r, verbose),
        Format::Json => serde_json::to_string_pretty(r).unwrap_or_default() + "\n",
        Format::Junit => junit(r),
        Format::Html => html(r),
    }
}

fn summary_line(r: &RunReport) -> String {
    let t = &r.totals;
    format!(
        "{} passed, {} failed, {} skipped, {} errors — {} required failure(s)",
        t.pass, t.fail, t.skip, t.error, t.blocking
    )
}

fn verdict(r: &RunReport) -> &'static str {
    match r.exit_code() {
        0 => "CONFORMS",
        1 => "DOES NOT CONFORM",
        _ => "COULD NOT RUN",
    }
}

/// Human text: one line per case, evidence for every failure (all cases with `verbose`).
pub fn text(r: &RunReport, verbose: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "crp-conformance {} — {}", r.runner, r.target);
    if let Some(f) = &r.fatal {
        let _ = writeln!(s, "\nCOULD NOT RUN: {f}");
        return s;
    }
    let provider = r
        .capability
        .as_ref()
        .map(|c| {
            format!(
                "{} (version {}, features {}, claims {})",
                c.get("provider").and_then(|v| v.as_str()).unwrap_or("?"),
                c.get("version").and_then(|v| v.as_str()).unwrap_or("?"),
                c.get("features").map(|v| v.to_string()).unwrap_or_else(|| "?".into()),
                c.get("conformance").and_then(|v| v.as_str()).unwrap_or("no tier")
            )
        })
        .unwrap_or_else(|| "no capability discovered".into());
    let _ = writeln!(s, "provider: {provider}");
    let _ = writeln!(s, "tier: {}   versions: {}   transport: {}\n", r.tier.as_str(), r.versions.join(", "), r.transport);
    for c in &r.cases {
        let _ = writeln!(
            s,
            "{:<5} {:<44} {:<8} {:<6} v{} {}",
            c.outcome.label(),
            c.meta.id,
            c.meta.tier.as_str(),
            c.meta.level.as_str(),
            c.meta.spec,
            c.meta.section
        );
        if let Some(why) = &c.reason
            && c.outcome != Outcome::Pass
        {
            let _ = writeln!(s, "      {why}");
        }
    }
    let failures: Vec<&CaseReport> = r.cases.iter().filter(|c| matches!(c.outcome, Outcome::Fail | Outcome::Error)).collect();
    let detailed: Vec<&CaseReport> = if verbose { r.cases.iter().collect() } else { failures };
    for c in detailed {
        let _ = writeln!(s, "\n=== {} {} ({} {}, v{} {}) ===", c.outcome.label(), c.meta.id, c.meta.level.as_str(), c.meta.tier.as_str(), c.meta.spec, c.meta.section);
        let _ = writeln!(s, "requirement: {}", c.meta.description);
        if let Some(why) = &c.reason {
            let _ = writeln!(s, "why: {why}");
        }
        for e in &c.evidence {
            let _ = writeln!(s, "--- {} {}", e.kind, e.title);
            for line in e.text.lines() {
                let _ = writeln!(s, "    {line}");
            }
        }
    }
    let _ = writeln!(s, "\n{}: {} in {} ms", verdict(r), summary_line(r), r.duration_ms);
    s
}

fn xml(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' && c != '\r' => o.push_str(&format!("&#x{:x};", c as u32)),
            c => o.push(c),
        }
    }
    o
}

fn evidence_text(c: &CaseReport) -> String {
    let mut s = String::new();
    for e in &c.evidence {
        let _ = writeln!(s, "--- {} {}\n{}", e.kind, e.title, e.text);
    }
    s
}

/// JUnit XML: one testsuite, one testcase per case; SHOULD failures are reported as
/// `<skipped>` with a message so they do not fail a CI gate that only reads JUnit.
pub fn junit(r: &RunReport) -> String {
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let t = &r.totals;
    let secs = r.duration_ms as f64 / 1000.0;
    let _ = writeln!(
        s,
        "<testsuites name=\"crp-conformance\" tests=\"{}\" failures=\"{}\" errors=\"{}\" time=\"{secs:.3}\">",
        r.cases.len(),
        r.cases.iter().filter(|c| c.outcome == Outcome::Fail && c.meta.level == Level::Must).count(),
        t.error + usize::from(r.fatal.is_some())
    );
    let _ = writeln!(s, "  <testsuite name=\"{}\" tests=\"{}\" timestamp=\"{}\" time=\"{secs:.3}\">", xml(&r.target), r.cases.len(), xml(&r.started_at));
    if let Some(f) = &r.fatal {
        let _ = writeln!(s, "    <testcase classname=\"crp-conformance\" name=\"run\"><error message=\"{}\"/></testcase>", xml(f));
    }
    for c in &r.cases {
        let class = format!("crp.v{}.{}", c.meta.spec, c.meta.id.split('.').next().unwrap_or("case"));
        let _ = write!(
            s,
            "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\">",
            xml(&class),
            xml(c.meta.id),
            c.duration_ms as f64 / 1000.0
        );
        let msg = xml(c.reason.as_deref().unwrap_or(""));
        let body = xml(&format!("{} ({} {}, v{} {})\n{}\n{}", c.meta.description, c.meta.level.as_str(), c.meta.tier.as_str(), c.meta.spec, c.meta.section, c.reason.clone().unwrap_or_default(), evidence_text(c)));
        match (c.outcome, c.meta.level) {
            (Outcome::Pass, _) => {}
            (Outcome::Fail, Level::Must) => {
                let _ = write!(s, "<failure message=\"{msg}\" type=\"MUST\">{body}</failure>");
            }
            (Outcome::Fail, lvl) => {
                let _ = write!(s, "<skipped message=\"{} not met: {msg}\"/><system-out>{body}</system-out>", lvl.as_str());
            }
            (Outcome::Skip, _) => {
                let _ = write!(s, "<skipped message=\"{msg}\"/>");
            }
            (Outcome::Error, _) => {
                let _ = write!(s, "<error message=\"{msg}\">{body}</error>");
            }
        }
        let _ = writeln!(s, "</testcase>");
    }
    let _ = writeln!(s, "  </testsuite>\n</testsuites>");
    s
}

/// A single HTML page with inline CSS and no scripts.
pub fn html(r: &RunReport) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>CRP conformance — {}</title>\n<style>{}</style></head><body>\n",
        xml(&r.target),
        CSS
    );
    let _ = writeln!(s, "<h1>CRP conformance report</h1>");
    let _ = writeln!(s, "<p class=\"verdict v{}\">{} — {}</p>", r.exit_code(), verdict(r), xml(&summary_line(r)));
    let _ = writeln!(s, "<table class=\"meta\"><tr><th>provider</th><td>{}</td></tr>", xml(&r.target));
    if let Some(c) = &r.capability {
        let _ = writeln!(s, "<tr><th>capability</th><td><code>{}</code></td></tr>", xml(&c.to_string()));
    }
    let _ = writeln!(
        s,
        "<tr><th>tier</th><td>{}</td></tr><tr><th>versions</th><td>{}</td></tr><tr><th>transport</th><td>{}</td></tr><tr><th>started</th><td>{}</td></tr><tr><th>duration</th><td>{} ms</td></tr><tr><th>runner</th><td>{}</td></tr></table>",
        r.tier.as_str(), xml(&r.versions.join(", ")), xml(&r.transport), xml(&r.started_at), r.duration_ms, xml(&r.runner)
    );
    if let Some(f) = &r.fatal {
        let _ = writeln!(s, "<p class=\"fatal\">Could not run: {}</p>", xml(f));
    }
    let _ = writeln!(s, "<table class=\"cases\"><thead><tr><th>result</th><th>case</th><th>tier</th><th>level</th><th>spec</th><th>requirement</th></tr></thead><tbody>");
    for c in &r.cases {
        let cls = c.outcome.label().to_ascii_lowercase();
        let _ = writeln!(
            s,
            "<tr class=\"{cls}\"><td><span class=\"badge {cls}\">{}</span></td><td><a href=\"#{}\">{}</a></td><td>{}</td><td>{}</td><td>v{} {}</td><td>{}</td></tr>",
            c.outcome.label(), xml(c.meta.id), xml(c.meta.id), c.meta.tier.as_str(), c.meta.level.as_str(), c.meta.spec, xml(c.meta.section), xml(c.meta.description)
        );
    }
    let _ = writeln!(s, "</tbody></table>\n<h2>Evidence</h2>");
    for c in &r.cases {
        let cls = c.outcome.label().to_ascii_lowercase();
        let open = if matches!(c.outcome, Outcome::Fail | Outcome::Error) { " open" } else { "" };
        let _ = writeln!(
            s,
            "<details id=\"{}\" class=\"{cls}\"{open}><summary><span class=\"badge {cls}\">{}</span> <b>{}</b> — {}</summary>",
            xml(c.meta.id), c.outcome.label(), xml(c.meta.id), xml(c.meta.description)
        );
        if let Some(why) = &c.reason {
            let _ = writeln!(s, "<p class=\"why\">{}</p>", xml(why));
        }
        for e in &c.evidence {
            let _ = writeln!(s, "<div class=\"ev {}\"><div class=\"evt\">{} · {}</div><pre>{}</pre></div>", e.kind, e.kind, xml(&e.title), xml(&e.text));
        }
        let _ = writeln!(s, "</details>");
    }
    let _ = writeln!(s, "<p class=\"foot\">Secrets are masked as «label». Generated by crp-conformance {}.</p></body></html>", xml(&r.runner));
    s
}

const CSS: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}\
h1{font-size:1.5em}table{border-collapse:collapse;width:100%;margin:1em 0}th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eee;vertical-align:top}\
.meta th{width:9em;color:#555}code,pre{font:12px/1.4 ui-monospace,monospace}pre{background:#f7f7f7;padding:6px;overflow-x:auto;white-space:pre-wrap;margin:2px 0 8px}\
.badge{display:inline-block;min-width:3.5em;text-align:center;border-radius:3px;padding:0 4px;font-weight:600;font-size:12px;color:#fff}\
.badge.pass{background:#2e7d32}.badge.fail{background:#c62828}.badge.skip{background:#757575}.badge.error{background:#ef6c00}\
.verdict{font-size:1.2em;font-weight:600;padding:8px;border-radius:4px}.v0{background:#e8f5e9}.v1{background:#ffebee}.v2{background:#fff3e0}\
details{border:1px solid #ddd;border-radius:4px;margin:6px 0;padding:4px 8px}summary{cursor:pointer}.why{color:#b71c1c;font-weight:600}\
.evt{color:#555;font-size:12px}.fatal{color:#b71c1c;font-weight:600}.foot{color:#777;font-size:12px}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_escapes_everything() {
        assert_eq!(xml("<a href=\"x\">&'\u{1}</a>"), "&lt;a href=&quot;x&quot;&gt;&amp;&apos;&#x1;&lt;/a&gt;");
    }
}
