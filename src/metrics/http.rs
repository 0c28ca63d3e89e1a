//! The metrics listener: its own TCP socket (so it can stay on loopback
//! while builds are served elsewhere), plain HTTP/1.1, `GET /metrics` (and
//! `HEAD`) answered with the Prometheus text; another method on `/metrics`
//! is 405; `GET /healthz` is the host's state for load balancers
//! ([`crate::server::health`]: 200 `serving`, 503 otherwise); any other
//! path 404.
//!
//! Bounded like any listener facing the network: at most
//! [`MAX_CONNECTIONS`] at once (more are closed at once), request headers
//! within [`HEADER_TIMEOUT`], a connection at most [`CONNECTION_LIFETIME`]
//! (Prometheus reconnects). [`serve`] ends when its shutdown token is
//! cancelled, and closes every connection still open.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::metrics::gauges::{self, Sources};
use crate::metrics::{Metrics, MetricsError, CONTENT_TYPE};
use crate::server::health::HostState;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection may stay open.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| MetricsError::Bind(addr.to_string(), e))
}

/// Serves `metrics` (its gauges read from `sources`) on `listener` until
/// `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    sources: Sources,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving metrics at /metrics");
    }
    // The embedded store counts its blobs by walking it once, when first
    // asked: ask now, so the first scrape finds the walk done.
    let _ = sources.store.blobs.stats();
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, or a connection reset before accept:
                // pause a little rather than spin.
                tracing::warn!(error = %e, "accepting a metrics connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if connections.len() >= MAX_CONNECTIONS {
            continue;
        }
        let (metrics, sources) = (metrics.clone(), sources.clone());
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (metrics, sources) = (metrics.clone(), sources.clone());
                async move { Ok::<_, Infallible>(answer(&req, &metrics, &sources).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            // An error is the client's (a bad request, a reset): nothing to do.
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
    }
    connections.shutdown().await;
}

/// The answer to one request.
async fn answer(
    req: &Request<Incoming>,
    metrics: &Metrics,
    sources: &Sources,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/healthz" {
        return healthz(sources);
    }
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    gauges::refresh(metrics, sources).await;
    match metrics.encode() {
        Ok(text) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(CONTENT_TYPE),
            );
            response
        }
        Err(e) => {
            tracing::warn!(error = %e, "encoding the metrics");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics could not be encoded\n",
            )
        }
    }
}

/// The host's state for load balancers: 200 `serving` or `full` (a full
/// host still queues builds; the body says which), 503 `draining` or
/// `stopped`.
fn healthz(sources: &Sources) -> Response<Full<Bytes>> {
    let Some(health) = &sources.health else {
        return plain(StatusCode::NOT_FOUND, "this server reports no health\n");
    };
    let state = health.state();
    let status = if state.is_up() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let text = match state {
        HostState::Serving => "serving\n",
        HostState::Full => "full\n",
        HostState::Draining => "draining\n",
        HostState::Stopped => "stopped\n",
    };
    plain(status, text)
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
