//! A tiny HTTP origin for trying shadowgate out: `cargo run --example demo_origin -- NAME ADDR [ADDR...] [--drift]`.
//! Answers every request with a small JSON document about it and logs it; `--drift` makes a
//! candidate that differs on one field (`$.price.currency`) in every tenth answer, for shadow verdicts.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let drift = args.iter().any(|a| a == "--drift");
    args.retain(|a| a != "--drift");
    let Some((name, addrs)) = args.split_first().filter(|(_, addrs)| !addrs.is_empty()) else {
        eprintln!(
            "usage: demo_origin NAME ADDR [ADDR...] [--drift]   e.g. demo_origin app 127.0.0.1:9001"
        );
        std::process::exit(2);
    };
    let origin = Arc::new(Demo {
        name: name.clone(),
        drift,
        answered: AtomicU64::new(0),
    });
    let mut servers = Vec::new();
    for addr in addrs {
        let addr: SocketAddr = addr.parse().unwrap_or_else(|_| {
            eprintln!("demo_origin: {addr:?} is not an address like 127.0.0.1:9001");
            std::process::exit(2);
        });
        let listener = TcpListener::bind(addr).await.unwrap_or_else(|e| {
            eprintln!("demo_origin: cannot listen on {addr}: {e}");
            std::process::exit(1);
        });
        println!("{name} listening on http://{addr}");
        servers.push(tokio::spawn(serve(origin.clone(), addr, listener)));
    }
    for server in servers {
        let _ = server.await;
    }
}

/// One demo origin: its name, and whether it drifts from the others.
struct Demo {
    name: String,
    drift: bool,
    answered: AtomicU64,
}

async fn serve(origin: Arc<Demo>, addr: SocketAddr, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("{} {addr}: accept failed: {e}", origin.name);
                continue;
            }
        };
        let origin = origin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, origin.clone(), addr));
            // A client that goes away mid-request is not worth a log line.
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    origin: Arc<Demo>,
    addr: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let name = &origin.name;
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // Health checks come every second: answer them without logging.
    if method == hyper::Method::GET && path == "/healthz" {
        return Ok(reply(StatusCode::OK, name, "ok\n".to_string()));
    }
    let mirrored = req.headers().contains_key("x-shadowgate-mirror");
    let (status, summary, len) = match req.into_body().collect().await {
        Ok(body) => {
            let len = body.to_bytes().len();
            (
                StatusCode::OK,
                format!("{method} {path}, {len} body bytes"),
                len,
            )
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            format!("{method} {path}: cannot read the body: {e}"),
            0,
        ),
    };
    // One line per request; shadowgate marks mirrored copies with x-shadowgate-mirror.
    let mark = if mirrored { " (mirror)" } else { "" };
    println!("[{name} {addr}] {summary} -> {status}{mark}");
    // The same document from every origin, except the time it was served (noise a
    // control sees too) and, from a drifting candidate, the currency now and then.
    let n = origin.answered.fetch_add(1, Ordering::Relaxed);
    let currency = if origin.drift && n % 10 == 9 {
        "eur"
    } else {
        "EUR"
    };
    let served_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let text = format!(
        "{{\"method\":\"{method}\",\"path\":{path:?},\"body_bytes\":{len},\"price\":{{\"amount\":1999,\"currency\":\"{currency}\"}},\"served_at\":{served_at}}}\n"
    );
    let mut response = reply(status, name, text);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

fn reply(status: StatusCode, name: &str, text: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(name) {
        response.headers_mut().insert("x-origin", value);
    }
    response
}
