//! Where shadow sessions run: on worker threads of their own, or on the proxy's.
//! Own threads keep shadow work (connects, writes, response reads) from queueing ahead of primary requests.

use std::future::Future;
use std::sync::OnceLock;

use log::{info, warn};
use tokio::runtime::{Handle, Runtime};

/// Runs shadow sessions.
pub struct ShadowExecutor {
    /// Dedicated worker threads; 0 means the proxy's own.
    threads: usize,
    /// Built on first use, so the threads exist in the serving process (after
    /// any `-d` fork), not in the parent that exits.
    runtime: OnceLock<Option<DedicatedRuntime>>,
}

impl ShadowExecutor {
    pub fn new(threads: usize) -> Self {
        ShadowExecutor {
            threads,
            runtime: OnceLock::new(),
        }
    }

    /// Start `session` detached from the caller.
    pub fn spawn<F>(&self, session: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // Boxed: a session's future is several KiB, and the task would otherwise
        // copy it by value at each step of spawning and again when it ends.
        let session = Box::pin(session);
        match self.handle() {
            Some(handle) => drop(handle.spawn(session)),
            None => drop(tokio::spawn(session)),
        }
    }

    fn handle(&self) -> Option<&Handle> {
        if self.threads == 0 {
            return None;
        }
        self.runtime
            .get_or_init(|| DedicatedRuntime::start(self.threads))
            .as_ref()
            .and_then(|r| r.0.as_ref())
            .map(Runtime::handle)
    }
}

/// A tokio runtime that may be dropped from async code: it shuts down in the
/// background instead of blocking (which tokio forbids there).
struct DedicatedRuntime(Option<Runtime>);

impl DedicatedRuntime {
    fn start(threads: usize) -> Option<DedicatedRuntime> {
        match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("shadowgate-mirror")
            .enable_all()
            .build()
        {
            Ok(runtime) => {
                info!("mirror: shadow sessions run on {threads} thread(s) of their own");
                Some(DedicatedRuntime(Some(runtime)))
            }
            Err(e) => {
                warn!("mirror: cannot start shadow threads ({e}); using the proxy's threads");
                None
            }
        }
    }
}

impl Drop for DedicatedRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
