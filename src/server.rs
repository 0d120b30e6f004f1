//! The HTTP/1 server loop shared by the mirror and the ops listener.
//!
//! It takes an already-bound listener and a shutdown future, so tests bind `127.0.0.1:0` and
//! stop it at will (mini-redis `server::run`). On shutdown it stops accepting at once, lets
//! in-flight requests (a blob halfway through, say) finish, and gives up after the grace period
//! (hyper-util's `GracefulShutdown` under a timeout, as linkerd drains).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;

use tokio::net::{TcpListener, TcpStream};

/// The most a connection buffers for writing (and for reading a request head). Together with
/// [`crate::forward::UPSTREAM_READ_BUF`] this bounds the memory of a streamed blob to about
/// 128 KiB, so many concurrent pulls stay small; hyper's default is 400 KiB.
pub const MAX_BUF: usize = 64 * 1024;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Something that answers requests and never fails.
pub trait Handler: Send + Sync + 'static {
    /// The response body.
    type Body: Body<Data = Bytes, Error = crate::respond::BodyError> + Send + 'static;
    /// Answers one request.
    fn call(&self, req: Request<Incoming>) -> BoxFuture<Response<Self::Body>>;
}

/// Serves `handler` on `listener` until `shutdown` resolves, then drains for at most `grace`.
/// Returns whether every connection finished within the grace period.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> bool {
    serve_with(
        listener,
        handler,
        shutdown,
        grace,
        |stream, _peer| async move { Some(stream) },
    )
    .await
}

/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// [`serve`] over TLS: each accepted connection is handshaken with `acceptor` (in its own task,
/// so a slow client holds up no one) and then served like a plain one. Drains the same way.
pub async fn serve_tls<H: Handler>(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> bool {
    serve_with(listener, handler, shutdown, grace, move |stream, peer| {
        let acceptor = acceptor.clone();
        async move {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => Some(s),
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    None
                }
            }
        }
    })
    .await
}

/// The accept loop behind [`serve`] and [`serve_tls`]: `open` turns an accepted socket into the
/// stream HTTP runs on (itself, or a TLS session), in the connection's own task.
async fn serve_with<H, O, F, S>(
    listener: TcpListener,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    open: O,
) -> bool
where
    H: Handler,
    O: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = Option<S>> + Send + 'static,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let h = Arc::clone(&handler);
                let opening = open(stream, peer);
                // Taken now, so a connection still opening at shutdown is waited for too.
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let Some(io) = opening.await else { return };
                    let svc = service_fn(move |req| {
                        let fut = h.call(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .max_buf_size(MAX_BUF)
                        .header_read_timeout(Duration::from_secs(30))
                        .serve_connection(TokioIo::new(io), svc);
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => true,
        Err(_) => {
            tracing::warn!(?grace, "grace period over; closing remaining connections");
            false
        }
    }
}
