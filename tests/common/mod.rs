//! Shared test support: loopback origins, the shadowgate process, and HTTP clients.
#![allow(dead_code)]

pub mod origin;
pub mod proxy;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[allow(unused_imports)]
pub use origin::{
    Misbehavior, Origin, OriginOptions, RawOrigin, Recorded, Reply, refusing_address, sha256_hex,
};
pub use proxy::Proxy;

/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// A client that never pools connections across tests and never retries on its own.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// One GET through the proxy: (status, x-origin header, body).
pub async fn get(client: &reqwest::Client, url: &str) -> (u16, String, String) {
    let resp = client.get(url).send().await.expect("request");
    let status = resp.status().as_u16();
    let origin = resp
        .headers()
        .get("x-origin")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, origin, resp.text().await.unwrap_or_default())
}

/// Send raw bytes on a fresh connection and read the whole response (the
/// request should carry `Connection: close`).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    read_rest(&mut stream).await
}

/// Everything the server sends until it closes the connection (bounded by `WAIT`).
pub async fn read_rest(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Deterministic test body of `len` bytes.
pub fn body_of(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// YAML for a pool of servers, e.g. `pool("app", &[a, b], "")`.
pub fn pool(name: &str, servers: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = servers
        .iter()
        .map(|s| format!("      - {{ address: \"{s}\" }}"))
        .collect();
    format!("  {name}:\n    servers:\n{}\n{extra}", list.join("\n"))
}

/// A proxy whose one route `all` sends everything to pool `app` of `servers`.
pub async fn proxy_to_pool(servers: &[SocketAddr], pool_extra: &str) -> Proxy {
    Proxy::start(&format!(
        "upstreams:\n{}routes:\n  - {{ name: all, upstream: app }}\n",
        pool("app", servers, pool_extra)
    ))
    .await
}
