//! Shutdown signals: SIGTERM (kubelet, systemd) or SIGINT (a terminal).

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};

/// Installs the SIGTERM and SIGINT handlers now, and returns a future that resolves on the first
/// of them. Call it before anything slow (binding, loading AWS config): until the handlers are
/// installed, a SIGTERM kills the process instead of draining it. Needs a Tokio runtime.
pub fn shutdown() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
    })
}
