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

#[test]
fn hosts_writes_one_file_per_upstream() {
    let (dir, path) = write_config("listen = \"0.0.0.0:5050\"\n");
    let certs = dir.path().join("certs.d");
    let out = run(&["hosts", "--config", &path, "--dir", certs.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut regs: Vec<String> = std::fs::read_dir(&certs)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    regs.sort();
    assert_eq!(
        regs,
        [
            "docker.io",
            "ghcr.io",
            "public.ecr.aws",
            "quay.io",
            "registry.gitlab.com",
            "registry.k8s.io"
        ]
    );
    let hub = std::fs::read_to_string(certs.join("docker.io/hosts.toml")).unwrap();
    let golden = std::fs::read_to_string(
        crate::support::repo_root().join("tests/fixtures/hosts/docker.io.toml"),
    )
    .unwrap();
    assert_eq!(hub, golden);
}
