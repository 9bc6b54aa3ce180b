//! The verdicts as a report: JSON for machines (`GET /compare`) and a small self-contained
//! HTML page for people (`GET /compare.html`), both built from the same snapshot.

use std::fmt::Write;
use std::sync::Arc;

use serde::Serialize;

use super::Comparator;
use super::difflog::Example;
use super::stats::EndpointReport;

#[derive(Debug, Serialize)]
pub struct MirrorReport {
    pub route: String,
    pub mirror: String,
    pub control: Option<String>,
    pub compared: u64,
    pub endpoints: Vec<EndpointReport>,
    /// The latest comparisons with differences, redacted.
    pub examples: Vec<Example>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub mirrors: Vec<MirrorReport>,
}

pub fn build(comparators: &[Arc<Comparator>]) -> Report {
    Report {
        mirrors: comparators
            .iter()
            .map(|c| {
                let (compared, endpoints, examples) = c.snapshot();
                MirrorReport {
                    route: c.route.clone(),
                    mirror: c.mirror.clone(),
                    control: c.control.clone(),
                    compared,
                    endpoints,
                    examples,
                }
            })
            .collect(),
    }
}

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn pct(rate: f64) -> String {
    format!("{:.1}%", rate * 100.0)
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}\
h1{font-size:20px}h2{font-size:16px;margin-top:28px}h3{font-size:14px;margin:16px 0 4px}\
table{border-collapse:collapse;margin:4px 0 12px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}\
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}code{font:12px ui-monospace,monospace}\
.flag{background:#fde2e1}.flag td:first-child::before{content:'\\25B2 ';color:#c00}.vol{color:#777}\
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-size:12px}.b-flag{background:#c00;color:#fff}\
.b-vol{background:#ddd}.b-ok{background:#2a7;color:#fff}.muted{color:#777}";

/// The page: per mirror, its endpoints with their fields, then a few examples side by side.
pub fn html(report: &Report) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>shadowgate: shadow verdicts</title>\
         <style>{STYLE}</style></head><body><h1>Shadow verdicts</h1>"
    );
    if report.mirrors.is_empty() {
        out.push_str("<p class=\"muted\">No mirror has a <code>compare</code> section.</p>");
    }
    for m in &report.mirrors {
        let flagged: usize = m
            .endpoints
            .iter()
            .map(|e| e.fields.iter().filter(|f| f.flagged).count())
            .sum();
        let _ = write!(
            out,
            "<h2>route <code>{}</code> &rarr; candidate <code>{}</code>{} &mdash; {} compared, {}</h2>",
            esc(&m.route),
            esc(&m.mirror),
            m.control
                .as_ref()
                .map(|c| format!(", control <code>{}</code>", esc(c)))
                .unwrap_or_else(|| ", no control".into()),
            m.compared,
            if flagged > 0 {
                format!("<span class=\"badge b-flag\">{flagged} flagged</span>")
            } else {
                "<span class=\"badge b-ok\">nothing flagged</span>".into()
            }
        );
        for e in &m.endpoints {
            let _ = write!(
                out,
                "<h3><code>{} {}</code> <span class=\"muted\">{} compared, {} in the recent window</span></h3>",
                esc(&e.method),
                esc(&e.path),
                e.compared,
                e.recent
            );
            if e.fields.is_empty() {
                out.push_str("<p class=\"muted\">No differences.</p>");
                continue;
            }
            out.push_str(
                "<table><tr><th>field</th><th>candidate diffs</th><th>candidate rate</th>\
                 <th>control diffs</th><th>control rate</th><th>verdict</th></tr>",
            );
            for f in &e.fields {
                let (class, verdict) = if f.flagged {
                    ("flag", "<span class=\"badge b-flag\">flagged</span>")
                } else if f.volatile {
                    ("vol", "<span class=\"badge b-vol\">volatile</span>")
                } else {
                    ("", "within noise")
                };
                let control = |v: String| {
                    if m.control.is_some() {
                        v
                    } else {
                        "&ndash;".into()
                    }
                };
                let _ = write!(
                    out,
                    "<tr class=\"{class}\"><td><code>{}</code></td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
                     <td class=\"n\">{}</td><td class=\"n\">{}</td><td>{verdict}</td></tr>",
                    esc(&f.path),
                    f.candidate_diffs,
                    pct(f.candidate_rate),
                    control(f.control_diffs.to_string()),
                    control(pct(f.control_rate)),
                );
            }
            out.push_str("</table>");
        }
        if !m.examples.is_empty() {
            out.push_str("<h3>Latest differences (redacted)</h3>");
        }
        for x in m.examples.iter().rev().take(4) {
            let _ = write!(
                out,
                "<p><code>{} {}</code> <span class=\"muted\">id {} &middot; primary / candidate{}: status {} / {}{}, {:.1} / {:.1}{} ms</span></p>\
                 <table><tr><th>field</th><th>kind</th><th>primary</th><th>candidate</th>{}</tr>",
                esc(&x.method),
                esc(&x.path),
                esc(&x.id),
                if x.status.control.is_some() {
                    " / control"
                } else {
                    ""
                },
                x.status.primary,
                x.status.candidate,
                x.status
                    .control
                    .map(|s| format!(" / {s}"))
                    .unwrap_or_default(),
                x.latency_ms.primary,
                x.latency_ms.candidate,
                x.latency_ms
                    .control
                    .map(|ms| format!(" / {ms:.1}"))
                    .unwrap_or_default(),
                if m.control.is_some() {
                    "<th>control</th>"
                } else {
                    ""
                }
            );
            for f in &x.fields {
                let cell = |v: &Option<String>| match v {
                    Some(v) => format!("<code>{}</code>", esc(v)),
                    None => "<span class=\"muted\">absent</span>".into(),
                };
                let _ = write!(
                    out,
                    "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td>{}</tr>",
                    esc(&f.path),
                    f.kind,
                    cell(&f.primary),
                    cell(&f.candidate),
                    if m.control.is_some() {
                        format!(
                            "<td>{}</td>",
                            match &f.control {
                                Some(v) => format!("<code>{}</code>", esc(v)),
                                None => "<span class=\"muted\">as primary</span>".into(),
                            }
                        )
                    } else {
                        String::new()
                    }
                );
            }
            out.push_str("</table>");
        }
    }
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes_and_stands_alone() {
        let report = Report {
            mirrors: vec![MirrorReport {
                route: "<r>".into(),
                mirror: "m".into(),
                control: None,
                compared: 3,
                endpoints: vec![],
                examples: vec![],
            }],
        };
        let page = html(&report);
        assert!(page.contains("&lt;r&gt;"));
        assert!(!page.contains("<r>"));
        assert!(!page.contains("http://") && !page.contains("https://"));
    }
}
