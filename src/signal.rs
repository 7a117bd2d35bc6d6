//! Process signals: SIGTERM/SIGINT end the program, SIGHUP reloads the configuration.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Cancels `token` on the first SIGTERM or SIGINT.
///
/// # Errors
/// The handlers cannot be installed.
pub fn cancel_on_shutdown(token: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received: shutting down"),
            _ = int.recv() => info!("SIGINT received: shutting down"),
            _ = t.cancelled() => {}
        }
        token.cancel();
    });
    Ok(())
}

/// A channel that receives one message per SIGHUP.
///
/// # Errors
/// The handler cannot be installed.
pub fn hangups(cancel: CancellationToken) -> std::io::Result<mpsc::Receiver<()>> {
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = hup.recv() => {
                    if r.is_none() { break; }
                    let _ = tx.try_send(());
                }
            }
        }
    });
    Ok(rx)
}
