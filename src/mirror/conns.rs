//! Idle keep-alive connections to HTTP/1 shadow servers, kept by the mirror itself.
//! Pingora's pool hashes the peer, locks twice and spawns a watcher task per request;
//! a shadow exchange only needs a per-server stack of idle sockets checked when taken.
//! The sockets are plain tokio TCP streams, connected as Pingora connects (a deadline,
//! `TCP_NODELAY`): Pingora's stream layers time every read that waits (two clock reads
//! per shadow) and add buffers and digests no shadow reads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use std::io;

use pingora_timeout::fast_timeout::fast_timeout;
use tokio::net::TcpStream;

/// One idle connection and since when it waits.
struct Idle {
    stream: TcpStream,
    since: Instant,
}

/// Connections to the servers of every HTTP/1 shadow pool of the process.
pub struct ShadowConnections {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    /// Idle connections kept per server; more are closed when released.
    max_idle_per_server: usize,
}

impl ShadowConnections {
    pub fn new(max_idle_per_server: usize) -> Self {
        ShadowConnections {
            idle: Mutex::new(HashMap::new()),
            max_idle_per_server,
        }
    }

    /// An open connection to `addr`: the most recently released idle one that is
    /// still usable, else a new one. The flag says whether it was reused.
    pub async fn get(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
        idle_timeout: Option<Duration>,
    ) -> io::Result<(TcpStream, bool)> {
        while let Some(idle) = self.pop(addr) {
            let expired = idle_timeout.is_some_and(|limit| idle.since.elapsed() >= limit);
            if !expired && still_open(&idle.stream) {
                return Ok((idle.stream, true));
            }
        }
        Ok((connect(addr, connect_timeout).await?, false))
    }

    /// Keep `stream` for the next exchange with `addr`, if there is room.
    pub fn put(&self, addr: SocketAddr, stream: TcpStream) {
        let mut idle = lock(&self.idle);
        let list = idle.entry(addr).or_default();
        if list.len() < self.max_idle_per_server {
            list.push(Idle {
                stream,
                since: Instant::now(),
            });
        }
    }

    fn pop(&self, addr: SocketAddr) -> Option<Idle> {
        lock(&self.idle).get_mut(&addr)?.pop()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The lists stay consistent whatever a panicking holder did.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A new connection to `addr`, within `timeout`, with `TCP_NODELAY` (a body's pieces
/// go out as they come, as Pingora's upstream connections do).
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    // Boxed: connecting is the rare path.
    let stream = match Box::pin(fast_timeout(timeout, TcpStream::connect(addr))).await {
        Ok(connected) => connected?,
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Whether an idle connection can carry a request: nothing to read (a close or
/// unexpected bytes from the server make it unusable). Never waits: with no read
/// readiness since the last response, no syscall either.
fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn idle_connections_are_reused_until_the_server_closes_them() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = ShadowConnections::new(4);
        let get = |limit| conns.get(addr, Duration::from_secs(5), limit);

        let (stream, reused) = get(None).await.unwrap();
        assert!(!reused);
        let (server_side, _) = listener.accept().await.unwrap();
        conns.put(addr, stream);
        let (stream, reused) = get(None).await.unwrap();
        assert!(reused, "an idle, open connection is taken again");
        conns.put(addr, stream);

        // The server closes the idle connection: it is dropped, a new one made.
        drop(server_side);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (stream, reused) = get(None).await.unwrap();
            if !reused {
                let _new = listener.accept().await.unwrap();
                break;
            }
            // The close had not reached the reactor yet; it will.
            assert!(
                Instant::now() < deadline,
                "a closed connection kept coming back"
            );
            conns.put(addr, stream);
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn expired_idle_connections_are_not_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = ShadowConnections::new(4);
        let get = |limit| conns.get(addr, Duration::from_secs(5), limit);
        let (stream, _) = get(None).await.unwrap();
        let _server_side = listener.accept().await.unwrap();
        conns.put(addr, stream);
        let (_, reused) = get(Some(Duration::ZERO)).await.unwrap();
        assert!(!reused);
    }
}
