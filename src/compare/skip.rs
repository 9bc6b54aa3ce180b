//! Why a sampled request got no verdict: a leaf shared by the comparison and its metrics.

/// Why a sampled request was not compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Mirrored, but the method is not in `compare.methods`.
    Method,
    /// The primary's response did not arrive whole (error, client gone).
    PrimaryIncomplete,
    /// The candidate was not started, failed, timed out or answered garbage.
    CandidateFailed,
    /// The same for the control.
    ControlFailed,
}

impl SkipReason {
    pub const ALL: [SkipReason; 4] = [
        SkipReason::Method,
        SkipReason::PrimaryIncomplete,
        SkipReason::CandidateFailed,
        SkipReason::ControlFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Method => "method",
            SkipReason::PrimaryIncomplete => "primary_incomplete",
            SkipReason::CandidateFailed => "candidate_failed",
            SkipReason::ControlFailed => "control_failed",
        }
    }
}
