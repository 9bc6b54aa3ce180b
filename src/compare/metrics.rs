//! The comparison's Prometheus metrics, registered once in the default registry like `crate::metrics`.
//! Labels are route, mirror and small fixed sets; field paths never become label values.

use std::sync::OnceLock;

use pingora_prometheus::prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    default_registry,
};

use super::diff::BodyNote;
use super::skip::SkipReason;
use crate::metrics::registered;

/// Signed latency differences (side minus primary), in seconds.
const DELTA_BUCKETS: &[f64] = &[
    -1.0, -0.25, -0.1, -0.05, -0.025, -0.01, -0.005, -0.001, 0.0, 0.001, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 1.0,
];

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

struct Families {
    total: IntCounterVec,
    skipped: IntCounterVec,
    degraded: IntCounterVec,
    status_pairs: IntCounterVec,
    flagged: IntGaugeVec,
    latency_delta: HistogramVec,
    diff_log: IntCounterVec,
}

fn families() -> &'static Families {
    static FAMILIES: OnceLock<Families> = OnceLock::new();
    FAMILIES.get_or_init(|| {
        let registry = default_registry();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            registered(registry, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let flagged = registered(
            registry,
            IntGaugeVec::new(
                Opts::new(
                    "shadowgate_compare_flagged_fields",
                    "Fields whose candidate diff rate exceeds the noise floor now",
                ),
                &["route", "mirror"],
            ),
        );
        let latency_delta = registered(
            registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "shadowgate_compare_latency_delta_seconds",
                    "Response time of the candidate (or control) minus the primary's",
                )
                .buckets(DELTA_BUCKETS.to_vec()),
                &["route", "mirror", "side"],
            ),
        );
        Families {
            total: counter(
                "shadowgate_compare_total",
                "Shadow verdicts: the candidate's response equal to, different from the primary's, or skipped",
                &["route", "mirror", "outcome"],
            ),
            skipped: counter(
                "shadowgate_compare_skipped_total",
                "Comparisons skipped, by reason",
                &["route", "mirror", "reason"],
            ),
            degraded: counter(
                "shadowgate_compare_body_degraded_total",
                "Bodies compared by length and hash only, or not at all, by reason",
                &["route", "mirror", "reason"],
            ),
            status_pairs: counter(
                "shadowgate_compare_status_pairs_total",
                "Compared responses by primary and candidate (or control) status class",
                &["route", "mirror", "side", "primary", "shadow"],
            ),
            flagged,
            latency_delta,
            diff_log: counter(
                "shadowgate_compare_diff_log_lines_total",
                "Diff log lines written, or dropped by the rate limit or an error",
                &["route", "mirror", "result"],
            ),
        }
    })
}

/// Which side of a comparison a metric is about.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    Candidate,
    Control,
}

/// Pre-labelled comparison metrics of one mirror.
pub struct CompareMetrics {
    equal: IntCounter,
    different: IntCounter,
    skipped_total: IntCounter,
    skipped: [IntCounter; SkipReason::ALL.len()],
    degraded: [IntCounter; BodyNote::ALL.len()],
    /// [side][primary class][shadow class]
    pairs: [[[IntCounter; 5]; 5]; 2],
    pub flagged: IntGauge,
    delta: [Histogram; 2],
    pub log_written: IntCounter,
    pub log_rate_limited: IntCounter,
    pub log_errors: IntCounter,
}

impl CompareMetrics {
    pub fn new(route: &str, mirror: &str) -> Self {
        let f = families();
        let sides = ["candidate", "control"];
        CompareMetrics {
            equal: f.total.with_label_values(&[route, mirror, "equal"]),
            different: f.total.with_label_values(&[route, mirror, "different"]),
            skipped_total: f.total.with_label_values(&[route, mirror, "skipped"]),
            skipped: SkipReason::ALL
                .map(|r| f.skipped.with_label_values(&[route, mirror, r.as_str()])),
            degraded: BodyNote::ALL
                .map(|r| f.degraded.with_label_values(&[route, mirror, r.as_str()])),
            pairs: sides.map(|side| {
                CLASSES.map(|p| {
                    CLASSES.map(|s| {
                        f.status_pairs
                            .with_label_values(&[route, mirror, side, p, s])
                    })
                })
            }),
            flagged: f.flagged.with_label_values(&[route, mirror]),
            delta: sides.map(|side| f.latency_delta.with_label_values(&[route, mirror, side])),
            log_written: f.diff_log.with_label_values(&[route, mirror, "written"]),
            log_rate_limited: f
                .diff_log
                .with_label_values(&[route, mirror, "rate_limited"]),
            log_errors: f.diff_log.with_label_values(&[route, mirror, "error"]),
        }
    }

    pub fn outcome(&self, different: bool) {
        if different {
            self.different.inc();
        } else {
            self.equal.inc();
        }
    }

    pub fn skipped(&self, reason: SkipReason) {
        self.skipped_total.inc();
        self.skipped[reason as usize].inc();
    }

    pub fn degraded(&self, note: BodyNote) {
        self.degraded[note as usize].inc();
    }

    pub fn status_pair(&self, side: Side, primary: u16, shadow: u16) {
        let class = |s: u16| (s / 100).clamp(1, 5) as usize - 1;
        self.pairs[side as usize][class(primary)][class(shadow)].inc();
    }

    pub fn latency_delta(&self, side: Side, seconds: f64) {
        self.delta[side as usize].observe(seconds);
    }
}
