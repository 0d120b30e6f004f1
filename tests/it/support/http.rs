//! A minimal HTTP/1 client for the tests: one connection per request, no
//! pooling, no redirects, no retries, so each call maps to exactly one
//! request in a server's access log.

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// Sends `req` (whose URI must be absolute, `http://host:port/path`) and
/// returns the response with its body still streaming.
///
/// The request goes out in origin form (`GET /path HTTP/1.1` plus `Host`),
/// as a registry client would send it.
pub async fn send_streaming(mut req: Request<Full<Bytes>>) -> Result<Response<Incoming>, String> {
    let uri = req.uri().clone();
    let method = req.method().clone();
    let authority = uri
        .authority()
        .ok_or_else(|| format!("request URI {uri} is not absolute"))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((authority.host(), port))
        .await
        .map_err(|e| format!("connect {authority}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake with {authority}: {e}"))?;
    // The connection task ends by itself once the response body is done or
    // dropped; an error there surfaces through the body instead.
    tokio::spawn(conn);

    let origin_form: Uri = uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .parse()
        .map_err(|e| format!("bad path in {uri}: {e}"))?;
    *req.uri_mut() = origin_form;
    if !req.headers().contains_key(HOST) {
        let host = HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
        req.headers_mut().insert(HOST, host);
    }
    // Bounds a regression that hangs instead of failing; asserts nothing about time.
    tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(req))
        .await
        .map_err(|_| format!("{method} {uri}: no response within {REQUEST_TIMEOUT:?}"))?
        .map_err(|e| format!("{method} {uri}: {e}"))
}

/// Upper bound for any one request's response head in the tests.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Sends `req` and reads the whole response body.
pub async fn send(req: Request<Full<Bytes>>) -> Result<Response<Bytes>, String> {
    let uri = req.uri().clone();
    let resp = send_streaming(req).await?;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(REQUEST_TIMEOUT, body.collect())
        .await
        .map_err(|_| format!("reading body of {uri}: nothing within {REQUEST_TIMEOUT:?}"))?
        .map_err(|e| format!("reading body of {uri}: {e}"))?
        .to_bytes();
    Ok(Response::from_parts(parts, body))
}

/// A request with an empty body and the given headers.
pub fn request(method: Method, url: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    request_with_body(method, url, headers, Bytes::new())
}

/// A request with `body` and the given headers.
pub fn request_with_body(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(body))
        .unwrap_or_else(|e| panic!("building request for {url}: {e}"))
}

/// `GET url` with `headers`, whole body read.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Result<Response<Bytes>, String> {
    send(request(Method::GET, url, headers)).await
}

/// The value of header `name` as a string; `""` if absent or not UTF-8.
pub fn header<'a, B>(resp: &'a Response<B>, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}
