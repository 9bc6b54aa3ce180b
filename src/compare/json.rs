//! JSON bodies compared field by field: both trees are walked in step, each difference
//! named by its field path (`$.items[*].price`) and typed; ignore patterns prune whole subtrees.
//! Depth, nodes visited and differences kept are capped, so no body grows the work without bound.

use std::collections::HashSet;

use serde_json::Value;

/// One step of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternStep {
    /// `.name`
    Child(String),
    /// `.*`: any object member.
    AnyChild,
    /// `[*]`: any array element.
    AnyIndex,
    /// `..name`: `name` at any depth below.
    Descendant(String),
}

/// An `ignore_fields` entry: `$.a.b` exact, `$..name` at any depth, `[*]` any index, `.*` any member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPattern {
    steps: Vec<PatternStep>,
}

impl FieldPattern {
    pub fn parse(text: &str) -> Result<FieldPattern, String> {
        let hint = "write it like \"$.meta.trace\", \"$..timestamp\" or \"$.items[*].id\"";
        let Some(mut rest) = text.strip_prefix('$') else {
            return Err(format!("{text:?} must start with '$'; {hint}"));
        };
        let mut steps = Vec::new();
        let name_len = |s: &str| s.find(['.', '[']).unwrap_or(s.len());
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix("[*]") {
                steps.push(PatternStep::AnyIndex);
                rest = after;
            } else if let Some(after) = rest.strip_prefix("..") {
                let n = name_len(after);
                if n == 0 || &after[..n] == "*" {
                    return Err(format!(
                        "{text:?}: '..' must be followed by a field name; {hint}"
                    ));
                }
                steps.push(PatternStep::Descendant(after[..n].to_string()));
                rest = &after[n..];
            } else if let Some(after) = rest.strip_prefix('.') {
                let n = name_len(after);
                if n == 0 {
                    return Err(format!("{text:?}: empty field name; {hint}"));
                }
                let name = &after[..n];
                steps.push(if name == "*" {
                    PatternStep::AnyChild
                } else {
                    PatternStep::Child(name.to_string())
                });
                rest = &after[n..];
            } else {
                return Err(format!(
                    "{text:?}: unexpected {:?}; only .name, ..name, .* and [*] are supported; {hint}",
                    rest.chars().next().unwrap_or(' ')
                ));
            }
        }
        if steps.is_empty() {
            return Err(format!(
                "{text:?} would ignore the whole body; name a field, {hint}"
            ));
        }
        Ok(FieldPattern { steps })
    }

    /// Whether the pattern names exactly this path (and so its whole subtree).
    fn matches(&self, path: &[Step<'_>]) -> bool {
        fn walk(pattern: &[PatternStep], path: &[Step<'_>]) -> bool {
            let Some((first, rest)) = pattern.split_first() else {
                return path.is_empty();
            };
            match first {
                PatternStep::Child(name) => {
                    matches!(path.first(), Some(Step::Key(k)) if k == name)
                        && walk(rest, &path[1..])
                }
                PatternStep::AnyChild => {
                    matches!(path.first(), Some(Step::Key(_))) && walk(rest, &path[1..])
                }
                PatternStep::AnyIndex => {
                    matches!(path.first(), Some(Step::Index)) && walk(rest, &path[1..])
                }
                PatternStep::Descendant(name) => (0..path.len()).any(|i| {
                    matches!(path[i], Step::Key(k) if k == name) && walk(rest, &path[i + 1..])
                }),
            }
        }
        walk(&self.steps, path)
    }

    /// The last member name the pattern needs, to skip the full match cheaply.
    fn last_name(&self) -> Option<&str> {
        match self.steps.last() {
            Some(PatternStep::Child(n)) | Some(PatternStep::Descendant(n)) => Some(n),
            _ => None,
        }
    }
}

/// A step of a concrete path while walking: array indices are folded to `[*]`.
#[derive(Debug, Clone, Copy)]
enum Step<'a> {
    Key(&'a str),
    Index,
}

/// How a field differs between the primary and the other side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffKind {
    /// Same JSON type, another value.
    Value,
    /// Another JSON type (e.g. number vs string).
    Type,
    /// In the primary, not in the other side.
    Missing,
    /// In the other side, not in the primary.
    Extra,
    /// An array of another length.
    Length,
}

impl DiffKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DiffKind::Value => "value",
            DiffKind::Type => "type",
            DiffKind::Missing => "missing",
            DiffKind::Extra => "extra",
            DiffKind::Length => "length",
        }
    }
}

/// One differing field: its path with indices folded, and a short example of each side.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldDiff {
    pub path: String,
    pub kind: DiffKind,
    pub primary: Option<String>,
    pub other: Option<String>,
}

/// Caps on one comparison.
#[derive(Debug, Clone, Copy)]
pub struct JsonLimits {
    /// Below this depth, a subtree is compared whole and reported at its root.
    pub max_depth: usize,
    /// Nodes visited (both sides together) before the walk stops.
    pub max_nodes: usize,
    /// Distinct differing paths kept.
    pub max_diffs: usize,
}

impl Default for JsonLimits {
    fn default() -> Self {
        JsonLimits {
            max_depth: 32,
            max_nodes: 100_000,
            max_diffs: 64,
        }
    }
}

/// The differences of one pair of JSON documents.
#[derive(Debug, Default)]
pub struct JsonDiff {
    /// One entry per differing path (array elements share one), in walk order.
    pub diffs: Vec<FieldDiff>,
    /// A limit stopped the walk: fields past it were not compared.
    pub incomplete: bool,
}

/// Bytes of each side kept as an example of a difference.
const FRAGMENT_BYTES: usize = 160;

/// Compare `primary` with `other`, skipping fields that match `ignore`.
pub fn diff(
    primary: &Value,
    other: &Value,
    ignore: &[FieldPattern],
    limits: JsonLimits,
) -> JsonDiff {
    let mut walker = Walker {
        ignore,
        limits,
        path: Vec::with_capacity(16),
        nodes: 0,
        seen: HashSet::new(),
        out: JsonDiff::default(),
    };
    walker.walk(primary, other);
    walker.out
}

struct Walker<'p, 'v> {
    ignore: &'p [FieldPattern],
    limits: JsonLimits,
    path: Vec<Step<'v>>,
    nodes: usize,
    seen: HashSet<String>,
    out: JsonDiff,
}

impl<'v> Walker<'_, 'v> {
    fn ignored(&self) -> bool {
        let last = match self.path.last() {
            Some(Step::Key(k)) => Some(*k),
            _ => None,
        };
        self.ignore.iter().any(|p| {
            // Most patterns end in a name: only a path ending in it can match.
            (p.last_name().is_none() || p.last_name() == last) && p.matches(&self.path)
        })
    }

    fn walk(&mut self, a: &'v Value, b: &'v Value) {
        if self.out.incomplete {
            return;
        }
        self.nodes += 2;
        if self.nodes > self.limits.max_nodes {
            self.out.incomplete = true;
            return;
        }
        if !self.ignore.is_empty() && !self.path.is_empty() && self.ignored() {
            return;
        }
        if self.path.len() >= self.limits.max_depth {
            if a != b {
                self.record(kind_of(a, b), Some(a), Some(b));
            }
            return;
        }
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                for (key, va) in x {
                    self.path.push(Step::Key(key));
                    match y.get(key) {
                        Some(vb) => self.walk(va, vb),
                        None => {
                            if !self.ignored() {
                                self.record(DiffKind::Missing, Some(va), None);
                            }
                        }
                    }
                    self.path.pop();
                }
                for (key, vb) in y {
                    if !x.contains_key(key) {
                        self.path.push(Step::Key(key));
                        if !self.ignored() {
                            self.record(DiffKind::Extra, None, Some(vb));
                        }
                        self.path.pop();
                    }
                }
            }
            (Value::Array(x), Value::Array(y)) => {
                if x.len() != y.len() {
                    self.record(DiffKind::Length, Some(a), Some(b));
                }
                self.path.push(Step::Index);
                for (va, vb) in x.iter().zip(y) {
                    self.walk(va, vb);
                }
                self.path.pop();
            }
            _ if a == b => {}
            _ => self.record(kind_of(a, b), Some(a), Some(b)),
        }
    }

    fn record(&mut self, kind: DiffKind, a: Option<&Value>, b: Option<&Value>) {
        if self.out.diffs.len() >= self.limits.max_diffs {
            self.out.incomplete = true;
            return;
        }
        let path = render_path(&self.path);
        if !self.seen.insert(path.clone()) {
            return;
        }
        self.out.diffs.push(FieldDiff {
            path,
            kind,
            primary: a.map(fragment),
            other: b.map(fragment),
        });
    }
}

fn kind_of(a: &Value, b: &Value) -> DiffKind {
    if std::mem::discriminant(a) == std::mem::discriminant(b) {
        DiffKind::Value
    } else {
        DiffKind::Type
    }
}

/// `$.a.b[*]`; a key that is not a plain name is quoted: `$["a b"]`.
fn render_path(path: &[Step<'_>]) -> String {
    let mut out = String::from("$");
    for step in path {
        match step {
            Step::Index => out.push_str("[*]"),
            Step::Key(k)
                if !k.is_empty()
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
            {
                out.push('.');
                out.push_str(k);
            }
            Step::Key(k) => {
                out.push('[');
                out.push_str(&Value::String((*k).to_string()).to_string());
                out.push(']');
            }
        }
    }
    out
}

/// A short rendering of a value for examples, cut at a character boundary.
pub fn fragment(v: &Value) -> String {
    let text = v.to_string();
    truncate(text, FRAGMENT_BYTES)
}

pub fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn paths(a: Value, b: Value, ignore: &[&str]) -> Vec<(String, DiffKind)> {
        let ignore: Vec<FieldPattern> = ignore
            .iter()
            .map(|p| FieldPattern::parse(p).unwrap())
            .collect();
        diff(&a, &b, &ignore, JsonLimits::default())
            .diffs
            .into_iter()
            .map(|d| (d.path, d.kind))
            .collect()
    }

    #[test]
    fn typed_differences_with_folded_indices() {
        let a = json!({"id": 1, "name": "x", "items": [{"price": 1}, {"price": 2}], "gone": true, "tags": [1, 2]});
        let b = json!({"id": "1", "name": "y", "items": [{"price": 1}, {"price": 3}], "new": null, "tags": [1]});
        assert_eq!(
            paths(a, b, &[]),
            vec![
                ("$.gone".into(), DiffKind::Missing),
                ("$.id".into(), DiffKind::Type),
                ("$.items[*].price".into(), DiffKind::Value),
                ("$.name".into(), DiffKind::Value),
                ("$.tags".into(), DiffKind::Length),
                ("$.new".into(), DiffKind::Extra),
            ]
        );
    }

    #[test]
    fn equal_documents_have_no_differences() {
        let a = json!({"a": [1, {"b": [true, null]}], "c": "d"});
        assert!(paths(a.clone(), a, &[]).is_empty());
    }

    #[test]
    fn ignore_patterns_prune_exact_recursive_and_indexed_paths() {
        let a = json!({"timestamp": 1, "meta": {"trace": "a", "keep": 1}, "items": [{"timestamp": 1, "id": 1}], "x": {"y": {"timestamp": 5}}});
        let b = json!({"timestamp": 2, "meta": {"trace": "b", "keep": 2}, "items": [{"timestamp": 2, "id": 2}], "x": {"y": {"timestamp": 6}}});
        assert_eq!(
            paths(a.clone(), b.clone(), &["$..timestamp", "$.meta.trace"]),
            vec![
                ("$.items[*].id".into(), DiffKind::Value),
                ("$.meta.keep".into(), DiffKind::Value),
            ]
        );
        assert_eq!(
            paths(a, b, &["$..timestamp", "$.meta", "$.items[*].id"]),
            vec![]
        );
        // A missing field is ignored too.
        assert!(paths(json!({"t": 1}), json!({}), &["$.t"]).is_empty());
        assert!(paths(json!({}), json!({"t": 1}), &["$..t"]).is_empty());
    }

    #[test]
    fn odd_keys_are_quoted() {
        assert_eq!(
            paths(json!({"a b": 1}), json!({"a b": 2}), &[]),
            vec![("$[\"a b\"]".into(), DiffKind::Value)]
        );
    }

    #[test]
    fn limits_stop_the_walk() {
        let wide: Value = (0..1000)
            .map(|i| (i.to_string(), json!(i)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        let other: Value = (0..1000)
            .map(|i| (i.to_string(), json!(i + 1)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        let limits = JsonLimits {
            max_depth: 32,
            max_nodes: 100,
            max_diffs: 10,
        };
        let out = diff(&wide, &other, &[], limits);
        assert!(out.incomplete);
        assert!(out.diffs.len() <= 10);
        // Deep documents are compared whole below the depth cap.
        let mut deep = json!(1);
        let mut deep2 = json!(2);
        for _ in 0..40 {
            deep = json!({"d": deep});
            deep2 = json!({"d": deep2});
        }
        let out = diff(&deep, &deep2, &[], JsonLimits::default());
        assert_eq!(out.diffs.len(), 1);
        assert_eq!(out.diffs[0].path.matches(".d").count(), 32);
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["timestamp", "$", "$.", "$..", "$[0]", "$.a[1]", "$..*"] {
            assert!(FieldPattern::parse(bad).is_err(), "{bad}");
        }
        for good in ["$.a", "$..a", "$.a[*].b", "$.*.id", "$[*]"] {
            assert!(FieldPattern::parse(good).is_ok(), "{good}");
        }
    }
}
