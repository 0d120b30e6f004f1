//! Protocol abuse against a running `pullthrough serve`, with raw TCP clients: header floods,
//! slowloris, pipelining, request smuggling, HTTP/2 prior knowledge and connection floods.
//!
//! Each attack must end in a clear status (or a clean close) and bounded resources, and must
//! leave the mirror serving everyone else. Reads are bounded by [`HANG_GUARD`], which only turns
//! a hang into a failure; nothing here asserts how long anything takes.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::moto::Moto;
use crate::support::pullthrough::{Options, Pullthrough, Recorder};
use crate::support::{dead_port, try_eventually};

/// Longer than any timeout under test; reaching it means the server hung.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// A pullthrough with nothing behind it (dead ECR endpoint and token API) and `server` as the
/// `[server]` table: enough for everything the mirror answers before going upstream.
async fn start(server: &str) -> Pullthrough {
    let dead = format!("http://127.0.0.1:{}", dead_port());
    let mut opts = Options::new(&dead, &dead);
    opts.extra.push_str(&format!("\n[server]\n{server}\n"));
    Pullthrough::start(opts).await
}

/// One parsed HTTP/1 response.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The OCI error code of the body (panics if it is not an OCI error).
    fn oci_code(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body))
        });
        v["errors"][0]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("not an OCI error: {v}"))
            .to_owned()
    }
}

/// A raw client connection that reads responses off the wire itself.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(pt: &Pullthrough) -> Raw {
        let stream = TcpStream::connect(pt.host()).await.expect("connect");
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Reads more bytes; `false` on EOF or reset.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(HANG_GUARD, self.stream.read(&mut chunk)).await {
            Err(_) => panic!("the server neither answered nor closed"),
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next response, or `None` if the connection ends first.
    async fn answer(&mut self) -> Option<Answer> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse::<usize>().expect("content-length"));
        let body = match length {
            Some(n) => {
                while self.buf.len() < n {
                    assert!(self.fill().await, "connection ended inside a body");
                }
                self.buf.drain(..n).collect()
            }
            // No length: the body runs to the close.
            None => {
                while self.fill().await {}
                std::mem::take(&mut self.buf)
            }
        };
        Some(Answer {
            status,
            headers,
            body,
        })
    }

    /// Waits for the server to close; returns whatever else it sent first.
    async fn closed(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }
}

/// `GET path` with a Host header, as one write.
fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n").into_bytes()
}

/// Sends one request on a fresh connection and returns the answer.
async fn one(pt: &Pullthrough, request: &[u8]) -> (Option<Answer>, Raw) {
    let mut c = Raw::connect(pt).await;
    c.send(request).await;
    (c.answer().await, c)
}

/// Open file descriptors of a process: its sockets, mostly.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/<pid>/fd")
        .count()
}

#[tokio::test]
async fn oversize_headers_and_header_floods_are_431_and_closed() {
    let pt = start("").await;

    // One 40 KiB header: past the 32 KiB head limit (server::MAX_HEAD).
    let big = format!(
        "GET /v2/ HTTP/1.1\r\nHost: mirror\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    let (answer, mut c) = one(&pt, big.as_bytes()).await;
    let answer = answer.expect("an answer to an oversize head");
    assert_eq!(answer.status, 431, "{answer:?}");
    assert!(c.closed().await.is_empty(), "nothing after the 431");

    // 500 small headers: past hyper's 100-header limit, though the head is only a few KiB.
    let mut flood = String::from("GET /v2/ HTTP/1.1\r\nHost: mirror\r\n");
    for i in 0..500 {
        flood.push_str(&format!("X-Flood-{i}: v\r\n"));
    }
    flood.push_str("\r\n");
    let (answer, mut c) = one(&pt, flood.as_bytes()).await;
    let answer = answer.expect("an answer to a header flood");
    assert_eq!(answer.status, 431, "{answer:?}");
    assert!(c.closed().await.is_empty(), "nothing after the 431");

    // And the mirror still serves a normal client.
    let (answer, _) = one(&pt, &get("/v2/")).await;
    assert_eq!(answer.expect("an answer").status, 200);
}

#[tokio::test]
async fn slowloris_and_idle_connections_are_closed_by_the_header_read_timeout() {
    let pt = start("header_read_timeout = \"1s\"").await;

    // A head trickled one line at a time never completes: the server hangs up without answer.
    let mut slow = Raw::connect(&pt).await;
    slow.send(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n").await;
    let (mut rd, mut wr) = slow.stream.into_split();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(HANG_GUARD, rd.read_to_end(&mut got)).await;
        got
    });
    let mut lines = 0;
    while !reader.is_finished() && lines < 300 {
        if wr.write_all(b"X-Slow: 1\r\n").await.is_err() {
            break;
        }
        lines += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        reader.is_finished() || lines < 300,
        "the server kept reading a head for {lines} lines"
    );
    let got = reader.await.expect("reader");
    eprintln!("slowloris: closed after {lines} trickled header lines");
    assert!(
        got.is_empty(),
        "a timed-out head gets no answer: {:?}",
        String::from_utf8_lossy(&got)
    );

    // A connection that sends nothing at all is closed the same way.
    let mut idle = Raw::connect(&pt).await;
    assert!(idle.closed().await.is_empty());

    // A keep-alive connection idle after its response is closed too.
    let (answer, mut kept) = one(&pt, &get("/v2/")).await;
    assert_eq!(answer.expect("an answer").status, 200);
    assert!(kept.closed().await.is_empty());

    let (answer, _) = one(&pt, &get("/v2/")).await;
    assert_eq!(answer.expect("an answer").status, 200);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let pt = start("").await;
    let mut c = Raw::connect(&pt).await;
    let mut burst = get("/v2/");
    burst.extend(get("/v2/_catalog"));
    burst.extend(get("/v2/Upper/manifests/1?ns=docker.io"));
    burst.extend(get("/v2/app/manifests/1?ns=ghcr.io"));
    c.send(&burst).await;

    let first = c.answer().await.expect("first answer");
    assert_eq!((first.status, first.body.as_slice()), (200, &b"{}"[..]));
    let second = c.answer().await.expect("second answer");
    assert_eq!(
        (second.status, second.oci_code()),
        (404, "UNSUPPORTED".into())
    );
    let third = c.answer().await.expect("third answer");
    assert_eq!(
        (third.status, third.oci_code()),
        (400, "NAME_INVALID".into())
    );
    let fourth = c.answer().await.expect("fourth answer");
    assert_eq!(
        (fourth.status, fourth.oci_code()),
        (404, "NAME_UNKNOWN".into())
    );

    // The connection is still good for more.
    c.send(&get("/v2")).await;
    assert_eq!(c.answer().await.expect("fifth answer").status, 200);
}

#[tokio::test]
async fn smuggling_attempts_are_400_closed_and_never_forwarded() {
    let moto = Moto::start().await;
    let recorder = Recorder::start().await;
    let pt = Pullthrough::start(Options::new(&recorder.url(), &moto.endpoint())).await;

    // A control request that does go up, so "nothing forwarded" below means something.
    let (answer, _) = one(&pt, &get("/v2/library/alpine/manifests/ok?ns=docker.io")).await;
    assert_eq!(answer.expect("control answer").status, 200);
    assert_eq!(recorder.requests().len(), 1);

    let smuggled =
        "GET /v2/library/alpine/manifests/smuggled?ns=docker.io HTTP/1.1\r\nHost: mirror\r\n\r\n";
    let m = "/v2/library/alpine/manifests/front?ns=docker.io";
    let chunk = format!("{:x}\r\n{smuggled}\r\n0\r\n\r\n", smuggled.len());
    // (name, request, answered by pullthrough with an OCI error rather than by hyper)
    let cases: Vec<(&str, String, bool)> = vec![
        (
            "cl_then_te",
            format!(
                "GET {m} HTTP/1.1\r\nHost: mirror\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}"
            ),
            true,
        ),
        (
            "te_then_cl",
            format!(
                "GET {m} HTTP/1.1\r\nHost: mirror\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{chunk}"
            ),
            true,
        ),
        (
            "te_chunked_body",
            format!(
                "GET {m} HTTP/1.1\r\nHost: mirror\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}"
            ),
            true,
        ),
        (
            "cl_body_holding_a_request",
            format!(
                "GET {m} HTTP/1.1\r\nHost: mirror\r\nContent-Length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
            true,
        ),
        (
            "duplicate_cl_equal",
            format!(
                "GET {m} HTTP/1.1\r\nHost: mirror\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello{smuggled}"
            ),
            true,
        ),
        (
            "duplicate_cl_conflicting",
            format!(
                "GET {m} HTTP/1.1\r\nHost: mirror\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
            false,
        ),
        (
            "cl_list",
            format!(
                "GET {m} HTTP/1.1\r\nHost: mirror\r\nContent-Length: 0, {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
            false,
        ),
        (
            "te_not_chunked_last",
            format!(
                "GET {m} HTTP/1.1\r\nHost: mirror\r\nTransfer-Encoding: chunked, identity\r\n\r\n{chunk}"
            ),
            false,
        ),
        (
            "te_obfuscated",
            format!(
                "GET {m} HTTP/1.1\r\nHost: mirror\r\nTransfer-Encoding: xchunked\r\n\r\n{chunk}"
            ),
            false,
        ),
        (
            "te_space_before_colon",
            format!(
                "GET {m} HTTP/1.1\r\nHost: mirror\r\nTransfer-Encoding : chunked\r\n\r\n{chunk}"
            ),
            false,
        ),
        (
            "te_in_http10",
            format!(
                "GET {m} HTTP/1.0\r\nHost: mirror\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}"
            ),
            false,
        ),
    ];
    for (name, request, ours) in &cases {
        let (answer, mut c) = one(&pt, request.as_bytes()).await;
        let answer = answer.unwrap_or_else(|| panic!("{name}: closed without an answer"));
        assert_eq!(answer.status, 400, "{name}: {answer:?}");
        if *ours {
            assert_eq!(answer.oci_code(), "UNSUPPORTED", "{name}");
            assert_eq!(answer.header("connection"), Some("close"), "{name}");
        }
        let rest = c.closed().await;
        assert!(
            !rest.starts_with(b"HTTP/"),
            "{name}: a second answer followed: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    let seen: Vec<String> = recorder.requests().into_iter().map(|(l, _)| l).collect();
    assert_eq!(
        seen,
        vec!["GET /v2/docker-hub/library/alpine/manifests/ok".to_owned()],
        "only the control request reached the upstream"
    );
}

#[tokio::test]
async fn http2_prior_knowledge_is_closed_cleanly() {
    let pt = start("").await;
    let mut c = Raw::connect(&pt).await;
    // The client preface, then an empty SETTINGS frame, as an h2c prior-knowledge client sends.
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
    c.send(&preface).await;
    let got = c.closed().await;
    assert!(
        got.is_empty(),
        "an HTTP/1 server has nothing to say in HTTP/2: {got:?}"
    );

    let (answer, _) = one(&pt, &get("/v2/")).await;
    assert_eq!(answer.expect("an answer").status, 200);
}

#[tokio::test]
async fn thousands_of_idle_connections_meet_the_connection_limit() {
    const LIMIT: usize = 16;
    const FLOOD: usize = 2000;
    let pt = start(&format!(
        "max_connections = {LIMIT}\nheader_read_timeout = \"120s\""
    ))
    .await;
    let baseline = open_fds(pt.pid());

    // Fill every slot with a served keep-alive connection.
    let mut admitted = Vec::new();
    for _ in 0..LIMIT {
        let (answer, c) = one(&pt, &get("/v2/")).await;
        assert_eq!(answer.expect("an answer within the limit").status, 200);
        admitted.push(c);
    }

    // Over the limit: an immediate 503 UNAVAILABLE (containerd's cue to use the next host).
    let (answer, mut c) = one(&pt, &get("/v2/")).await;
    let answer = answer.expect("an answer over the limit");
    assert_eq!(
        (answer.status, answer.oci_code()),
        (503, "UNAVAILABLE".into())
    );
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(c.closed().await.is_empty());

    // Thousands of connections that never send a byte.
    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        flood.push(Raw::connect(&pt).await);
    }
    // Once the last one is closed, the server has accepted them all: what it holds now is all
    // it will ever hold for them.
    let last = flood.last_mut().expect("flood");
    assert!(last.closed().await.is_empty());
    let held = open_fds(pt.pid()).saturating_sub(baseline);
    eprintln!("connection flood: {held} descriptors above the baseline of {baseline}");
    assert!(
        held <= LIMIT + pullthrough::server::REJECTING_MAX + 4,
        "{held} descriptors held for {LIMIT} admitted connections and a flood of {FLOOD}"
    );
    for c in &mut flood {
        assert!(c.closed().await.is_empty(), "a flood connection got bytes");
    }

    // The admitted clients never noticed.
    for c in &mut admitted {
        c.send(&get("/v2/")).await;
        assert_eq!(c.answer().await.expect("still served").status, 200);
    }
    assert!(pt.log().contains("connection limit reached"));

    // Freed slots are served again.
    drop(admitted);
    let addr = pt.host();
    // Blocking probes: this test's runtime has nothing else to run meanwhile.
    let ok = try_eventually(|| probe(&addr).filter(|s| *s == 200)).await;
    assert_eq!(ok, Some(200), "slots were not freed");
}

/// A blocking `GET /v2/`, its status if one came back.
fn probe(addr: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(HANG_GUARD)).ok()?;
    s.write_all(&get("/v2/")).ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let line = String::from_utf8_lossy(&buf[..n]).into_owned();
    line.split(' ').nth(1)?.parse().ok()
}
