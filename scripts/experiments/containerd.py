#!/usr/bin/env python3
"""Which containerd configs send pulls through a hosts.toml mirror? The experiments behind
tests/fixtures/containerd/NOTES.md, kept so they can be rerun.

Run as root inside a fresh network namespace, so nothing can leave the machine whatever
containerd does (a bypassed mirror means containerd tries docker.io itself):

    unshare -n sh -c 'ip link set lo up && .cache/venv-exp/bin/python scripts/experiments/containerd.py'

Needs: scripts/deps-containerd (1.7.24 and 2.1.9 in .cache/containerd), Debian's containerd
(1.6.20), docker-registry, skopeo, and grpcio (the CRI client below speaks gRPC with hand-encoded
protobuf; `python3 -m venv .cache/venv-exp && .cache/venv-exp/bin/pip install grpcio`).

Each case starts its own containerd (private root, state, socket and config under /tmp), pulls
`docker.io/library/alpine:3.19` once through CRI (`PullImage`, as the kubelet does) or `ctr`,
and reads the mirror's access log: a pull went through the mirror when the mirror served the
manifest. The hosts.toml puts the mirror first and `server` at a dead loopback port, so a pull
succeeds only through the mirror. Results go to stdout as JSON lines and to $OUT (default
/tmp/ctrd-exp/results).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import io
import gzip
import hashlib
import time

import grpc

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WORK = os.environ.get("WORK", "/tmp/ctrd-exp")
OUT = os.environ.get("OUT", os.path.join(WORK, "results"))
BINS = {
    "1.6.20": "/usr/bin",
    "1.7.24": os.path.join(REPO, ".cache/containerd/1.7.24/usr/bin"),
    "2.1.9": os.path.join(REPO, ".cache/containerd/2.1.9/usr/bin"),
}
IMAGE = "docker.io/library/alpine:3.19"
ETC_CERTS_D = "/etc/containerd/certs.d"


# --- protobuf by hand: only strings and nested messages -----------------------------------

def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num, payload):
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _first_string(buf):
    """Field 1 of a message whose field 1 is a string (PullImageResponse.image_ref)."""
    if not buf:
        return ""
    i, shift, n = 1, 0, 0
    while True:
        b = buf[i]
        n |= (b & 0x7F) << shift
        i += 1
        shift += 7
        if not b & 0x80:
            break
    return buf[i:i + n].decode()


class Cri:
    def __init__(self, sock):
        self.ch = grpc.insecure_channel("unix://" + sock)

    def _call(self, method, req, timeout):
        f = self.ch.unary_unary(method)  # no serializers: bytes in, bytes out
        return f(req, timeout=timeout)

    def list_images(self):
        return self._call("/runtime.v1.ImageService/ListImages", b"", 5)

    def pull(self, image, timeout=60):
        # PullImageRequest{image: ImageSpec{image}}
        resp = self._call("/runtime.v1.ImageService/PullImage", _field(1, _field(1, image.encode())), timeout)
        return _first_string(resp)

    def close(self):
        self.ch.close()


# --- helpers ------------------------------------------------------------------------------

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def sh(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def sha256(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def make_oci_layout(path):
    """A one-layer linux/amd64 OCI image (a text file), written as an OCI layout."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        data = b"pullthrough containerd experiment\n"
        ti = tarfile.TarInfo("hello.txt")
        ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
        t.addfile(ti, io.BytesIO(data))
    tar = raw.getvalue()
    layer = gzip.compress(tar, mtime=0)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/hello.txt"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(layer), "size": len(layer)}],
    }, sort_keys=True).encode()
    blobs = os.path.join(path, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    for b in (layer, config, manifest):
        with open(os.path.join(blobs, sha256(b)[7:]), "wb") as f:
            f.write(b)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(manifest),
            "size": len(manifest), "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}, f)
    return sha256(manifest)


class Registry:
    """docker-registry (CNCF distribution 2.8) on 127.0.0.1, access log to a file."""

    def __init__(self, root):
        self.port = free_port()
        self.dir = os.path.join(root, "registry")
        os.makedirs(self.dir, exist_ok=True)
        cfg = os.path.join(self.dir, "config.yml")
        with open(cfg, "w") as f:
            f.write(f"""version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {self.dir}/data
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{self.port}
  secret: containerd-experiments
health:
  storagedriver:
    enabled: false
""")
        self.log_path = os.path.join(self.dir, "registry.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self.proc = subprocess.Popen(["docker-registry", "serve", cfg], stdout=open(self.log_path, "w"),
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("registry did not start")

    def push(self, layout, repo_tag):
        r = sh(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:latest",
                f"docker://127.0.0.1:{self.port}/{repo_tag}"])
        if r.returncode:
            raise RuntimeError(f"skopeo copy {repo_tag}: {r.stderr}")

    def mark(self):
        return os.path.getsize(self.log_path)

    def requests_since(self, mark):
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            lines = f.read().decode(errors="replace").splitlines()
        # combined log format: 127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 200 ...
        out = []
        for line in lines:
            if '"' in line and " HTTP/1.1\" " in line:
                req = line.split('"')[1]
                status = line.split('"')[2].split()[0]
                out.append(f"{req.rsplit(' ', 1)[0]} {status}")
        return out

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)


class Containerd:
    def __init__(self, version, name, config_text):
        self.version = version
        self.dir = os.path.join(WORK, name)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.sock = os.path.join(self.dir, "c.sock")
        self.config_path = os.path.join(self.dir, "config.toml")
        text = "\n".join(
            l if l.lstrip().startswith("#") else
            l.replace("{root}", self.dir + "/root").replace("{state}", self.dir + "/state").replace("{socket}", self.sock)
            for l in config_text.splitlines()) + "\n"
        with open(self.config_path, "w") as f:
            f.write(text)
        self.log_path = os.path.join(self.dir, "containerd.log")
        t0 = time.monotonic()
        self.proc = subprocess.Popen([os.path.join(BINS[version], "containerd"), "--config", self.config_path],
                                     stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     env=dict(os.environ, PATH=BINS[version] + ":" + os.environ["PATH"]))
        self.cri = None
        deadline = t0 + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd {version} exited: {self.log()[-3000:]}")
            if os.path.exists(self.sock):
                try:
                    c = Cri(self.sock)
                    c.list_images()
                    self.cri = c
                    break
                except grpc.RpcError:
                    c.close()
            time.sleep(0.02)
        if self.cri is None:
            raise RuntimeError(f"containerd {version}: CRI did not answer: {self.log()[-3000:]}")
        self.start_s = round(time.monotonic() - t0, 3)

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def ctr(self, *args, timeout=60):
        return sh([os.path.join(BINS[self.version], "ctr"), "--address", self.sock, "--namespace", "exp", *args],
                  timeout=timeout)

    def stop(self):
        if self.cri:
            self.cri.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # A pull leaves nothing mounted; make sure before deleting the root.
        with open("/proc/mounts") as f:
            left = [l.split()[1] for l in f if l.split()[1].startswith(self.dir)]
        for m in reversed(left):
            sh(["umount", "-l", m])
        shutil.rmtree(self.dir, ignore_errors=True)
        return left


def hosts_toml(mirror_port, dead_port):
    return (f'server = "http://127.0.0.1:{dead_port}"\n\n'
            f'[host."http://127.0.0.1:{mirror_port}"]\n  capabilities = ["pull", "resolve"]\n')


def write_certs_d(root, registry, text):
    d = os.path.join(root, registry)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "hosts.toml"), "w") as f:
        f.write(text)


def config_for(version, config_path, extra=""):
    """The committed min-<version>.toml template with `config_path` set, or removed (None)."""
    with open(os.path.join(REPO, "tests/fixtures/containerd", f"min-{version}.toml")) as f:
        text = f.read()
    out = []
    for line in text.splitlines():
        if not line.lstrip().startswith("#"):
            if "config_path" in line and config_path is None:
                continue
            line = line.replace("{extra}", extra).replace("{certs_d}", config_path or "")
        out.append(line)
    return "\n".join(out) + "\n"


def pull_path(log):
    """Which CRI pull path containerd 2.x logged (debug level):
    `PullImage "<ref>" with snapshotter <s> using transfer service|client.Pull()`."""
    for line in log.splitlines():
        if "PullImage" in line and "with snapshotter" in line:
            if "using transfer service" in line:
                return "transfer service"
            if "using client.Pull()" in line:
                return "local (client.Pull)"
    return "unknown"


def run_case(reg, name, version, config, client="cri", ctr_args=(), note=""):
    d = Containerd(version, name, config)
    mark = reg.mark()
    err, ref = "", ""
    try:
        if client == "cri":
            try:
                ref = d.cri.pull(IMAGE)
            except grpc.RpcError as e:
                err = f"{e.code().name}: {e.details()}"
        else:
            r = d.ctr("images", "pull", *ctr_args, IMAGE)
            if r.returncode:
                err = (r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout).strip() else f"rc={r.returncode}"
            else:
                ref = "ok"
        time.sleep(0.2)
        reqs = reg.requests_since(mark)
        log = d.log()
        with open(d.config_path) as f:
            config = f.read()
    finally:
        left = d.stop()
    mirror_manifests = [r for r in reqs if "/manifests/" in r]
    warn = [l.split("msg=")[1][:200] for l in log.splitlines() if "Falling back to local image pull" in l or "incompatible with transfer service" in l]
    res = {
        "case": name, "containerd": version, "client": client if client == "cri" else "ctr " + " ".join(ctr_args),
        "pulled": not err, "error": err[:400], "through_mirror": bool(mirror_manifests),
        "mirror_requests": reqs, "start_s": d.start_s, "note": note,
    }
    if client == "cri":
        res["cri_pull_path"] = pull_path(log) if version.startswith("2.") else "local (client.Pull)"
        res["fallback_warning"] = warn
    if left:
        res["mounts_left"] = left
    with open(os.path.join(OUT, name + ".containerd.log"), "w") as f:
        f.write(log)
    with open(os.path.join(OUT, name + ".config.toml"), "w") as f:
        f.write(config)
    print(json.dumps(res), flush=True)
    return res


def main():
    if os.geteuid() != 0:
        sys.exit("run as root (containerd needs it)")
    with open("/proc/net/route") as f:
        if len(f.read().splitlines()) > 1:
            sys.exit("refusing to run with a network route: run inside `unshare -n` (see the docstring)")
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(OUT)
    layout = os.path.join(WORK, "oci")
    digest = make_oci_layout(layout)
    reg = Registry(WORK)
    for repo in ("library/alpine:3.19",):
        reg.push(layout, repo)
    dead = free_port()
    certs = os.path.join(WORK, "certs.d")
    write_certs_d(certs, "docker.io", hosts_toml(reg.port, dead))
    colon = f"{certs}:/etc/docker/certs.d"
    only = os.environ.get("ONLY", "")
    cases = [
        # name, version, config, client, ctr args, note
        ("v2.1.9-single-dir", "2.1.9", config_for("2.1.9", certs), "cri", (), ""),
        ("v2.1.9-colon-list", "2.1.9", config_for("2.1.9", colon), "cri", (), "containerd #12415/#12636"),
        ("v2.1.9-colon-list-discard", "2.1.9", config_for("2.1.9", colon, "discard_unpacked_layers = true"), "cri", (), "EKS AL2023-like"),
        ("v2.1.9-colon-list-local-pull", "2.1.9", config_for("2.1.9", colon, "use_local_image_pull = true"), "cri", (), ""),
        ("v2.1.9-colon-list-snapshot-annotations", "2.1.9", config_for("2.1.9", colon, "disable_snapshot_annotations = false"), "cri", (), "SOCI-like"),
        ("v2.1.9-colon-list-max-downloads", "2.1.9", config_for("2.1.9", colon, "max_concurrent_downloads = 10"), "cri", (), ""),
        ("v2.1.9-single-dir-discard", "2.1.9", config_for("2.1.9", certs, "discard_unpacked_layers = true"), "cri", (), ""),
        ("v2.1.9-ctr-hosts-dir", "2.1.9", config_for("2.1.9", certs), "ctr", ("--hosts-dir", certs), ""),
        ("v2.1.9-ctr-hosts-dir-colon", "2.1.9", config_for("2.1.9", certs), "ctr", ("--hosts-dir", colon), ""),
        ("v2.1.9-ctr-local-hosts-dir", "2.1.9", config_for("2.1.9", certs), "ctr", ("--local", "--hosts-dir", certs), ""),
        ("v1.7.24-single-dir", "1.7.24", config_for("1.7.24", certs), "cri", (), ""),
        ("v1.7.24-colon-list", "1.7.24", config_for("1.7.24", colon), "cri", (), ""),
        ("v1.7.24-ctr-hosts-dir", "1.7.24", config_for("1.7.24", certs), "ctr", ("--hosts-dir", certs), ""),
        ("v1.6.20-single-dir", "1.6.20", config_for("1.6.20", certs), "cri", (), ""),
        ("v1.6.20-colon-list", "1.6.20", config_for("1.6.20", colon), "cri", (), ""),
        ("v1.6.20-ctr-hosts-dir", "1.6.20", config_for("1.6.20", certs), "ctr", ("--hosts-dir", certs), ""),
    ]
    # Version 2 configs on containerd 2.1 (migrated at start-up), as AL2023's 1.7-era template
    # writes them. The CRI images plugin migrates `containerd.discard_unpacked_layers` only when
    # the same `containerd` table also has `runtimes` (plugins/cri/images/plugin.go).
    v2_discard = config_for("1.7.24", colon, "discard_unpacked_layers = true")
    runc = ('\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
            '  runtime_type = "io.containerd.runc.v2"\n')
    cases += [
        ("v2.1.9-version2-colon-discard-no-runtimes", "2.1.9", v2_discard, "cri", (), "version 2 file on 2.1"),
        ("v2.1.9-version2-colon-discard-runtimes", "2.1.9", v2_discard + runc, "cri", (), "version 2 file on 2.1"),
        ("v2.1.9-version2-colon", "2.1.9", config_for("1.7.24", colon) + runc, "cri", (), "version 2 file on 2.1"),
    ]
    # The list is split (local pull): the hosts.toml only in the second directory.
    second = f"{WORK}/empty-certs.d:{certs}"
    os.makedirs(f"{WORK}/empty-certs.d")
    cases += [
        ("v1.7.24-colon-list-second-dir", "1.7.24", config_for("1.7.24", second), "cri", (), ""),
        ("v2.1.9-colon-list-second-dir-discard", "2.1.9", config_for("2.1.9", second, "discard_unpacked_layers = true"), "cri", (), ""),
    ]
    # The snapshotter: 2.1's transfer service unpacks with its own unpack_config (overlayfs).
    native = config_for("2.1.9", certs).replace('snapshotter = "overlayfs"', 'snapshotter = "native"')
    native_local = config_for("2.1.9", certs, "use_local_image_pull = true").replace('snapshotter = "overlayfs"', 'snapshotter = "native"')
    native_unpack = native + ('\n[[plugins."io.containerd.transfer.v1.local".unpack_config]]\n'
                              '  platform = "linux/amd64"\n  snapshotter = "native"\n')
    cases += [
        ("v2.1.9-native-snapshotter", "2.1.9", native, "cri", (), ""),
        ("v2.1.9-native-snapshotter-unpack-config", "2.1.9", native_unpack, "cri", (), "transfer unpack_config names native"),
        ("v2.1.9-native-snapshotter-local-pull", "2.1.9", native_local, "cri", (), ""),
    ]
    # imports: an imported file that sets only the registry table of the CRI images plugin.
    imp = os.path.join(WORK, "import-registry.toml")
    with open(imp, "w") as f:
        f.write(f'version = 3\n[plugins."io.containerd.cri.v1.images".registry]\n  config_path = "{colon}"\n')
    main_discard = config_for("2.1.9", colon, "discard_unpacked_layers = true").replace(
        "version = 3\n", f'version = 3\nimports = ["{imp}"]\n', 1)
    cases.append(("v2.1.9-import-sets-registry-only", "2.1.9", main_discard, "cri", (), "import sets only registry.config_path"))
    # The deprecated inline mirrors (Bottlerocket's containerd 1.7 template writes these from
    # settings.container-registry.mirrors), no config_path.
    mirrors_v2 = (f'\n[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n'
                  f'  endpoint = ["http://127.0.0.1:{reg.port}"]\n')
    mirrors_v3 = mirrors_v2.replace("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images")
    cases += [
        ("v1.7.24-registry-mirrors", "1.7.24", config_for("1.7.24", None) + mirrors_v2, "cri", (), "Bottlerocket 1.7-like"),
        ("v2.1.9-registry-mirrors", "2.1.9", config_for("2.1.9", None) + mirrors_v3, "cri", (), ""),
    ]
    results = []
    for c in cases:
        if only and only not in c[0]:
            continue
        results.append(run_case(reg, c[0], c[1], c[2], c[3], c[4], c[5]))

    # The built-in default directory: no config_path at all, a hosts.toml in /etc/containerd/certs.d.
    if not only or "etc" in only:
        backup = None
        if os.path.lexists(ETC_CERTS_D):
            backup = ETC_CERTS_D + ".exp-backup"
            os.rename(ETC_CERTS_D, backup)
        try:
            write_certs_d(ETC_CERTS_D, "docker.io", hosts_toml(reg.port, dead))
            for v in ("2.1.9", "1.7.24", "1.6.20"):
                results.append(run_case(reg, f"v{v}-no-config-path-etc-certs-d", v, config_for(v, None), "cri", (), "hosts.toml in /etc/containerd/certs.d"))
                results.append(run_case(reg, f"v{v}-no-config-path-ctr-no-hosts-dir", v, config_for(v, None), "ctr", (), "hosts.toml in /etc/containerd/certs.d"))
        finally:
            shutil.rmtree(ETC_CERTS_D, ignore_errors=True)
            if backup:
                os.rename(backup, ETC_CERTS_D)
    reg.stop()
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump({"image": IMAGE, "manifest_digest": digest, "mirror_port": reg.port, "dead_port": dead,
                   "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
