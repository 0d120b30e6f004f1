#!/usr/bin/env python3
"""A front that makes a plain CNCF distribution registry behave like ECR's pull-through cache.

The integration tests stand in for ECR with `docker-registry` (distribution 2.8, htpasswd user
`AWS`). A plain registry serves whatever a test pushed, by tag or by digest, so it hides how ECR's
pull-through cache really behaves. This front sits before that registry (the "backend") and adds
ECR's behaviour:

- A manifest GET **by tag** under a configured prefix (`docker-hub/library/x:1`) that the backend
  does not hold imports the image from the matching upstream registry first: the manifest, for an
  index every child manifest, and every config and layer blob. That is the only way an image
  enters the cache (ECR documents that it caches an image on the first pull through the cache
  URI, and an uncached manifest asked for by digest "returns as missing": aws/containers-roadmap
  #2837).
- A tag already held is re-checked upstream at most once per `--tag-recheck` (ECR: "checks the
  upstream registry for a new version of the image with that specific tag ... at least once every
  24 hours"), so a tag moved upstream stays stale until then, and an unreachable upstream at
  re-check time leaves the cached image in service.
- A manifest GET or HEAD **by digest** is answered from the backend only: 404 `MANIFEST_UNKNOWN`
  when it is not held, whatever the upstream has.
- A blob GET answers `307` to a presigned-style URL on a second listener (the "S3" server), which
  streams the bytes from the backend and, like S3, refuses any request that carries an
  `Authorization` header (a presigned URL already authenticates the request).
- Every `/v2/` request needs the Basic credential; the backend's htpasswd decides which one is
  valid (see "Credentials" below).

Everything else under `/v2/` (tag lists, uploads, deletes, `_catalog`) is relayed to the backend.

Standard library only (Python 3.9+), so the Rust harness can start it with the system `python3`.

# Credentials
The front keeps no password of its own. A `/v2/` request without `Authorization: Basic ...` gets
401 at once; any other request is answered by first asking the backend with the client's own
`Authorization`, and the backend's 401 becomes the front's 401. So the backend's htpasswd is the
single source of truth, and a test that rotates the registry password (`Registry::set_password`)
rotates the front's too, with no restart. Imports push to the backend with the credential of the
request that caused them (it was just accepted). The S3 server fetches a blob with the credential
of the request that got the redirect, remembered (in memory, never logged) under the URL's
signature until the URL expires. Unlike a real presigned URL, one handed out just before the
registry password rotates fails (404 `NoSuchKey`) if fetched after the rotation; clients fetch the
Location at once, so tests do not meet that.

# The S3 host name
Go's HTTP client (which containerd and skopeo use) keeps a request's `Authorization` on a redirect
when the target has the same host: Go 1.19 (Debian 12's skopeo) compares host *and port*, newer
Go (since the change for golang/go#35104) the host name only. With both listeners on `127.0.0.1`, a client built
with newer Go that sends the registry credential itself would carry it to the S3 server and get
400, which ECR's real S3 host (another name) never causes. `--s3-host localhost` puts another
host name in the Location (still loopback) for such clients. A pull through pullthrough is not
affected: the client's request to the mirror carries no credential to carry over.

# Choices where ECR's behaviour is not documented
- A manifest HEAD by tag is answered from what the backend holds: no import, no re-check. ECR
  documents caching on a pull; pullthrough sends GET for every manifest.
- A blob HEAD answers 200 with `Content-Length` and `Docker-Content-Digest` (as distribution
  does), not a redirect.
- A tag the backend holds that this process never checked (pushed to the backend directly, or
  the front restarted) counts as checked when first seen, so seeding the backend causes no
  upstream request until the re-check interval has passed.
- A failed re-check (upstream down, 5xx, or the tag gone upstream) keeps the cached image and
  counts as the check of this interval. A failed first import (upstream down or missing) answers
  404 `MANIFEST_UNKNOWN` and is retried on the next GET.
- Only Basic credentials are sent upstream (`--upstream-auth`); no bearer-token dance.

# Command line
    ecr_front.py --listen 127.0.0.1:0 --backend http://127.0.0.1:B \\
        --upstream docker-hub=http://127.0.0.1:U1 --upstream quay=http://127.0.0.1:U2 \\
        [--upstream-auth docker-hub=user:pass] [--s3-listen 127.0.0.1:0] [--s3-host localhost] \\
        [--s3-expires 600] [--tag-recheck 24h] [--upstream-timeout 30] --log /path/front.log

Once both listeners are bound it prints one line `ready <port> <s3-port>` to stdout and flushes.
SIGTERM or SIGINT stops it (exit 0).

# Log (`--log`, JSON lines, appended, one object per line, flushed per line)
- Front request: `{"ts", "server": "ecr", "method", "path" (with query), "status",
  "auth": "none"|"basic"|"other", "upstream_requests": N, ...}`; a manifest GET by tag under a
  prefix adds `"tag_check": "fresh"|"imported"|"unchanged"|"upstream_missing"|"upstream_error"`,
  and when it went upstream also `"import": "<prefix>/<repo>:<tag>"`, and `"digest"` (success)
  or `"import_error"` (failure). A blob
  redirect adds `"location"` (the URL without its query). A failure adds `"error"`.
- S3 request: `{"ts", "server": "s3", "method", "path" (no query), "status", "authorization": bool,
  "range": str|null, "bytes": N}`.
- Upstream request (one per request the front sends upstream): `{"ts", "server": "upstream",
  "upstream": "<prefix>", "method", "path", "status"}` (status null when the connection failed).
"""

import argparse
import base64
import calendar
import hashlib
import hmac
import http.client
import http.server
import json
import re
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.parse

# Media types a manifest GET may answer with: Docker and OCI, single manifests and indexes.
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
ACCEPT_ALL = ", ".join(MANIFEST_TYPES)

# The realm ECR names in its challenge (`Basic realm="https://<registry>/",service="ecr.amazonaws.com"`).
SERVICE = "ecr.amazonaws.com"

CHUNK = 1 << 20
BACKEND_TIMEOUT = 60.0

NAME_RE = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
DIGEST_RE = r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+"
TAG_RE = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
MANIFEST_PATH = re.compile(rf"^/v2/(?P<name>{NAME_RE})/manifests/(?P<ref>[^/]+)$")
BLOB_PATH = re.compile(rf"^/v2/(?P<name>{NAME_RE})/blobs/(?P<digest>{DIGEST_RE})$")
DIGEST_ONLY = re.compile(rf"^{DIGEST_RE}$")
TAG_ONLY = re.compile(rf"^{TAG_RE}$")

# Headers a relayed answer keeps (hop-by-hop and framing headers are the front's own business).
PASS_RESPONSE_HEADERS = (
    "content-type",
    "docker-content-digest",
    "etag",
    "location",
    "range",
    "docker-upload-uuid",
    "link",
    "oci-subject",
    "content-range",
    "accept-ranges",
)
# Headers a relayed request keeps. Authorization is handled separately.
PASS_REQUEST_HEADERS = ("accept", "content-type", "range", "if-none-match", "content-range")


def parse_duration(text):
    """`24h`, `1s`, `500ms`, `1h30m`, `0`, or plain seconds (`90`, `1.5`) -> seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 24h, 90s, 500ms)")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * scale[u] for n, u in parts)


def parse_hostport(text):
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def parse_base_url(text):
    """`http://127.0.0.1:5000` -> (host, port)."""
    url = urllib.parse.urlsplit(text)
    if url.scheme != "http" or not url.hostname or url.path not in ("", "/"):
        raise argparse.ArgumentTypeError(f"expected http://HOST:PORT, got {text!r}")
    return url.hostname, url.port or 80


def parse_named(text):
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def oci_error(code, message, detail=None):
    err = {"code": code, "message": message}
    if detail is not None:
        err["detail"] = detail
    return json.dumps({"errors": [err]}).encode()


def s3_error(code, message, extra=""):
    request_id = secrets.token_hex(8).upper()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>{extra}"
        f"<RequestId>{request_id}</RequestId><HostId>{secrets.token_hex(16)}</HostId></Error>"
    ).encode()


def sha256_digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class JsonLog:
    """Appends one JSON object per line to a file (or nowhere), thread-safe, flushed per line."""

    def __init__(self, path):
        self._file = open(path, "a", encoding="utf-8") if path else None
        self._lock = threading.Lock()

    def write(self, **fields):
        if self._file is None:
            return
        fields = {"ts": round(time.time(), 3), **fields}
        line = json.dumps(fields, separators=(",", ":")) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()


class ImportError_(Exception):
    """An import could not complete; `kind` is `missing` (upstream 404) or `error`."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


class BackendUnauthorized(Exception):
    """The backend refused the client's credential."""


class Connection:
    """One HTTP/1.1 connection to a registry, reused across the requests of one front request."""

    def __init__(self, host, port, timeout):
        self.host, self.port, self.timeout = host, port, timeout
        self._conn = None

    def request(self, method, path, headers=None, body=None, host_header=None):
        """Sends a request and returns the response with its body still unread.

        `body` may be bytes or an iterable of chunks (then `Content-Length` must be in `headers`,
        or it goes chunked). The caller must read or close the response before the next request.
        """
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                self._conn.putheader("Host", host_header or f"{self.host}:{self.port}")
                headers = dict(headers or {})
                chunked = False
                if body is not None and not isinstance(body, (bytes, bytearray)):
                    if not any(k.lower() == "content-length" for k in headers):
                        headers["Transfer-Encoding"] = "chunked"
                        chunked = True
                elif body is not None:
                    headers["Content-Length"] = str(len(body))
                elif method in ("POST", "PUT", "PATCH"):
                    headers["Content-Length"] = "0"
                for k, v in headers.items():
                    self._conn.putheader(k, v)
                self._conn.endheaders()
                if isinstance(body, (bytes, bytearray)):
                    self._conn.send(body)
                elif body is not None:
                    for chunk in body:
                        if not chunk:
                            continue
                        if chunked:
                            self._conn.send(b"%x\r\n" % len(chunk) + bytes(chunk) + b"\r\n")
                        else:
                            self._conn.send(chunk)
                    if chunked:
                        self._conn.send(b"0\r\n\r\n")
                return self._conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A kept-alive connection the server closed meanwhile: retry once on a new one,
                # but only when no streamed body was consumed.
                self.close()
                if attempt == 1 or (body is not None and not isinstance(body, (bytes, bytearray))):
                    raise
            except Exception:
                self.close()
                raise
        raise AssertionError("unreachable")

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Front:
    """Shared state: configuration, the per-(repo, tag) check times, presigned-URL credentials."""

    def __init__(self, args):
        self.backend = args.backend
        self.upstreams = dict(args.upstream)
        self.upstream_auth = {}
        for name, cred in args.upstream_auth:
            if name not in self.upstreams:
                raise SystemExit(f"--upstream-auth {name}: no --upstream {name}=URL")
            self.upstream_auth[name] = "Basic " + base64.b64encode(cred.encode()).decode()
        self.tag_recheck = args.tag_recheck
        self.upstream_timeout = args.upstream_timeout
        self.s3_expires = args.s3_expires
        self.s3_host = args.s3_host
        self.s3_port = None  # set once bound
        self.log = JsonLog(args.log)
        self.secret = secrets.token_bytes(32)
        # (repo, tag) -> monotonic time of the last upstream check.
        self.checked = {}
        self.tag_locks = {}
        self.lock = threading.Lock()
        # signature -> (Authorization, expiry epoch) for the S3 server's backend fetches.
        self.presigned = {}
        self.upstream_requests = 0

    # --- bookkeeping -------------------------------------------------------------------------

    def tag_lock(self, key):
        with self.lock:
            lock = self.tag_locks.get(key)
            if lock is None:
                lock = self.tag_locks[key] = threading.Lock()
            return lock

    def count_upstream(self):
        with self.lock:
            self.upstream_requests += 1

    def presign(self, repo, digest, authorization):
        """The S3 URL for `digest` of `repo`, signed with this process's secret."""
        path = f"/prod-local-starport-layer-bucket/{repo}/{digest}"
        now = time.time()
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        expires = str(self.s3_expires)
        signature = self.sign(path, amz_date, expires)
        with self.lock:
            self.presigned[signature] = (authorization, now + self.s3_expires + 5)
            for sig, (_, until) in list(self.presigned.items()):
                if until < now:
                    del self.presigned[sig]
        query = urllib.parse.urlencode(
            [
                ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
                ("X-Amz-Credential", f"ASIAFRONTSTANDIN/{amz_date[:8]}/local/s3/aws4_request"),
                ("X-Amz-Date", amz_date),
                ("X-Amz-Expires", expires),
                ("X-Amz-SignedHeaders", "host"),
                ("X-Amz-Signature", signature),
            ]
        )
        return f"http://{self.s3_host}:{self.s3_port}{path}", query

    def sign(self, path, amz_date, expires):
        msg = f"GET\n{path}\n{amz_date}\n{expires}".encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()

    def backend_conn(self):
        return Connection(self.backend[0], self.backend[1], BACKEND_TIMEOUT)


class Handler(http.server.BaseHTTPRequestHandler):
    """Shared HTTP/1.1 plumbing for both listeners."""

    protocol_version = "HTTP/1.1"
    server_version = "ecr-front"
    # Idle keep-alive connections and stuck clients must not hold a thread forever.
    timeout = 120
    front = None  # set on the subclass

    def version_string(self):
        return self.server_version

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass  # the JSON log says what happened

    def setup(self):
        super().setup()
        self.sock_nodelay()

    def sock_nodelay(self):
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def read_body(self):
        """The request body (for the requests that may carry one; small ones only)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def body_stream(self, length):
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(CHUNK, remaining))
            if not chunk:
                raise ConnectionError("client closed the request body early")
            remaining -= len(chunk)
            yield chunk

    def send_simple(self, status, body, content_type, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self.status = status

    def stream_response(self, resp, status=None, extra_headers=()):
        """Relays a backend response (headers from PASS_RESPONSE_HEADERS, body in chunks)."""
        status = status or resp.status
        self.send_response(status)
        for name in PASS_RESPONSE_HEADERS:
            for value in resp.headers.get_all(name) or ():
                self.send_header(name.title(), value)
        for k, v in extra_headers:
            self.send_header(k, v)
        length = resp.getheader("Content-Length")
        if self.command == "HEAD" or status in (204, 304):
            if length is not None:
                self.send_header("Content-Length", length)
            else:
                self.send_header("Content-Length", "0")
            self.end_headers()
            resp.read()
            self.status = status
            return 0
        chunked = length is None
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", length)
        self.end_headers()
        self.status = status
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        sent = 0
        while True:
            n = resp.readinto(buf)
            if not n:
                break
            if chunked:
                self.wfile.write(b"%x\r\n" % n)
                self.wfile.write(view[:n])
                self.wfile.write(b"\r\n")
            else:
                self.wfile.write(view[:n])
            sent += n
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        elif sent != int(length):
            # The backend cut the body short; the client must not take it as complete.
            self.close_connection = True
        return sent


class EcrHandler(Handler):
    """The registry side: `/v2/...` with ECR's pull-through semantics."""

    def send_response(self, code, message=None):
        super().send_response(code, message)
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")

    def do_GET(self):
        self.handle_any()

    def do_HEAD(self):
        self.handle_any()

    def do_POST(self):
        self.handle_any()

    def do_PUT(self):
        self.handle_any()

    def do_PATCH(self):
        self.handle_any()

    def do_DELETE(self):
        self.handle_any()

    def handle_any(self):
        self.status = None
        self.note = {}
        self.upstream_count = 0
        auth = self.headers.get("Authorization")
        auth_kind = "none" if not auth else ("basic" if auth[:6].lower() == "basic " else "other")
        try:
            self.dispatch(auth, auth_kind)
        except BackendUnauthorized:
            self.unauthorized("authentication required")
        except (BrokenPipeError, ConnectionResetError) as e:
            self.note["error"] = f"client went away: {e}"
            self.close_connection = True
        except Exception as e:  # never crash the server: a 500 OCI error and a log line
            self.note["error"] = f"{type(e).__name__}: {e}"
            sys.stderr.write(traceback.format_exc())
            self.close_connection = True
            if self.status is None:
                try:
                    self.send_simple(
                        500,
                        oci_error("UNKNOWN", "internal error in the ECR stand-in", str(e)),
                        "application/json",
                        [("Connection", "close")],
                    )
                except OSError:
                    pass
        finally:
            self.front.log.write(
                server="ecr",
                method=self.command,
                path=self.path,
                status=self.status,
                auth=auth_kind,
                upstream_requests=self.upstream_count,
                **self.note,
            )

    def unauthorized(self, message):
        # Whatever body the request carried is not read; the connection cannot be reused.
        if self.command in ("POST", "PUT", "PATCH"):
            self.close_connection = True
        host = self.headers.get("Host", "ecr")
        self.send_simple(
            401,
            oci_error("UNAUTHORIZED", message),
            "application/json; charset=utf-8",
            [("WWW-Authenticate", f'Basic realm="https://{host}/",service="{SERVICE}"')]
            + ([("Connection", "close")] if self.close_connection else []),
        )

    def dispatch(self, auth, auth_kind):
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        if path != "/v2" and not path.startswith("/v2/"):
            self.send_simple(404, oci_error("NOT_FOUND", "not a registry path"), "application/json")
            return
        if auth_kind != "basic":
            self.unauthorized("authentication required")
            return
        if path in ("/v2", "/v2/"):
            self.relay(auth)  # the backend checks the credential and answers 200 {}
            return
        m = MANIFEST_PATH.match(path)
        if m and self.command in ("GET", "HEAD"):
            self.manifest(m.group("name"), m.group("ref"), auth)
            return
        m = BLOB_PATH.match(path)
        if m and self.command in ("GET", "HEAD"):
            self.blob(m.group("name"), m.group("digest"), auth)
            return
        self.relay(auth)

    # --- manifests ---------------------------------------------------------------------------

    def manifest(self, name, ref, auth):
        prefix, _, upstream_repo = name.partition("/")
        by_tag = bool(TAG_ONLY.match(ref))  # anything else is relayed and refused by the backend
        # Only a GET by tag can import. A digest is never looked up upstream (ECR: an uncached
        # manifest referenced by digest returns as missing). A HEAD by tag is answered from what
        # is held, without import or re-check: ECR documents caching on a pull (GET), and
        # pullthrough sends GET for every manifest, so a HEAD never needs to fill the cache here.
        if self.command == "GET" and by_tag and prefix in self.front.upstreams and upstream_repo:
            self.check_tag(prefix, upstream_repo, name, ref, auth)
        self.relay(auth, accept_default=ACCEPT_ALL)

    def check_tag(self, prefix, upstream_repo, name, tag, auth):
        """Imports `name:tag` from upstream when it is not held or its re-check is due."""
        front = self.front
        key = (name, tag)
        with front.tag_lock(key):
            held = self.backend_manifest_digest(name, tag, auth)
            now = time.monotonic()
            last = front.checked.get(key)
            if held is not None and last is None:
                # Held, but not imported by this process (a test pushed it to the backend
                # directly, or the front restarted): count it as checked now, as if it had just
                # been cached, so seeding the backend causes no upstream traffic.
                front.checked[key] = now
                self.note["tag_check"] = "fresh"
                return
            if held is not None and now - last < front.tag_recheck:
                self.note["tag_check"] = "fresh"
                return
            self.note["import"] = f"{name}:{tag}"
            try:
                digest = Importer(self, prefix, upstream_repo, name, auth).run(tag, held)
            except ImportError_ as e:
                self.note["tag_check"] = "upstream_missing" if e.kind == "missing" else "upstream_error"
                self.note["import_error"] = str(e)
                if held is not None:
                    # Re-check failed (upstream down, tag gone): keep serving the cached image,
                    # and do not try again before the next interval.
                    front.checked[key] = time.monotonic()
                return  # not held: the relay below answers 404 MANIFEST_UNKNOWN from the backend
            front.checked[key] = time.monotonic()
            self.note["digest"] = digest
            self.note["tag_check"] = "unchanged" if digest == held else "imported"

    def backend_manifest_digest(self, name, ref, auth):
        conn = self.front.backend_conn()
        try:
            resp = conn.request(
                "HEAD",
                f"/v2/{name}/manifests/{ref}",
                {"Authorization": auth, "Accept": ACCEPT_ALL},
            )
            resp.read()
            if resp.status == 401:
                raise BackendUnauthorized()
            if resp.status == 200:
                return resp.getheader("Docker-Content-Digest") or ""
            return None
        finally:
            conn.close()

    # --- blobs -------------------------------------------------------------------------------

    def blob(self, name, digest, auth):
        if self.command == "HEAD":
            # ECR's answer to a blob HEAD is not documented; answered here as distribution does
            # (200, Content-Length, Docker-Content-Digest), without a redirect.
            self.relay(auth)
            return
        conn = self.front.backend_conn()
        try:
            resp = conn.request("HEAD", f"/v2/{name}/blobs/{digest}", {"Authorization": auth})
            resp.read()
            if resp.status == 401:
                raise BackendUnauthorized()
            if resp.status != 200:
                self.send_simple(
                    404,
                    oci_error("BLOB_UNKNOWN", "blob unknown to registry", {"digest": digest}),
                    "application/json; charset=utf-8",
                )
                return
        finally:
            conn.close()
        base, query = self.front.presign(name, digest, auth)
        self.note["location"] = base
        self.send_response(307)
        self.send_header("Location", f"{base}?{query}")
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.status = 307

    # --- relay -------------------------------------------------------------------------------

    def relay(self, auth, accept_default=None):
        """Sends this request to the backend with the client's credential and relays the answer."""
        headers = {"Authorization": auth}
        for name in PASS_REQUEST_HEADERS:
            # A client may send a header more than once (containers/image sends one Accept per
            # media type): keep every value, as one comma-separated header.
            values = self.headers.get_all(name)
            if values:
                headers[name.title()] = ", ".join(values)
        if accept_default and "Accept" not in headers:
            headers["Accept"] = accept_default
        body = None
        if self.command in ("POST", "PUT", "PATCH"):
            length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
                body = self.read_body()
            else:
                headers["Content-Length"] = length
                body = self.body_stream(int(length))
        conn = self.front.backend_conn()
        try:
            # The client's Host, so that the Location of an upload points back at the front.
            resp = conn.request(self.command, self.path, headers, body, self.headers.get("Host"))
            if resp.status == 401:
                resp.read()
                raise BackendUnauthorized()
            self.stream_response(resp)
        finally:
            conn.close()


class Importer:
    """Copies one tag's image from an upstream registry into the backend."""

    def __init__(self, handler, prefix, upstream_repo, name, auth):
        self.handler = handler
        self.front = handler.front
        self.prefix = prefix
        self.upstream_repo = upstream_repo
        self.name = name
        self.auth = auth
        host, port = self.front.upstreams[prefix]
        self.upstream = Connection(host, port, self.front.upstream_timeout)
        self.backend = self.front.backend_conn()
        self.pushed_blobs = set()

    def run(self, tag, held_digest):
        try:
            data, media_type, digest = self.fetch_manifest(tag)
            if digest == held_digest:
                return digest  # the tag has not moved: nothing to copy
            self.copy_manifest_tree(data, media_type)
            self.put_manifest(tag, data, media_type)
            return digest
        finally:
            self.upstream.close()
            self.backend.close()

    # upstream side

    def upstream_request(self, method, path, headers=None):
        headers = dict(headers or {})
        cred = self.front.upstream_auth.get(self.prefix)
        if cred:
            headers["Authorization"] = cred
        self.front.count_upstream()
        self.handler.upstream_count += 1
        status = None
        try:
            resp = self.upstream.request(method, path, headers)
            status = resp.status
            return resp
        except OSError as e:
            raise ImportError_("error", f"upstream {self.prefix}: {method} {path}: {e}") from e
        except http.client.HTTPException as e:
            raise ImportError_("error", f"upstream {self.prefix}: {method} {path}: {e!r}") from e
        finally:
            self.front.log.write(
                server="upstream", upstream=self.prefix, method=method, path=path, status=status
            )

    def fetch_manifest(self, ref):
        path = f"/v2/{self.upstream_repo}/manifests/{ref}"
        resp = self.upstream_request("GET", path, {"Accept": ACCEPT_ALL})
        data = resp.read()
        if resp.status == 404:
            raise ImportError_("missing", f"upstream {self.prefix}: {path}: 404")
        if resp.status != 200:
            raise ImportError_("error", f"upstream {self.prefix}: {path}: {resp.status}")
        digest = sha256_digest(data)
        if DIGEST_ONLY.match(ref) and ref != digest:
            raise ImportError_("error", f"upstream {self.prefix}: {path}: digest is {digest}")
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise ImportError_("error", f"upstream {self.prefix}: {path}: not JSON: {e}") from e
        media_type = (resp.getheader("Content-Type") or "").split(";")[0].strip()
        if media_type not in MANIFEST_TYPES:
            media_type = doc.get("mediaType", "")
        if media_type not in MANIFEST_TYPES:
            raise ImportError_("error", f"upstream {self.prefix}: {path}: media type {media_type!r}")
        return data, media_type, digest

    def copy_manifest_tree(self, data, media_type):
        """Pushes everything `data` references (children, configs, layers), deepest first."""
        doc = json.loads(data)
        if media_type in INDEX_TYPES:
            for child in doc.get("manifests", []):
                child_digest = child["digest"]
                child_data, child_type, _ = self.fetch_manifest(child_digest)
                self.copy_manifest_tree(child_data, child_type)
                self.put_manifest(child_digest, child_data, child_type)
            return
        descriptors = [doc["config"]] if doc.get("config") else []
        descriptors += doc.get("layers", [])
        for desc in descriptors:
            if desc.get("urls"):
                continue  # a foreign layer: registries do not hold those
            self.copy_blob(desc["digest"], desc.get("size"))

    def copy_blob(self, digest, size):
        if digest in self.pushed_blobs:
            return
        if self.backend_has_blob(digest):
            self.pushed_blobs.add(digest)
            return
        path = f"/v2/{self.upstream_repo}/blobs/{digest}"
        resp = self.upstream_request("GET", path)
        if resp.status in (301, 302, 303, 307, 308):
            # A registry that redirects to object storage: follow once, without credentials.
            location = resp.getheader("Location") or ""
            resp.read()
            resp = self.follow_redirect(location, path)
        if resp.status != 200:
            resp.read()
            raise ImportError_("error", f"upstream {self.prefix}: GET {path}: {resp.status}")
        length = resp.getheader("Content-Length")
        hasher = hashlib.sha256()

        def chunks():
            buf = bytearray(CHUNK)
            while True:
                n = resp.readinto(buf)
                if not n:
                    return
                chunk = bytes(memoryview(buf)[:n])
                hasher.update(chunk)
                yield chunk

        location = self.start_upload()
        sep = "&" if "?" in location else "?"
        headers = {"Authorization": self.auth, "Content-Type": "application/octet-stream"}
        if length is not None:
            headers["Content-Length"] = length
        put = self.backend.request(
            "PUT", f"{location}{sep}digest={urllib.parse.quote(digest)}", headers, chunks()
        )
        text = put.read()
        if "sha256:" + hasher.hexdigest() != digest:
            raise ImportError_("error", f"upstream {self.prefix}: blob {digest} has other bytes")
        if put.status != 201:
            raise ImportError_("error", f"backend PUT blob {digest}: {put.status} {text[:200]!r}")
        self.pushed_blobs.add(digest)

    def follow_redirect(self, location, path):
        url = urllib.parse.urlsplit(location)
        if url.scheme != "http" or url.hostname not in ("127.0.0.1", "localhost"):
            raise ImportError_("error", f"upstream {self.prefix}: {path}: redirect to {location!r}")
        conn = Connection(url.hostname, url.port or 80, self.front.upstream_timeout)
        self.front.count_upstream()
        self.handler.upstream_count += 1
        target = url.path + (f"?{url.query}" if url.query else "")
        try:
            resp = conn.request("GET", target)
        except OSError as e:
            raise ImportError_("error", f"upstream {self.prefix}: {location}: {e}") from e
        self.front.log.write(
            server="upstream", upstream=self.prefix, method="GET", path=url.path, status=resp.status
        )
        return resp

    # backend side

    def backend_has_blob(self, digest):
        resp = self.backend.request(
            "HEAD", f"/v2/{self.name}/blobs/{digest}", {"Authorization": self.auth}
        )
        resp.read()
        if resp.status == 401:
            raise BackendUnauthorized()
        return resp.status == 200

    def start_upload(self):
        resp = self.backend.request(
            "POST", f"/v2/{self.name}/blobs/uploads/", {"Authorization": self.auth}, b""
        )
        text = resp.read()
        if resp.status == 401:
            raise BackendUnauthorized()
        if resp.status != 202:
            raise ImportError_("error", f"backend POST upload: {resp.status} {text[:200]!r}")
        location = resp.getheader("Location") or ""
        url = urllib.parse.urlsplit(location)
        return url.path + (f"?{url.query}" if url.query else "")

    def put_manifest(self, ref, data, media_type):
        resp = self.backend.request(
            "PUT",
            f"/v2/{self.name}/manifests/{ref}",
            {"Authorization": self.auth, "Content-Type": media_type},
            data,
        )
        text = resp.read()
        if resp.status == 401:
            raise BackendUnauthorized()
        if resp.status != 201:
            raise ImportError_("error", f"backend PUT manifest {ref}: {resp.status} {text[:300]!r}")


class S3Handler(Handler):
    """The object-storage side: presigned GETs of blobs, streamed from the backend."""

    server_version = "AmazonS3"

    def do_GET(self):
        self.handle_any()

    def do_HEAD(self):
        self.handle_any()

    def do_PUT(self):
        self.handle_any()

    def do_POST(self):
        self.handle_any()

    def do_DELETE(self):
        self.handle_any()

    def send_response(self, code, message=None):
        super().send_response(code, message)
        self.send_header("x-amz-request-id", secrets.token_hex(8).upper())

    def xml_error(self, status, code, message, extra=""):
        if self.command in ("POST", "PUT"):
            self.close_connection = True  # the body is not read
        self.send_simple(status, s3_error(code, message, extra), "application/xml",
                         [("Connection", "close")] if self.close_connection else [])

    def handle_any(self):
        self.status = None
        self.sent_bytes = 0
        self.note = {}
        url = urllib.parse.urlsplit(self.path)
        try:
            self.serve(url)
        except (BrokenPipeError, ConnectionResetError) as e:
            self.note["error"] = f"client went away: {e}"
            self.close_connection = True
        except Exception as e:
            self.note["error"] = f"{type(e).__name__}: {e}"
            sys.stderr.write(traceback.format_exc())
            self.close_connection = True
            if self.status is None:
                try:
                    self.xml_error(500, "InternalError", "We encountered an internal error.")
                except OSError:
                    pass
        finally:
            self.front.log.write(
                server="s3",
                method=self.command,
                path=url.path,
                status=self.status,
                authorization="Authorization" in self.headers,
                range=self.headers.get("Range"),
                bytes=self.sent_bytes,
                **self.note,
            )

    def serve(self, url):
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        if "Authorization" in self.headers:
            # What S3 answers when a presigned URL also carries an Authorization header (a
            # client that forwarded the registry's credential across the redirect).
            self.xml_error(
                400,
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be specified",
                "<ArgumentName>Authorization</ArgumentName>"
                f"<ArgumentValue>{self.headers['Authorization'].split(' ')[0]} ...</ArgumentValue>",
            )
            return
        if "X-Amz-Signature" not in query or query.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256":
            self.xml_error(403, "AccessDenied", "Access Denied")
            return
        amz_date = query.get("X-Amz-Date", "")
        expires = query.get("X-Amz-Expires", "")
        # Signed over the decoded path, so a client that percent-encodes `:` still matches.
        key_path = urllib.parse.unquote(url.path)
        expected = self.front.sign(key_path, amz_date, expires)
        # A presigned GET URL does not sign HEAD (the method is part of the signature in S3).
        if self.command != "GET" or not hmac.compare_digest(expected, query["X-Amz-Signature"]):
            self.xml_error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided. "
                "Check your key and signing method.",
            )
            return
        try:
            signed_at = calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
            if time.time() > signed_at + int(expires):
                self.xml_error(403, "AccessDenied", "Request has expired",
                               f"<X-Amz-Expires>{expires}</X-Amz-Expires>")
                return
        except ValueError:
            self.xml_error(403, "AccessDenied", "Access Denied")
            return
        with self.front.lock:
            cred = self.front.presigned.get(query["X-Amz-Signature"])
        parts = key_path.split("/")
        # /<bucket>/<repo...>/<digest>
        if cred is None or len(parts) < 4:
            self.xml_error(404, "NoSuchKey", "The specified key does not exist.")
            return
        repo = "/".join(parts[2:-1])
        digest = parts[-1]
        headers = {"Authorization": cred[0]}
        if self.headers.get("Range"):
            headers["Range"] = self.headers["Range"]
        conn = self.front.backend_conn()
        try:
            resp = conn.request("GET", f"/v2/{repo}/blobs/{digest}", headers)
            if resp.status == 416:
                resp.read()
                self.xml_error(416, "InvalidRange", "The requested range is not satisfiable")
                return
            if resp.status not in (200, 206):
                resp.read()
                self.note["backend_status"] = resp.status
                self.xml_error(404, "NoSuchKey", "The specified key does not exist.")
                return
            self.send_response(resp.status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{digest.split(":")[-1][:32]}"')
            if resp.getheader("Content-Range"):
                self.send_header("Content-Range", resp.getheader("Content-Range"))
            length = resp.getheader("Content-Length")
            if length is None:
                raise ValueError("backend blob answer without Content-Length")
            self.send_header("Content-Length", length)
            self.end_headers()
            self.status = resp.status
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while True:
                n = resp.readinto(buf)
                if not n:
                    break
                self.wfile.write(view[:n])
                self.sent_bytes += n
            if self.sent_bytes != int(length):
                self.close_connection = True
        finally:
            conn.close()


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--listen", type=parse_hostport, required=True,
                        help="HOST:PORT of the registry side (port 0: any free port)")
    parser.add_argument("--backend", type=parse_base_url, required=True,
                        help="http://HOST:PORT of the docker-registry that stores the cache")
    parser.add_argument("--upstream", type=parse_named, action="append", default=[],
                        metavar="PREFIX=URL", help="a pull-through rule: prefix and upstream registry")
    parser.add_argument("--upstream-auth", type=parse_named, action="append", default=[],
                        metavar="PREFIX=USER:PASS", help="Basic credential for an upstream")
    parser.add_argument("--s3-listen", type=parse_hostport, default=("127.0.0.1", 0),
                        help="HOST:PORT of the S3-like blob server (default 127.0.0.1:0)")
    parser.add_argument("--s3-host", default=None,
                        help="host name put in the redirect Location (default: the --s3-listen "
                             "host; `localhost` makes it another host than 127.0.0.1 for clients "
                             "that drop credentials only when the host name changes)")
    parser.add_argument("--s3-expires", type=int, default=600,
                        help="X-Amz-Expires of the presigned URLs, seconds (default 600)")
    parser.add_argument("--tag-recheck", type=parse_duration, default=parse_duration("24h"),
                        help="re-check a held tag upstream at most once per this (default 24h)")
    parser.add_argument("--upstream-timeout", type=float, default=30.0,
                        help="seconds per upstream socket operation (default 30)")
    parser.add_argument("--log", default=None, help="JSON-lines log file (appended)")
    args = parser.parse_args(argv)
    upstreams = []
    for name, url in args.upstream:
        try:
            upstreams.append((name, parse_base_url(url)))
        except argparse.ArgumentTypeError as e:
            parser.error(f"--upstream {name}: {e}")
    args.upstream = upstreams
    if args.s3_host is None:
        args.s3_host = args.s3_listen[0]

    front = Front(args)
    ecr_handler = type("BoundEcrHandler", (EcrHandler,), {"front": front})
    s3_handler = type("BoundS3Handler", (S3Handler,), {"front": front})
    ecr = Server(args.listen, ecr_handler)
    s3 = Server(args.s3_listen, s3_handler)
    front.s3_port = s3.server_address[1]

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threads = [
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        for srv in (ecr, s3)
    ]
    for t in threads:
        t.start()
    print(f"ready {ecr.server_address[1]} {s3.server_address[1]}", flush=True)
    while not stop.wait(0.5):
        pass
    for srv in (ecr, s3):
        srv.shutdown()
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
