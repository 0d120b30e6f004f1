//! moto's server standing in for the ECR API, so the proxy fetches real
//! `GetAuthorizationToken` answers without AWS.
//!
//! # What moto answers (moto 5.2, `moto/ecr/responses.py`)
//! For each requested registry id (default: the account moto runs as,
//! `MOTO_ACCOUNT_ID` or `123456789012`):
//!
//! ```json
//! {"authorizationData": [{
//!   "authorizationToken": "<base64 of AWS:<account>-auth-token>",
//!   "expiresAt": 1420070400,
//!   "proxyEndpoint": "https://<account>.dkr.ecr.<region>.amazonaws.com"}]}
//! ```
//!
//! `expiresAt` is fixed at 2015-01-01T00:00:00Z, i.e. **already expired**;
//! `<region>` is taken from the SigV4 credential scope of the request
//! (`us-east-1` if absent). Any `Authorization` header is accepted.
//!
//! # Counting calls
//! moto's recorder (`MOTO_ENABLE_RECORDING`) appends one JSON line per
//! request, with its headers, to `MOTO_RECORDER_FILEPATH` *before* handling
//! it, so by the time a caller has the answer the line is on disk.
//! [`Moto::token_calls`] counts the lines whose `X-Amz-Target` is
//! [`GET_AUTHORIZATION_TOKEN`]. The file lives in the guard's tempdir and
//! survives [`Moto::restart_with_account`], so counts are cumulative.

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use http::Method;
use serde_json::Value;
use tempfile::TempDir;

use super::http::{request_with_body, send};
use super::{ChildGuard, base64, free_port, repo_root};

/// moto's account id when `MOTO_ACCOUNT_ID` is not set.
pub const DEFAULT_ACCOUNT: &str = "123456789012";

/// The `X-Amz-Target` of ECR's `GetAuthorizationToken` (JSON 1.1 protocol).
pub const GET_AUTHORIZATION_TOKEN: &str =
    "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken";

/// A running `moto_server`; killed on drop.
pub struct Moto {
    port: u16,
    account: String,
    child: ChildGuard,
    // Last: the process must die before its recording is deleted.
    dir: TempDir,
}

impl Moto {
    /// Starts moto with its default account, [`DEFAULT_ACCOUNT`].
    pub async fn start() -> Moto {
        Self::start_with_account(DEFAULT_ACCOUNT).await
    }

    /// Starts moto running as `account` (`MOTO_ACCOUNT_ID`).
    pub async fn start_with_account(account: &str) -> Moto {
        let dir = tempfile::Builder::new()
            .prefix("moto")
            .tempdir()
            .expect("moto tempdir");
        let port = free_port();
        let mut child = spawn(dir.path(), port, account);
        child.wait_for_port(port).await;
        Moto {
            port,
            account: account.to_owned(),
            child,
            dir,
        }
    }

    /// Restarts moto as `account` on the same port, as if ECR started handing
    /// out another token. The recording (and so [`Moto::token_calls`])
    /// carries over.
    pub async fn restart_with_account(&mut self, account: &str) {
        self.child.kill();
        self.child = spawn(self.dir.path(), self.port, account);
        self.child.wait_for_port(self.port).await;
        self.account = account.to_owned();
    }

    /// Stops moto; calls fail with "connection refused" until a restart.
    pub fn stop(&mut self) {
        self.child.kill();
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`, the ECR endpoint URL to configure.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The account moto runs as.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The registry password moto's token decodes to: `<account>-auth-token`.
    pub fn password(&self) -> String {
        format!("{}-auth-token", self.account)
    }

    /// The `authorizationToken` moto returns: base64 of `AWS:<password>`.
    pub fn authorization_token(&self) -> String {
        base64(format!("AWS:{}", self.password()).as_bytes())
    }

    /// moto's stderr (werkzeug's request log) so far, for debugging.
    pub fn log(&self) -> String {
        self.child.stderr()
    }

    /// Every request moto has recorded, as moto's recorder wrote them
    /// (`{"headers": {...}, "method", "url", "body", "body_encoded"}`).
    pub fn recorded_requests(&self) -> Vec<Value> {
        std::fs::read_to_string(recording_path(self.dir.path()))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// How many `GetAuthorizationToken` calls moto has received.
    pub fn token_calls(&self) -> usize {
        self.recorded_requests()
            .iter()
            .filter(|r| {
                r["headers"].as_object().is_some_and(|h| {
                    h.iter().any(|(k, v)| {
                        k.eq_ignore_ascii_case("x-amz-target")
                            && v.as_str() == Some(GET_AUTHORIZATION_TOKEN)
                    })
                })
            })
            .count()
    }

    /// Calls `GetAuthorizationToken` directly (raw JSON 1.1 POST with a
    /// SigV4-shaped header for `region`) and returns the parsed answer.
    pub async fn get_authorization_token(&self, region: &str) -> Result<Value, String> {
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20250101/{region}/ecr/aws4_request, \
             SignedHeaders=host;x-amz-date;x-amz-target, Signature=00"
        );
        let req = request_with_body(
            Method::POST,
            &format!("{}/", self.endpoint()),
            &[
                ("x-amz-target", GET_AUTHORIZATION_TOKEN),
                ("content-type", "application/x-amz-json-1.1"),
                ("x-amz-date", "20250101T000000Z"),
                ("authorization", &auth),
            ],
            Bytes::from_static(b"{}"),
        );
        let resp = send(req).await?;
        if !resp.status().is_success() {
            return Err(format!(
                "GetAuthorizationToken: {} {}",
                resp.status(),
                String::from_utf8_lossy(resp.body())
            ));
        }
        serde_json::from_slice(resp.body()).map_err(|e| format!("GetAuthorizationToken json: {e}"))
    }
}

/// `$PULLTHROUGH_MOTO_SERVER`, else the repo's `.cache/venv/bin/moto_server`.
pub fn moto_server_path() -> PathBuf {
    std::env::var_os("PULLTHROUGH_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/venv/bin/moto_server"))
}

fn recording_path(dir: &Path) -> PathBuf {
    dir.join("recording.jsonl")
}

fn spawn(dir: &Path, port: u16, account: &str) -> ChildGuard {
    let bin = moto_server_path();
    assert!(
        bin.exists(),
        "moto_server not found at {} (set PULLTHROUGH_MOTO_SERVER, or \
         `python3 -m venv .cache/venv && .cache/venv/bin/pip install 'moto[server]'`)",
        bin.display()
    );
    let mut cmd = Command::new(bin);
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .env("MOTO_ENABLE_RECORDING", "True")
        .env("MOTO_RECORDER_FILEPATH", recording_path(dir))
        .env("MOTO_ACCOUNT_ID", account)
        .current_dir(dir);
    ChildGuard::spawn("moto_server", &mut cmd, dir)
}
