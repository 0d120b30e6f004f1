//! The response body every listener of every program answers with, and the small bodies built
//! here: a leaf of the shared plumbing, so that the server loop, the ops handler, the webhook and
//! the mirror agree on one type without importing each other.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};

/// The body of every response: streamed from upstream, or built here.
pub type ResponseBody = http_body_util::combinators::BoxBody<Bytes, BodyError>;

/// An error while streaming a body; hyper aborts the client connection on it, so a truncated
/// body is never mistaken for a complete one.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A whole, small body.
pub fn full(b: impl Into<Bytes>) -> ResponseBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// No body.
pub fn empty() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A plain-text answer (probes, the webhook's refusals of what is not an admission request).
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
