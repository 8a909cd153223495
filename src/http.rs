//! The one HTTP listener (SPEC 4): `/metrics`, `/healthz`, `/readyz`.
//!
//! `/metrics` renders the recorder's counters and histograms and, at scrape time, the state
//! gauges from the fleet. `/healthz` is 503 when the engine loop has not turned for
//! `http.stuck_after_secs` (so Kubernetes restarts a stuck process); `/readyz` is 200 only
//! while Redis answers and the first registry scan has completed.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::telemetry::metrics::{render_state, ScrapeState};

/// Serves until `cancel`.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<Context>,
    prometheus: PrometheusHandle,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let ctx = Arc::clone(&ctx);
        let prometheus = prometheus.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let ctx = Arc::clone(&ctx);
                let prometheus = prometheus.clone();
                async move { Ok::<_, Infallible>(route(&req, &ctx, &prometheus)) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = conn => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "http connection ended with an error");
                    }
                }
            }
        });
    }
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

fn route(
    req: &Request<Incoming>,
    ctx: &Context,
    prometheus: &PrometheusHandle,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render_metrics(ctx, prometheus),
        ),
        "/healthz" => {
            let cfg = ctx.config();
            let since = ctx.status.since_heartbeat_ms();
            let bound =
                i64::try_from(cfg.http.stuck_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
            if since <= bound {
                text(StatusCode::OK, "text/plain", "ok\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("scheduler loop stuck for {} ms\n", since),
                )
            }
        }
        "/readyz" => {
            if ctx.status.ready() {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            } else if !ctx.status.redis_up() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "redis unreachable\n".into(),
                )
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "first registry scan not done\n".into(),
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// The full exposition: recorder output plus the scrape-time state gauges.
pub fn render_metrics(ctx: &Context, prometheus: &PrometheusHandle) -> String {
    let cfg = ctx.config();
    let mut out = prometheus.render();
    let state = ScrapeState {
        redis_up: ctx.status.redis_up(),
        per_provider_series: cfg.metrics.per_provider_series,
        max_provider_series: cfg.metrics.max_provider_series,
        failing_after: cfg.refresh.failing_after,
        queue_len: ctx.status.queue_len.load(Ordering::Relaxed),
    };
    let fleet = ctx.fleet.read();
    render_state(&mut out, &fleet, &state);
    out
}
