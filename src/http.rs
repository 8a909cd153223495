//! The one HTTP listener (SPEC 4): `/metrics`, `/healthz`, `/readyz`.
//!
//! `/metrics` renders the recorder's counters and histograms and, at scrape time, the state
//! gauges from the fleet. `/healthz` is 503 when the engine loop has not turned for
//! `http.stuck_after_secs` (so Kubernetes restarts a stuck process); `/readyz` is 200 only
//! while Redis answers and the first registry scan has completed.
//!
//! The listener is exposed to whatever can reach the port, so no client can hold it:
//! - a request head must arrive within `http.header_timeout_ms` (hyper's header read
//!   timeout; a kept-alive connection waiting for its next request counts too);
//! - a connection on which no byte moves either way for `http.idle_timeout_secs` is closed
//!   (a client that stops reading a response);
//! - at most `http.max_connections` connections at once; one more is closed at once;
//! - accept errors (out of file descriptors) back off from 100 ms to 1 s, and are logged at
//!   most once a second, with the count since the last line.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::telemetry::metrics::{render_state, ScrapeState};

/// First pause after a failed accept; doubled per failure up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(100);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A warning that is written at most once per `every`, with the count of the ones held back.
#[derive(Debug)]
pub struct RateLimited {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl RateLimited {
    pub fn new(every: Duration) -> RateLimited {
        RateLimited {
            every,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(n)` when a line is due now: `n` occurrences since the last line, this one
    /// included; `None` when this one is held back.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.held_back += 1;
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < self.every)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

/// Serves until `cancel`.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<Context>,
    prometheus: PrometheusHandle,
    cancel: CancellationToken,
) {
    let cap = ctx.config().http.max_connections;
    let slots = Arc::new(Semaphore::new(cap));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut accept_errors = RateLimited::new(Duration::from_secs(1));
    let mut refused = RateLimited::new(Duration::from_secs(1));
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                stream
            }
            Err(e) => {
                if let Some(n) = accept_errors.hit(Instant::now()) {
                    tracing::warn!(error = %e, count = n, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            if let Some(n) = refused.hit(Instant::now()) {
                tracing::warn!(
                    max_connections = cap,
                    count = n,
                    "http connection refused: http.max_connections reached"
                );
            }
            drop(stream);
            continue;
        };
        let ctx = Arc::clone(&ctx);
        let prometheus = prometheus.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            serve_connection(stream, ctx, prometheus, cancel).await;
            drop(permit);
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    ctx: Arc<Context>,
    prometheus: PrometheusHandle,
    cancel: CancellationToken,
) {
    let (header_timeout, idle_timeout) = {
        let cfg = ctx.config();
        (
            Duration::from_millis(cfg.http.header_timeout_ms),
            Duration::from_secs(cfg.http.idle_timeout_secs),
        )
    };
    let started = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let io = Watched {
        inner: stream,
        started,
        last: Arc::clone(&activity),
    };
    let service = service_fn(move |req| {
        let ctx = Arc::clone(&ctx);
        let prometheus = prometheus.clone();
        async move { Ok::<_, Infallible>(route(&req, &ctx, &prometheus)) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service);
    let idle = async {
        loop {
            let last = Duration::from_millis(activity.load(Ordering::Relaxed));
            let quiet = started.elapsed().saturating_sub(last);
            if quiet >= idle_timeout {
                return;
            }
            tokio::time::sleep(idle_timeout - quiet).await;
        }
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = idle => tracing::debug!("http connection idle: closed"),
        r = conn => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        }
    }
}

/// A stream that notes when a byte last moved, for the idle timeout.
struct Watched {
    inner: TcpStream,
    started: Instant,
    /// Milliseconds after `started` of the last read or write.
    last: Arc<AtomicU64>,
}

impl Watched {
    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
        journal_pending: ctx.status.journal_pending.load(Ordering::Relaxed),
        replicas: ctx.status.replicas.load(Ordering::Relaxed),
        expiring_window_secs: i64::from(cfg.metrics.expiring_window_secs),
        now: chrono::Utc::now(),
    };
    let fleet = ctx.fleet.read();
    render_state(&mut out, &fleet, &state);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_lines_carry_the_count() {
        let mut r = RateLimited::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(r.hit(t0), Some(1));
        for i in 1..1000 {
            assert_eq!(r.hit(t0 + Duration::from_micros(i)), None);
        }
        assert_eq!(r.hit(t0 + Duration::from_secs(1)), Some(1000));
        assert_eq!(r.hit(t0 + Duration::from_millis(1500)), None);
    }
}
