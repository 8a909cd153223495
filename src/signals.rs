//! Signals become domain events here, and nowhere else: SIGTERM and SIGINT ask for shutdown,
//! SIGHUP for a configuration reload (through `signal-hook`).

use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::mpsc;

/// What a signal means to tokenwarden.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Shutdown,
    Reload,
}

/// Starts listening; events arrive on the returned channel.
pub fn listen() -> std::io::Result<mpsc::Receiver<Event>> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Some(sig) = signals.next().await {
            let event = if sig == SIGHUP {
                Event::Reload
            } else {
                Event::Shutdown
            };
            if tx.send(event).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}
