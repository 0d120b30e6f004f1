//! The load and soak driver behind `bench/soak`: many concurrent clients against one running
//! `pullthrough serve`, with its RSS and open file descriptors sampled from /proc over time.
//!
//! It starts the same loopback stand-ins as the integration tests and `bench/run` (docker-registry
//! with bcrypt htpasswd as the ECR registry endpoint, moto as the ECR API) and one release-built
//! `pullthrough serve` with the deployed defaults (timeouts, info logging with one access-log line
//! per request). Then:
//!
//! 1. **load**: `--conns` keep-alive connections, each sending requests back to back;
//! 2. **soak**: the same connections for longer, paced to `--rate` requests per second in total;
//! 3. **settle**: no clients, long enough for the upstream pool's idle connections to close, to see
//!    that RSS and file descriptors go back to where they started.
//!
//! Each request is one of a fixed mix: manifest by tag (always upstream), manifest by digest (the
//! manifest cache), a 256 KiB blob, a 4 MiB blob, and a client that reads the first 256 KiB of a
//! 32 MiB blob and then drops its connection. Every answer is checked (status, length, and the
//! sha256 of every 64th blob), and anything wrong counts as an error. Nothing here talks to
//! anything but 127.0.0.1.
//!
//! Usage (normally through `bench/soak`): `soak [--quick] [--conns N] [--load-secs S]
//! [--soak-secs S] [--rate R] [--sample-secs S] [--settle-secs S] [--out FILE]`.

// The driver reuses the integration tests' harness, whose helpers panic with a message on
// failure; a driver that cannot set up has nothing better to do either.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use sha2::Digest as _;

use support::image::{ACCEPT, Blob, Image, random_bytes};
use support::moto::Moto;
use support::pullthrough::{Options, Pullthrough};
use support::registry::Registry;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// How much of the big blob an aborting client reads before it drops the connection.
const ABORT_AFTER: usize = 256 * KIB;
/// Every how many blob answers one gets its sha256 checked (the others: their length).
const DIGEST_EVERY: u64 = 64;

/// What to do, from the command line.
#[derive(Debug, Clone)]
struct Args {
    quick: bool,
    conns: usize,
    load_secs: u64,
    soak_secs: u64,
    /// Requests per second in total during the soak; 0 means back to back.
    rate: f64,
    sample_secs: u64,
    settle_secs: u64,
    out: Option<PathBuf>,
}

impl Args {
    fn parse() -> anyhow::Result<Args> {
        let argv: Vec<String> = std::env::args().skip(1).collect();
        let quick = argv.iter().any(|a| a == "--quick");
        let mut a = Args {
            quick,
            conns: 256,
            load_secs: if quick { 15 } else { 60 },
            soak_secs: if quick { 30 } else { 600 },
            rate: 100.0,
            sample_secs: if quick { 2 } else { 10 },
            // The upstream pool closes connections idle for 50 s, checking every 50 s (forward.rs).
            settle_secs: 120,
            out: None,
        };
        let mut it = argv.iter();
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
            };
            match flag.as_str() {
                "--quick" => {}
                "--conns" => a.conns = value()?.parse()?,
                "--load-secs" => a.load_secs = value()?.parse()?,
                "--soak-secs" => a.soak_secs = value()?.parse()?,
                "--rate" => a.rate = value()?.parse()?,
                "--sample-secs" => a.sample_secs = value()?.parse()?,
                "--settle-secs" => a.settle_secs = value()?.parse()?,
                "--out" => a.out = Some(PathBuf::from(value()?)),
                other => anyhow::bail!("unknown argument {other}"),
            }
        }
        anyhow::ensure!(
            a.conns > 0 && a.sample_secs > 0,
            "--conns and --sample-secs must be > 0"
        );
        Ok(a)
    }
}

/// The request mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    ManifestTag,
    ManifestDigest,
    BlobSmall,
    BlobMedium,
    AbortMidBlob,
}

const KINDS: [Kind; 5] = [
    Kind::ManifestTag,
    Kind::ManifestDigest,
    Kind::BlobSmall,
    Kind::BlobMedium,
    Kind::AbortMidBlob,
];

impl Kind {
    /// Share of requests, in percent.
    fn weight(self) -> u32 {
        match self {
            Kind::ManifestTag => 20,
            Kind::ManifestDigest => 30,
            Kind::BlobSmall => 30,
            Kind::BlobMedium => 15,
            Kind::AbortMidBlob => 5,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::ManifestTag => "manifest by tag",
            Kind::ManifestDigest => "manifest by digest (cache)",
            Kind::BlobSmall => "blob 256 KiB",
            Kind::BlobMedium => "blob 4 MiB",
            Kind::AbortMidBlob => "32 MiB blob, dropped after 256 KiB",
        }
    }

    fn idx(self) -> usize {
        KINDS.iter().position(|k| *k == self).unwrap_or(0)
    }

    fn pick(rng: &mut fastrand::Rng) -> Kind {
        let mut n = rng.u32(0..100);
        for k in KINDS {
            if n < k.weight() {
                return k;
            }
            n -= k.weight();
        }
        Kind::ManifestDigest
    }
}

/// What each kind asks for and expects.
struct Target {
    path: String,
    len: usize,
    digest: String,
}

struct Targets {
    host: String,
    by_kind: [Target; 5],
}

/// Counters and latencies of one phase.
#[derive(Default)]
struct PhaseStats {
    requests: AtomicU64,
    errors: AtomicU64,
    aborted: AtomicU64,
    bytes: AtomicU64,
    /// Microseconds to the last byte (or, for aborts, to the dropped connection), per kind.
    latencies: Mutex<[Vec<u32>; 5]>,
    /// The first few error messages.
    error_samples: Mutex<Vec<String>>,
}

impl PhaseStats {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut s = self.error_samples.lock().unwrap();
        if s.len() < 20 {
            s.push(what);
        }
    }
}

/// One /proc sample of the pullthrough process.
#[derive(Clone, Debug)]
struct Sample {
    secs: f64,
    phase: &'static str,
    requests: u64,
    errors: u64,
    rss_kib: u64,
    fds: usize,
    threads: u64,
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Connects a fresh HTTP/1 connection to pullthrough.
async fn connect(
    host: &str,
) -> Result<(SendRequest<Empty<Bytes>>, tokio::task::JoinHandle<()>), String> {
    let stream = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, task))
}

/// One request of `kind` on `sender`. `Ok(true)` means the connection must be dropped (an
/// abort, on purpose); errors also drop it.
async fn one(
    sender: &mut SendRequest<Empty<Bytes>>,
    targets: &Targets,
    kind: Kind,
    check_digest: bool,
    stats: &PhaseStats,
) -> Result<bool, String> {
    let t = &targets.by_kind[kind.idx()];
    let req = Request::get(t.path.as_str())
        .header(header::HOST, targets.host.as_str())
        .header(header::ACCEPT, ACCEPT)
        .header(header::USER_AGENT, "pullthrough-soak")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    sender.ready().await.map_err(|e| format!("ready: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{}: {e}", kind.name()))?;
    if resp.status() != StatusCode::OK {
        return Err(format!("{}: status {}", kind.name(), resp.status()));
    }
    let mut body = resp.into_body();
    let mut got = 0usize;
    let mut hasher = check_digest.then(sha2::Sha256::new);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("{}: body: {e}", kind.name()))?;
        if let Ok(data) = frame.into_data() {
            got += data.len();
            if let Some(h) = hasher.as_mut() {
                h.update(&data);
            }
            if kind == Kind::AbortMidBlob && got >= ABORT_AFTER {
                stats.bytes.fetch_add(got as u64, Ordering::Relaxed);
                stats.aborted.fetch_add(1, Ordering::Relaxed);
                return Ok(true);
            }
        }
    }
    stats.bytes.fetch_add(got as u64, Ordering::Relaxed);
    if got != t.len {
        return Err(format!("{}: {got} bytes, expected {}", kind.name(), t.len));
    }
    if let Some(h) = hasher {
        let d = format!("sha256:{}", support::hex(&h.finalize()));
        if d != t.digest {
            return Err(format!(
                "{}: digest {d}, expected {}",
                kind.name(),
                t.digest
            ));
        }
    }
    Ok(false)
}

/// One client: one keep-alive connection (replaced after an abort or error), requests until
/// `until`, paced to one per `every` if given.
async fn client(
    id: usize,
    targets: Arc<Targets>,
    stats: Arc<PhaseStats>,
    until: Instant,
    every: Option<Duration>,
) {
    let mut rng = fastrand::Rng::with_seed(0x5eed_0000 + id as u64);
    let mut conn: Option<(SendRequest<Empty<Bytes>>, tokio::task::JoinHandle<()>)> = None;
    let mut ticker = every.map(|e| {
        // Spread the clients over the first interval, so the pace is even, not in waves.
        let start = tokio::time::Instant::now() + e.mul_f64(rng.f64());
        let mut t = tokio::time::interval_at(start, e);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut n = 0u64;
    while Instant::now() < until {
        if let Some(t) = ticker.as_mut() {
            t.tick().await;
            if Instant::now() >= until {
                break;
            }
        }
        if conn.is_none() {
            match connect(&targets.host).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    stats.requests.fetch_add(1, Ordering::Relaxed);
                    stats.error(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some((sender, _)) = conn.as_mut() else {
            continue;
        };
        let kind = Kind::pick(&mut rng);
        n += 1;
        let check =
            matches!(kind, Kind::BlobSmall | Kind::BlobMedium) && n.is_multiple_of(DIGEST_EVERY);
        let t0 = Instant::now();
        let result = one(sender, &targets, kind, check, &stats).await;
        let micros = u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX);
        stats.requests.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(drop_conn) => {
                stats.latencies.lock().unwrap()[kind.idx()].push(micros);
                if drop_conn {
                    // Closing the socket mid-body, as a client that gives up (or dies) does.
                    if let Some((_, task)) = conn.take() {
                        task.abort();
                    }
                }
            }
            Err(e) => {
                stats.error(e);
                if let Some((_, task)) = conn.take() {
                    task.abort();
                }
            }
        }
    }
    if let Some((_, task)) = conn.take() {
        task.abort();
    }
}

/// Runs `conns` clients for `secs`, paced to `rate` requests per second in total (0: no pacing).
async fn phase(args: &Args, targets: &Arc<Targets>, stats: &Arc<PhaseStats>, secs: u64, rate: f64) {
    let until = Instant::now() + Duration::from_secs(secs);
    let every = (rate > 0.0).then(|| Duration::from_secs_f64(args.conns as f64 / rate));
    let tasks: Vec<_> = (0..args.conns)
        .map(|id| {
            tokio::spawn(client(
                id,
                Arc::clone(targets),
                Arc::clone(stats),
                until,
                every,
            ))
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = proc_status_kib_file("/proc/meminfo", "MemTotal:");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, nproc {nproc}, {:.1} GiB RAM, Linux {}",
        mem as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

fn proc_status_kib_file(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(", "))
        .unwrap_or_default()
}

fn say(s: &str) {
    eprintln!("soak: {s}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let command = std::env::var("SOAK_COMMAND").unwrap_or_else(|_| "bench/soak".into());
    let _ = rustls::crypto::ring::default_provider().install_default();
    let load_before = loadavg();
    let started = Instant::now();

    say("starting moto, docker-registry (bcrypt htpasswd) and pullthrough");
    let moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    let repo = "docker-hub/library/soak";
    let image = Image::small("soak");
    registry.push(repo, "1", &image).await;
    let blobs: Vec<Blob> = [(256 * KIB, 1), (4 * MIB, 2), (32 * MIB, 3)]
        .into_iter()
        .map(|(size, seed)| Blob::new("application/octet-stream", random_bytes(size, seed)))
        .collect();
    for b in &blobs {
        registry.push_blob(repo, b).await;
    }
    registry.clear_requests();

    let (mut opts, dead) = Options::with_dead_servers(&registry.base_url(), &moto.endpoint());
    // As deployed: default timeouts and info logging (one access-log line per request).
    opts.extra = support::pullthrough::upstreams_toml(Some(&dead));
    opts.rust_log = "info".into();
    let pt = Pullthrough::start(opts).await;
    let pid = pt.pid();
    for _ in 0..200 {
        if pt.ready_status().await == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let api = "/v2/library/soak";
    let target = |path: String, blob: &Blob| Target {
        path,
        len: blob.bytes.len(),
        digest: blob.digest.clone(),
    };
    let targets = Arc::new(Targets {
        host: pt.host(),
        by_kind: [
            target(format!("{api}/manifests/1?ns=docker.io"), &image.root),
            target(
                format!("{api}/manifests/{}?ns=docker.io", image.digest()),
                &image.root,
            ),
            target(
                format!("{api}/blobs/{}?ns=docker.io", blobs[0].digest),
                &blobs[0],
            ),
            target(
                format!("{api}/blobs/{}?ns=docker.io", blobs[1].digest),
                &blobs[1],
            ),
            target(
                format!("{api}/blobs/{}?ns=docker.io", blobs[2].digest),
                &blobs[2],
            ),
        ],
    });
    // Each kind answers correctly once before anything is timed.
    {
        let warm = PhaseStats::default();
        let (mut sender, task) = connect(&targets.host).await.map_err(anyhow::Error::msg)?;
        for k in [
            Kind::ManifestTag,
            Kind::ManifestDigest,
            Kind::BlobSmall,
            Kind::BlobMedium,
        ] {
            one(&mut sender, &targets, k, true, &warm)
                .await
                .map_err(anyhow::Error::msg)?;
        }
        task.abort();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = (proc_status_kib(pid, "VmRSS:"), fd_count(pid));
    say(&format!(
        "pullthrough pid {pid}: idle RSS {:.1} MiB, {} fds",
        idle.0 as f64 / 1024.0,
        idle.1
    ));

    // The sampler: every --sample-secs, whatever phase is running.
    let phase_name: Arc<Mutex<&'static str>> = Arc::new(Mutex::new("idle"));
    let load = Arc::new(PhaseStats::default());
    let soak = Arc::new(PhaseStats::default());
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (phase_name, load, soak, samples, stop) = (
            Arc::clone(&phase_name),
            Arc::clone(&load),
            Arc::clone(&soak),
            Arc::clone(&samples),
            Arc::clone(&stop),
        );
        let t0 = Instant::now();
        let every = Duration::from_secs(args.sample_secs);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let s = Sample {
                    secs: t0.elapsed().as_secs_f64(),
                    phase: *phase_name.lock().unwrap(),
                    requests: load.requests.load(Ordering::Relaxed)
                        + soak.requests.load(Ordering::Relaxed),
                    errors: load.errors.load(Ordering::Relaxed)
                        + soak.errors.load(Ordering::Relaxed),
                    rss_kib: proc_status_kib(pid, "VmRSS:"),
                    fds: fd_count(pid),
                    threads: proc_status_kib(pid, "Threads:"),
                };
                say(&format!(
                    "{:>6.0} s  {:<6}  {:>8} requests  {:>3} errors  RSS {:>6.1} MiB  {:>4} fds",
                    s.secs,
                    s.phase,
                    s.requests,
                    s.errors,
                    s.rss_kib as f64 / 1024.0,
                    s.fds
                ));
                samples.lock().unwrap().push(s);
            }
        })
    };

    say(&format!(
        "load: {} connections, back to back, {} s",
        args.conns, args.load_secs
    ));
    *phase_name.lock().unwrap() = "load";
    let t = Instant::now();
    phase(&args, &targets, &load, args.load_secs, 0.0).await;
    let load_secs = t.elapsed().as_secs_f64();

    say(&format!(
        "soak: {} connections, {} req/s in total, {} s",
        args.conns, args.rate, args.soak_secs
    ));
    *phase_name.lock().unwrap() = "soak";
    let t = Instant::now();
    phase(&args, &targets, &soak, args.soak_secs, args.rate).await;
    let soak_secs = t.elapsed().as_secs_f64();

    say(&format!("settle: no clients, {} s", args.settle_secs));
    *phase_name.lock().unwrap() = "settle";
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let settled = (proc_status_kib(pid, "VmRSS:"), fd_count(pid));
    let token_calls = moto.token_calls();
    let load_after = loadavg();
    let elapsed = started.elapsed();
    let samples = samples.lock().unwrap().clone();

    let report = render(Render {
        args: &args,
        command: &command,
        load_before: &load_before,
        load_after: &load_after,
        elapsed,
        idle,
        settled,
        samples: &samples,
        phases: [("load", &load, load_secs), ("soak", &soak, soak_secs)],
        token_calls,
    });
    println!("\n{}", report.text);
    if let Some(out) = &args.out {
        std::fs::write(out, &report.text)?;
        say(&format!("wrote {}", out.display()));
    }
    drop(pt);
    anyhow::ensure!(report.errors == 0, "{} errors", report.errors);
    anyhow::ensure!(
        report.flat,
        "RSS or file descriptors are not flat: see the report"
    );
    Ok(())
}

struct Render<'a> {
    args: &'a Args,
    command: &'a str,
    load_before: &'a str,
    load_after: &'a str,
    elapsed: Duration,
    idle: (u64, usize),
    settled: (u64, usize),
    samples: &'a [Sample],
    phases: [(&'static str, &'a Arc<PhaseStats>, f64); 2],
    token_calls: usize,
}

struct Report {
    text: String,
    errors: u64,
    flat: bool,
}

fn render(r: Render<'_>) -> Report {
    let mut s = String::new();
    let a = r.args;
    let _ = writeln!(s, "### Load and soak: `{}`\n", r.command);
    if a.quick {
        let _ = writeln!(
            s,
            "(`--quick`: short phases, for development, not for the record)\n"
        );
    }
    let _ = writeln!(
        s,
        "- machine: {}; load average {} before, {} after (other builds were running)",
        machine(),
        r.load_before,
        r.load_after
    );
    let _ = writeln!(
        s,
        "- pullthrough {} (release build), docker-registry with bcrypt htpasswd, moto; all on 127.0.0.1",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(
        s,
        "- {} connections; load {} s back to back, then soak {} s at {} req/s in total, then {} s with no clients; whole run {:.0} s",
        a.conns,
        a.load_secs,
        a.soak_secs,
        a.rate,
        a.settle_secs,
        r.elapsed.as_secs_f64()
    );
    let mix: Vec<String> = KINDS
        .iter()
        .map(|k| format!("{} % {}", k.weight(), k.name()))
        .collect();
    let _ = writeln!(s, "- mix: {}", mix.join(", "));
    let _ = writeln!(
        s,
        "- GetAuthorizationToken calls: {} (moto's tokens say they expired in 2015, so pullthrough treats them as 5-minute tokens and refreshes under load)\n",
        r.token_calls
    );

    let mut errors = 0;
    let _ = writeln!(
        s,
        "| phase | requests | req/s | errors | clients dropped mid-blob | MiB served |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
    for (name, st, secs) in &r.phases {
        let n = st.requests.load(Ordering::Relaxed);
        let e = st.errors.load(Ordering::Relaxed);
        errors += e;
        let _ = writeln!(
            s,
            "| {name} | {n} | {:.0} | {e} | {} | {:.0} |",
            n as f64 / secs,
            st.aborted.load(Ordering::Relaxed),
            st.bytes.load(Ordering::Relaxed) as f64 / MIB as f64
        );
    }
    for (name, st, _) in &r.phases {
        for e in st.error_samples.lock().unwrap().iter() {
            let _ = writeln!(s, "\n- {name} error: {e}");
        }
    }

    let _ = writeln!(s, "\nLatency to the last byte, ms:\n");
    let _ = writeln!(s, "| phase | request | n | p50 | p90 | p99 | p99.9 | max |");
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|");
    for (name, st, _) in &r.phases {
        let mut lat = st.latencies.lock().unwrap();
        for k in KINDS {
            let v = &mut lat[k.idx()];
            v.sort_unstable();
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                k.name(),
                v.len(),
                percentile(v, 50.0),
                percentile(v, 90.0),
                percentile(v, 99.0),
                percentile(v, 99.9),
                percentile(v, 100.0)
            );
        }
    }

    // Flatness: during the soak (after its first fifth, while connections and buffers settle in)
    // RSS and fds must not grow; after the settle phase both must be back near idle.
    let soak: Vec<&Sample> = r.samples.iter().filter(|x| x.phase == "soak").collect();
    let skip = soak.len() / 5;
    let steady = &soak[skip.min(soak.len())..];
    let q = (steady.len() / 4).max(1);
    let rss_of = |v: &[&Sample]| median(&v.iter().map(|x| x.rss_kib as f64).collect::<Vec<_>>());
    let (first, last) = if steady.len() >= 2 {
        (
            rss_of(&steady[..q.min(steady.len())]),
            rss_of(&steady[steady.len().saturating_sub(q)..]),
        )
    } else {
        (f64::NAN, f64::NAN)
    };
    let growth = last - first;
    // 2 MiB or 10 %: allocator noise, not a leak; a leak per request grows with the request count.
    let rss_flat = steady.len() >= 2 && growth <= (2048.0f64).max(first * 0.10);
    let fd_min = steady.iter().map(|x| x.fds).min().unwrap_or(0);
    let fd_max = steady.iter().map(|x| x.fds).max().unwrap_or(0);
    let fds_back = r.settled.1 <= r.idle.1 + 2;
    let rss_back = (r.settled.0 as f64) <= (r.idle.0 as f64 + 2048.0).max(first * 1.10);
    let flat = rss_flat && fds_back;
    let _ = writeln!(
        s,
        "\nRSS and open file descriptors of the pullthrough process:\n"
    );
    let _ = writeln!(s, "| | RSS (MiB) | fds |");
    let _ = writeln!(s, "|---|---:|---:|");
    let _ = writeln!(
        s,
        "| idle, before the load | {:.1} | {} |",
        r.idle.0 as f64 / 1024.0,
        r.idle.1
    );
    let peak = r.samples.iter().map(|x| x.rss_kib).max().unwrap_or(0);
    let fd_peak = r.samples.iter().map(|x| x.fds).max().unwrap_or(0);
    let _ = writeln!(
        s,
        "| peak, whole run | {:.1} | {} |",
        peak as f64 / 1024.0,
        fd_peak
    );
    let _ = writeln!(
        s,
        "| soak, first quarter after warm-up (median) | {:.1} | {fd_min}–{fd_max} over the soak |",
        first / 1024.0
    );
    let _ = writeln!(
        s,
        "| soak, last quarter (median) | {:.1} | |",
        last / 1024.0
    );
    let _ = writeln!(
        s,
        "| after {} s with no clients | {:.1} | {} |",
        a.settle_secs,
        r.settled.0 as f64 / 1024.0,
        r.settled.1
    );
    let _ = writeln!(
        s,
        "\n- RSS during the soak: {} ({:+.1} MiB from the first to the last quarter; limit max(2 MiB, 10 %))",
        if rss_flat { "flat" } else { "**GROWING**" },
        growth / 1024.0
    );
    let _ = writeln!(
        s,
        "- fds after the clients left: {} ({} vs {} idle)",
        if fds_back {
            "back to idle"
        } else {
            "**NOT back to idle**"
        },
        r.settled.1,
        r.idle.1
    );
    let _ = writeln!(
        s,
        "- RSS after the clients left: {} ({:.1} MiB vs {:.1} idle; allocators keep freed pages, so this is information, not a verdict)",
        if rss_back {
            "near idle or soak level"
        } else {
            "above soak level"
        },
        r.settled.0 as f64 / 1024.0,
        r.idle.0 as f64 / 1024.0
    );

    let _ = writeln!(s, "\n<details><summary>Every sample</summary>\n");
    let _ = writeln!(
        s,
        "| t (s) | phase | requests so far | errors | RSS (MiB) | fds | threads |"
    );
    let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|");
    for x in r.samples {
        let _ = writeln!(
            s,
            "| {:.0} | {} | {} | {} | {:.1} | {} | {} |",
            x.secs,
            x.phase,
            x.requests,
            x.errors,
            x.rss_kib as f64 / 1024.0,
            x.fds,
            x.threads
        );
    }
    let _ = writeln!(s, "\n</details>");
    Report {
        text: s,
        errors,
        flat,
    }
}
