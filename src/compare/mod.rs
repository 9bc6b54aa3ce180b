//! Shadow verdicts: the primary's response and the candidate's (and a control's) are captured
//! as they stream, then compared off the request path, once all sides are in.
//! Results: Prometheus metrics, `GET /compare` (JSON and HTML) and a redacted diff log.

pub mod capture;
pub mod config;
pub mod diff;
pub mod difflog;
pub mod http;
pub mod json;
pub mod metrics;
pub mod report;
pub mod skip;
pub mod stats;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use ::http::{HeaderName, Method};
use pingora_http::RequestHeader;
use tokio::sync::oneshot;

use capture::Capture;
use config::{CompareConfig, DEFAULT_IGNORED_HEADERS};
use diff::{Differences, Settings};
use difflog::{DiffLog, Example, ExampleField, Logged, PerSide};
use json::{FieldPattern, JsonLimits};
use metrics::{CompareMetrics, Side};
pub use skip::SkipReason;
use stats::{Stats, Thresholds};

/// Examples kept in memory per mirror for the report page.
const EXAMPLES_KEPT: usize = 16;
/// Decoded gzip may be this many times `max_body_bytes`.
const GZIP_EXPANSION: u64 = 8;

/// Every comparator of the process, for the report endpoints.
pub fn registry() -> &'static Mutex<Vec<Arc<Comparator>>> {
    static REGISTRY: OnceLock<Mutex<Vec<Arc<Comparator>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Vec::new()))
}

/// The comparison of one mirror of one route.
pub struct Comparator {
    pub route: String,
    pub mirror: String,
    pub control: Option<String>,
    methods: Vec<Method>,
    /// Per side, body bytes kept.
    pub max_body_bytes: u64,
    settings: Settings,
    metrics: CompareMetrics,
    state: Mutex<State>,
    log: Option<Mutex<DiffLog>>,
}

struct State {
    stats: Stats,
    examples: VecDeque<Example>,
}

impl Comparator {
    /// Build from a validated section and register for the report.
    pub fn new(route: &str, mirror: &str, config: &CompareConfig) -> Arc<Comparator> {
        let ignore_headers: HashSet<HeaderName> = DEFAULT_IGNORED_HEADERS
            .iter()
            .map(|h| h.to_string())
            .chain(config.ignore_headers.iter().map(|h| h.to_ascii_lowercase()))
            .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
            .collect();
        let settings = Settings {
            ignore_headers,
            ignore_fields: config
                .ignore_fields
                .iter()
                .filter_map(|p| FieldPattern::parse(p).ok())
                .collect(),
            max_decoded_bytes: config.max_body_bytes.saturating_mul(GZIP_EXPANSION),
            limits: JsonLimits::default(),
        };
        let thresholds = Thresholds {
            min_samples: config.min_samples,
            absolute_margin: config.absolute_margin,
            relative_margin: config.relative_margin,
            volatile_rate: config.volatile_rate,
            window: config.window,
            max_endpoints: config.max_endpoints as usize,
            max_fields: config.max_fields as usize,
            has_control: config.control.is_some(),
        };
        let comparator = Arc::new(Comparator {
            route: route.to_string(),
            mirror: mirror.to_string(),
            control: config.control.clone(),
            methods: match &config.methods {
                Some(list) => list
                    .iter()
                    .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                    .collect(),
                None => config::DEFAULT_METHODS
                    .iter()
                    .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                    .collect(),
            },
            max_body_bytes: config.max_body_bytes,
            settings,
            metrics: CompareMetrics::new(route, mirror),
            state: Mutex::new(State {
                stats: Stats::new(thresholds),
                examples: VecDeque::new(),
            }),
            log: config.diff_log.as_ref().map(|path| {
                Mutex::new(DiffLog::new(
                    path,
                    config.diff_log_max_bytes,
                    config.diff_log_per_second,
                ))
            }),
        });
        if let Ok(mut all) = registry().lock() {
            all.push(comparator.clone());
        }
        comparator
    }

    /// Start comparing this request, or count why not. The returned senders
    /// go to each side; a sender dropped unsent means that side failed.
    pub fn begin(self: &Arc<Self>, request: CompareRequest) -> Option<Pending> {
        if !self.methods.contains(&request.method) {
            self.metrics.skipped(SkipReason::Method);
            return None;
        }
        let (primary_tx, primary) = oneshot::channel();
        let (candidate_tx, candidate) = oneshot::channel();
        let (control_tx, control) = match self.control {
            Some(_) => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let job = Job {
            comparator: self.clone(),
            method: request.method.as_str().to_string(),
            path: request.path,
            id: request.id,
            primary,
            candidate,
            control,
        };
        Some(Pending {
            primary: primary_tx,
            candidate: candidate_tx,
            control: control_tx,
            job,
        })
    }

    fn skip(&self, reason: SkipReason) {
        self.metrics.skipped(reason);
    }

    /// Compare the sides of one request and record the verdict.
    fn judge(&self, job: &Job, primary: &Capture, candidate: &Capture, control: Option<&Capture>) {
        let cand = diff::compare(primary, candidate, &self.settings);
        let ctrl = control.map(|c| diff::compare(primary, c, &self.settings));
        self.metrics.outcome(!cand.fields.is_empty());
        let delta = |c: &Capture| c.elapsed.as_secs_f64() - primary.elapsed.as_secs_f64();
        self.metrics
            .status_pair(Side::Candidate, primary.status, candidate.status);
        self.metrics
            .latency_delta(Side::Candidate, delta(candidate));
        if let Some(note) = cand.body_note {
            self.metrics.degraded(note);
        }
        if let (Some(c), Some(d)) = (control, &ctrl) {
            self.metrics
                .status_pair(Side::Control, primary.status, c.status);
            self.metrics.latency_delta(Side::Control, delta(c));
            if let Some(note) = d.body_note {
                self.metrics.degraded(note);
            }
        }
        fn paths(d: &Differences) -> Vec<&str> {
            d.fields.iter().map(|f| f.path.as_str()).collect()
        }
        let cand_paths = paths(&cand);
        let ctrl_paths = ctrl.as_ref().map(paths).unwrap_or_default();
        let template = stats::path_template(&job.path);
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let flagged = state
            .stats
            .record(&job.method, &template, &cand_paths, &ctrl_paths);
        self.metrics.flagged.set(flagged as i64);
        // Examples are for differences worth a look: not ones made only of
        // fields known to differ on nearly every request.
        if cand.fields.is_empty() || state.stats.only_noise(&job.method, &template, &cand_paths) {
            return;
        }
        let example = self.example(job, primary, candidate, control, &cand, ctrl.as_ref());
        if state.examples.len() >= EXAMPLES_KEPT {
            state.examples.pop_front();
        }
        state.examples.push_back(example.clone());
        drop(state);
        if let Some(log) = &self.log
            && let Ok(mut log) = log.lock()
        {
            match log.write(&example) {
                Logged::Written => self.metrics.log_written.inc(),
                Logged::RateLimited => self.metrics.log_rate_limited.inc(),
                Logged::Failed => self.metrics.log_errors.inc(),
            }
        }
    }

    fn example(
        &self,
        job: &Job,
        primary: &Capture,
        candidate: &Capture,
        control: Option<&Capture>,
        cand: &Differences,
        ctrl: Option<&Differences>,
    ) -> Example {
        let ms = |c: &Capture| c.elapsed.as_secs_f64() * 1000.0;
        let fields = cand
            .fields
            .iter()
            .map(|f| {
                // The control's value of the same field, if it differed too.
                let control_value = ctrl.and_then(|d| {
                    d.fields
                        .iter()
                        .find(|g| g.path == f.path)
                        .map(|g| g.other.clone().unwrap_or_default())
                });
                ExampleField::new(
                    &f.path,
                    f.kind.as_str(),
                    f.primary.clone(),
                    f.other.clone(),
                    control_value,
                )
            })
            .collect();
        Example {
            ts: difflog::now_ms(),
            id: job.id.clone(),
            route: self.route.clone(),
            mirror: self.mirror.clone(),
            method: job.method.clone(),
            path: job.path.clone(),
            status: PerSide {
                primary: primary.status,
                candidate: candidate.status,
                control: control.map(|c| c.status),
            },
            latency_ms: PerSide {
                primary: ms(primary),
                candidate: ms(candidate),
                control: control.map(ms),
            },
            fields,
        }
    }

    /// The endpoints with their fields, and recent examples.
    pub fn snapshot(&self) -> (u64, Vec<stats::EndpointReport>, Vec<Example>) {
        match self.state.lock() {
            Ok(state) => (
                state.stats.compared(),
                state.stats.report(),
                state.examples.iter().cloned().collect(),
            ),
            Err(_) => (0, Vec::new(), Vec::new()),
        }
    }
}

/// The request's own `x-request-id`, or a process-unique one.
fn correlation_id(request: &RequestHeader) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    if let Some(id) = request
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
    {
        return id.to_string();
    }
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("sg-{}-{n}", std::process::id())
}

/// What a comparison keeps of the request: taken from the primary's header when it
/// goes upstream, so that no copy of the header is needed.
pub struct CompareRequest {
    method: Method,
    path: String,
    id: String,
}

impl CompareRequest {
    pub fn of(request: &RequestHeader) -> Self {
        CompareRequest {
            method: request.method.clone(),
            path: request.uri.path().to_string(),
            id: correlation_id(request),
        }
    }
}

/// A comparison begun for one request: where each side delivers its capture.
pub struct Pending {
    pub primary: oneshot::Sender<Arc<Capture>>,
    pub candidate: oneshot::Sender<Capture>,
    pub control: Option<oneshot::Sender<Capture>>,
    pub job: Job,
}

/// Waits for every side, then compares. Runs as its own task, off the request path.
pub struct Job {
    comparator: Arc<Comparator>,
    method: String,
    path: String,
    id: String,
    primary: oneshot::Receiver<Arc<Capture>>,
    candidate: oneshot::Receiver<Capture>,
    control: Option<oneshot::Receiver<Capture>>,
}

impl Job {
    /// Every sender belongs to something bounded (the request, a shadow session
    /// under its timeout), so this ends when the last side ends.
    pub async fn run(mut self) {
        let control = self.control.take();
        let (primary, candidate, control) =
            tokio::join!(&mut self.primary, &mut self.candidate, async move {
                match control {
                    Some(rx) => Some(rx.await),
                    None => None,
                }
            });
        let comparator = self.comparator.clone();
        let Ok(primary) = primary else {
            return comparator.skip(SkipReason::PrimaryIncomplete);
        };
        let Ok(candidate) = candidate else {
            return comparator.skip(SkipReason::CandidateFailed);
        };
        let control = match control {
            None => None,
            Some(Ok(c)) => Some(c),
            Some(Err(_)) => return comparator.skip(SkipReason::ControlFailed),
        };
        // Parsing and walking bodies is CPU work: let requests waiting on this
        // worker go first (with `mirror_threads: 0` it is a proxy worker).
        tokio::task::yield_now().await;
        comparator.judge(&self, &primary, &candidate, control.as_ref());
    }
}
