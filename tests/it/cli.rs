//! The command line: exit codes and messages a platform engineer sees.

use std::process::{Command, Output};

use crate::support::pullthrough_bin;

fn run(args: &[&str]) -> Output {
    Command::new(pullthrough_bin())
        .args(args)
        .env_remove("PULLTHROUGH_CONFIG")
        .output()
        .unwrap()
}

fn write_config(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pullthrough.toml");
    std::fs::write(&path, text).unwrap();
    let p = path.display().to_string();
    (dir, p)
}

#[test]
fn bad_config_exits_64_naming_file_line_and_key() {
    let (_dir, path) = write_config(
        "listen = \"127.0.0.1:5050\"\n\n[upstreams.\"docker.io\"]\nprefix = \"Docker_Hub\"\n",
    );
    for cmd in ["serve", "hosts", "check-config"] {
        let out = run(&[cmd, "--config", &path]);
        assert_eq!(out.status.code(), Some(64), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("{path}:4: upstreams.\"docker.io\".prefix: \"Docker_Hub\" is not an ECR pull-through prefix")),
            "{cmd}: {err}"
        );
    }
}

#[test]
fn unknown_key_exits_64() {
    let (_dir, path) = write_config("[ecr]\nregion = \"eu-west-1\"\nacount = \"123456789012\"\n");
    let out = run(&["check-config", "--config", &path]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{path}:3: ecr.acount: unknown field `acount`")),
        "{err}"
    );
}

#[test]
fn missing_config_file_exits_64() {
    let out = run(&["check-config", "--config", "/nonexistent/pullthrough.toml"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("/nonexistent/pullthrough.toml: cannot read config")
    );
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    assert_eq!(run(&["serve"]).status.code(), Some(64), "missing --config");
    assert_eq!(run(&["frobnicate"]).status.code(), Some(64));
    assert_eq!(
        run(&["--log-format", "xml", "serve", "--config", "x"])
            .status
            .code(),
        Some(64)
    );
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("hosts"));
}

#[test]
fn check_config_accepts_the_documented_example() {
    let path = crate::support::repo_root().join("docs/pullthrough.example.toml");
    let out = run(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (3 upstreams)"));
}

#[test]
fn a_bad_ca_file_exits_64() {
    let (_dir, path) = write_config("[ecr]\nca_file = \"/etc/hostname\"\n");
    let out = run(&["check-config", "--config", &path]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":2: ecr.ca_file: \"/etc/hostname\" holds no PEM certificate"),
        "{err}"
    );
}

#[test]
fn an_account_without_a_region_exits_64() {
    let (_dir, path) = write_config(
        "listen = \"127.0.0.1:0\"\nops_listen = \"127.0.0.2:0\"\n[ecr]\naccount = \"123456789012\"\n",
    );
    let out = Command::new(pullthrough_bin())
        .args(["serve", "--config", &path])
        .env_clear()
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("set ecr.region or ecr.endpoint"));
}

/// Every file under `dir`, relative path → bytes (`<dir>` for directories).
fn snapshot(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if p.is_dir() {
                out.push((rel, b"<dir>".to_vec()));
                walk(root, &p, out);
            } else {
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn containerd_hosts_examples_match_the_renderer() {
    let (dir, path) = write_config("listen = \"127.0.0.1:5050\"\n");
    let certs = dir.path().join("certs.d");
    let out = run(&["hosts", "--config", &path, "--dir", certs.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches(": created").count(), 6, "{stdout}");
    let examples = crate::support::repo_root().join("containerd-hosts");
    let want: Vec<_> = snapshot(&examples)
        .into_iter()
        .filter(|(p, _)| p != "README.md")
        .collect();
    assert_eq!(
        snapshot(&certs),
        want,
        "containerd-hosts/ drifted: see its README"
    );
}

#[test]
fn hosts_install_then_remove_restores_a_hand_written_file_byte_for_byte() {
    let (dir, path) = write_config("listen = \"127.0.0.1:5050\"\n");
    let certs = dir.path().join("certs.d");
    let hand = "# ours\nserver = \"https://registry-1.docker.io\"\n\n[host.\"https://mirror.corp.example\"]\n  capabilities = [\"pull\"]\n";
    std::fs::create_dir_all(certs.join("docker.io")).unwrap();
    std::fs::write(certs.join("docker.io/hosts.toml"), hand).unwrap();
    std::fs::create_dir_all(certs.join("corp.example:5000")).unwrap();
    std::fs::write(
        certs.join("corp.example:5000/hosts.toml"),
        "server = \"https://corp.example:5000\"\n",
    )
    .unwrap();
    let before = snapshot(&certs);

    let out = run(&["hosts", "--config", &path, "--dir", certs.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("docker.io/hosts.toml: merged"), "{stdout}");
    let merged = std::fs::read_to_string(certs.join("docker.io/hosts.toml")).unwrap();
    let ours = merged.find("[host.\"http://127.0.0.1:5050\"]").unwrap();
    assert!(
        ours < merged
            .find("[host.\"https://mirror.corp.example\"]")
            .unwrap(),
        "{merged}"
    );

    // --remove needs no config.
    let out = run(&["hosts", "--remove", "--dir", certs.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("docker.io/hosts.toml: restored"));
    assert_eq!(snapshot(&certs), before);
}

#[test]
fn hosts_without_config_or_remove_is_a_usage_error() {
    let out = run(&["hosts", "--dir", "/nonexistent"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}

#[rstest::rstest]
#[case::registries_conf(
    "registries-conf",
    "[[registry.mirror]]\nlocation = \"127.0.0.1:5050/quay.io\""
)]
#[case::bottlerocket(
    "bottlerocket",
    "[[settings.container-registry.mirrors]]\nregistry = \"quay.io\"\nendpoint = [\"http://127.0.0.1:5050\"]"
)]
fn hosts_prints_other_runtime_formats(#[case] format: &str, #[case] want: &str) {
    let (dir, path) =
        write_config("listen = \"127.0.0.1:5050\"\n[upstreams.\"quay.io\"]\nprefix = \"quay\"\n");
    let out = run(&[
        "hosts",
        "--config",
        &path,
        "--format",
        format,
        "--dir",
        dir.path().join("untouched").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(want));
    assert!(
        !dir.path().join("untouched").exists(),
        "other formats write nothing to --dir"
    );
}

#[test]
fn a_bad_containerd_version_exits_64_naming_the_flag() {
    let (_dir, path) = write_config("listen = \"127.0.0.1:5050\"\n");
    let out = run(&["node", "--config", &path, "--containerd-version", "banana"]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--containerd-version") && err.contains("names no containerd version"),
        "{err}"
    );
}

/// Text logs written to a file (a pipe, a container log) carry no ANSI colour codes.
#[tokio::test]
async fn text_logs_to_a_file_have_no_colour_codes() {
    let (dir, path) = write_config("listen = \"127.0.0.1:5050\"\n");
    let host = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(host.path().join("etc/containerd/certs.d")).unwrap();
    let port = crate::support::free_port();
    let mut cmd = Command::new(pullthrough_bin());
    // The node agent with --remove: it logs, then idles until SIGTERM.
    cmd.args(["node", "--config", &path, "--remove", "--host-root"])
        .arg(host.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env_clear()
        .env("RUST_LOG", "info");
    let mut agent = crate::support::ChildGuard::spawn("node", &mut cmd, dir.path());
    agent.wait_for_port(port).await;
    crate::support::eventually("the agent logs", || {
        agent
            .stderr()
            .contains("node agent listening")
            .then_some(())
    })
    .await;
    agent.sigterm();
    agent.wait_exit(std::time::Duration::from_secs(10)).await;
    let bytes = std::fs::read(agent.stderr_path()).unwrap();
    assert!(
        !bytes.contains(&0x1b),
        "ESC in the log file: {}",
        String::from_utf8_lossy(&bytes)
    );
    // The level is still there, as plain text.
    assert!(String::from_utf8_lossy(&bytes).contains(" INFO "));
}
