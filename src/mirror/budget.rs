//! Byte accounting for queued shadow chunks: a per-shadow queue limit and one process-wide budget.
//! A queued chunk gives its bytes back when it is dropped, wherever that happens, so nothing can leak.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use pingora_prometheus::prometheus::IntGauge;

use super::AbandonReason;

/// The process-wide ceiling on queued shadow bytes (`mirror_budget_bytes`).
#[derive(Debug)]
pub struct ByteBudget {
    used: AtomicU64,
    limit: u64,
    gauge: IntGauge,
}

impl ByteBudget {
    pub fn new(limit: u64, gauge: IntGauge) -> Self {
        ByteBudget {
            used: AtomicU64::new(0),
            limit,
            gauge,
        }
    }

    /// Take `n` bytes if they fit under the limit.
    fn try_take(&self, n: u64) -> bool {
        let before = self.used.fetch_add(n, Ordering::AcqRel);
        if before + n > self.limit {
            self.used.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        self.gauge.add(n as i64);
        true
    }

    fn give_back(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
        self.gauge.sub(n as i64);
    }

    /// Bytes queued now, across every shadow of the process.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// The queue of one shadow request: bounded in bytes, and drawing on the process budget.
#[derive(Debug)]
pub struct QueueAccount {
    queued: AtomicU64,
    limit: u64,
    budget: Arc<ByteBudget>,
}

impl QueueAccount {
    pub fn new(limit: u64, budget: Arc<ByteBudget>) -> Self {
        QueueAccount {
            queued: AtomicU64::new(0),
            limit,
            budget,
        }
    }

    /// Admit a chunk to this queue, or say which limit it would break. The
    /// process budget is checked first: when both would overflow, memory
    /// pressure is the cause worth reporting.
    pub fn admit(self: &Arc<Self>, bytes: Bytes) -> Result<QueuedChunk, AbandonReason> {
        let n = bytes.len() as u64;
        if !self.budget.try_take(n) {
            return Err(AbandonReason::MemoryBudget);
        }
        // Only the primary's task admits to a given queue, so load-then-add cannot race
        // with another admit; the shadow only ever lowers `queued`.
        if self.queued.load(Ordering::Acquire) + n > self.limit {
            self.budget.give_back(n);
            return Err(AbandonReason::QueueFull);
        }
        self.queued.fetch_add(n, Ordering::AcqRel);
        Ok(QueuedChunk {
            bytes,
            account: self.clone(),
        })
    }
}

/// A body chunk on its way to a shadow. Its bytes count against the queue and
/// the budget until it is dropped: after the write, or unsent when a shadow is abandoned.
#[derive(Debug)]
pub struct QueuedChunk {
    bytes: Bytes,
    account: Arc<QueueAccount>,
}

impl QueuedChunk {
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}

impl Drop for QueuedChunk {
    fn drop(&mut self) {
        let n = self.bytes.len() as u64;
        self.account.queued.fetch_sub(n, Ordering::AcqRel);
        self.account.budget.give_back(n);
    }
}

/// Bytes held outside any queue, e.g. a response captured for comparison: drawn
/// from the same process budget, grown as bytes arrive, given back on drop.
#[derive(Debug)]
pub struct BudgetHold {
    budget: Arc<ByteBudget>,
    bytes: u64,
}

impl BudgetHold {
    pub fn new(budget: Arc<ByteBudget>) -> Self {
        BudgetHold { budget, bytes: 0 }
    }

    /// Take `n` more bytes if the budget has them.
    pub fn grow(&mut self, n: u64) -> bool {
        if !self.budget.try_take(n) {
            return false;
        }
        self.bytes += n;
        true
    }

    /// Give every held byte back now.
    pub fn release(&mut self) {
        self.budget.give_back(self.bytes);
        self.bytes = 0;
    }
}

impl Drop for BudgetHold {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: u64) -> Arc<ByteBudget> {
        Arc::new(ByteBudget::new(
            limit,
            IntGauge::new("test_queued", "test").unwrap(),
        ))
    }

    #[test]
    fn queue_limit_then_budget_limit() {
        let budget = budget(10);
        let a = Arc::new(QueueAccount::new(6, budget.clone()));
        let b = Arc::new(QueueAccount::new(6, budget.clone()));
        let first = a.admit(Bytes::from_static(b"12345")).unwrap();
        assert_eq!(
            a.admit(Bytes::from_static(b"67")).unwrap_err(),
            AbandonReason::QueueFull
        );
        let _second = b.admit(Bytes::from_static(b"12345")).unwrap();
        assert_eq!(
            b.admit(Bytes::from_static(b"6")).unwrap_err(),
            AbandonReason::MemoryBudget
        );
        drop(first);
        assert_eq!(budget.used(), 5);
        assert!(a.admit(Bytes::from_static(b"123456")).is_err());
        assert!(a.admit(Bytes::from_static(b"12345")).is_ok());
    }

    #[test]
    fn dropping_chunks_returns_every_byte() {
        let budget = budget(100);
        let q = Arc::new(QueueAccount::new(100, budget.clone()));
        let chunks: Vec<_> = (0..10)
            .map(|_| q.admit(Bytes::from(vec![0u8; 10])).unwrap())
            .collect();
        assert_eq!(budget.used(), 100);
        drop(chunks);
        assert_eq!(budget.used(), 0);
        assert_eq!(budget.gauge.get(), 0);
    }

    #[test]
    fn a_hold_grows_within_the_budget_and_gives_back_on_drop() {
        let budget = budget(10);
        let mut hold = BudgetHold::new(budget.clone());
        assert!(hold.grow(8));
        assert!(!hold.grow(3));
        assert_eq!(budget.used(), 8);
        drop(hold);
        assert_eq!(budget.used(), 0);
    }
}
