//! The noise floor: how often each field differs, per endpoint (method and path template),
//! for the candidate and for the control, cumulative and over a recent window.
//! Endpoints and fields are bounded; past the bounds they share an `(other)` entry.

use std::collections::HashMap;

use serde::Serialize;

/// The entry that collects endpoints or fields past their bound.
pub const OTHER: &str = "(other)";

/// When a field is flagged or volatile.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub min_samples: u64,
    pub absolute_margin: f64,
    pub relative_margin: f64,
    pub volatile_rate: f64,
    /// Comparisons in the recent window (two halves; the older half is dropped as a new one fills).
    pub window: u64,
    pub max_endpoints: usize,
    pub max_fields: usize,
    pub has_control: bool,
}

/// Diff counts of one side for one field.
#[derive(Debug, Default, Clone, Copy)]
struct Count {
    total: u64,
    current: u64,
    previous: u64,
}

impl Count {
    fn add(&mut self) {
        self.total += 1;
        self.current += 1;
    }
    fn recent(&self) -> u64 {
        self.current + self.previous
    }
    fn rotate(&mut self) {
        self.previous = self.current;
        self.current = 0;
    }
}

#[derive(Debug, Default)]
struct Field {
    candidate: Count,
    control: Count,
    flagged: bool,
    volatile: bool,
}

#[derive(Debug, Default)]
struct Endpoint {
    compared: Count,
    fields: HashMap<String, Field>,
}

/// The statistics of one mirror.
#[derive(Debug)]
pub struct Stats {
    thresholds: Thresholds,
    endpoints: HashMap<(String, String), Endpoint>,
    flagged: usize,
}

/// A field as the report shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FieldReport {
    pub path: String,
    pub candidate_diffs: u64,
    pub control_diffs: u64,
    /// Share of recent comparisons where the candidate differed.
    pub candidate_rate: f64,
    pub control_rate: f64,
    pub flagged: bool,
    pub volatile: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EndpointReport {
    pub method: String,
    pub path: String,
    pub compared: u64,
    /// Comparisons in the recent window that rates and flags are computed over.
    pub recent: u64,
    pub fields: Vec<FieldReport>,
}

impl Stats {
    pub fn new(thresholds: Thresholds) -> Self {
        Stats {
            thresholds,
            endpoints: HashMap::new(),
            flagged: 0,
        }
    }

    /// Record one comparison: the paths where the candidate differed from the
    /// primary and, with a control, where the control did. Returns the number
    /// of flagged fields of the mirror afterwards.
    pub fn record(
        &mut self,
        method: &str,
        template: &str,
        candidate: &[&str],
        control: &[&str],
    ) -> usize {
        let t = self.thresholds;
        let key = (method.to_string(), template.to_string());
        if !self.endpoints.contains_key(&key) && self.endpoints.len() >= t.max_endpoints {
            let other = (OTHER.to_string(), OTHER.to_string());
            return self.record_at(other, candidate, control);
        }
        self.record_at(key, candidate, control)
    }

    fn record_at(&mut self, key: (String, String), candidate: &[&str], control: &[&str]) -> usize {
        let t = self.thresholds;
        let endpoint = self.endpoints.entry(key).or_default();
        // A full half-window moves to `previous`: the recent window holds one to two halves.
        let half = (t.window / 2).max(1);
        if endpoint.compared.current >= half {
            endpoint.compared.rotate();
            for field in endpoint.fields.values_mut() {
                field.candidate.rotate();
                field.control.rotate();
            }
        }
        endpoint.compared.add();
        for path in candidate {
            field_of(&mut endpoint.fields, path, t.max_fields)
                .candidate
                .add();
        }
        for path in control {
            field_of(&mut endpoint.fields, path, t.max_fields)
                .control
                .add();
        }
        let recent = endpoint.compared.recent();
        for (path, field) in endpoint.fields.iter_mut() {
            let (flagged, volatile) = judge(&t, recent, path, field);
            if flagged != field.flagged {
                if flagged {
                    self.flagged += 1;
                } else {
                    self.flagged -= 1;
                }
            }
            field.flagged = flagged;
            field.volatile = volatile;
        }
        self.flagged
    }

    /// Whether every one of `paths` is a volatile, unflagged field of the endpoint:
    /// an example of such a difference teaches nothing new.
    pub fn only_noise(&self, method: &str, template: &str, paths: &[&str]) -> bool {
        let key = (method.to_string(), template.to_string());
        let Some(endpoint) = self.endpoints.get(&key) else {
            return false;
        };
        paths.iter().all(|p| {
            endpoint
                .fields
                .get(*p)
                .is_some_and(|f| f.volatile && !f.flagged)
        })
    }

    pub fn flagged(&self) -> usize {
        self.flagged
    }

    pub fn compared(&self) -> u64 {
        self.endpoints.values().map(|e| e.compared.total).sum()
    }

    /// Endpoints by most compared, fields flagged first, then by candidate diffs.
    pub fn report(&self) -> Vec<EndpointReport> {
        let mut out: Vec<EndpointReport> = self
            .endpoints
            .iter()
            .map(|((method, path), e)| {
                let recent = e.compared.recent();
                let rate = |n: u64| {
                    if recent == 0 {
                        0.0
                    } else {
                        n as f64 / recent as f64
                    }
                };
                let mut fields: Vec<FieldReport> = e
                    .fields
                    .iter()
                    .map(|(path, f)| FieldReport {
                        path: path.clone(),
                        candidate_diffs: f.candidate.total,
                        control_diffs: f.control.total,
                        candidate_rate: rate(f.candidate.recent()),
                        control_rate: rate(f.control.recent()),
                        flagged: f.flagged,
                        volatile: f.volatile,
                    })
                    .collect();
                fields.sort_by(|a, b| {
                    b.flagged
                        .cmp(&a.flagged)
                        .then(b.candidate_diffs.cmp(&a.candidate_diffs))
                        .then(a.path.cmp(&b.path))
                });
                EndpointReport {
                    method: method.clone(),
                    path: path.clone(),
                    compared: e.compared.total,
                    recent,
                    fields,
                }
            })
            .collect();
        out.sort_by(|a, b| b.compared.cmp(&a.compared).then(a.path.cmp(&b.path)));
        out
    }
}

/// The entry of `path`, or the shared `(other)` one once `max` fields are tracked.
fn field_of<'a>(fields: &'a mut HashMap<String, Field>, path: &str, max: usize) -> &'a mut Field {
    let key = if fields.contains_key(path) || fields.len() < max {
        path
    } else {
        OTHER
    };
    fields.entry(key.to_string()).or_default()
}

/// (flagged, volatile) for a field over `recent` comparisons.
///
/// Flagged: enough samples, and the candidate's rate exceeds the control's
/// (zero without a control) by more than the absolute margin and by more than
/// the relative margin of the control's rate. Without a control a volatile
/// field (differing on nearly every request) is reported, never flagged: only
/// a control can tell a regression from a timestamp. The status is the
/// exception: no status code is a timestamp, so it is flagged regardless.
fn judge(t: &Thresholds, recent: u64, path: &str, f: &Field) -> (bool, bool) {
    if recent < t.min_samples {
        return (false, false);
    }
    let candidate = f.candidate.recent() as f64 / recent as f64;
    let control = f.control.recent() as f64 / recent as f64;
    let volatile = candidate >= t.volatile_rate;
    let exceeds =
        candidate - control > t.absolute_margin && candidate > control * (1.0 + t.relative_margin);
    let flagged = exceeds && (t.has_control || !volatile || path == "status");
    (flagged, volatile)
}

/// The path with its variable segments folded: numbers `{n}`, UUIDs `{uuid}`,
/// hex strings of 8 or more with a digit `{hex}`. The query is dropped.
pub fn path_template(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let mut out = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(fold(segment));
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

fn fold(segment: &str) -> &str {
    let b = segment.as_bytes();
    if !b.is_empty() && b.iter().all(u8::is_ascii_digit) {
        return "{n}";
    }
    let is_uuid = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        });
    if is_uuid {
        return "{uuid}";
    }
    if b.len() >= 8 && b.iter().all(u8::is_ascii_hexdigit) && b.iter().any(u8::is_ascii_digit) {
        return "{hex}";
    }
    segment
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds(has_control: bool) -> Thresholds {
        Thresholds {
            min_samples: 20,
            absolute_margin: 0.01,
            relative_margin: 0.5,
            volatile_rate: 0.95,
            window: 100,
            max_endpoints: 2,
            max_fields: 2,
            has_control,
        }
    }

    fn field(s: &Stats, path: &str) -> FieldReport {
        s.report()
            .into_iter()
            .flat_map(|e| e.fields)
            .find(|f| f.path == path)
            .unwrap_or_else(|| panic!("no field {path}"))
    }

    #[test]
    fn templates_fold_ids() {
        assert_eq!(path_template("/users/42/orders?x=1"), "/users/{n}/orders");
        assert_eq!(
            path_template("/o/123e4567-e89b-12d3-a456-426614174000"),
            "/o/{uuid}"
        );
        assert_eq!(path_template("/c/deadbeef01/x"), "/c/{hex}/x");
        assert_eq!(path_template("/c/deadbeef"), "/c/deadbeef");
        assert_eq!(path_template(""), "/");
    }

    #[test]
    fn a_candidate_only_difference_is_flagged_after_min_samples() {
        let mut s = Stats::new(thresholds(true));
        for i in 0..19 {
            let cand: &[&str] = if i % 5 == 0 { &["$.a"] } else { &[] };
            assert_eq!(s.record("GET", "/x", cand, &[]), 0);
        }
        assert_eq!(s.record("GET", "/x", &[], &[]), 1);
        let f = field(&s, "$.a");
        assert!(f.flagged && !f.volatile);
        assert_eq!(f.candidate_diffs, 4);
    }

    #[test]
    fn noise_seen_by_the_control_is_not_flagged() {
        let mut s = Stats::new(thresholds(true));
        for _ in 0..50 {
            s.record("GET", "/x", &["$.ts"], &["$.ts"]);
        }
        let f = field(&s, "$.ts");
        assert!(!f.flagged && f.volatile);
        assert_eq!((f.candidate_diffs, f.control_diffs), (50, 50));
        assert!(s.only_noise("GET", "/x", &["$.ts"]));
        assert!(!s.only_noise("GET", "/x", &["$.ts", "$.new"]));
    }

    #[test]
    fn without_control_volatile_fields_are_reported_not_flagged() {
        let mut s = Stats::new(thresholds(false));
        for i in 0..50 {
            let cand: &[&str] = if i % 10 == 0 {
                &["$.ts", "$.a"]
            } else {
                &["$.ts"]
            };
            s.record("GET", "/x", cand, &[]);
        }
        assert!(field(&s, "$.ts").volatile && !field(&s, "$.ts").flagged);
        assert!(field(&s, "$.a").flagged);
        // A status that always differs is a regression, not noise.
        let mut s = Stats::new(thresholds(false));
        for _ in 0..50 {
            s.record("GET", "/x", &["status"], &[]);
        }
        let f = field(&s, "status");
        assert!(f.flagged && f.volatile);
    }

    #[test]
    fn a_fixed_regression_stops_being_flagged() {
        let mut s = Stats::new(thresholds(true));
        for _ in 0..30 {
            s.record("GET", "/x", &["$.a"], &[]);
        }
        assert_eq!(s.flagged(), 1);
        for _ in 0..100 {
            s.record("GET", "/x", &[], &[]);
        }
        assert_eq!(s.flagged(), 0);
        assert_eq!(field(&s, "$.a").candidate_diffs, 30);
    }

    #[test]
    fn endpoints_and_fields_are_bounded() {
        let mut s = Stats::new(thresholds(true));
        s.record("GET", "/a", &["$.1", "$.2", "$.3"], &[]);
        s.record("GET", "/b", &[], &[]);
        s.record("GET", "/c", &[], &[]);
        let report = s.report();
        assert_eq!(report.len(), 3);
        assert!(report.iter().any(|e| e.path == OTHER));
        let a = report.iter().find(|e| e.path == "/a").unwrap();
        assert_eq!(a.fields.len(), 3);
        assert!(a.fields.iter().any(|f| f.path == OTHER));
    }
}
