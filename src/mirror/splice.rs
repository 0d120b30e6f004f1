//! Zero-copy blob bodies: `splice(2)` from the ECR socket, through a pipe, into the client's
//! socket, for blob GETs to a plain-HTTP endpoint (Linux only).
//!
//! Through hyper, every byte of a blob is copied out of the kernel and back in, and those two
//! copies are most of what a blob stream costs (`BENCHMARKS.md`: over 90 % of the proxy's CPU
//! time is the kernel's `_copy_to_iter` and `_copy_from_iter`). hyper owns both connections and
//! cannot hand a socket over in the middle of a response, so this module splits the work:
//! - hyper still parses the request and writes the response head, framing and keep-alive. The
//!   body it is given ([`SpliceBody`]) is made of *placeholder* chunks: slices of one static
//!   buffer that nobody ever reads. Each chunk stands for bytes that the body has just spliced
//!   from the upstream socket into the connection's pipe.
//! - The client connection's IO ([`SpliceIo`]) knows a placeholder by its address. Instead of
//!   writing it, it splices as many bytes from the pipe into the socket. hyper's vectored write
//!   queue keeps chunks in order and never copies them (`writev(true)`), so the pipe and the
//!   placeholders always line up. A placeholder that finds the pipe short fails the connection:
//!   a client gets an aborted body, which it retries or takes elsewhere, never zeros.
//! - The upstream side is [`Client`]: one HTTP/1.1 GET on a pooled connection, with only the
//!   response head parsed here. Only a 200 or 206 framed by `Content-Length` is spliced; the
//!   caller maps errors (and retries a 401 with a new token) as on hyper's path, and sends a
//!   redirect or a body without a length down hyper's path instead.
//!
//! Everything the hyper path guarantees still holds: the header allow-lists (the caller builds
//! both header sets with [`super::forward`]), the byte count of the access log, the idle
//! timeout on the upstream, and an aborted client connection when the upstream fails mid-body.
//! TLS endpoints (ECR itself) cannot be spliced, since the bytes must be decrypted; there, and
//! for everything that is not a blob, nothing changes.

use std::io::{self, IoSlice};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HeaderName, HeaderValue, TRANSFER_ENCODING};
use http::{HeaderMap, StatusCode, Uri};
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;

use super::forward::{BodyStalled, ForwardError};
use crate::body::BodyError;

/// The most one placeholder chunk, and so one splice from the upstream, carries. The pipe is
/// asked for this capacity too; four times the default means a quarter of the wakeups.
pub const CHUNK: usize = 256 * 1024;

/// The placeholder buffer. Never read: only its address matters. Allocated zeroed (so `calloc`
/// maps fresh pages that are never touched and never resident) rather than a `static`, which
/// would add its size to the binary's mapped pages.
fn placeholder_buffer() -> &'static [u8] {
    static BUFFER: OnceLock<&'static [u8]> = OnceLock::new();
    BUFFER.get_or_init(|| Vec::leak(vec![0u8; CHUNK]))
}

/// The largest response head accepted from the endpoint.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// At most this many response header lines.
const MAX_RESPONSE_HEADERS: usize = 64;
/// Idle upstream connections kept for reuse. Beyond it a finished connection is closed.
const MAX_IDLE: usize = 32;
/// An idle connection older than this is closed instead of reused: under the ~60 s idle timeout
/// of load balancers and NAT on the way, as for hyper's pool in [`super::forward`].
const IDLE_FOR: Duration = Duration::from_secs(50);

/// Whether `buf` is (part of) a placeholder chunk.
pub fn is_placeholder(buf: &[u8]) -> bool {
    !buf.is_empty() && placeholder_buffer().as_ptr_range().contains(&buf.as_ptr())
}

fn placeholder(n: usize) -> Bytes {
    let buffer = placeholder_buffer();
    Bytes::from_static(&buffer[..n.min(buffer.len())])
}

/// The pipe of one client connection, shared by its IO and the body being sent on it.
#[derive(Clone, Debug, Default)]
pub struct Slot(Arc<Mutex<Pipeline>>);

#[derive(Debug, Default)]
struct Pipeline {
    /// Created on the first spliced body.
    pipe: Option<Pipe>,
    /// Bytes in the pipe: exactly the placeholder bytes hyper holds and has not written yet.
    queued: usize,
    /// The body, waiting for the pipe to empty before it splices more into it.
    waiting: Option<Waker>,
    /// A body was dropped before its end: the pipe may no longer match hyper's placeholders.
    broken: bool,
}

#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // Best effort: a system at its pipe-size limit leaves 64 KiB, which only means more
        // (smaller) splices.
        let _ = rustix::pipe::fcntl_setpipe_size(&write, CHUNK);
        Ok(Self { read, write })
    }
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, Pipeline> {
        // Nothing panics while holding it; should it, the state is still consistent counters.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A plain-TCP client connection whose writes of placeholder chunks come from its pipe.
#[derive(Debug)]
pub struct SpliceIo {
    stream: TcpStream,
    slot: Slot,
}

impl SpliceIo {
    /// Wraps an accepted connection.
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            slot: Slot::default(),
        }
    }

    /// The slot a [`SpliceBody`] for a response on this connection needs.
    pub fn slot(&self) -> Slot {
        self.slot.clone()
    }

    /// Moves up to `len` bytes of the pipe into the socket, for a placeholder of that length.
    fn poll_send_pipe(&self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            let mut p = self.slot.lock();
            let Some(pipe) = p.pipe.as_ref().filter(|_| !p.broken && p.queued >= len) else {
                return Poll::Ready(Err(io::Error::other(
                    "splice: the pipe does not hold the body bytes being written",
                )));
            };
            let moved = self.stream.try_io(Interest::WRITABLE, || {
                Ok(rustix::pipe::splice(
                    &pipe.read,
                    None,
                    &self.stream,
                    None,
                    len,
                    SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
                )?)
            });
            match moved {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    p.queued -= n;
                    if p.queued == 0
                        && let Some(w) = p.waiting.take()
                    {
                        w.wake();
                    }
                    return Poll::Ready(Ok(n));
                }
                // The socket is full; `poll_write_ready` registers for when it drains.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for SpliceIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SpliceIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if is_placeholder(buf) {
            this.poll_send_pipe(cx, buf.len())
        } else {
            Pin::new(&mut this.stream).poll_write(cx, buf)
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Real bytes up to the first placeholder go out as they are; a short write is fine,
        // hyper comes back for the rest.
        match bufs.iter().position(|b| is_placeholder(b)) {
            Some(0) => this.poll_send_pipe(cx, bufs[0].len()),
            Some(k) => Pin::new(&mut this.stream).poll_write_vectored(cx, &bufs[..k]),
            None => Pin::new(&mut this.stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The client for blob GETs to a plain-HTTP endpoint, with its own small pool of keep-alive
/// connections (hyper's pool cannot lend out a raw socket).
#[derive(Clone, Debug)]
pub struct Client {
    idle: Arc<Mutex<Vec<Idle>>>,
    connect: Duration,
    response_headers: Duration,
}

#[derive(Debug)]
struct Idle {
    authority: String,
    stream: TcpStream,
    since: Instant,
}

/// A response head from [`Client::get`], with the connection positioned at its body.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// Every header as received; the caller filters them.
    pub headers: HeaderMap,
    content_length: Option<u64>,
    keep_alive: bool,
    /// Body bytes that arrived with the head.
    prefix: Bytes,
    stream: TcpStream,
    authority: String,
}

impl Answer {
    /// Whether the body can be spliced: a 200 or 206 framed by one `Content-Length`.
    pub fn spliceable(&self) -> bool {
        matches!(self.status, StatusCode::OK | StatusCode::PARTIAL_CONTENT)
            && self.content_length.is_some()
    }

    /// The body, to be sent on the connection that owns `slot`; `None` unless
    /// [`Answer::spliceable`]. `idle` fails the body when the endpoint sends nothing for that
    /// long; `spliced` counts the bytes that never entered user space.
    pub fn into_body(
        self,
        pool: &Client,
        slot: Slot,
        idle: Duration,
        spliced: Counter,
    ) -> Option<SpliceBody> {
        if !self.spliceable() {
            return None;
        }
        let length = self.content_length?;
        let mut prefix = self.prefix;
        let mut keep_alive = self.keep_alive;
        if prefix.len() as u64 > length {
            // More than the body: the endpoint is not speaking HTTP/1.1 as expected.
            prefix.truncate(usize::try_from(length).unwrap_or(usize::MAX));
            keep_alive = false;
        }
        let remaining = length - prefix.len() as u64;
        let mut body = SpliceBody {
            prefix,
            upstream: Some(self.stream),
            authority: self.authority,
            keep_alive,
            remaining,
            pool: pool.clone(),
            slot,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            spliced,
        };
        if remaining == 0 {
            body.release();
        }
        Some(body)
    }
}

impl Client {
    /// A client with the endpoint's connect and response-header timeouts.
    pub fn new(connect: Duration, response_headers: Duration) -> Self {
        Self {
            idle: Arc::default(),
            connect,
            response_headers,
        }
    }

    /// Sends `GET uri` with exactly `headers` (plus `Host`) and reads the response head, within
    /// the response-header timeout. A pooled connection that turns out to be closed is replaced
    /// by a new one once.
    pub async fn get(&self, uri: &Uri, headers: &HeaderMap) -> Result<Answer, ForwardError> {
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .ok_or_else(|| ForwardError::Io("no authority in the upstream URI".into()))?;
        let request = request_head(uri, &authority, headers);
        let exchange = async {
            loop {
                let (mut stream, reused) = match self.checkout(&authority) {
                    Some(s) => (s, true),
                    None => (self.connect(uri).await?, false),
                };
                match exchange(&mut stream, &request).await {
                    Ok((head, prefix)) => return Ok((stream, head, prefix)),
                    // The endpoint closed a pooled connection before this request reached it.
                    Err(Exchange::Closed) if reused => continue,
                    Err(Exchange::Closed) => {
                        return Err(ForwardError::Io(
                            "connection closed before a response".into(),
                        ));
                    }
                    Err(Exchange::Failed(e)) => return Err(e),
                }
            }
        };
        let (stream, head, prefix) =
            match tokio::time::timeout(self.response_headers, exchange).await {
                Ok(r) => r?,
                Err(_) => return Err(ForwardError::Timeout(self.response_headers)),
            };
        Ok(Answer {
            status: head.status,
            content_length: head.content_length,
            keep_alive: head.keep_alive,
            headers: head.headers,
            prefix,
            stream,
            authority,
        })
    }

    async fn connect(&self, uri: &Uri) -> Result<TcpStream, ForwardError> {
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .ok_or_else(|| ForwardError::Connect("no host in the upstream URI".into()))?;
        let port = uri.port_u16().unwrap_or(80);
        let stream =
            match tokio::time::timeout(self.connect, TcpStream::connect((host, port))).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(ForwardError::Connect(e.to_string())),
                Err(_) => {
                    return Err(ForwardError::Connect(format!(
                        "no connection within {:?}",
                        self.connect
                    )));
                }
            };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// An idle connection to `authority` that still looks open.
    fn checkout(&self, authority: &str) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|c| c.since.elapsed() < IDLE_FOR);
        while let Some(i) = idle.iter().rposition(|c| c.authority == authority) {
            let c = idle.swap_remove(i);
            // Readable now means the endpoint closed it (or sent junk): either way, not reusable.
            let mut probe = [0u8; 1];
            match c.stream.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(c.stream),
                _ => continue,
            }
        }
        None
    }

    fn checkin(&self, authority: String, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                authority,
                stream,
                since: Instant::now(),
            });
        }
    }
}

fn request_head(uri: &Uri, authority: &str, headers: &HeaderMap) -> Vec<u8> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"GET ");
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    head.extend_from_slice(authority.as_bytes());
    head.extend_from_slice(b"\r\n");
    // `HeaderValue` cannot hold CR or LF, so nothing here can split the request.
    for (name, value) in headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// A parsed response head.
#[derive(Debug)]
struct Head {
    status: StatusCode,
    headers: HeaderMap,
    /// `Some` only when the body is framed by exactly one valid `Content-Length` and no
    /// `Transfer-Encoding`.
    content_length: Option<u64>,
    keep_alive: bool,
}

enum Exchange {
    /// Closed before a byte of response: safe to resend a GET on a new connection.
    Closed,
    Failed(ForwardError),
}

async fn exchange(stream: &mut TcpStream, request: &[u8]) -> Result<(Head, Bytes), Exchange> {
    if let Err(e) = stream.write_all(request).await {
        return Err(match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => Exchange::Closed,
            _ => Exchange::Failed(ForwardError::Io(e.to_string())),
        });
    }
    let mut buf = BytesMut::with_capacity(8 * 1024);
    loop {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(8 * 1024);
        }
        let n = match stream.read_buf(&mut buf).await {
            Ok(n) => n,
            Err(e) if buf.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(Exchange::Failed(ForwardError::Io(e.to_string()))),
        };
        if n == 0 {
            return Err(if buf.is_empty() {
                Exchange::Closed
            } else {
                Exchange::Failed(ForwardError::Io(
                    "connection closed in the response head".into(),
                ))
            });
        }
        match parse_head(&buf) {
            Ok(Some((head, len))) => {
                let prefix = buf.split_off(len).freeze();
                return Ok((head, prefix));
            }
            Ok(None) if buf.len() > MAX_RESPONSE_HEAD => {
                return Err(Exchange::Failed(ForwardError::Io(format!(
                    "response head over {MAX_RESPONSE_HEAD} bytes"
                ))));
            }
            Ok(None) => {}
            Err(e) => return Err(Exchange::Failed(ForwardError::Io(e))),
        }
    }
}

/// Parses a response head; `Ok(None)` while it is incomplete. Pure, so table-tested.
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, String> {
    let mut lines = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut lines);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("bad response head: {e}")),
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or("bad response status")?;
    let mut headers = HeaderMap::new();
    for h in resp.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            headers.append(name, value);
        }
    }
    let lengths: Vec<&HeaderValue> = headers.get_all(CONTENT_LENGTH).iter().collect();
    let content_length = match lengths.as_slice() {
        [one] if !headers.contains_key(TRANSFER_ENCODING) => one
            .to_str()
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok()),
        _ => None,
    };
    let close = headers
        .get_all(CONNECTION)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let keep_alive = resp.version == Some(1) && !close && content_length.is_some();
    Ok(Some((
        Head {
            status,
            headers,
            content_length,
            keep_alive,
        },
        len,
    )))
}

/// A blob body made of placeholder chunks, each backed by bytes spliced into the connection's
/// pipe (see the module docs). Its connection goes back to the pool once all of it is read.
#[derive(Debug)]
pub struct SpliceBody {
    prefix: Bytes,
    upstream: Option<TcpStream>,
    authority: String,
    keep_alive: bool,
    /// Bytes still to splice from the upstream.
    remaining: u64,
    pool: Client,
    slot: Slot,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    spliced: Counter,
}

impl SpliceBody {
    /// Returns the finished connection to the pool.
    fn release(&mut self) {
        if let Some(stream) = self.upstream.take()
            && self.keep_alive
        {
            self.pool
                .checkin(std::mem::take(&mut self.authority), stream);
        }
    }

    fn rearm(&mut self) {
        let deadline = tokio::time::Instant::now() + self.idle;
        self.timer.as_mut().reset(deadline);
    }
}

/// Why a spliced body ended early.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// The endpoint closed the connection before the announced length.
    #[error("the ECR endpoint closed the connection with {0} body bytes still to come")]
    Truncated(u64),
    /// A system call failed.
    #[error("splice: {0}")]
    Io(#[from] io::Error),
    /// An earlier body on this connection ended early.
    #[error("splice: the connection's pipe is out of step")]
    Broken,
}

impl Body for SpliceBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut this.prefix)))));
        }
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let fail = |e: SpliceError| Poll::Ready(Some(Err(Box::new(e) as BodyError)));
        loop {
            let Some(up) = this.upstream.as_ref() else {
                return fail(SpliceError::Truncated(this.remaining));
            };
            let mut p = this.slot.lock();
            if p.broken {
                return fail(SpliceError::Broken);
            }
            if p.queued > 0 {
                // Wait for the IO to empty the pipe. The wait is the client's, not the
                // endpoint's, so it does not count towards the idle timeout.
                p.waiting = Some(cx.waker().clone());
                drop(p);
                this.rearm();
                return Poll::Pending;
            }
            if p.pipe.is_none() {
                match Pipe::new() {
                    Ok(pipe) => p.pipe = Some(pipe),
                    Err(e) => return fail(e.into()),
                }
            }
            match up.poll_read_ready(cx) {
                Poll::Pending => {
                    drop(p);
                    return match this.timer.as_mut().poll(cx) {
                        Poll::Ready(()) => {
                            Poll::Ready(Some(Err(Box::new(BodyStalled(this.idle)) as BodyError)))
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
                Poll::Ready(Err(e)) => return fail(e.into()),
                Poll::Ready(Ok(())) => {}
            }
            let Some(pipe) = p.pipe.as_ref() else {
                return fail(SpliceError::Broken);
            };
            let want = usize::try_from(this.remaining).map_or(CHUNK, |r| r.min(CHUNK));
            let moved = up.try_io(Interest::READABLE, || {
                Ok(rustix::pipe::splice(
                    up,
                    None,
                    &pipe.write,
                    None,
                    want,
                    SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
                )?)
            });
            match moved {
                Ok(0) => return fail(SpliceError::Truncated(this.remaining)),
                Ok(n) => {
                    p.queued += n;
                    drop(p);
                    this.remaining -= n as u64;
                    this.spliced.inc_by(n as u64);
                    this.rearm();
                    if this.remaining == 0 {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(placeholder(n)))));
                }
                // Not readable after all; `poll_read_ready` registers for the next data.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return fail(e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.prefix.len() as u64 + self.remaining)
    }
}

impl Drop for SpliceBody {
    fn drop(&mut self) {
        if self.remaining > 0 {
            // hyper drops an unfinished body only when the connection is going away; should a
            // later response still come, its placeholders must not meet this body's bytes.
            self.slot.lock().broken = true;
        }
    }
}

impl crate::server::Connection for SpliceIo {
    type Extension = Slot;

    /// The connection's pipe: a blob GET on it can be spliced. Only plain TCP has one, since TLS
    /// must see every byte.
    fn extension(&self) -> Option<Slot> {
        Some(self.slot())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[test]
    fn placeholders_are_known_by_address_only() {
        let p = placeholder(100);
        assert!(is_placeholder(&p));
        assert!(is_placeholder(&p[50..]));
        assert!(is_placeholder(&placeholder(CHUNK)[CHUNK - 1..]));
        let zeros = vec![0u8; 100];
        assert!(!is_placeholder(&zeros));
        assert!(!is_placeholder(&[]));
        assert!(!is_placeholder(&p[100..]));
    }

    #[rstest]
    #[case::ok_with_length(
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        Some((200, Some(5), true, 5))
    )]
    #[case::partial_content(
        "HTTP/1.1 206 Partial Content\r\ncontent-length: 3\r\ncontent-range: bytes 0-2/9\r\n\r\n",
        Some((206, Some(3), true, 0))
    )]
    #[case::close("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n", Some((200, Some(5), false, 0)))]
    #[case::http_1_0("HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n", Some((200, Some(5), false, 0)))]
    #[case::chunked(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Some((200, None, false, 15))
    )]
    #[case::length_and_chunked(
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        Some((200, None, false, 0))
    )]
    #[case::two_lengths(
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        Some((200, None, false, 0))
    )]
    #[case::signed_length("HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n", Some((200, None, false, 0)))]
    #[case::no_length("HTTP/1.1 307 Temporary Redirect\r\nLocation: http://s3/x\r\n\r\n", Some((307, None, false, 0)))]
    #[case::incomplete("HTTP/1.1 200 OK\r\nContent-Le", None)]
    fn parses_response_heads(
        #[case] raw: &str,
        #[case] want: Option<(u16, Option<u64>, bool, usize)>,
    ) {
        let got = parse_head(raw.as_bytes()).unwrap().map(|(h, len)| {
            (
                h.status.as_u16(),
                h.content_length,
                h.keep_alive,
                raw.len() - len,
            )
        });
        assert_eq!(got, want);
    }

    #[rstest]
    #[case::not_http("SSH-2.0-OpenSSH\r\n\r\n")]
    #[case::bad_status("HTTP/1.1 2000 OK\r\n\r\n")]
    fn refuses_what_is_not_a_response_head(#[case] raw: &str) {
        assert!(parse_head(raw.as_bytes()).is_err());
    }

    #[test]
    fn request_head_carries_exactly_the_given_headers() {
        let uri: Uri = "http://127.0.0.1:5000/v2/docker-hub/library/a/blobs/sha256:00"
            .parse()
            .unwrap();
        let mut h = HeaderMap::new();
        h.insert(http::header::RANGE, HeaderValue::from_static("bytes=1-"));
        let head = request_head(&uri, "127.0.0.1:5000", &h);
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "GET /v2/docker-hub/library/a/blobs/sha256:00 HTTP/1.1\r\nhost: 127.0.0.1:5000\r\n\
             range: bytes=1-\r\n\r\n"
        );
    }
}
