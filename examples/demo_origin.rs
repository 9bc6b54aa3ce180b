//! A tiny HTTP origin for trying shadowgate out: `cargo run --example demo_origin -- NAME ADDR [ADDR...]`.
//! Answers every request with `hello from NAME (ADDR): METHOD PATH, N body bytes` and logs it.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((name, addrs)) = args.split_first().filter(|(_, addrs)| !addrs.is_empty()) else {
        eprintln!("usage: demo_origin NAME ADDR [ADDR...]   e.g. demo_origin app 127.0.0.1:9001");
        std::process::exit(2);
    };
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
        servers.push(tokio::spawn(serve(name.clone(), addr, listener)));
    }
    for server in servers {
        let _ = server.await;
    }
}

async fn serve(name: String, addr: SocketAddr, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("{name} {addr}: accept failed: {e}");
                continue;
            }
        };
        let name = name.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, name.clone(), addr));
            // A client that goes away mid-request is not worth a log line.
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    name: String,
    addr: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // Health checks come every second: answer them without logging.
    if method == hyper::Method::GET && path == "/healthz" {
        return Ok(reply(StatusCode::OK, &name, "ok\n".to_string()));
    }
    let mirrored = req.headers().contains_key("x-shadowgate-mirror");
    let (status, summary) = match req.into_body().collect().await {
        Ok(body) => {
            let len = body.to_bytes().len();
            (StatusCode::OK, format!("{method} {path}, {len} body bytes"))
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            format!("{method} {path}: cannot read the body: {e}"),
        ),
    };
    // One line per request; shadowgate marks mirrored copies with x-shadowgate-mirror.
    let mark = if mirrored { " (mirror)" } else { "" };
    println!("[{name} {addr}] {summary} -> {status}{mark}");
    let text = format!("hello from {name} ({addr}): {summary}\n");
    Ok(reply(status, &name, text))
}

fn reply(status: StatusCode, name: &str, text: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(name) {
        response.headers_mut().insert("x-origin", value);
    }
    response
}
