//! The side-by-side benchmark driver behind `bench/run`: direct pulls vs pullthrough vs nginx.
//!
//! It starts the same loopback stand-ins the integration tests use (docker-registry with bcrypt
//! htpasswd as the ECR registry endpoint, moto as the ECR API), one `pullthrough serve` (release
//! build) for the whole run, and nginx configured from `bench/nginx.conf` the way ECR-signing
//! nginx proxies are deployed. Every measurement then runs against all three in turn, round after
//! round (direct, pullthrough, nginx, direct, …), so machine drift hits all of them alike, and
//! the medians and their ratios to direct go into `BENCHMARKS.md`.
//!
//! Nothing here talks to anything but 127.0.0.1. Load generators are curl (blobs) and wrk
//! (manifests); real pulls go through a fresh containerd per run via CRI `PullImage`.
//!
//! Usage (normally through `bench/run`): `bench [--quick] [--out BENCHMARKS.md]`.

// The driver reuses the integration tests' harness, whose helpers panic with a message on
// failure; a benchmark that cannot set up has nothing better to do either.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::containerd::{AuthConfig, Containerd, mirror_hosts_toml, write_hosts_toml};
use support::image::{ACCEPT, Blob, Image, LayerBuilder, Manifest, Platform, random_bytes};
use support::moto::Moto;
use support::pullthrough::{Options, Pullthrough};
use support::registry::{Registry, USER};
use support::{ChildGuard, basic_auth, free_port, repo_root, short_tempdir};

const MIB: usize = 1024 * 1024;
const GIB: usize = 1024 * MIB;

/// How much of everything to do.
struct Plan {
    quick: bool,
    blob_size: usize,
    blob_rounds: usize,
    fan_size: usize,
    fan_streams: usize,
    fan_rounds: usize,
    wrk_secs: u64,
    manifest_rounds: usize,
    layers: usize,
    layer_size: usize,
    pulls: usize,
    startups: usize,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            quick: false,
            blob_size: GIB,
            blob_rounds: 5,
            fan_size: 256 * MIB,
            fan_streams: 64,
            fan_rounds: 3,
            wrk_secs: 10,
            manifest_rounds: 2,
            layers: 8,
            layer_size: 16 * MIB,
            pulls: 8,
            startups: 7,
        }
    }

    fn quick() -> Plan {
        Plan {
            quick: true,
            blob_size: 256 * MIB,
            blob_rounds: 2,
            fan_size: 16 * MIB,
            fan_streams: 64,
            fan_rounds: 1,
            wrk_secs: 2,
            manifest_rounds: 1,
            layers: 8,
            layer_size: 4 * MIB,
            pulls: 2,
            startups: 3,
        }
    }
}

/// The three ways to reach the registry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    Direct,
    Pullthrough,
    Nginx,
}

const ALL: [Via; 3] = [Via::Direct, Via::Pullthrough, Via::Nginx];

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Pullthrough => "pullthrough",
            Via::Nginx => "nginx",
        }
    }
}

/// Everything running for the whole benchmark.
struct Stand {
    moto: Moto,
    registry: Registry,
    pt: Pullthrough,
    nginx: Nginx,
    /// `Basic …` for the registry: what direct clients and nginx send.
    auth: String,
    pt_pid: u32,
}

impl Stand {
    fn base(&self, via: Via) -> String {
        match via {
            Via::Direct => self.registry.base_url(),
            Via::Pullthrough => self.pt.url(),
            Via::Nginx => self.nginx.url(),
        }
    }

    /// The URL of `endpoint` (`blobs/<d>`, `manifests/<ref>`) of Docker Hub's `library/<name>`.
    fn url(&self, via: Via, name: &str, endpoint: &str) -> String {
        match via {
            Via::Direct => format!("{}/v2/docker-hub/library/{name}/{endpoint}", self.base(via)),
            _ => format!(
                "{}/v2/library/{name}/{endpoint}?ns=docker.io",
                self.base(via)
            ),
        }
    }

    /// Headers a client sends: only direct carries credentials.
    fn headers(&self, via: Via) -> Vec<String> {
        match via {
            Via::Direct => vec![format!("Authorization: {}", self.auth)],
            _ => vec![],
        }
    }

    /// The processes whose CPU and memory count as the proxy's.
    fn proxy_pids(&self, via: Via) -> Vec<u32> {
        match via {
            Via::Direct => vec![],
            Via::Pullthrough => vec![self.pt_pid],
            Via::Nginx => process_tree(self.nginx.child.id()),
        }
    }
}

/// nginx from `bench/nginx.conf`; killed on drop.
struct Nginx {
    child: ChildGuard,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    async fn start(registry_port: u16, token: &str) -> Nginx {
        let dir = short_tempdir("bench-nginx");
        let port = free_port();
        let mut child = spawn_nginx(dir.path(), port, registry_port, token);
        child.wait_for_port(port).await;
        Nginx {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM, not the guard's SIGKILL: only the master can stop its workers, which would
        // otherwise live on, orphaned, holding the port.
        self.child.terminate(Duration::from_secs(5));
    }
}

fn nginx_bin() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nginx"))
}

fn spawn_nginx(dir: &Path, port: u16, registry_port: u16, token: &str) -> ChildGuard {
    let template = std::fs::read_to_string(repo_root().join("bench/nginx.conf"))
        .expect("read bench/nginx.conf");
    let conf = template
        .replace("@DIR@", &dir.display().to_string())
        .replace("@PORT@", &port.to_string())
        .replace("@REGISTRY_PORT@", &registry_port.to_string())
        .replace("@TOKEN@", token);
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    let mut cmd = Command::new(nginx_bin());
    cmd.arg("-c").arg(&path).arg("-p").arg(dir);
    ChildGuard::spawn("nginx", &mut cmd, dir)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let plan = if args.iter().any(|a| a == "--quick") {
        Plan::quick()
    } else {
        Plan::full()
    };
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    // `--only blob,fanout,manifests,pulls,footprint`: a subset, for development.
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').map(str::to_owned).collect());
    let section = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|s| s == name));
    let command = std::env::var("BENCH_COMMAND").unwrap_or_else(|_| "bench/run".into());
    let _ = rustls::crypto::ring::default_provider().install_default();
    let run_start = Instant::now();
    let load_before = uptime();
    say(&format!("load before: {load_before}"));

    say("starting moto, docker-registry (bcrypt htpasswd), pullthrough and nginx");
    let moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    let token = support::base64(format!("{USER}:{}", moto.password()).as_bytes());
    let auth = basic_auth(USER, &moto.password());

    say("filling the registry");
    let blob = push_random_blob(&registry, "docker-hub/library/bench", plan.blob_size, 1).await;
    let fan = push_random_blob(&registry, "docker-hub/library/bench", plan.fan_size, 2).await;
    let small = Image::small("bench");
    registry.push("docker-hub/library/bench", "1", &small).await;
    let layers: Vec<Blob> = (0..plan.layers)
        .map(|i| {
            LayerBuilder::new()
                .random_file(
                    &format!("data/layer{i}.bin"),
                    plan.layer_size,
                    100 + i as u64,
                )
                .build()
        })
        .collect();
    let pull_image = Image::single(Manifest::new(Platform::LINUX_AMD64, layers, "pullbench"));
    // pullthrough and nginx find it at the pull-through path; direct pulls at Docker Hub's.
    registry
        .push("docker-hub/library/pullbench", "1", &pull_image)
        .await;
    registry.push("library/pullbench", "1", &pull_image).await;
    registry.clear_requests();

    let (mut opts, dead) = Options::with_dead_servers(&registry.base_url(), &moto.endpoint());
    // As deployed: the default timeouts, not the tests' short ones.
    opts.extra = support::pullthrough::upstreams_toml(Some(&dead));
    // Every request by tag goes to the registry, as it did before the tag cache: the figure is
    // the mirror's cost per upstream request. With the default `tag_ttl`, repeats within five
    // minutes are answered from memory, like requests by digest.
    opts.extra
        .push_str("\n[manifest_cache]\ntag_ttl = \"0s\"\n");
    // As deployed: info level, so every request writes its access-log line.
    opts.rust_log = "info".into();
    let pt = Pullthrough::start(opts).await;
    let pt_pid = pid_listening(&pt.host()).expect("pullthrough's pid");
    let nginx = Nginx::start(registry.port(), &token).await;
    let stand = Stand {
        moto,
        registry,
        pt,
        nginx,
        auth,
        pt_pid,
    };
    // Idle: the token fetched, nothing served yet.
    for _ in 0..200 {
        if stand.pt.ready_status().await == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = [
        None,
        Some(rss(&stand.proxy_pids(Via::Pullthrough))),
        Some(rss(&stand.proxy_pids(Via::Nginx))),
    ];

    if args.iter().any(|a| a == "--hold") {
        // For profiling by hand: the stand stays up until Ctrl-C.
        println!(
            "registry  {}  (Authorization: {})",
            stand.registry.base_url(),
            stand.auth
        );
        println!(
            "pullthrough {}  pid {}  config {}",
            stand.pt.url(),
            stand.pt_pid,
            stand.pt.config_path().display()
        );
        println!("nginx     {}", stand.nginx.url());
        println!(
            "blob      {blob}\nfan blob  {fan}\nmanifest  {}",
            small.digest()
        );
        println!("ECR API   {}", stand.moto.endpoint());
        tokio::signal::ctrl_c().await?;
        return Ok(());
    }
    let mut results = Results {
        idle_rss,
        ..Results::default()
    };

    // Every target must answer correctly before it is timed.
    for via in ALL {
        let (n, _) = curl_get(
            &stand,
            via,
            &stand.url(via, "bench", &format!("blobs/{}", fan)),
        )
        .map_err(|e| anyhow::anyhow!("{} blob check: {e}", via.name()))?;
        anyhow::ensure!(n == plan.fan_size as u64, "{}: short blob", via.name());
    }

    say(&format!(
        "1. blob streaming: {} MiB, single stream, {} rounds",
        plan.blob_size / MIB,
        plan.blob_rounds
    ));
    for round in 0..plan.blob_rounds * usize::from(section("blob")) {
        for via in ALL {
            let pids = stand.proxy_pids(via);
            let cpu0 = cpu_secs(&pids);
            let all0 = Cpu::now(&stand);
            let url = stand.url(via, "bench", &format!("blobs/{blob}"));
            let (bytes, secs) = curl_get(&stand, via, &url).map_err(anyhow::Error::msg)?;
            anyhow::ensure!(bytes == plan.blob_size as u64, "{}: short blob", via.name());
            let cpu = cpu_secs(&pids) - cpu0;
            let all = Cpu::now(&stand).since(&all0, cpu);
            let gib = bytes as f64 / GIB as f64;
            results.blob_cpu_all.push(via, all.processes / gib);
            results.blob_idle.push(via, all.idle * 100.0);
            let mbs = bytes as f64 / secs / 1e6;
            say(&format!(
                "   round {round} {:<12} {mbs:>8.0} MB/s  cpu {cpu:.2} s",
                via.name()
            ));
            results.blob_mbs.push(via, mbs);
            if via != Via::Direct {
                results
                    .blob_cpu_per_gib
                    .push(via, cpu / (bytes as f64 / GIB as f64));
            }
        }
    }

    say(&format!(
        "2. fan-out: {} concurrent GETs of a {} MiB blob, {} rounds",
        plan.fan_streams,
        plan.fan_size / MIB,
        plan.fan_rounds
    ));
    for round in 0..plan.fan_rounds * usize::from(section("fanout")) {
        for via in ALL {
            let pids = stand.proxy_pids(via);
            let sampler = RssSampler::start(pids.clone());
            let cpu0 = cpu_secs(&pids);
            let all0 = Cpu::now(&stand);
            let url = stand.url(via, "bench", &format!("blobs/{fan}"));
            let (bytes, secs) =
                curl_parallel(&stand, via, &url, plan.fan_streams).map_err(anyhow::Error::msg)?;
            let peak = sampler.stop();
            let cpu = cpu_secs(&pids) - cpu0;
            let all = Cpu::now(&stand).since(&all0, cpu);
            let gib = bytes as f64 / GIB as f64;
            results.fan_cpu_all.push(via, all.processes / gib);
            results.fan_idle.push(via, all.idle * 100.0);
            if via != Via::Direct {
                results.fan_cpu_per_gib.push(via, cpu / gib);
            }
            let want = (plan.fan_size * plan.fan_streams) as u64;
            anyhow::ensure!(
                bytes == want,
                "{}: fan-out got {bytes} of {want} bytes",
                via.name()
            );
            let mbs = bytes as f64 / secs / 1e6;
            say(&format!(
                "   round {round} {:<12} {mbs:>8.0} MB/s  peak RSS {:.1} MiB",
                via.name(),
                peak as f64 / MIB as f64
            ));
            results.fan_mbs.push(via, mbs);
            if via != Via::Direct {
                results.fan_peak_rss.push(via, peak as f64 / MIB as f64);
            }
        }
    }

    say(&format!(
        "3. manifests: by tag and by digest, c=1 and c=64, {} s each, {} rounds",
        plan.wrk_secs, plan.manifest_rounds
    ));
    let digest = small.digest().to_owned();
    for via in ALL {
        for reference in ["1", digest.as_str()] {
            let url = stand.url(via, "bench", &format!("manifests/{reference}"));
            check_manifest(&stand, via, &url)?;
        }
    }
    for round in 0..plan.manifest_rounds * usize::from(section("manifests")) {
        for (which, reference) in [(0, "1"), (1, digest.as_str())] {
            for (ci, conns) in [1u32, 64].into_iter().enumerate() {
                for via in ALL {
                    let url = stand.url(via, "bench", &format!("manifests/{reference}"));
                    let w = wrk(&stand, via, &url, conns, plan.wrk_secs)?;
                    say(&format!(
                        "   round {round} {} c={conns:<3} {:<12} {:>8.0} req/s  p50 {:.3} ms  p99 {:.3} ms{}",
                        if which == 0 { "tag   " } else { "digest" },
                        via.name(),
                        w.rps,
                        w.p50_ms,
                        w.p99_ms,
                        if w.errors > 0 {
                            format!("  ({} errors)", w.errors)
                        } else {
                            String::new()
                        }
                    ));
                    let m = &mut results.manifests[which][ci];
                    m.rps.push(via, w.rps);
                    m.p50.push(via, w.p50_ms);
                    m.p99.push(via, w.p99_ms);
                    m.errors[idx(via)] += w.errors;
                }
            }
        }
    }

    say(&format!(
        "4. real pulls: {} layers x {} MiB, fresh containerd per pull, {} rounds",
        plan.layers,
        plan.layer_size / MIB,
        plan.pulls
    ));
    for round in 0..plan.pulls * usize::from(section("pulls")) {
        for via in ALL {
            let secs = cri_pull(&stand, via, &pull_image).await?;
            say(&format!("   round {round} {:<12} {secs:.3} s", via.name()));
            results.pull_secs.push(via, secs);
        }
    }

    say("5. footprint and start-up");
    results.end_rss = [
        None,
        Some(rss(&stand.proxy_pids(Via::Pullthrough))),
        Some(rss(&stand.proxy_pids(Via::Nginx))),
    ];
    results.binary = [
        None,
        std::fs::metadata(support::pullthrough_bin())
            .ok()
            .map(|m| m.len()),
        std::fs::metadata(nginx_bin()).ok().map(|m| m.len()),
    ];
    for _ in 0..plan.startups * usize::from(section("footprint")) {
        let (listen, answer) = startup_pullthrough(&stand).await;
        results.startup_listen.push(Via::Pullthrough, listen);
        results.startup_answer.push(Via::Pullthrough, answer);
        let (listen, answer) = startup_nginx(&stand).await;
        results.startup_listen.push(Via::Nginx, listen);
        results.startup_answer.push(Via::Nginx, answer);
    }

    say("6. token economy");
    results.token_calls = stand.moto.token_calls();
    results.elapsed = run_start.elapsed();
    let load_after = uptime();
    say(&format!("load after: {load_after}"));

    let report = render(&plan, &results, &command, &load_before, &load_after);
    println!("\n{report}");
    if let Some(out) = out {
        std::fs::write(&out, &report)?;
        say(&format!("wrote {}", out.display()));
    }
    drop(stand);
    Ok(())
}

async fn push_random_blob(registry: &Registry, repo: &str, size: usize, seed: u64) -> String {
    let blob = Blob::new("application/octet-stream", random_bytes(size, seed));
    registry.push_blob(repo, &blob).await;
    blob.digest
}

fn say(s: &str) {
    eprintln!("bench: {s}");
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().take(3).collect();
            format!("load average {}", f.join(", "))
        })
        .unwrap_or_else(|_| "load average unknown".into())
}

// ---------------------------------------------------------------------------------------------
// Load generators.

/// One `curl` GET to `/dev/null`: bytes and seconds.
fn curl_get(stand: &Stand, via: Via, url: &str) -> Result<(u64, f64), String> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--fail",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download} %{time_total}",
    ]);
    for h in stand.headers(via) {
        cmd.arg("-H").arg(h);
    }
    cmd.arg(url);
    let out = cmd.output().map_err(|e| format!("curl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let s = String::from_utf8_lossy(&out.stdout);
    let mut it = s.split_whitespace();
    let bytes = it
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or("curl output")?;
    let secs = it
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or("curl output")?;
    Ok((bytes, secs))
}

/// `n` concurrent GETs of `url` from one curl (`--parallel`): total bytes and wall seconds.
fn curl_parallel(stand: &Stand, via: Via, url: &str, n: usize) -> Result<(u64, f64), String> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--fail",
        "-Z",
        "--parallel-immediate",
        "--parallel-max",
        &n.to_string(),
        "-w",
        "%{size_download}\\n",
    ]);
    for h in stand.headers(via) {
        cmd.arg("-H").arg(h);
    }
    for _ in 0..n {
        cmd.args(["-o", "/dev/null", url]);
    }
    let t0 = Instant::now();
    let out = cmd.output().map_err(|e| format!("curl: {e}"))?;
    let secs = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!(
            "curl -Z {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let bytes = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .sum();
    Ok((bytes, secs))
}

fn check_manifest(stand: &Stand, via: Via, url: &str) -> anyhow::Result<()> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "-o", "/dev/null", "-H"])
        .arg(format!("Accept: {ACCEPT}"));
    for h in stand.headers(via) {
        cmd.arg("-H").arg(h);
    }
    let out = cmd.arg(url).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{} manifest check {url}: {}",
        via.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn wrk(stand: &Stand, via: Via, url: &str, conns: u32, secs: u64) -> anyhow::Result<Wrk> {
    let threads = conns.min(2);
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{threads}"))
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .arg("--latency")
        .arg("-H")
        .arg(format!("Accept: {ACCEPT}"));
    for h in stand.headers(via) {
        cmd.arg("-H").arg(h);
    }
    let out = cmd.arg(url).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(out.status.success(), "wrk {url}: {text}");
    parse_wrk(&text).ok_or_else(|| anyhow::anyhow!("cannot parse wrk output:\n{text}"))
}

fn parse_wrk(text: &str) -> Option<Wrk> {
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut errors = 0;
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = t.strip_prefix("50%") {
            p50 = parse_duration_ms(v.trim());
        } else if let Some(v) = t.strip_prefix("99%") {
            p99 = parse_duration_ms(v.trim());
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    Some(Wrk {
        rps: rps?,
        p50_ms: p50?,
        p99_ms: p99?,
        errors,
    })
}

/// wrk's `1.23ms`, `456.00us`, `1.02s` → milliseconds.
fn parse_duration_ms(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

/// One CRI `PullImage` by a fresh containerd (new root) whose `docker.io` mirror is `via`.
async fn cri_pull(stand: &Stand, via: Via, image: &Image) -> anyhow::Result<f64> {
    let certs = short_tempdir("bench-certs");
    let dead = format!("http://127.0.0.1:{}", support::dead_port());
    write_hosts_toml(
        certs.path(),
        "docker.io",
        &mirror_hosts_toml(&dead, &stand.base(via)),
    );
    let containerd = Containerd::start(certs.path()).await;
    let reference = "docker.io/library/pullbench:1";
    let auth = (via == Via::Direct).then(|| AuthConfig {
        username: USER.into(),
        password: stand.moto.password(),
    });
    let t0 = Instant::now();
    containerd
        .cri()
        .pull_image_with_auth(reference, auth)
        .await
        .map_err(|e| anyhow::anyhow!("{} pull: {e}\n{}", via.name(), containerd.log()))?;
    let secs = t0.elapsed().as_secs_f64();
    let digest = containerd
        .image_digest(reference)
        .await
        .map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        digest.as_deref() == Some(image.digest()),
        "{} pulled {digest:?}, expected {}",
        via.name(),
        image.digest()
    );
    Ok(secs)
}

// ---------------------------------------------------------------------------------------------
// Start-up.

/// Milliseconds from exec to a socket accepting connections, and to the first answered `/v2/`.
async fn startup_pullthrough(stand: &Stand) -> (f64, f64) {
    let dir = short_tempdir("bench-start");
    let port = free_port();
    let ops = free_port();
    let config = std::fs::read_to_string(stand.pt.config_path()).expect("read config");
    let config = config
        .lines()
        .map(|l| {
            if l.starts_with("listen =") {
                format!("listen = \"127.0.0.1:{port}\"")
            } else if l.starts_with("ops_listen =") {
                format!("ops_listen = \"127.0.0.1:{ops}\"")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = dir.path().join("pullthrough.toml");
    std::fs::write(&path, config).expect("write config");
    let mut cmd = Command::new(support::pullthrough_bin());
    cmd.args(["--log-format", "json", "serve", "--config"])
        .arg(&path)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        // A dead ECR API: these short-lived instances must not count in the token economy.
        .env(
            "AWS_ENDPOINT_URL_ECR",
            format!("http://127.0.0.1:{}", support::dead_port()),
        )
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    time_startup(&mut cmd, dir.path(), port, "/v2/").await
}

async fn startup_nginx(stand: &Stand) -> (f64, f64) {
    let dir = short_tempdir("bench-start");
    let port = free_port();
    let template = std::fs::read_to_string(repo_root().join("bench/nginx.conf"))
        .expect("read bench/nginx.conf");
    let conf = template
        .replace("@DIR@", &dir.path().display().to_string())
        .replace("@PORT@", &port.to_string())
        .replace("@REGISTRY_PORT@", &stand.registry.port().to_string())
        .replace("@TOKEN@", "x");
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    let mut cmd = Command::new(nginx_bin());
    cmd.arg("-c").arg(&path).arg("-p").arg(dir.path());
    // nginx has no `/v2/` of its own: any answer (the registry's 401) counts.
    time_startup(&mut cmd, dir.path(), port, "/v2/").await
}

async fn time_startup(cmd: &mut Command, dir: &Path, port: u16, path: &str) -> (f64, f64) {
    let t0 = Instant::now();
    let mut child = ChildGuard::spawn("startup", cmd, dir);
    let deadline = t0 + Duration::from_secs(10);
    let listen = loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break t0.elapsed().as_secs_f64() * 1000.0;
        }
        assert!(
            Instant::now() < deadline && child.try_exited().is_none(),
            "{:?} never listened; stderr:\n{}",
            cmd,
            child.stderr()
        );
        std::thread::sleep(Duration::from_micros(200));
    };
    let url = format!("http://127.0.0.1:{port}{path}");
    let answer = loop {
        if support::http::get(&url, &[]).await.is_ok() {
            break t0.elapsed().as_secs_f64() * 1000.0;
        }
        assert!(Instant::now() < deadline, "{url} never answered");
        tokio::time::sleep(Duration::from_micros(500)).await;
    };
    child.terminate(Duration::from_secs(5));
    (listen, answer)
}

// ---------------------------------------------------------------------------------------------
// /proc.

/// `pid` and its child processes (nginx's workers).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    for t in tasks.flatten() {
        if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out
}

/// The pid of the process listening on `host` (`127.0.0.1:PORT`), from `ss`.
fn pid_listening(host: &str) -> Option<u32> {
    let out = Command::new("ss")
        .args(["-Hltnp", &format!("src = {host}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let i = text.find("pid=")?;
    text[i + 4..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds of `pids`.
/// CPU counters around one transfer: the registry's, the waited-for clients' (curl), and the
/// whole machine's busy and total time, so a transfer can be shown to be CPU-bound.
struct Cpu {
    registry: f64,
    clients: f64,
    busy: f64,
    total: f64,
}

/// What a transfer cost, from two [`Cpu`] readings.
struct Spent {
    /// CPU seconds of registry + proxy + client.
    processes: f64,
    /// Fraction of the machine's CPU time that was idle.
    idle: f64,
}

impl Cpu {
    fn now(stand: &Stand) -> Cpu {
        let registry = pid_listening(&format!("127.0.0.1:{}", stand.registry.port()))
            .map_or(0.0, |p| cpu_secs(&[p]));
        let ticks = clock_ticks();
        // cutime and cstime of this process: its waited-for children, i.e. finished curls.
        let clients = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                let rest = &s[s.rfind(')')? + 2..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(f.get(13)?.parse::<f64>().ok()? + f.get(14)?.parse::<f64>().ok()?)
            })
            .unwrap_or(0.0)
            / ticks;
        // The first line of /proc/stat: user nice system idle iowait irq softirq steal.
        let (busy, total) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let f: Vec<f64> = s
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .take(8)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                let total: f64 = f.iter().sum();
                let idle = f.get(3)? + f.get(4)?;
                Some(((total - idle) / ticks, total / ticks))
            })
            .unwrap_or((0.0, 0.0));
        Cpu {
            registry,
            clients,
            busy,
            total,
        }
    }

    /// From `before` to `self`, with `proxy` CPU seconds measured alongside.
    fn since(&self, before: &Cpu, proxy: f64) -> Spent {
        let total = self.total - before.total;
        Spent {
            processes: (self.registry - before.registry) + (self.clients - before.clients) + proxy,
            idle: if total > 0.0 {
                1.0 - (self.busy - before.busy) / total
            } else {
                0.0
            },
        }
    }
}

fn cpu_secs(pids: &[u32]) -> f64 {
    let ticks = clock_ticks();
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            // Fields after the parenthesised command name; utime and stime are 14 and 15.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / ticks
}

/// Resident set size of `pids`, in bytes.
fn rss(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        })
        .sum()
}

/// Samples the summed RSS of some processes every 10 ms, keeping the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(rss(&pids));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak.max(rss(&pids))
        });
        RssSampler { stop, handle }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Results.

fn idx(via: Via) -> usize {
    match via {
        Via::Direct => 0,
        Via::Pullthrough => 1,
        Via::Nginx => 2,
    }
}

/// Samples per target.
#[derive(Default, Clone)]
struct Series([Vec<f64>; 3]);

impl Series {
    fn push(&mut self, via: Via, v: f64) {
        self.0[idx(via)].push(v);
    }

    fn median(&self, via: Via) -> Option<f64> {
        median(&self.0[idx(via)])
    }

    fn ratio(&self, via: Via) -> Option<f64> {
        Some(self.median(via)? / self.median(Via::Direct)?)
    }

    fn samples(&self, via: Via) -> String {
        self.0[idx(via)]
            .iter()
            .map(|v| format!("{v:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

#[derive(Default)]
struct ManifestRuns {
    rps: Series,
    p50: Series,
    p99: Series,
    errors: [u64; 3],
}

#[derive(Default)]
struct Results {
    blob_mbs: Series,
    blob_cpu_per_gib: Series,
    /// CPU seconds per GiB of registry + proxy + client together.
    blob_cpu_all: Series,
    /// Percent of the machine's CPU time left idle during the transfer.
    blob_idle: Series,
    fan_mbs: Series,
    fan_peak_rss: Series,
    fan_cpu_per_gib: Series,
    fan_cpu_all: Series,
    fan_idle: Series,
    /// [tag, digest][c=1, c=64].
    manifests: [[ManifestRuns; 2]; 2],
    pull_secs: Series,
    idle_rss: [Option<u64>; 3],
    end_rss: [Option<u64>; 3],
    binary: [Option<u64>; 3],
    startup_listen: Series,
    startup_answer: Series,
    token_calls: usize,
    elapsed: Duration,
}

fn cell(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.prec$}"))
}

fn ratio_cell(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.2}×"))
}

fn mib(v: Option<u64>) -> Option<f64> {
    v.map(|b| b as f64 / MIB as f64)
}

/// One target verdict.
struct Verdict {
    figure: String,
    target: &'static str,
    measured: String,
    met: bool,
}

fn render(plan: &Plan, r: &Results, command: &str, load_before: &str, load_after: &str) -> String {
    let mut md = String::new();
    let p = Via::Pullthrough;
    let n = Via::Nginx;
    let d = Via::Direct;
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `{command}` ({}), in {:.0} s. Direct pulls (straight from the registry, the \
         physical limit) vs pullthrough vs nginx as an ECR-signing reverse proxy \
         ([`bench/nginx.conf`](bench/nginx.conf)), all on 127.0.0.1, interleaved round by round. \
         Figures are medians; ratios are to direct in the same run.\n",
        if plan.quick {
            "quick mode: smaller sizes, fewer rounds; not for comparison"
        } else {
            "full run"
        },
        r.elapsed.as_secs_f64()
    );
    let _ = writeln!(md, "## Machine\n");
    let _ = writeln!(md, "- {}", machine());
    let _ = writeln!(md, "- {load_before} before the run, {load_after} after it");
    let _ = writeln!(md, "- versions: {}\n", versions());

    let _ = writeln!(md, "## Results\n");
    let _ = writeln!(
        md,
        "| figure | direct | pullthrough | nginx | pullthrough / direct | nginx / direct |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    let row = |md: &mut String, name: &str, s: &Series, prec: usize, ratios: bool| {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} |",
            cell(s.median(d), prec),
            cell(s.median(p), prec),
            cell(s.median(n), prec),
            if ratios {
                ratio_cell(s.ratio(p))
            } else {
                "–".into()
            },
            if ratios {
                ratio_cell(s.ratio(n))
            } else {
                "–".into()
            },
        );
    };
    row(
        &mut md,
        &format!("{} MiB blob, one stream (MB/s)", plan.blob_size / MIB),
        &r.blob_mbs,
        0,
        true,
    );
    row(
        &mut md,
        "proxy CPU per GiB streamed (s)",
        &r.blob_cpu_per_gib,
        2,
        false,
    );
    row(
        &mut md,
        "one stream: CPU per GiB of registry + proxy + curl (s)",
        &r.blob_cpu_all,
        2,
        false,
    );
    row(
        &mut md,
        "one stream: machine idle (%)",
        &r.blob_idle,
        0,
        false,
    );
    row(
        &mut md,
        &format!(
            "fan-out: {} × {} MiB, aggregate (MB/s)",
            plan.fan_streams,
            plan.fan_size / MIB
        ),
        &r.fan_mbs,
        0,
        true,
    );
    row(
        &mut md,
        "fan-out: proxy peak RSS (MiB)",
        &r.fan_peak_rss,
        1,
        false,
    );
    row(
        &mut md,
        "fan-out: proxy CPU per GiB (s)",
        &r.fan_cpu_per_gib,
        2,
        false,
    );
    row(
        &mut md,
        "fan-out: CPU per GiB of registry + proxy + curl (s)",
        &r.fan_cpu_all,
        2,
        false,
    );
    row(&mut md, "fan-out: machine idle (%)", &r.fan_idle, 0, false);
    for (which, label) in [(0, "tag"), (1, "digest")] {
        for (ci, c) in [(0, 1), (1, 64)] {
            let m = &r.manifests[which][ci];
            row(
                &mut md,
                &format!("manifest by {label}, c={c} (req/s)"),
                &m.rps,
                0,
                true,
            );
            row(
                &mut md,
                &format!("manifest by {label}, c={c}, p50 (ms)"),
                &m.p50,
                3,
                false,
            );
            row(
                &mut md,
                &format!("manifest by {label}, c={c}, p99 (ms)"),
                &m.p99,
                3,
                false,
            );
        }
    }
    row(
        &mut md,
        &format!(
            "CRI pull, {} × {} MiB layers, fresh containerd (s)",
            plan.layers,
            plan.layer_size / MIB
        ),
        &r.pull_secs,
        3,
        true,
    );
    let fixed = |md: &mut String, name: &str, v: [Option<f64>; 3], prec: usize| {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | – | – |",
            cell(v[0], prec),
            cell(v[1], prec),
            cell(v[2], prec)
        );
    };
    fixed(
        &mut md,
        "idle RSS after start (MiB)",
        r.idle_rss.map(mib),
        1,
    );
    fixed(
        &mut md,
        "RSS after the whole run (MiB)",
        r.end_rss.map(mib),
        1,
    );
    fixed(&mut md, "binary size (MiB)", r.binary.map(mib), 1);
    row(
        &mut md,
        "start-up to a listening socket (ms)",
        &r.startup_listen,
        1,
        false,
    );
    row(
        &mut md,
        "start-up to the first answer (ms)",
        &r.startup_answer,
        1,
        false,
    );
    let _ = writeln!(
        md,
        "| GetAuthorizationToken calls, whole run | – | {} | – (static token in config) | – | – |",
        r.token_calls
    );
    let errors: u64 = r
        .manifests
        .iter()
        .flatten()
        .map(|m| m.errors.iter().sum::<u64>())
        .sum();
    if errors > 0 {
        let _ = writeln!(
            md,
            "\n**wrk saw {errors} non-2xx responses or socket errors.**"
        );
    }

    // Targets.
    let tag1 = &r.manifests[0][0];
    let tag64 = &r.manifests[0][1];
    let dig1 = &r.manifests[1][0];
    let dig64 = &r.manifests[1][1];
    let ge = |v: Option<f64>, t: f64| v.is_some_and(|v| v >= t);
    let le = |v: Option<f64>, t: f64| v.is_some_and(|v| v <= t);
    let r2 = |v: Option<f64>| ratio_cell(v);
    let p50_added = tag1
        .p50
        .median(p)
        .zip(tag1.p50.median(d))
        .map(|(a, b)| a - b);
    let verdicts = vec![
        Verdict {
            figure: "single blob stream".into(),
            target: "≥ 0.85× direct",
            measured: r2(r.blob_mbs.ratio(p)),
            met: ge(r.blob_mbs.ratio(p), 0.85),
        },
        Verdict {
            figure: "64-stream fan-out".into(),
            target: "≥ 0.8× direct, peak RSS ≤ 32 MiB",
            measured: format!(
                "{}, {} MiB",
                r2(r.fan_mbs.ratio(p)),
                cell(r.fan_peak_rss.median(p), 1)
            ),
            met: ge(r.fan_mbs.ratio(p), 0.8) && le(r.fan_peak_rss.median(p), 32.0),
        },
        Verdict {
            figure: "manifest by tag".into(),
            target: "≥ 0.95× direct req/s; p50 added ≤ 0.1 ms",
            measured: format!(
                "c=1 {}, c=64 {}; p50 added {} ms",
                r2(tag1.rps.ratio(p)),
                r2(tag64.rps.ratio(p)),
                cell(p50_added, 3)
            ),
            met: ge(tag1.rps.ratio(p), 0.95) && ge(tag64.rps.ratio(p), 0.95) && le(p50_added, 0.1),
        },
        Verdict {
            figure: "manifest by digest".into(),
            target: "≥ 2× direct req/s (from the manifest cache)",
            measured: format!(
                "c=1 {}, c=64 {}",
                r2(dig1.rps.ratio(p)),
                r2(dig64.rps.ratio(p))
            ),
            met: ge(dig1.rps.ratio(p), 2.0) && ge(dig64.rps.ratio(p), 2.0),
        },
        Verdict {
            figure: "CRI pull".into(),
            target: "≤ 1.03× direct",
            measured: r2(r.pull_secs.ratio(p)),
            met: le(r.pull_secs.ratio(p), 1.03),
        },
        Verdict {
            figure: "idle RSS".into(),
            target: "≤ 10 MiB",
            measured: format!("{} MiB", cell(mib(r.idle_rss[1]), 1)),
            met: le(mib(r.idle_rss[1]), 10.0),
        },
        Verdict {
            figure: "start-up to listening".into(),
            target: "≤ 50 ms",
            measured: format!("{} ms", cell(r.startup_listen.median(p), 1)),
            met: le(r.startup_listen.median(p), 50.0),
        },
        Verdict {
            figure: "token calls".into(),
            target: "exactly 1 for the whole run",
            measured: r.token_calls.to_string(),
            met: r.token_calls == 1,
        },
    ];
    let _ = writeln!(md, "\n## Targets\n");
    let _ = writeln!(md, "| figure | target | measured | |");
    let _ = writeln!(md, "|---|---|---|---|");
    for v in &verdicts {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            v.figure,
            v.target,
            v.measured,
            if v.met { "met" } else { "**missed**" }
        );
    }

    let _ = writeln!(md, "\n## Reading\n");
    let _ = writeln!(md, "{}", reading(r, &verdicts));

    // Figures from other drivers, kept beside the notes so a rerun here keeps them.
    for (file, heading) in [
        ("bench/many-core.md", "Many cores"),
        ("bench/fleet.md", "Fleet"),
    ] {
        if let Ok(text) = std::fs::read_to_string(repo_root().join(file)) {
            let _ = writeln!(md, "\n## {heading}\n");
            let _ = write!(md, "{text}");
        }
    }
    if let Ok(notes) = std::fs::read_to_string(repo_root().join("bench/NOTES.md")) {
        let _ = writeln!(md, "\n## Profiles and what is left\n");
        let _ = write!(md, "{notes}");
    }

    let _ = writeln!(md, "\n## Method\n");
    let _ = writeln!(
        md,
        "- The ECR stand-in is Debian's `docker-registry` (CNCF distribution) with a bcrypt \
         htpasswd for user `AWS`, and moto for `GetAuthorizationToken` (through \
         [`bench/moto_server`](bench/moto_server), which makes moto's tokens expire in 12 h like \
         ECR's instead of in 2015). pullthrough runs its release build with the default config and \
         `RUST_LOG=info`, so every request writes its access-log line; nginx runs \
         [`bench/nginx.conf`](bench/nginx.conf) with its access log on.\n\
         - Blobs: `curl -o /dev/null`, MB/s = bytes / curl's `time_total`. CPU is utime + stime \
         of the proxy's processes from `/proc/<pid>/stat` (nginx: master and workers). Fan-out: \
         one `curl -Z --parallel-max {n}` with {n} transfers, aggregate = bytes / wall time; peak \
         RSS sampled from `/proc/<pid>/status` every 10 ms.\n\
         - Manifests: `wrk --latency` (c=1: 1 thread, c=64: 2 threads) for {w} s each, {mr} \
         round(s); by tag goes to the registry every time (this run sets `tag_ttl = \"0s\"`; \
         by default a repeat within five minutes is answered from memory), by digest is served \
         from pullthrough's manifest cache.\n\
         - Real pulls: a fresh containerd (new root) per pull, CRI `PullImage` of \
         `docker.io/library/pullbench:1` ({l} layers of {ls} MiB, uncompressed tar, native \
         snapshotter), with `hosts.toml` naming the registry itself (direct, with CRI \
         credentials), pullthrough or nginx as the mirror; {pulls} rounds.\n\
         - Start-up: exec to the first successful TCP connect, and to the first answered \
         `GET /v2/`, {s} runs.",
        n = plan.fan_streams,
        w = plan.wrk_secs,
        mr = plan.manifest_rounds,
        l = plan.layers,
        ls = plan.layer_size / MIB,
        pulls = plan.pulls,
        s = plan.startups
    );

    let _ = writeln!(md, "\n<details><summary>Every sample</summary>\n");
    let _ = writeln!(md, "| figure | direct | pullthrough | nginx |");
    let _ = writeln!(md, "|---|---|---|---|");
    let mut samples = |name: &str, s: &Series| {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} |",
            s.samples(d),
            s.samples(p),
            s.samples(n)
        );
    };
    samples("blob MB/s", &r.blob_mbs);
    samples("blob CPU s/GiB", &r.blob_cpu_per_gib);
    samples("fan-out MB/s", &r.fan_mbs);
    samples("fan-out peak RSS MiB", &r.fan_peak_rss);
    samples("fan-out all CPU s/GiB", &r.fan_cpu_all);
    samples("fan-out idle %", &r.fan_idle);
    for (which, label) in [(0, "tag"), (1, "digest")] {
        for (ci, c) in [(0, 1), (1, 64)] {
            samples(&format!("{label} c={c} req/s"), &r.manifests[which][ci].rps);
        }
    }
    samples("CRI pull s", &r.pull_secs);
    samples("start-up listen ms", &r.startup_listen);
    samples("start-up answer ms", &r.startup_answer);
    let _ = writeln!(md, "\n</details>");
    md
}

fn reading(r: &Results, verdicts: &[Verdict]) -> String {
    let p = Via::Pullthrough;
    let n = Via::Nginx;
    let missed: Vec<&str> = verdicts
        .iter()
        .filter(|v| !v.met)
        .map(|v| v.figure.as_str())
        .collect();
    let mut s = String::new();
    let _ = write!(
        s,
        "pullthrough streams one blob at {} of direct ({} for nginx), using {} CPU seconds per \
         GiB ({} for nginx). With 64 streams it reaches {} of direct ({} for nginx) with a peak \
         RSS of {} MiB ({} MiB for nginx). ",
        ratio_cell(r.blob_mbs.ratio(p)),
        ratio_cell(r.blob_mbs.ratio(n)),
        cell(r.blob_cpu_per_gib.median(p), 2),
        cell(r.blob_cpu_per_gib.median(n), 2),
        ratio_cell(r.fan_mbs.ratio(p)),
        ratio_cell(r.fan_mbs.ratio(n)),
        cell(r.fan_peak_rss.median(p), 1),
        cell(r.fan_peak_rss.median(n), 1),
    );
    for (what, all, idle, proxy, target) in [
        (
            "One stream",
            &r.blob_cpu_all,
            &r.blob_idle,
            &r.blob_cpu_per_gib,
            0.85,
        ),
        (
            "The fan-out",
            &r.fan_cpu_all,
            &r.fan_idle,
            &r.fan_cpu_per_gib,
            0.8,
        ),
    ] {
        if let (Some(d_all), Some(p_all), Some(d_idle), Some(p_idle), Some(own)) = (
            all.median(Via::Direct),
            all.median(p),
            idle.median(Via::Direct),
            idle.median(p),
            proxy.median(p),
        ) {
            let _ = write!(
                s,
                "{what} leaves {d_idle:.0} % of the machine idle direct and {p_idle:.0} % \
                 through pullthrough, so its rate follows the CPU it costs: {d_all:.2} CPU \
                 seconds per GiB direct (registry and curl) and {p_all:.2} through pullthrough \
                 ({own:.2} in pullthrough itself), a ratio of {:.2}. {target}× of direct would \
                 need the whole extra hop to cost at most {:.2} s/GiB. ",
                d_all / p_all,
                d_all / target - d_all,
            );
        }
    }
    let _ = write!(
        s,
        "Manifests by tag cost what the registry costs (its bcrypt check dominates), so all \
         three are close; by digest pullthrough answers from its manifest cache at {} (c=1) and \
         {} (c=64) of direct's rate. A whole CRI pull takes {} of direct's time ({} for nginx).\n\n",
        ratio_cell(r.manifests[1][0].rps.ratio(p)),
        ratio_cell(r.manifests[1][1].rps.ratio(p)),
        ratio_cell(r.pull_secs.ratio(p)),
        ratio_cell(r.pull_secs.ratio(n)),
    );
    if missed.is_empty() {
        let _ = write!(s, "Every target is met in this run.");
    } else {
        let _ = write!(s, "Missed in this run: {}.", missed.join(", "));
    }
    let _ = write!(
        s,
        "\n\nWhat loopback does not show: a real ECR answers blob GETs with a 307 redirect to \
         S3, which pullthrough passes back, so on a real node containerd fetches layers from S3 \
         itself and the mirror only carries manifests, tags and the redirects. The blob figures \
         above are the worst case, a registry that serves blobs itself (as the stand-in does); \
         on ECR the figures that matter are the manifest ones and the footprint."
    );
    s
}

fn machine() -> String {
    let lscpu = cmd_out("lscpu", &[]);
    let field = |k: &str| {
        lscpu
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "?".into())
    };
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kb: u64 = m.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.1} GiB RAM", kb as f64 / 1024.0 / 1024.0))
        })
        .unwrap_or_default();
    format!(
        "{} ({} CPUs, {} threads per core), {mem}, Linux {}",
        field("Model name"),
        field("CPU(s)"),
        field("Thread(s) per core"),
        cmd_out("uname", &["-r"]).trim()
    )
}

fn versions() -> String {
    let first = |s: String| s.lines().next().unwrap_or("?").trim().to_owned();
    let nginx = Command::new(nginx_bin())
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default();
    let wrk_v = Command::new("wrk")
        .arg("-v")
        .output()
        .map(|o| {
            first(format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ))
        })
        .unwrap_or_default();
    format!(
        "pullthrough {} ({}); {}; {}; {}; {}; {}; {}",
        env!("CARGO_PKG_VERSION"),
        first(cmd_out("git", &["rev-parse", "--short", "HEAD"])),
        first(cmd_out("rustc", &["--version"])),
        nginx,
        first(cmd_out("docker-registry", &["--version"])),
        first(cmd_out("containerd", &["--version"])),
        first(cmd_out("curl", &["--version"])),
        wrk_v
    )
}

fn cmd_out(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
