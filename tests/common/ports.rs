//! Loopback ports for tests, handed out so that no two uses in one test process collide.
//!
//! A port from `free_port` is only a number until the proxy binds it, and in that gap the
//! kernel may give the same port to any other `bind(0)` in the process (an origin, another
//! `free_port`, a refusing address). Every test-side bind goes through here, so a port once
//! handed out is never handed out again.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::{Mutex, OnceLock};

use tokio::net::{TcpListener, TcpSocket};

/// Record `port` as handed out; false if it already was.
fn claim(port: u16) -> bool {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(|| Mutex::new(HashSet::new()));
    let mut seen = handed_out.lock().unwrap_or_else(|e| e.into_inner());
    seen.insert(port)
}

/// A free loopback port for a process to bind later. The probe listener is dropped.
///
/// Taken below the kernel's ephemeral range, so that no `connect` or `bind(0)` anywhere on
/// the machine can take it before the process binds it; the start is spread by pid.
pub fn free_port() -> SocketAddr {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOWEST: u16 = 20000;
    if ephemeral_start > LOWEST + 1000 {
        let span = u32::from(ephemeral_start - LOWEST);
        let start = std::process::id() * 7919 % span;
        for step in 0..span {
            let port = LOWEST + ((start + step) % span) as u16;
            if let Ok(listener) = StdListener::bind(("127.0.0.1", port))
                && claim(port)
            {
                return listener.local_addr().expect("address");
            }
        }
    }
    loop {
        let listener = StdListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        if claim(addr.port()) {
            return addr;
        }
    }
}

/// A listening loopback socket on a port never handed out before.
pub async fn listener() -> TcpListener {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        if claim(listener.local_addr().expect("address").port()) {
            return listener;
        }
    }
}

/// A loopback address where nothing listens, for the whole test process: the port stays
/// bound by a socket that never listens, so connects are refused and no later bind
/// (ours or another test's) can take it.
pub fn refusing_address() -> SocketAddr {
    static HELD: Mutex<Vec<TcpSocket>> = Mutex::new(Vec::new());
    loop {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        let addr = socket.local_addr().expect("address");
        if claim(addr.port()) {
            HELD.lock().unwrap_or_else(|e| e.into_inner()).push(socket);
            return addr;
        }
    }
}
