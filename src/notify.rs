//! systemd's notify protocol (SPEC 6, `sd_notify(3)`), through the `sd-notify` crate.
//!
//! [`Notifier`] sends `READY=1` once the first registry scan is done, `RELOADING=1` (with
//! `MONOTONIC_USEC`) and `READY=1` around a SIGHUP reload, `STOPPING=1` on SIGTERM, `STATUS=`
//! lines, and `WATCHDOG=1` pings. Outside systemd (`NOTIFY_SOCKET` unset) every call is a
//! no-op. Which task sends what is decided in [`crate::daemon`]; the watchdog pings come from
//! a task that checks the engine loop's heartbeat, so only a stuck loop stops them.

use std::time::Duration;

use sd_notify::NotifyState;

/// Sends state changes to the service manager, or nothing when there is none.
#[derive(Debug, Clone)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (the watchdog is this
    /// process's only if `WATCHDOG_PID` is unset or names it).
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty());
        let watchdog = if enabled {
            sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
        } else {
            None
        };
        Notifier { enabled, watchdog }
    }

    /// A notifier that never sends (tests, one-shot commands).
    pub fn disabled() -> Notifier {
        Notifier {
            enabled: false,
            watchdog: None,
        }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)`
    /// advises; `None` when no watchdog is set.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// `READY=1`: start-up (or a reload) is complete.
    pub fn ready(&self) {
        self.send(&[NotifyState::Ready]);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC`, which systemd 253 and later want with it.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// `WATCHDOG=1`: the scheduler loop is turning.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// `STATUS=...`: one line for `systemctl status` (control characters replaced).
    pub fn status(&self, line: &str) {
        let clean: String = line
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        self.send(&[NotifyState::Status(&clean)]);
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "cannot notify the service manager");
        }
    }
}

/// The `STATUS=` line: what `systemctl status` shows under the unit.
pub fn status_line(providers: usize, redis_up: bool, journal_pending: usize) -> String {
    format!(
        "tracking {providers} provider{}, redis {}, journal {journal_pending} pending",
        if providers == 1 { "" } else { "s" },
        if redis_up { "up" } else { "down" },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_reads_well() {
        assert_eq!(
            status_line(3, true, 0),
            "tracking 3 providers, redis up, journal 0 pending"
        );
        assert_eq!(
            status_line(1, false, 2),
            "tracking 1 provider, redis down, journal 2 pending"
        );
    }

    #[test]
    fn a_disabled_notifier_has_no_watchdog() {
        let n = Notifier::disabled();
        assert!(!n.enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready();
        n.watchdog();
    }
}
