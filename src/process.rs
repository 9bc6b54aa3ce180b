//! Setup that must run in the serving process itself, after Pingora has daemonized and bound its listeners:
//! it makes the listeners hand over only connections with data.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use log::{debug, warn};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

/// How long the kernel may hold a connection that has sent nothing yet.
const DEFER_ACCEPT_SECONDS: libc::c_int = 10;

/// A background service that runs once at startup.
pub struct ProcessSetup {
    pub listeners: Vec<SocketAddr>,
}

#[async_trait]
impl BackgroundService for ProcessSetup {
    async fn start(&self, _shutdown: ShutdownWatch) {
        // Pingora binds the listeners in another service; wait for them (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let tuned = defer_accept(&self.listeners);
            if tuned >= self.listeners.len() {
                debug!("TCP_DEFER_ACCEPT set on {tuned} listening sockets");
                return;
            }
            if Instant::now() > deadline {
                warn!(
                    "TCP_DEFER_ACCEPT set on {tuned} of {} listeners; an upgrade may drop a connection that has not sent its request yet",
                    self.listeners.len()
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Set TCP_DEFER_ACCEPT on this process's listening sockets bound to `addrs`.
///
/// Pingora closes every connection still waiting for its first request when it
/// stops accepting, including one accepted a moment earlier whose request bytes
/// had not arrived: across an upgrade that drops a client. With TCP_DEFER_ACCEPT
/// the kernel hands over a connection only once data has arrived, so the request
/// is read before the shutdown check. The option lives on the socket, so it
/// survives the hand-over to the next process. Pingora 0.9 has no setting for it.
fn defer_accept(addrs: &[SocketAddr]) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let mut tuned = 0;
    for entry in entries.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // SAFETY: the descriptor was open when listed and is only borrowed for
        // read-only queries and one setsockopt; if it closed meanwhile, the calls
        // fail with EBADF and we skip it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        let listening = socket.is_listener().unwrap_or(false);
        let local = socket.local_addr().ok().and_then(|a| a.as_socket());
        if !listening || !local.is_some_and(|a| addrs.contains(&a)) {
            continue;
        }
        let value = DEFER_ACCEPT_SECONDS;
        // SAFETY: a valid socket descriptor and a correctly sized c_int option value.
        let rc = unsafe {
            libc::setsockopt(
                borrowed.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            tuned += 1;
        }
    }
    tuned
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_defer_accept_on_a_matching_listener_only() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let other = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        assert_eq!(defer_accept(&[addr]), 1);
        let read = |fd: i32| {
            let mut value: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: valid descriptor and output buffer of the declared size.
            unsafe {
                libc::getsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_DEFER_ACCEPT,
                    (&mut value as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            value
        };
        assert!(read(listener.as_raw_fd()) > 0);
        assert_eq!(read(other.as_raw_fd()), 0);
    }
}
