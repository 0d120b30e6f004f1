//! The HTTP/1 server loop shared by every listener of every program (the mirror, the ops
//! listeners, the node agent and the webhook).
//!
//! It takes an already-bound listener and a shutdown future, so tests bind `127.0.0.1:0` and
//! stop it at will (mini-redis `server::run`). On shutdown it stops accepting at once, lets
//! in-flight requests (a blob halfway through, say) finish, and gives up after the grace period
//! (hyper-util's `GracefulShutdown` under a timeout, as linkerd drains).
//!
//! It is also the first line against bad input on the wire. hyper refuses what it cannot parse
//! (oversize heads and header floods with 431, malformed framing with 400) and closes; this loop
//! adds what hyper leaves to the application, from `[server]` ([`Limits`]):
//! - a deadline for each request head (`header_read_timeout`), which also closes idle
//!   keep-alive connections, so a slowloris client holds a connection for a bounded time;
//! - a cap on open connections per listener (`max_connections`). Over it, a connection is
//!   answered `503 UNAVAILABLE` at once and closed, as long as a small budget of such refusals
//!   is in progress ([`REJECTING_MAX`]), and simply closed beyond that. containerd treats both
//!   like any mirror failure and pulls from the next host, which beats a pull that hangs in the
//!   accept queue of a saturated mirror;
//! - a refusal (400, connection closed) of a GET or HEAD that announces a request body, which
//!   a pull mirror never reads: hyper settles `Content-Length` against `Transfer-Encoding`
//!   itself, so this keeps every smuggling-shaped request away from the handlers.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use toml::Spanned;

use crate::body::{BodyError, ResponseBody};
use crate::config::error::{ConfigError, Locator};
use crate::oci::ErrorCode;

/// The most a connection buffers for writing (and for reading a request head). Together with
/// [`crate::mirror::forward::UPSTREAM_READ_BUF`] this bounds the memory of a streamed blob to about
/// 128 KiB, so many concurrent pulls stay small; hyper's default is 400 KiB.
pub const MAX_BUF: usize = 64 * 1024;

/// The largest request head (request line and headers) accepted; a larger one gets 431. A
/// registry client's head is well under 4 KiB (the longest part is containerd's `Accept` list).
/// hyper's buffer limit alone lets a head grow past [`MAX_BUF`] when it arrives in few reads.
pub const MAX_HEAD: usize = 32 * 1024;

/// At most this many header lines (hyper's default, stated here); more get 431.
pub const MAX_HEADERS: usize = 100;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Something that answers requests and never fails.
pub trait Handler: Send + Sync + 'static {
    /// The response body.
    type Body: Body<Data = Bytes, Error = BodyError> + Send + Unpin + 'static;
    /// Answers one request.
    fn call(&self, req: Request<Incoming>) -> BoxFuture<Response<Self::Body>>;
}

/// Default `server.header_read_timeout`: hyper's own default, generous for any real client.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `server.max_connections` per listener. containerd and the kubelet keep a few
/// connections per pull (one per parallel layer, plus idle keep-alives); even 50 parallel pulls
/// stay far below this, while a flood stops well before a node's file-descriptor limit. With at
/// most [`MAX_BUF`] of buffers per busy connection the cap also bounds memory.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Largest `server.max_connections` accepted.
pub const MAX_MAX_CONNECTIONS: usize = 100_000;
/// How many over-the-limit connections may be in the middle of getting their 503 at once;
/// beyond this they are closed at once, so a flood costs no more than this many extra sockets.
pub const REJECTING_MAX: usize = 64;
/// How long an over-the-limit connection may take to send its request head before it is
/// closed without an answer. A client that wants one writes its request right after connecting.
pub const REJECT_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// `[server]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    header_read_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    worker_threads: Option<Spanned<i64>>,
}

/// `[server]`: connection limits of each listener, and the size of the long-running commands'
/// async runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a client may take to send a request head, counted from the connection's start
    /// or from the end of its previous response; then the connection is closed without answer.
    pub header_read_timeout: Duration,
    /// Open connections per listener; more are refused with 503 (see the module docs).
    pub max_connections: usize,
    /// Worker threads of `serve`'s and `webhook`'s runtime; `None` means one per CPU the process
    /// may use ([`worker_threads`]).
    pub worker_threads: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            worker_threads: None,
        }
    }
}

/// Validates `[server]`.
pub(crate) fn validate(raw: &RawServer, at: Locator<'_>) -> Result<Limits, ConfigError> {
    let defaults = Limits::default();
    let header_read_timeout = at.positive_duration(
        &raw.header_read_timeout,
        "server.header_read_timeout",
        defaults.header_read_timeout,
    )?;
    let max_connections = at
        .count(
            &raw.max_connections,
            "server.max_connections",
            MAX_MAX_CONNECTIONS,
            |n| format!("{n} is out of range: 1 to {MAX_MAX_CONNECTIONS} connections per listener"),
        )?
        .unwrap_or(defaults.max_connections);
    let worker_threads = at.count(
        &raw.worker_threads,
        "server.worker_threads",
        MAX_WORKER_THREADS,
        |n| {
            format!(
                "{n} is out of range: 1 to {MAX_WORKER_THREADS} threads (leave it out for one \
                 per CPU)"
            )
        },
    )?;
    Ok(Limits {
        header_read_timeout,
        max_connections,
        worker_threads,
    })
}

/// Largest `server.worker_threads` accepted.
pub const MAX_WORKER_THREADS: usize = 1024;

/// How many worker threads the runtime of a command that serves traffic gets: `configured`, or
/// one per CPU this process may use. `available_parallelism` follows the cgroup's CPU quota and
/// the affinity mask, so a container limited to 2 CPUs on a 96-vCPU node gets 2 threads. Idle
/// workers park and cost only their stacks' touched pages.
pub fn worker_threads(configured: Option<usize>) -> usize {
    configured.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A request the server answers itself, before any handler sees it. Each becomes an OCI error
/// through [`crate::oci::error_response`], with `Connection: close`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// A GET or HEAD that announces a body: no client of a pull mirror sends one, and a body
    /// the server never reads is what request smuggling hides in.
    #[error("a {method} request must not carry {header}: this server reads no request body")]
    BodyOnRead {
        /// GET or HEAD.
        method: String,
        /// The offending header and value.
        header: String,
    },
    /// The listener is at `server.max_connections`.
    #[error("over {0} open connections: try the next registry host")]
    Overloaded(usize),
}

impl Refused {
    /// Checks the framing of a request head (hyper has already refused what is malformed).
    pub fn check(method: &Method, headers: &http::HeaderMap) -> Result<(), Refused> {
        if method != Method::GET && method != Method::HEAD {
            return Ok(());
        }
        let refuse = |header: String| {
            Err(Refused::BodyOnRead {
                method: method.to_string(),
                header,
            })
        };
        if let Some(te) = headers.get(TRANSFER_ENCODING) {
            return refuse(format!("Transfer-Encoding: {}", clip(te)));
        }
        let lengths: Vec<&HeaderValue> = headers.get_all(CONTENT_LENGTH).iter().collect();
        match lengths.as_slice() {
            [] => Ok(()),
            [one] if one.as_bytes() == b"0" => Ok(()),
            [one] => refuse(format!("Content-Length: {}", clip(one))),
            _ => refuse("more than one Content-Length".to_owned()),
        }
    }

    /// The status and OCI code.
    pub fn classify(&self) -> (StatusCode, ErrorCode) {
        match self {
            Refused::BodyOnRead { .. } => (StatusCode::BAD_REQUEST, ErrorCode::Unsupported),
            Refused::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
        }
    }

    /// The response, which also makes hyper close the connection after it.
    pub fn into_response(self, head: bool) -> Response<ResponseBody> {
        let (status, code) = self.classify();
        tracing::debug!(error = %self, "refused request");
        let mut resp = crate::oci::error_response(status, code, &self.to_string(), head);
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        resp
    }
}

/// What a connection answers with: the handler's body, or one of the server's own refusals.
pub enum ServerBody<B> {
    /// From the handler.
    Handler(B),
    /// A [`Refused`] answer.
    Refusal(ResponseBody),
}

impl<B> Body for ServerBody<B>
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ServerBody::Handler(b) => Pin::new(b).poll_frame(cx),
            ServerBody::Refusal(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ServerBody::Handler(b) => b.is_end_stream(),
            ServerBody::Refusal(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ServerBody::Handler(b) => b.size_hint(),
            ServerBody::Refusal(b) => b.size_hint(),
        }
    }
}

/// A header value for an error message: bounded, and lossy for non-ASCII.
fn clip(v: &HeaderValue) -> String {
    String::from_utf8_lossy(v.as_bytes())
        .chars()
        .take(40)
        .collect()
}

/// Serves `handler` on `listener` until `shutdown` resolves, then drains for at most `grace`.
/// Returns whether every connection finished within the grace period. `limits` is `[server]` of
/// the config; every listener of every command honours it.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    limits: Limits,
) -> bool {
    serve_with(
        listener,
        handler,
        shutdown,
        grace,
        limits,
        |stream, _peer| async move { Some(stream) },
    )
    .await
}

/// A stream HTTP is served on: a TCP stream or a TLS session.
pub trait Connection:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static
{
}

impl Connection for TcpStream {}

impl Connection for tokio_rustls::server::TlsStream<TcpStream> {}

/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// [`serve`] over TLS: each accepted connection is handshaken with `acceptor` (in its
/// own task, so a slow client holds up no one) and then served like a plain one. Drains the same
/// way.
pub async fn serve_tls<H: Handler>(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    limits: Limits,
) -> bool {
    serve_with(
        listener,
        handler,
        shutdown,
        grace,
        limits,
        move |stream, peer| {
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
        },
    )
    .await
}

/// The accept loop behind [`serve`] and [`serve_tls`]: `open` turns an accepted socket into the
/// stream HTTP runs on (itself, or a TLS session), in the connection's own task, or into nothing
/// to drop it.
async fn serve_with<H, O, F, S>(
    listener: TcpListener,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    limits: Limits,
    open: O,
) -> bool
where
    H: Handler,
    O: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = Option<S>> + Send + 'static,
    S: Connection,
{
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let rejecting = Arc::new(Semaphore::new(REJECTING_MAX));
    let mut overload = OverloadLog::default();
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
                // Taken now, so a connection still opening at shutdown is waited for too.
                let watcher = graceful.watcher();
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    let answering = Arc::clone(&rejecting).try_acquire_owned().ok();
                    overload.note(limits.max_connections, answering.is_some());
                    let Some(answering) = answering else {
                        // Closed at once: the flood is past what is worth answering.
                        drop(stream);
                        continue;
                    };
                    let opening = open(stream, peer);
                    let limit = limits.max_connections;
                    let read_timeout = limits.header_read_timeout.min(REJECT_READ_TIMEOUT);
                    tokio::spawn(async move {
                        let _answering = answering;
                        let Some(io) = opening.await else { return };
                        let svc = service_fn(move |req: Request<Incoming>| {
                            let head = req.method() == Method::HEAD;
                            let resp = Refused::Overloaded(limit).into_response(head);
                            async move { Ok::<_, Infallible>(resp) }
                        });
                        let conn = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .keep_alive(false)
                            .max_buf_size(MAX_BUF)
                            .max_header_size(MAX_HEAD)
                            .max_headers(MAX_HEADERS)
                            .header_read_timeout(read_timeout)
                            .serve_connection(TokioIo::new(io), svc);
                        let _ = watcher.watch(conn).await;
                    });
                    continue;
                };
                let h = Arc::clone(&handler);
                let opening = open(stream, peer);
                let read_timeout = limits.header_read_timeout;
                tokio::spawn(async move {
                    let _slot = slot;
                    let Some(io) = opening.await else { return };
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let refused = Refused::check(req.method(), req.headers());
                        let fut = match refused {
                            Ok(()) => Ok(h.call(req)),
                            Err(r) => Err(r.into_response(req.method() == Method::HEAD)),
                        };
                        async move {
                            Ok::<_, Infallible>(match fut {
                                Ok(fut) => fut.await.map(ServerBody::Handler),
                                Err(refusal) => refusal.map(ServerBody::Refusal),
                            })
                        }
                    });
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .max_buf_size(MAX_BUF)
                        .max_header_size(MAX_HEAD)
                        .max_headers(MAX_HEADERS)
                        .header_read_timeout(read_timeout)
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

/// Logs refused connections at most every [`OverloadLog::EVERY`], with counts, so a flood
/// shows in the log without flooding it.
#[derive(Default)]
struct OverloadLog {
    last: Option<tokio::time::Instant>,
    answered: u64,
    closed: u64,
}

impl OverloadLog {
    const EVERY: Duration = Duration::from_secs(10);

    fn note(&mut self, limit: usize, answered: bool) {
        if answered {
            self.answered += 1;
        } else {
            self.closed += 1;
        }
        let now = tokio::time::Instant::now();
        if self
            .last
            .is_none_or(|t| now.duration_since(t) >= Self::EVERY)
        {
            tracing::warn!(
                max_connections = limit,
                answered_503 = self.answered,
                closed = self.closed,
                "connection limit reached: refusing new connections (server.max_connections)"
            );
            self.last = Some(now);
            self.answered = 0;
            self.closed = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use rstest::rstest;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[rstest]
    #[case::plain_get("GET", &[], true)]
    #[case::get_zero_length("GET", &[("content-length", "0")], true)]
    #[case::get_with_body("GET", &[("content-length", "5")], false)]
    #[case::head_with_body("HEAD", &[("content-length", "1")], false)]
    #[case::get_chunked("GET", &[("transfer-encoding", "chunked")], false)]
    #[case::get_te_other("GET", &[("transfer-encoding", "gzip, chunked")], false)]
    #[case::duplicate_length("GET", &[("content-length", "0"), ("content-length", "0")], false)]
    #[case::post_with_body("POST", &[("content-length", "5")], true)]
    #[case::post_chunked("POST", &[("transfer-encoding", "chunked")], true)]
    fn framing(#[case] method: &str, #[case] h: &[(&str, &str)], #[case] ok: bool) {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let got = Refused::check(&method, &headers(h));
        assert_eq!(got.is_ok(), ok, "{got:?}");
    }

    #[tokio::test]
    async fn refusals_are_oci_errors_that_close_the_connection() {
        use http_body_util::BodyExt;
        let r = Refused::check(&Method::GET, &headers(&[("transfer-encoding", "chunked")]));
        let resp = r.unwrap_err().into_response(false);
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.headers()[CONNECTION], "close");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "UNSUPPORTED");

        let resp = Refused::Overloaded(8).into_response(true);
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[CONNECTION], "close");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(body.is_empty(), "HEAD gets headers only");
    }

    #[test]
    fn limits_default_and_parse() {
        let c = Config::from_toml_str("", "p.toml").unwrap();
        assert_eq!(c.server, Limits::default());
        let c = Config::from_toml_str(
            "[server]\nheader_read_timeout = \"500ms\"\nmax_connections = 16\n",
            "p.toml",
        )
        .unwrap();
        assert_eq!(
            c.server,
            Limits {
                header_read_timeout: Duration::from_millis(500),
                max_connections: 16,
                worker_threads: None,
            }
        );
        let c = Config::from_toml_str("[server]\nworker_threads = 3\n", "p.toml").unwrap();
        assert_eq!(c.server.worker_threads, Some(3));
        assert_eq!(worker_threads(Some(3)), 3);
        assert!(worker_threads(None) >= 1);
    }

    #[rstest]
    #[case::zero_timeout(
        "[server]\nheader_read_timeout = \"0s\"\n",
        "p.toml:2: server.header_read_timeout: \"0s\" is not a positive duration"
    )]
    #[case::bad_timeout(
        "[server]\n\nheader_read_timeout = \"soon\"\n",
        "p.toml:3: server.header_read_timeout: \"soon\" is not a positive duration"
    )]
    #[case::zero_connections(
        "[server]\nmax_connections = 0\n",
        "p.toml:2: server.max_connections: 0 is out of range: 1 to 100000"
    )]
    #[case::negative_connections(
        "[server]\nmax_connections = -1\n",
        "p.toml:2: server.max_connections: -1 is out of range"
    )]
    #[case::huge_connections(
        "[server]\nmax_connections = 100001\n",
        "p.toml:2: server.max_connections: 100001 is out of range"
    )]
    #[case::string_connections(
        "[server]\nmax_connections = \"many\"\n",
        "p.toml:2: server.max_connections: invalid type"
    )]
    #[case::zero_threads(
        "[server]\nworker_threads = 0\n",
        "p.toml:2: server.worker_threads: 0 is out of range: 1 to 1024 threads"
    )]
    #[case::too_many_threads(
        "[server]\n\nworker_threads = 1025\n",
        "p.toml:3: server.worker_threads: 1025 is out of range"
    )]
    #[case::unknown_key(
        "[server]\nmax_conections = 1\n",
        "p.toml:2: server.max_conections: unknown field"
    )]
    fn bad_limits_name_file_line_and_key(#[case] text: &str, #[case] want: &str) {
        let err = Config::from_toml_str(text, "p.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err:?} does not contain {want:?}");
    }
}
