//! Idle keep-alive connections to HTTP/1 shadow servers, kept by the mirror itself.
//! Pingora's pool hashes the peer, locks twice and spawns a watcher task per request;
//! a shadow exchange only needs a per-server stack of idle sockets checked when taken.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::FutureExt;
use pingora_core::connectors::{ConnectorOptions, TransportConnector};
use pingora_core::protocols::Stream;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use tokio::io::AsyncReadExt;

/// One idle connection and since when it waits.
struct Idle {
    stream: Stream,
    since: Instant,
}

/// Connections to the servers of every HTTP/1 shadow pool of the process.
pub struct ShadowConnections {
    transport: TransportConnector,
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    /// Idle connections kept per server; more are closed when released.
    max_idle_per_server: usize,
}

impl ShadowConnections {
    pub fn new(max_idle_per_server: usize) -> Self {
        ShadowConnections {
            transport: TransportConnector::new(Some(ConnectorOptions::new(0))),
            idle: Mutex::new(HashMap::new()),
            max_idle_per_server,
        }
    }

    /// An open connection to `addr`: the most recently released idle one that is
    /// still usable, else a new one. The flag says whether it was reused.
    pub async fn get(
        &self,
        peer: &HttpPeer,
        addr: SocketAddr,
        idle_timeout: Option<Duration>,
    ) -> Result<(Stream, bool)> {
        while let Some(mut idle) = self.pop(addr) {
            let expired = idle_timeout.is_some_and(|limit| idle.since.elapsed() >= limit);
            if !expired && still_open(&mut idle.stream) {
                return Ok((idle.stream, true));
            }
        }
        Ok((self.connect(peer).await?, false))
    }

    /// A new connection to `peer`.
    pub async fn connect(&self, peer: &HttpPeer) -> Result<Stream> {
        // Boxed: connecting is the rare path and its future is large.
        Box::pin(self.transport.new_stream(peer)).await
    }

    /// Keep `stream` for the next exchange with `addr`, if there is room.
    pub fn put(&self, addr: SocketAddr, stream: Stream) {
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

/// Whether an idle connection can carry a request: nothing to read (a close or
/// unexpected bytes from the server make it unusable). Never waits.
fn still_open(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    tokio::task::unconstrained(stream.read(&mut byte))
        .now_or_never()
        .is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn idle_connections_are_reused_until_the_server_closes_them() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = HttpPeer::new(addr, false, String::new());
        let conns = ShadowConnections::new(4);

        let (stream, reused) = conns.get(&peer, addr, None).await.unwrap();
        assert!(!reused);
        let (server_side, _) = listener.accept().await.unwrap();
        conns.put(addr, stream);
        let (stream, reused) = conns.get(&peer, addr, None).await.unwrap();
        assert!(reused, "an idle, open connection is taken again");
        conns.put(addr, stream);

        // The server closes the idle connection: it is dropped, a new one made.
        drop(server_side);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (stream, reused) = conns.get(&peer, addr, None).await.unwrap();
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
        let peer = HttpPeer::new(addr, false, String::new());
        let conns = ShadowConnections::new(4);
        let (stream, _) = conns.get(&peer, addr, None).await.unwrap();
        let _server_side = listener.accept().await.unwrap();
        conns.put(addr, stream);
        let (_, reused) = conns.get(&peer, addr, Some(Duration::ZERO)).await.unwrap();
        assert!(!reused);
    }
}
