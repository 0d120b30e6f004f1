//! The access log: one structured line per request, written when the response body is finished
//! (or dropped), so that it carries the real byte count and duration of a streamed blob, and
//! says when a stream was cut short.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::metrics::{Metrics, RequestLabels, UpstreamLabels};
use crate::body::{BodyError, ResponseBody};

/// What one request did, filled in along the way.
#[derive(Debug, Clone)]
pub struct Entry {
    /// HTTP method.
    pub method: String,
    /// Canonical upstream registry, or `-`.
    pub registry: String,
    /// Request kind label.
    pub kind: &'static str,
    /// Path and query sent to ECR, or `-` when none was sent.
    pub upstream_path: String,
    /// Status sent to the client.
    pub status: u16,
    /// `hit`, `miss` or `-`.
    pub cache: &'static str,
    /// Whether the body came from ECR (counted in the upstream byte metric).
    pub from_upstream: bool,
    /// When the request arrived.
    pub start: Instant,
}

/// A response body that logs its [`Entry`] once it is done.
pub struct LoggedBody {
    inner: ResponseBody,
    entry: Entry,
    metrics: Metrics,
    bytes: u64,
    outcome: Outcome,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Streaming,
    Complete,
    Failed,
}

impl LoggedBody {
    /// Wraps `inner`; the line is written on completion or drop.
    pub fn new(inner: ResponseBody, entry: Entry, metrics: Metrics) -> Self {
        Self {
            inner,
            entry,
            metrics,
            bytes: 0,
            outcome: Outcome::Streaming,
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => this.outcome = Outcome::Failed,
            Poll::Ready(None) => this.outcome = Outcome::Complete,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let e = &self.entry;
        // A body that hyper never polled because it was empty counts as complete.
        let outcome = match self.outcome {
            Outcome::Streaming if self.inner.is_end_stream() => "complete",
            Outcome::Streaming => "aborted",
            Outcome::Complete => "complete",
            Outcome::Failed => "upstream_failed",
        };
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                registry: e.registry.clone(),
                kind: e.kind.to_owned(),
                code: e.status,
            })
            .inc();
        if e.from_upstream {
            self.metrics
                .upstream_bytes
                .get_or_create(&UpstreamLabels {
                    registry: e.registry.clone(),
                    kind: e.kind.to_owned(),
                })
                .inc_by(self.bytes);
        }
        tracing::info!(
            target: "pullthrough::access",
            method = %e.method,
            registry = %e.registry,
            kind = e.kind,
            upstream_path = %e.upstream_path,
            status = e.status,
            bytes = self.bytes,
            duration_ms = e.start.elapsed().as_secs_f64() * 1000.0,
            cache = e.cache,
            body = outcome,
            "request"
        );
    }
}
