//! Logs through `tracing-subscriber`: text or JSON on stdout, the filter from `log.level`
//! (`TOKENWARDEN_LOG`), reloadable on SIGHUP.
//!
//! Nothing logged may carry a secret: secrets are [`crate::secret::Secret`]s, whose `Debug`
//! is `[redacted]`, and errors are built from codes and descriptions, never from request
//! bodies.
//!
//! One event is one line: in text logs every field and message is written through
//! [`crate::text::escape_control`], so a tenant id with a newline cannot forge a second line
//! (JSON logs escape control characters as JSON does).

use std::fmt::Write as _;

use tracing::field::Field;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// Changes the log filter of a running process.
#[derive(Clone)]
pub struct LogHandle(Option<reload::Handle<EnvFilter, Registry>>);

impl LogHandle {
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let Some(h) = &self.0 else { return Ok(()) };
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        h.reload(filter).map_err(|e| e.to_string())
    }
}

/// Installs the global subscriber; a second call (tests) leaves the first in place.
pub fn init(level: &str, format: LogFormat) -> LogHandle {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stdout),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_ansi(false)
                    .fmt_fields(escaped_fields())
                    .with_writer(std::io::stdout),
            )
            .try_init(),
    };
    LogHandle(installed.ok().map(|_| handle))
}

/// Text-log fields as `name=value`, the message bare, control characters escaped.
fn escaped_fields() -> impl for<'w> fmt::FormatFields<'w> + Send + Sync + 'static {
    fmt::format::debug_fn(
        |w: &mut Writer<'_>, field: &Field, value: &dyn std::fmt::Debug| {
            let mut rendered = String::new();
            let _ = write!(rendered, "{value:?}");
            let rendered = crate::text::escape_control(&rendered);
            if field.name() == "message" {
                w.write_str(&rendered)
            } else {
                write!(w, "{}={}", field.name(), rendered)
            }
        },
    )
    .delimited(" ")
}
