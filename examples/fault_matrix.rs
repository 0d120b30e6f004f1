//! The fault matrix's timing driver behind `scripts/fault-matrix`: how many extra seconds each
//! fallback scenario costs a real CRI pull, compared with pulling straight from the upstream.
//!
//! The tests (`cargo test --test it fault::`) prove each scenario ends with the right image and
//! say where the bytes came from; they assert nothing about time. This measures it. It starts the
//! same loopback stand-ins (moto, docker-registry as ECR, a second docker-registry as the real
//! upstream, a private containerd) and, round after round, pulls a small image through each
//! scenario with a fresh pullthrough (so the breaker starts closed every time), timing the CRI
//! `PullImage` call. Rounds interleave the scenarios, so machine drift hits them alike.
//!
//! Usage: `fault_matrix [--rounds N]` (default 3). Prints a Markdown table.

// The driver reuses the integration tests' harness, whose helpers panic with a message on
// failure; a measurement that cannot set up has nothing better to do either.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::time::Instant;

use http::StatusCode;
use support::containerd::{Containerd, mirror_hosts_toml, write_hosts_toml};
use support::fault::{Mode, Relay, StatusServer};
use support::image::Image;
use support::moto::Moto;
use support::pullthrough::{Options, Pullthrough, upstreams_toml};
use support::registry::Registry;
use support::{dead_port, short_tempdir};

/// One row of the matrix.
#[derive(Clone, Copy)]
enum Scenario {
    Direct,
    Healthy,
    NotRunning,
    Refused,
    Hung(&'static str),
    Status(u16),
    Absent,
    MissingBlob,
    TokenDown,
    TokenDownAfterFailure,
}

impl Scenario {
    fn label(self) -> String {
        match self {
            Scenario::Direct => "direct upstream pull (no mirror; the baseline)".into(),
            Scenario::Healthy => "healthy: through pullthrough from ECR".into(),
            Scenario::NotRunning => "1. pullthrough not running".into(),
            Scenario::Refused => "2. ECR endpoint refuses connections".into(),
            Scenario::Hung(t) => format!("3. ECR endpoint hangs (response_headers = {t})"),
            Scenario::Status(s) => format!("4. ECR endpoint answers {s}"),
            Scenario::Absent => "5. image not in ECR (404)".into(),
            Scenario::MissingBlob => "6. one layer missing in ECR".into(),
            Scenario::TokenDown => "7. token API down (pull during the first fetch)".into(),
            Scenario::TokenDownAfterFailure => {
                "7. token API down (pull after the first fetch failed)".into()
            }
        }
    }

    /// The repository (same under quay/ in ECR and bare upstream) the scenario pulls.
    fn repo(self) -> &'static str {
        match self {
            Scenario::Absent => "org/absent",
            Scenario::MissingBlob => "org/partial",
            _ => "org/full",
        }
    }
}

const ALL: &[Scenario] = &[
    Scenario::Direct,
    Scenario::Healthy,
    Scenario::NotRunning,
    Scenario::Refused,
    Scenario::Hung("2s"),
    Scenario::Hung("15s"),
    Scenario::Status(500),
    Scenario::Status(503),
    Scenario::Status(429),
    Scenario::Absent,
    Scenario::MissingBlob,
    Scenario::TokenDown,
    Scenario::TokenDownAfterFailure,
];

struct Stack {
    moto: Moto,
    ecr: Registry,
    upstream: Registry,
    image: Image,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut rounds = 3usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().and_then(|n| n.parse().ok()).unwrap_or(3),
            _ => {
                eprintln!("usage: fault_matrix [--rounds N]");
                std::process::exit(64);
            }
        }
    }
    let load_before = loadavg();

    let moto = Moto::start().await;
    let ecr = Registry::start(&moto.password()).await;
    let upstream = Registry::start_open().await;
    let image = Image::small("fault-matrix");
    let layer = image.manifests[0].layers[0].digest.clone();
    for repo in ["org/full", "org/absent", "org/partial"] {
        upstream.push(repo, "1", &image).await;
    }
    ecr.push("quay/org/full", "1", &image).await;
    ecr.push_without_blob("quay/org/partial", "1", &image, &layer)
        .await;
    let stack = Stack {
        moto,
        ecr,
        upstream,
        image,
    };

    let certs = short_tempdir("certs");
    let containerd = Containerd::start(certs.path()).await;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); ALL.len()];
    for round in 0..rounds {
        for (i, s) in ALL.iter().enumerate() {
            let secs = measure(&stack, *s, certs.path(), &containerd).await;
            eprintln!("round {}: {:<55} {secs:.2} s", round + 1, s.label());
            times[i].push(secs);
        }
    }

    let base = median(&times[0]);
    let mut out = String::new();
    out.push_str("| scenario | median pull (s) | extra vs direct (s) | runs |\n");
    out.push_str("|---|---:|---:|---|\n");
    for (s, t) in ALL.iter().zip(&times) {
        let m = median(t);
        let runs = t
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ");
        let extra = if matches!(s, Scenario::Direct) {
            "—".to_owned()
        } else {
            format!("{:+.2}", m - base)
        };
        out.push_str(&format!("| {} | {m:.2} | {extra} | {runs} |\n", s.label()));
    }
    println!("{out}");
    println!(
        "Machine: {} CPUs ({}), {}; load average before {load_before}, after {}.",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        containerd_version(),
        loadavg()
    );
    println!(
        "Command: scripts/fault-matrix --rounds {rounds} (debug build of pullthrough; a small \
         1-layer image; connect timeout 1s, breaker.cooldown 5s)."
    );
}

/// One timed CRI pull of the scenario's image, with a fresh pullthrough.
async fn measure(st: &Stack, s: Scenario, certs: &std::path::Path, c: &Containerd) -> f64 {
    let reference = format!("quay.io/{}:1", s.repo());
    // Whatever the last scenario wrote: `pullthrough hosts` would merge into a file it did not
    // write, so start from nothing.
    for reg in ["docker.io", "quay.io", "registry.k8s.io"] {
        let _ = std::fs::remove_dir_all(certs.join(reg));
    }
    let dead = format!("http://127.0.0.1:{}", dead_port());
    let mut relay = None;
    let mut status = None;
    let (endpoint, ecr_api, timeout) = match s {
        Scenario::Refused => (dead.clone(), st.moto.endpoint(), "2s"),
        Scenario::Hung(t) => {
            let r = Relay::start(st.ecr.port(), Mode::Hang).await;
            let url = r.url();
            relay = Some(r);
            (url, st.moto.endpoint(), t)
        }
        Scenario::Status(code) => {
            let srv = StatusServer::start(StatusCode::from_u16(code).unwrap()).await;
            let url = srv.url();
            status = Some(srv);
            (url, st.moto.endpoint(), "2s")
        }
        Scenario::TokenDown | Scenario::TokenDownAfterFailure => {
            (st.ecr.base_url(), dead.clone(), "2s")
        }
        _ => (st.ecr.base_url(), st.moto.endpoint(), "2s"),
    };
    let mut pt = None;
    if let Scenario::Direct = s {
        let up = st.upstream.base_url();
        write_hosts_toml(certs, "quay.io", &mirror_hosts_toml(&up, &up));
    } else {
        let mut opts = Options::new(&endpoint, &ecr_api);
        opts.extra = format!(
            "[timeouts]\nconnect = \"1s\"\nresponse_headers = \"{timeout}\"\nshutdown = \"5s\"\n\
             [breaker]\ncooldown = \"5s\"\n{}",
            upstreams_toml(Some(&st.upstream.base_url()))
        );
        let p = Pullthrough::start(opts).await;
        p.write_hosts(certs).expect("pullthrough hosts");
        if matches!(s, Scenario::Healthy) {
            // Token fetched, as on a node that has been up for a while.
            for _ in 0..100 {
                if p.ready_status().await == 200 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        if matches!(s, Scenario::TokenDownAfterFailure) {
            // As on a node whose mirror restarted during the outage a while ago.
            for _ in 0..200 {
                if p.log().contains("ECR token fetch failed") {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        pt = Some(p);
    }
    if let (Scenario::NotRunning, Some(p)) = (s, pt.as_mut()) {
        p.kill();
    }

    let t0 = Instant::now();
    let pulled = c.pull_image(&reference).await;
    let secs = t0.elapsed().as_secs_f64();
    if let Err(e) = pulled {
        panic!(
            "{}: {e}\n{}",
            s.label(),
            pt.as_ref().map(Pullthrough::log).unwrap_or_default()
        );
    }
    let digest = c.image_digest(&reference).await.unwrap();
    assert_eq!(digest.as_deref(), Some(st.image.digest()), "{}", s.label());
    c.remove_image(&reference).await.unwrap();
    drop((relay, status, pt));
    secs
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn containerd_version() -> String {
    std::process::Command::new("containerd")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
                .replace("github.com/containerd/containerd ", "")
        })
        .unwrap_or_default()
}
