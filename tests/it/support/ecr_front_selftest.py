#!/usr/bin/env python3
"""Checks ecr_front.py against real parts: three docker-registry processes, curl and skopeo.

    python3 tests/it/support/ecr_front_selftest.py [--keep] [--big-mib 64]

Starts, on 127.0.0.1 with free ports:
- `up1`: an open docker-registry, the Docker Hub stand-in (prefix `docker-hub`);
- `up2`: a docker-registry with htpasswd user `quayuser`, the quay stand-in (prefix `quay`,
  reached with `--upstream-auth`);
- `ecr`: a docker-registry with htpasswd user `AWS`, the backend that stores the cache;
- the front, in front of `ecr`, with both upstreams.

Pushes images built here (uncompressed tar layers, OCI manifests, an OCI index) to the upstreams,
then checks the front's behaviour with curl and skopeo (see `main`). Every process is stopped at
the end, also on failure or Ctrl-C. Exits 0 when every check passed; prints each check.

Needs: docker-registry (Debian `docker-registry`), htpasswd (`apache2-utils`), curl, skopeo.
No assertion depends on wall-clock time; the throughput of the big blob is printed, not checked.
"""

import argparse
import base64
import hashlib
import http.client
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
FRONT = os.path.join(HERE, "ecr_front.py")
PASSWORD = "123456789012-auth-token"
QUAY_USER, QUAY_PASS = "quayuser", "quaypass"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ACCEPT = f"{OCI_MANIFEST}, {OCI_INDEX}"

CHECKS = 0


def check(cond, what, detail=""):
    global CHECKS
    if not cond:
        raise AssertionError(f"FAILED: {what}" + (f"\n  {detail}" if detail else ""))
    CHECKS += 1
    print(f"ok  {what}", flush=True)


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, name, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}) before opening {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not open 127.0.0.1:{port}")


# --- processes ------------------------------------------------------------------------------

PROCS = []


def spawn(name, argv, workdir, **kw):
    out = open(os.path.join(workdir, f"{name}.stdout"), "ab")
    err = open(os.path.join(workdir, f"{name}.stderr"), "ab")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=kw.get("stdout", out),
                            stderr=err, env=env)
    PROCS.append(proc)
    return proc


def stop(proc, grace=5):
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class Registry:
    """A docker-registry configured as tests/it/support/registry.rs does."""

    def __init__(self, workdir, name, user=None, password=None):
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir)
        self.name, self.port, self.user, self.password = name, free_port(), user, password
        auth = ""
        if user:
            htpasswd = os.path.join(self.dir, "htpasswd")
            out = subprocess.run(["htpasswd", "-Bbn", user, password], check=True,
                                 capture_output=True).stdout
            with open(htpasswd, "wb") as f:
                f.write(out)
            auth = f"auth:\n  htpasswd:\n    realm: selftest\n    path: {htpasswd}\n"
        with open(os.path.join(self.dir, "config.yml"), "w") as f:
            f.write(
                "version: 0.1\nlog:\n  level: info\n  formatter: text\n  accesslog:\n"
                "    disabled: false\nstorage:\n  filesystem:\n"
                f"    rootdirectory: {self.dir}/data\n  delete:\n    enabled: true\n"
                "  maintenance:\n    uploadpurging:\n      enabled: false\n"
                f"http:\n  addr: 127.0.0.1:{self.port}\n  secret: selftest\n"
                f"health:\n  storagedriver:\n    enabled: false\n{auth}"
            )
        self.start()

    def start(self):
        self.proc = spawn(self.name, ["docker-registry", "serve",
                                      os.path.join(self.dir, "config.yml")], self.dir)
        wait_port(self.port, self.proc, self.name)

    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def request(self, method, path, headers=None, body=None):
        headers = dict(headers or {})
        if self.user:
            cred = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            headers["Authorization"] = f"Basic {cred}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def push_blob(self, repo, data):
        status, headers, body = self.request("POST", f"/v2/{repo}/blobs/uploads/")
        assert status == 202, (status, body)
        loc = urllib.parse.urlsplit(headers["Location"])
        path = loc.path + "?" + (loc.query + "&" if loc.query else "") + "digest=" + digest_of(data)
        status, _, body = self.request("PUT", path, {"Content-Type": "application/octet-stream"},
                                       data)
        assert status == 201, (status, body)

    def put_manifest(self, repo, ref, data, media_type):
        status, _, body = self.request("PUT", f"/v2/{repo}/manifests/{ref}",
                                       {"Content-Type": media_type}, data)
        assert status == 201, (status, body)

    def push(self, repo, tag, image):
        for blob in image.blobs():
            self.push_blob(repo, blob)
        for m in image.children:
            self.put_manifest(repo, digest_of(m.manifest), m.manifest, OCI_MANIFEST)
        self.put_manifest(repo, tag, image.root, image.media_type)

    def has_manifest(self, repo, ref):
        status, headers, _ = self.request("HEAD", f"/v2/{repo}/manifests/{ref}", {"Accept": ACCEPT})
        return status == 200 and headers.get("Docker-Content-Digest")

    def access_log(self):
        with open(os.path.join(self.dir, f"{self.name}.stdout"), errors="replace") as f:
            lines = f.read().splitlines()
        out = []
        for line in lines:
            m = re.search(r'"(\w+) (\S+) HTTP/[\d.]+" (\d+)', line)
            if m:
                out.append((m.group(1), m.group(2), int(m.group(3))))
        return out


# --- images ---------------------------------------------------------------------------------


def layer(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path, data in files:
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Manifest:
    def __init__(self, arch, layers, label):
        self.layers = layers
        config = {
            "architecture": arch,
            "os": "linux",
            "config": {"Labels": {"selftest": label}},
            "rootfs": {"type": "layers", "diff_ids": [digest_of(l) for l in layers]},
        }
        self.config = json.dumps(config).encode()
        self.arch = arch
        self.manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": digest_of(self.config), "size": len(self.config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": digest_of(l), "size": len(l)} for l in layers],
        }).encode()


class Image:
    def __init__(self, manifests, index=False):
        self.children = manifests if index else []
        self.manifests = manifests
        if index:
            self.media_type = OCI_INDEX
            self.root = json.dumps({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest_of(m.manifest),
                               "size": len(m.manifest),
                               "platform": {"os": "linux", "architecture": m.arch}}
                              for m in manifests],
            }).encode()
        else:
            self.media_type = OCI_MANIFEST
            self.root = manifests[0].manifest
        self.digest = digest_of(self.root)

    def blobs(self):
        seen = {}
        for m in self.manifests:
            for b in [m.config] + m.layers:
                seen.setdefault(digest_of(b), b)
        return list(seen.values())


# --- curl -----------------------------------------------------------------------------------


class Curl:
    def __init__(self, workdir):
        self.dir = workdir
        self.n = 0

    def __call__(self, url, *args, auth=None, method=None, body_file=None):
        """Runs curl once; returns (status, headers dict lowercased, body bytes)."""
        self.n += 1
        hdr = os.path.join(self.dir, f"curl{self.n}.headers")
        out = body_file or os.path.join(self.dir, f"curl{self.n}.body")
        argv = ["curl", "-sS", "--noproxy", "*", "-D", hdr, "-o", out, "-w", "%{http_code}"]
        if auth:
            argv += ["-u", auth]
        if method == "HEAD":
            argv += ["-I"]
        elif method:
            argv += ["-X", method]
        argv += list(args) + [url]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"curl {url}: {res.stderr}")
        headers = {}
        with open(hdr, errors="replace", newline="") as f:
            for line in f.read().split("\r\n"):
                k, sep, v = line.partition(":")
                if sep:
                    headers[k.strip().lower()] = v.strip()
        body = b""
        if body_file is None and os.path.exists(out):
            with open(out, "rb") as f:
                body = f.read()
        return int(res.stdout.strip()[-3:]), headers, body


def error_code(body):
    try:
        return json.loads(body)["errors"][0]["code"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def read_log(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                return "sha256:" + h.hexdigest()
            h.update(chunk)


# --- the checks -----------------------------------------------------------------------------


class FrontProc:
    def __init__(self, workdir, backend, up1, up2, recheck, s3_host=None):
        self.log = os.path.join(workdir, "front.log")
        argv = [sys.executable, FRONT, "--listen", "127.0.0.1:0", "--backend", backend.url(),
                "--upstream", f"docker-hub={up1.url()}", "--upstream", f"quay={up2.url()}",
                "--upstream-auth", f"quay={QUAY_USER}:{QUAY_PASS}",
                "--s3-listen", "127.0.0.1:0", "--tag-recheck", recheck, "--log", self.log]
        if s3_host:
            argv += ["--s3-host", s3_host]
        self.proc = spawn("front", argv, workdir, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline().decode()
        m = re.fullmatch(r"ready (\d+) (\d+)\n", line)
        if not m:
            raise RuntimeError(f"front did not print its ready line: {line!r}")
        self.port, self.s3_port = int(m.group(1)), int(m.group(2))
        self.base = f"http://127.0.0.1:{self.port}"

    def entries(self, server=None):
        return [e for e in read_log(self.log) if server is None or e.get("server") == server]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--big-mib", type=int, default=64, help="size of the big layer (MiB)")
    opts = parser.parse_args()
    for tool in ("docker-registry", "htpasswd", "curl", "skopeo"):
        if shutil.which(tool) is None:
            sys.exit(f"missing tool: {tool}")
    workdir = tempfile.mkdtemp(prefix="ecrfront", dir="/tmp")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ok = False
    try:
        run(workdir, opts)
        ok = True
    finally:
        for p in PROCS:
            stop(p)
        if ok and not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}", file=sys.stderr)
    print(f"all {CHECKS} checks passed")


def run(workdir, opts):
    curl = Curl(workdir)
    aws = f"AWS:{PASSWORD}"
    up1 = Registry(workdir, "up1")
    up2 = Registry(workdir, "up2", QUAY_USER, QUAY_PASS)
    ecr = Registry(workdir, "ecr", "AWS", PASSWORD)

    img_a = Image([Manifest("amd64", [layer([("a.txt", b"image a\n")]),
                                      layer([("big.bin", random.Random(1).randbytes(300000))])],
                            "a")])
    img_b = Image([Manifest("amd64", [layer([("b.txt", b"image b\n")])], "b")])
    multi = Image([Manifest("amd64", [layer([("m.txt", b"multi amd64\n")])], "m-amd64"),
                   Manifest("arm64", [layer([("m.txt", b"multi arm64\n")])], "m-arm64")],
                  index=True)
    img_q = Image([Manifest("amd64", [layer([("q.txt", b"from quay\n")])], "q")])
    up1.push("library/x", "1", img_a)
    up1.push("library/multi", "1", multi)
    up2.push("org/q", "v1", img_q)

    front = FrontProc(workdir, ecr, up1, up2, "24h")
    F = front.base
    print(f"front on {front.port}, s3 on {front.s3_port}; workdir {workdir}")

    # Auth.
    st, h, body = curl(f"{F}/v2/")
    check(st == 401 and error_code(body) == "UNAUTHORIZED", "GET /v2/ without auth: 401 UNAUTHORIZED",
          f"{st} {body!r}")
    check(h.get("www-authenticate", "").startswith("Basic realm="), "401 carries a Basic challenge",
          str(h))
    check(h.get("docker-distribution-api-version") == "registry/2.0",
          "Docker-Distribution-API-Version on the 401")
    st, _, body = curl(f"{F}/v2/", auth="AWS:wrong")
    check(st == 401 and error_code(body) == "UNAUTHORIZED", "GET /v2/ with a wrong password: 401")
    st, h, body = curl(f"{F}/v2/", auth=aws)
    check(st == 200 and json.loads(body) == {}, "GET /v2/ with AWS:PW: 200 {}", f"{st} {body!r}")
    check(h.get("docker-distribution-api-version") == "registry/2.0",
          "Docker-Distribution-API-Version on the 200")
    st, _, _ = curl(f"{F}/v2/docker-hub/library/x/manifests/1", "-H", f"Accept: {ACCEPT}")
    check(st == 401, "manifest GET without auth: 401 (no import)")

    # By digest before any tag pull: missing, whatever the upstream has.
    st, _, body = curl(f"{F}/v2/docker-hub/library/x/manifests/{img_a.digest}", "-H",
                       f"Accept: {ACCEPT}", auth=aws)
    check(st == 404 and error_code(body) == "MANIFEST_UNKNOWN",
          "GET by digest before a tag pull: 404 MANIFEST_UNKNOWN", f"{st} {body!r}")
    st, _, _ = curl(f"{F}/v2/docker-hub/library/x/manifests/{img_a.digest}", "-H",
                    f"Accept: {ACCEPT}", auth=aws, method="HEAD")
    check(st == 404, "HEAD by digest before a tag pull: 404")
    st, _, _ = curl(f"{F}/v2/docker-hub/library/x/manifests/1", "-H", f"Accept: {ACCEPT}",
                    auth=aws, method="HEAD")
    check(st == 404, "HEAD by tag before a tag pull: 404 (HEAD does not import)")
    st, _, body = curl(f"{F}/v2/docker-hub/library/x/blobs/{digest_of(img_a.manifests[0].config)}",
                       auth=aws)
    check(st == 404 and error_code(body) == "BLOB_UNKNOWN", "blob GET before a tag pull: 404 BLOB_UNKNOWN",
          f"{st} {body!r}")
    check(not front.entries("upstream"), "no upstream request so far")
    check(not ecr.has_manifest("docker-hub/library/x", img_a.digest), "backend does not hold it")

    # By tag: import, then serve.
    st, h, body = curl(f"{F}/v2/docker-hub/library/x/manifests/1", "-H", f"Accept: {ACCEPT}",
                       auth=aws)
    check(st == 200 and body == img_a.root, "GET by tag: 200 with the upstream's manifest bytes",
          f"{st} {body[:200]!r}")
    check(h.get("docker-content-digest") == img_a.digest and h.get("content-type") == OCI_MANIFEST,
          "GET by tag: Docker-Content-Digest and Content-Type passed through", str(h))
    imp = [e for e in front.entries("ecr") if e.get("import") == "docker-hub/library/x:1"]
    check(len(imp) == 1 and imp[0]["tag_check"] == "imported" and imp[0]["upstream_requests"] == 4,
          "log: one import of docker-hub/library/x:1 with 4 upstream requests (manifest, config, "
          "2 layers)", str(imp))
    check(ecr.has_manifest("docker-hub/library/x", "1") == img_a.digest,
          "backend now holds docker-hub/library/x:1")
    for b in img_a.blobs():
        st, _, data = ecr.request("GET", f"/v2/docker-hub/library/x/blobs/{digest_of(b)}")
        check(st == 200 and data == b, f"backend holds blob {digest_of(b)[:19]}")
    st, h, body = curl(f"{F}/v2/docker-hub/library/x/manifests/{img_a.digest}", "-H",
                       f"Accept: {ACCEPT}", auth=aws)
    check(st == 200 and body == img_a.root, "GET by digest after the tag pull: 200")
    st, h, _ = curl(f"{F}/v2/docker-hub/library/x/manifests/{img_a.digest}", "-H",
                    f"Accept: {ACCEPT}", auth=aws, method="HEAD")
    check(st == 200 and h.get("docker-content-digest") == img_a.digest
          and h.get("content-length") == str(len(img_a.root)),
          "HEAD by digest after the tag pull: 200 with digest and length", str(h))
    n_up = len(front.entries("upstream"))
    st, _, body = curl(f"{F}/v2/docker-hub/library/x/manifests/1", "-H", f"Accept: {ACCEPT}",
                       auth=aws)
    check(st == 200 and body == img_a.root and len(front.entries("upstream")) == n_up,
          "second GET by tag: served without an upstream request")

    # Blobs: redirect to S3.
    big_layer = img_a.manifests[0].layers[1]
    ld = digest_of(big_layer)
    st, h, body = curl(f"{F}/v2/docker-hub/library/x/blobs/{ld}", auth=aws)
    loc = h.get("location", "")
    check(st == 307 and body == b"" and h.get("content-length") == "0",
          "blob GET: 307 with an empty body and Content-Length: 0", f"{st} {h}")
    check(loc.startswith(f"http://127.0.0.1:{front.s3_port}/") and "X-Amz-Signature=" in loc
          and "X-Amz-Expires=600" in loc and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in loc,
          "Location is a presigned-style URL on the S3 listener", loc)
    st, h, body = curl(loc)
    check(st == 200 and digest_of(body) == ld and h.get("content-length") == str(len(big_layer)),
          "Location fetched without Authorization: 200, right bytes", f"{st} {h}")
    st, h, body = curl(loc, auth=aws)
    check(st == 400 and b"<Code>InvalidArgument</Code>" in body
          and b"Only one auth mechanism allowed" in body,
          "Location fetched with Authorization: 400 InvalidArgument", f"{st} {body!r}")
    st, h, body = curl(loc, "-H", "Range: bytes=100-1123")
    check(st == 206 and body == big_layer[100:1124]
          and h.get("content-range") == f"bytes 100-1123/{len(big_layer)}",
          "Range request: 206 with Content-Range and the right slice", f"{st} {h}")
    bad = re.sub(r"X-Amz-Signature=([0-9a-f])", lambda m: "X-Amz-Signature=" +
                 ("0" if m.group(1) != "0" else "1"), loc)
    st, _, body = curl(bad)
    check(st == 403 and b"SignatureDoesNotMatch" in body, "tampered signature: 403 SignatureDoesNotMatch")
    st, _, body = curl(loc.split("?")[0])
    check(st == 403 and b"AccessDenied" in body, "no query: 403 AccessDenied")
    st, _, _ = curl(loc, method="HEAD")
    check(st == 403, "HEAD of a presigned GET URL: 403 (the method is signed)")
    st, h, _ = curl(f"{F}/v2/docker-hub/library/x/blobs/{ld}", auth=aws, method="HEAD")
    check(st == 200 and h.get("content-length") == str(len(big_layer))
          and h.get("docker-content-digest") == ld, "blob HEAD: 200 with length and digest", str(h))
    st, _, body = curl(f"{F}/v2/docker-hub/library/x/blobs/sha256:{'0' * 64}", auth=aws)
    check(st == 404 and error_code(body) == "BLOB_UNKNOWN", "unknown blob GET: 404 BLOB_UNKNOWN")
    s3 = front.entries("s3")
    check(any(e["status"] == 400 and e["authorization"] for e in s3)
          and any(e["status"] == 200 and not e["authorization"] for e in s3),
          "S3 log records the authorization flag and statuses")

    # Keep-alive: two requests on one connection (framing is right).
    res = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "-u", aws, "-o", "/dev/null", "-o", "/dev/null",
         "-w", "%{http_code} %{num_connects}\n", f"{F}/v2/",
         f"{F}/v2/docker-hub/library/x/blobs/sha256:{'0' * 64}"],
        capture_output=True, text=True, check=True)
    check(res.stdout.split("\n")[:2] == ["200 1", "404 0"], "keep-alive: second request reuses the "
          "connection", res.stdout)
    res = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-o", "/dev/null",
         "-w", "%{http_code} %{num_connects}\n", loc, loc], capture_output=True, text=True,
        check=True)
    check(res.stdout.split("\n")[:2] == ["200 1", "200 0"], "S3 keep-alive", res.stdout)

    # Tags list relayed.
    st, _, body = curl(f"{F}/v2/docker-hub/library/x/tags/list", auth=aws)
    check(st == 200 and json.loads(body).get("tags") == ["1"], "tags/list relayed to the backend")

    # An index: every child and blob imported.
    st, h, body = curl(f"{F}/v2/docker-hub/library/multi/manifests/1", "-H", f"Accept: {ACCEPT}",
                       auth=aws)
    check(st == 200 and body == multi.root and h.get("content-type") == OCI_INDEX,
          "index GET by tag: 200 with the index")
    imp = [e for e in front.entries("ecr") if e.get("import") == "docker-hub/library/multi:1"]
    check(len(imp) == 1 and imp[0]["upstream_requests"] == 1 + 2 * 3,
          "index import: index + 2 x (manifest, config, layer) upstream requests", str(imp))
    for m in multi.manifests:
        st, _, body = curl(f"{F}/v2/docker-hub/library/multi/manifests/{digest_of(m.manifest)}",
                           "-H", f"Accept: {ACCEPT}", auth=aws)
        check(st == 200 and body == m.manifest, f"child {m.arch} by digest: 200")
        st, h, _ = curl(f"{F}/v2/docker-hub/library/multi/blobs/{digest_of(m.layers[0])}", auth=aws)
        st2, _, data = curl(h.get("location", ""))
        check(st == 307 and st2 == 200 and data == m.layers[0], f"child {m.arch} layer via S3")

    # A second upstream that needs credentials.
    st, h, body = curl(f"{F}/v2/quay/org/q/manifests/v1", "-H", f"Accept: {ACCEPT}", auth=aws)
    check(st == 200 and body == img_q.root, "quay prefix with --upstream-auth: imported")
    # Missing upstream.
    st, _, body = curl(f"{F}/v2/docker-hub/library/nope/manifests/1", "-H", f"Accept: {ACCEPT}",
                       auth=aws)
    check(st == 404 and error_code(body) == "MANIFEST_UNKNOWN",
          "tag the upstream lacks: 404 MANIFEST_UNKNOWN", f"{st} {body!r}")
    nope = [e for e in front.entries("ecr") if e.get("import") == "docker-hub/library/nope:1"]
    check(nope and nope[-1]["tag_check"] == "upstream_missing", "log says upstream_missing")
    # Not a configured prefix: a plain ECR repository (relayed, no import).
    st, _, body = curl(f"{F}/v2/other/x/manifests/1", "-H", f"Accept: {ACCEPT}", auth=aws)
    check(st == 404 and error_code(body) == "MANIFEST_UNKNOWN", "unconfigured prefix: no import, 404")

    # skopeo through the front (follows the 307; must not send the credential to S3).
    s3_before = len(front.entries("s3"))
    ref = f"docker://127.0.0.1:{front.port}/docker-hub/library/x:1"
    res = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--creds", aws, ref],
                         capture_output=True, text=True, timeout=120)
    check(res.returncode == 0 and json.loads(res.stdout)["Digest"] == img_a.digest,
          "skopeo inspect through the front: digest matches", res.stderr[-2000:])
    dest = os.path.join(workdir, "skopeo-dir")
    res = subprocess.run(["skopeo", "copy", "--src-tls-verify=false", "--src-creds", aws, ref,
                          f"dir:{dest}"], capture_output=True, text=True, timeout=300)
    check(res.returncode == 0, "skopeo copy through the front to a dir", res.stderr[-2000:])
    for b in img_a.blobs():
        p = os.path.join(dest, digest_of(b).split(":")[1])
        check(os.path.exists(p) and sha256_file(p) == digest_of(b),
              f"skopeo copied blob {digest_of(b)[:19]} intact")
    s3_skopeo = front.entries("s3")[s3_before:]
    check(s3_skopeo and all(e["status"] == 200 and not e["authorization"] for e in s3_skopeo),
          f"skopeo fetched {len(s3_skopeo)} blobs from S3, none with Authorization", str(s3_skopeo))

    # A big blob streams through import and S3 (throughput printed, not asserted).
    rng = random.Random(7)
    big = Image([Manifest("amd64", [b"".join(rng.randbytes(1 << 20) for _ in range(opts.big_mib))],
                          "big")])
    up1.push("library/big", "1", big)
    del big.manifests[0].layers[:]  # free it; only the digest is needed below
    big_digest = json.loads(big.root)["layers"][0]["digest"]
    t0 = time.monotonic()
    st, _, _ = curl(f"{F}/v2/docker-hub/library/big/manifests/1", "-H", f"Accept: {ACCEPT}",
                    auth=aws)
    t_import = time.monotonic() - t0
    check(st == 200, f"{opts.big_mib} MiB image imported")
    st, h, _ = curl(f"{F}/v2/docker-hub/library/big/blobs/{big_digest}", auth=aws)
    out = os.path.join(workdir, "big.bin")
    res = subprocess.run(["curl", "-sS", "--noproxy", "*", "-o", out, "-w",
                          "%{http_code} %{size_download} %{speed_download}", h["location"]],
                         capture_output=True, text=True, check=True)
    code, size, speed = res.stdout.split()
    check(code == "200" and int(size) == opts.big_mib << 20 and sha256_file(out) == big_digest,
          f"{opts.big_mib} MiB blob via S3: right bytes")
    os.unlink(out)
    # A client that goes away in the middle of the big blob does not hurt the S3 server.
    loc = urllib.parse.urlsplit(h["location"])
    sock = socket.create_connection(("127.0.0.1", front.s3_port))
    sock.sendall(f"GET {loc.path}?{loc.query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got = 0
    while got < (1 << 20):
        got += len(sock.recv(65536))
    sock.close()
    st, _, body = curl(h["location"], "-H", "Range: bytes=0-9")
    check(st == 206 and len(body) == 10, "S3 serves on after a client dropped a blob mid-way")
    with open(f"/proc/{front.proc.pid}/status") as f:
        hwm_kib = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
    check(hwm_kib < (opts.big_mib << 10), f"front's peak RSS {hwm_kib >> 10} MiB stays below the "
          f"blob size (streamed, never held whole)")
    print(f"note: {opts.big_mib} MiB import took {t_import:.2f} s; S3 download "
          f"{float(speed) / (1 << 20):.0f} MiB/s")

    # Concurrent first pulls of one tag: one import, the others wait for it.
    par = Image([Manifest("amd64", [layer([("p.txt", b"parallel\n")])], "par")])
    up1.push("library/par", "1", par)
    results = []

    def pull():
        results.append(curl(f"{F}/v2/docker-hub/library/par/manifests/1", "-H",
                            f"Accept: {ACCEPT}", auth=aws))

    threads = [threading.Thread(target=pull) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    checks = [e.get("tag_check") for e in front.entries("ecr")
              if e["path"] == "/v2/docker-hub/library/par/manifests/1"]
    check(all(r[0] == 200 and r[2] == par.root for r in results) and len(results) == 8
          and sorted(checks) == ["fresh"] * 7 + ["imported"],
          "8 concurrent first pulls: all 200, exactly one import", str(checks))

    # The tag moves upstream: stale until the re-check interval.
    up1.push("library/x", "1", img_b)
    n_up = len(front.entries("upstream"))
    st, h, body = curl(f"{F}/v2/docker-hub/library/x/manifests/1", "-H", f"Accept: {ACCEPT}",
                       auth=aws)
    check(st == 200 and h.get("docker-content-digest") == img_a.digest
          and len(front.entries("upstream")) == n_up,
          "tag moved upstream, --tag-recheck 24h: still the old digest, no upstream request")
    check(stop(front.proc) == 0, "front exits 0 on SIGTERM")

    # The second front puts `localhost` in the Location: another host name than 127.0.0.1, so
    # that Go clients built with newer Go (which compare host names without the port) drop
    # the credential on the redirect, as they do for ECR's real S3 host.
    front = FrontProc(workdir, ecr, up1, up2, "1s", s3_host="localhost")
    F = front.base
    st, h, _ = curl(f"{F}/v2/docker-hub/library/x/blobs/{ld}", auth=aws)
    st2, _, body = curl(h.get("location", ""))
    check(st == 307 and h["location"].startswith(f"http://localhost:{front.s3_port}/")
          and st2 == 200 and digest_of(body) == ld, "--s3-host localhost: Location on localhost works")
    st, h, _ = curl(f"{F}/v2/docker-hub/library/x/manifests/1", "-H", f"Accept: {ACCEPT}",
                    auth=aws)
    check(st == 200 and h.get("docker-content-digest") == img_a.digest,
          "restarted front (--tag-recheck 1s): a held tag counts as just checked")
    time.sleep(2)
    st, h, body = curl(f"{F}/v2/docker-hub/library/x/manifests/1", "-H", f"Accept: {ACCEPT}",
                       auth=aws)
    check(st == 200 and h.get("docker-content-digest") == img_b.digest and body == img_b.root,
          "after the re-check interval: the new digest", str(h))
    st, _, _ = curl(f"{F}/v2/docker-hub/library/x/manifests/{img_a.digest}", "-H",
                    f"Accept: {ACCEPT}", auth=aws)
    check(st == 200, "the old digest stays in the backend")
    # Upstream down at re-check time: serve the stale image.
    up1.push("library/x", "1", img_a)
    stop(up1.proc)
    time.sleep(2)
    st, h, _ = curl(f"{F}/v2/docker-hub/library/x/manifests/1", "-H", f"Accept: {ACCEPT}",
                    auth=aws)
    last = [e for e in front.entries("ecr") if e.get("import") == "docker-hub/library/x:1"][-1]
    check(st == 200 and h.get("docker-content-digest") == img_b.digest
          and last["tag_check"] == "upstream_error",
          "upstream down at re-check: the cached image is served", f"{st} {h} {last}")
    st, _, body = curl(f"{F}/v2/docker-hub/library/y/manifests/1", "-H", f"Accept: {ACCEPT}",
                       auth=aws)
    check(st == 404 and error_code(body) == "MANIFEST_UNKNOWN",
          "upstream down, tag not held: 404 MANIFEST_UNKNOWN")

    # Password rotation on the backend rotates the front's credential too.
    new = "rotated-token"
    out = subprocess.run(["htpasswd", "-Bbn", "AWS", new], check=True, capture_output=True).stdout
    hp = os.path.join(ecr.dir, "htpasswd")
    with open(hp + ".tmp", "wb") as f:
        f.write(out)
    st_old = os.stat(hp).st_mtime
    os.utime(hp + ".tmp", (st_old + 1, st_old + 1))
    os.rename(hp + ".tmp", hp)
    st, _, _ = curl(f"{F}/v2/", auth=aws)
    st2, _, _ = curl(f"{F}/v2/", auth=f"AWS:{new}")
    check(st == 401 and st2 == 200, "backend password rotated: old 401, new 200 through the front")

    # Backend down: a 500 OCI error, and the front keeps serving.
    stop(ecr.proc)
    st, _, body = curl(f"{F}/v2/", auth=f"AWS:{new}")
    check(st == 500 and error_code(body) == "UNKNOWN", "backend down: 500 OCI error", f"{st} {body!r}")
    ecr.start()
    st, _, _ = curl(f"{F}/v2/", auth=f"AWS:{new}")
    check(st == 200, "backend back: the front serves again")

    # Every front line is well formed.
    ecr_lines = front.entries("ecr")
    check(all({"method", "path", "status", "auth", "upstream_requests"} <= e.keys()
              for e in ecr_lines), "every front log line has method, path, status, auth, "
          "upstream_requests")
    check(stop(front.proc) == 0, "front exits 0 on SIGTERM")


if __name__ == "__main__":
    main()
