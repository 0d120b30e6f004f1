#!/usr/bin/env bash
# Docker Engine (Debian 12's docker.io 20.10) and podman (4.3) pulling through a mirror, the
# experiments behind the Docker/podman part of tests/fixtures/containerd/NOTES.md. Run as root inside a fresh
# network namespace, so the real registries cannot be reached and only the mirror can serve:
#
#   unshare -n sh -c 'ip link set lo up && scripts/experiments/clients.sh'
#
# The mirror is a plain docker-registry on 127.0.0.1 holding a tiny one-layer image under the
# paths each client asks for: dockerd's registry-mirrors send Docker Hub pulls without a
# registry name (/v2/library/alpine/...), podman's registries.conf mirror locations carry it as
# a path prefix (/v2/docker.io/library/alpine/...), as `pullthrough hosts --format
# registries-conf` writes them. Logs and the access log go to $OUT (default /tmp/clients-exp/out).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
[ "$(wc -l </proc/net/route)" -le 1 ] || { echo "run inside unshare -n (see the header)" >&2; exit 1; }

WORK=${WORK:-/tmp/clients-exp}
OUT=${OUT:-$WORK/out}
rm -rf "$WORK"; mkdir -p "$OUT"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  # dockerd's vfs layers and podman's storage may hold mounts (shm, overlay of the run root).
  { grep -o " $WORK[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount -l "$m" || true; done
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
REG_PORT=$(port)

# The image: the same tiny OCI layout as scripts/experiments/containerd.py.
python3 - "$WORK/oci" <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("exp", "scripts/experiments/containerd.py")
exp = importlib.util.module_from_spec(spec)
sys.modules["grpc"] = type(sys)("grpc")  # the layout writer needs no gRPC
spec.loader.exec_module(exp)
print(exp.make_oci_layout(sys.argv[1]))
EOF

mkdir -p "$WORK/registry"
cat >"$WORK/registry/config.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $WORK/registry/data
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$REG_PORT
  secret: client-experiments
health:
  storagedriver:
    enabled: false
EOF
env -u REGISTRY_HTTP_ADDR docker-registry serve "$WORK/registry/config.yml" >"$OUT/registry.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$REG_PORT/v2/" >/dev/null && break; sleep 0.05; done
for repo in library/alpine:3.19 bitnami/nginx:1.25 \
  docker.io/library/alpine:3.19 docker.io/bitnami/nginx:1.25 \
  quay.io/prometheus/busybox:latest registry.k8s.io/pause:3.10; do
  skopeo copy --quiet --dest-tls-verify=false "oci:$WORK/oci:latest" "docker://127.0.0.1:$REG_PORT/$repo"
done
mark() { wc -l <"$OUT/registry.log"; }
served() { # since-line -> the GET/HEAD lines the mirror answered
  tail -n +"$(($1 + 1))" "$OUT/registry.log" | grep -o '"\(GET\|HEAD\) /v2/[^"]*" [0-9]*' | sed 's/ HTTP\/1.1"//' || true
}
result() { # name rc since
  printf '%s: rc=%s\n' "$1" "$2" | tee -a "$OUT/results.txt"
  served "$3" | sed 's/^/    mirror: /' | tee -a "$OUT/results.txt"
}

# --- Docker Engine ---------------------------------------------------------------------------
D=$WORK/docker
mkdir -p "$D/data" "$D/exec"
# insecure-registries is not needed for a loopback mirror: dockerd treats 127.0.0.0/8 as
# insecure by default. INSECURE=1 adds it anyway.
if [ "${INSECURE:-0}" = 1 ]; then
  printf '{\n  "registry-mirrors": ["http://127.0.0.1:%s"],\n  "insecure-registries": ["127.0.0.1:%s"]\n}\n' "$REG_PORT" "$REG_PORT" >"$D/daemon.json"
else
  printf '{\n  "registry-mirrors": ["http://127.0.0.1:%s"]\n}\n' "$REG_PORT" >"$D/daemon.json"
fi
cp "$D/daemon.json" "$OUT/daemon.json"
T0=$(date +%s.%N)
dockerd --config-file "$D/daemon.json" --data-root "$D/data" --exec-root "$D/exec" \
  --pidfile "$D/docker.pid" -H "unix://$D/docker.sock" \
  --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false --bridge=none \
  --userland-proxy=false --storage-driver vfs >"$OUT/dockerd.log" 2>&1 &
PIDS+=($!)
DOCKER=(/usr/bin/docker -H "unix://$D/docker.sock")
up=no
for _ in $(seq 300); do
  if "${DOCKER[@]}" version >/dev/null 2>&1; then up=yes; break; fi
  kill -0 "${PIDS[-1]}" 2>/dev/null || break
  sleep 0.1
done
echo "dockerd up=$up after $(echo "$(date +%s.%N) - $T0" | bc)s" | tee -a "$OUT/results.txt"
if [ "$up" = yes ]; then
  "${DOCKER[@]}" info --format '{{json .RegistryConfig.Mirrors}} driver={{.Driver}}' | tee -a "$OUT/results.txt"
  # nosuch/image: the mirror answers 404, dockerd falls back to Docker Hub (unreachable here).
  for img in alpine:3.19 bitnami/nginx:1.25 nosuch/image:1 quay.io/prometheus/busybox:latest; do
    m=$(mark); rc=0
    "${DOCKER[@]}" pull "$img" >"$OUT/docker-pull-${img//[\/:]/_}.log" 2>&1 || rc=$?
    result "docker pull $img" "$rc" "$m"
    tail -2 "$OUT/docker-pull-${img//[\/:]/_}.log" | sed 's/^/    docker: /' | tee -a "$OUT/results.txt"
  done
  "${DOCKER[@]}" images --digests | tee -a "$OUT/results.txt"
else
  tail -20 "$OUT/dockerd.log" | tee -a "$OUT/results.txt"
fi
kill "${PIDS[-1]}" 2>/dev/null || true

# --- podman ------------------------------------------------------------------------------------
P=$WORK/podman
mkdir -p "$P/root" "$P/runroot" "$P/tmp"
# The shape `pullthrough hosts --format registries-conf` writes (src/hosts.rs render_registries_conf).
cat >"$P/registries.conf" <<EOF
[[registry]]
prefix = "docker.io"
location = "registry-1.docker.io"

[[registry.mirror]]
location = "127.0.0.1:$REG_PORT/docker.io"
insecure = true

[[registry]]
prefix = "quay.io"
location = "quay.io"

[[registry.mirror]]
location = "127.0.0.1:$REG_PORT/quay.io"
insecure = true

[[registry]]
prefix = "registry.k8s.io"
location = "registry.k8s.io"

[[registry.mirror]]
location = "127.0.0.1:$REG_PORT/registry.k8s.io"
insecure = true
EOF
PODMAN=(podman --root "$P/root" --runroot "$P/runroot" --storage-driver vfs --tmpdir "$P/tmp"
  --cgroup-manager cgroupfs --events-backend file)
export CONTAINERS_REGISTRIES_CONF=$P/registries.conf
for img in docker.io/library/alpine:3.19 docker.io/bitnami/nginx:1.25 quay.io/prometheus/busybox:latest \
  registry.k8s.io/pause:3.10; do
  m=$(mark); rc=0
  T0=$(date +%s.%N)
  "${PODMAN[@]}" pull "$img" >"$OUT/podman-pull-${img//[\/:]/_}.log" 2>&1 || rc=$?
  result "podman pull $img ($(echo "$(date +%s.%N) - $T0" | bc)s)" "$rc" "$m"
  tail -2 "$OUT/podman-pull-${img//[\/:]/_}.log" | sed 's/^/    podman: /' | tee -a "$OUT/results.txt"
done
"${PODMAN[@]}" images --digests | tee -a "$OUT/results.txt"
# Without the drop-in: the real registry, unreachable here.
unset CONTAINERS_REGISTRIES_CONF
m=$(mark); rc=0
"${PODMAN[@]}" pull docker.io/library/busybox:1.36 >"$OUT/podman-pull-no-mirror.log" 2>&1 || rc=$?
result "podman pull without the mirror config" "$rc" "$m"
tail -1 "$OUT/podman-pull-no-mirror.log" | sed 's/^/    podman: /' | tee -a "$OUT/results.txt"
