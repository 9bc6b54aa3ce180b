//! The metrics listener: `/metrics` (Prometheus text of the default registry), `/compare`
//! (verdicts as JSON) and `/compare.html` (the same for people). Anything else is 404.

use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::{HttpServer, ServeHttp};
use pingora_core::modules::http::compression::ResponseCompressionBuilder;
use pingora_core::protocols::http::ServerSession;
use pingora_core::services::listening::Service;
use pingora_prometheus::prometheus::{self, Encoder, TextEncoder};

use super::{registry, report};
use crate::metrics::Metrics;

/// Serves the metrics listener's pages.
pub struct AdminApp;

fn respond(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut response = Response::new(body);
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    let len = response.body().len();
    response
        .headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    response
}

/// The current verdicts of every comparing mirror.
fn snapshot() -> report::Report {
    let comparators = registry().lock().map(|c| c.clone()).unwrap_or_default();
    report::build(&comparators)
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/metrics" => {
                // Set at scrape time, not at startup: a background task may run after the
                // listener already answers, and the pid must be the serving process's.
                Metrics::global().record_process_info();
                let encoder = TextEncoder::new();
                let mut buffer = Vec::new();
                match encoder.encode(&prometheus::gather(), &mut buffer) {
                    Ok(()) => respond(200, encoder.format_type(), buffer),
                    Err(e) => respond(500, "text/plain", format!("{e}\n").into_bytes()),
                }
            }
            "/compare" => match serde_json::to_vec_pretty(&snapshot()) {
                Ok(body) => respond(200, "application/json", body),
                Err(e) => respond(500, "text/plain", format!("{e}\n").into_bytes()),
            },
            "/compare.html" => respond(
                200,
                "text/html; charset=utf-8",
                report::html(&snapshot()).into_bytes(),
            ),
            _ => respond(
                404,
                "text/plain",
                b"not found; try /metrics, /compare or /compare.html\n".to_vec(),
            ),
        }
    }
}

/// The listening service for the metrics address.
pub fn service() -> Service<HttpServer<AdminApp>> {
    let mut server = HttpServer::new_app(AdminApp);
    // Gzip for clients that ask, as the stock Prometheus service did.
    server.add_module(ResponseCompressionBuilder::enable(7));
    Service::new("metrics and verdicts HTTP".to_string(), server)
}
