//! The CNCF distribution registry (`docker-registry serve`, 2.8) as the
//! upstream ECR stands in for: filesystem storage in a tempdir, htpasswd
//! auth for user `AWS`, and an access log the tests read to see which
//! requests reached upstream.
//!
//! # Access log
//! With `log.accesslog` on, distribution wraps its handler in gorilla's
//! `CombinedLoggingHandler` writing to **stdout**, one line per request, in
//! Apache combined format:
//!
//! ```text
//! 127.0.0.1 - - [27/Nov/2026:22:01:18 +0000] "GET /v2/x/manifests/1?ns=docker.io HTTP/1.1" 404 94 "" "curl/7.88.1"
//! ```
//!
//! That line has method, request URI (with query) and status for *every*
//! request, including the 401s that auth rejects, so it is what
//! [`Registry::requests`] parses. The logrus lines on stderr
//! (`http.request.method=… http.request.uri=… http.response.status=…`) have
//! no "response completed" line for requests auth rejects, so they are only
//! kept for debugging.
//!
//! The line is written when the registry's handler returns, which is
//! usually before the client sees the end of the response, but for a large
//! blob the last bytes can reach the client first. Assert with
//! [`Registry::wait_for_request`] rather than a bare [`Registry::requests`]
//! snapshot when the request just finished.
//!
//! # Manifests need `Accept`
//! Distribution 2.8 answers `404 MANIFEST_UNKNOWN` to a GET of an OCI
//! manifest or index unless `Accept` lists its media type (it tries to
//! down-convert to Docker schema 1 and fails), so a proxy must forward the
//! client's `Accept` header. [`Registry::get_manifest`] sends
//! [`ACCEPT`].
//!
//! # Password changes
//! Distribution 2.8's htpasswd controller stats the file on every request
//! and re-reads it when its mtime changes (checked here: the old password
//! gets 401 and the new one 200 right after a rename), so
//! [`Registry::set_password`] needs no restart. [`Registry::restart`] exists
//! for "upstream went away and came back" cases; it keeps port and storage.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use tempfile::TempDir;

use super::http::{request_with_body, send};
use super::image::{ACCEPT, Blob, Image};
use super::{ChildGuard, basic_auth, free_port, try_eventually};

/// The user name ECR tokens carry, and so the one the registry accepts.
pub const USER: &str = "AWS";

/// One access-log line: method, request URI (path and query), status.
pub type LoggedRequest = (String, String, u16);

/// A running `docker-registry`; killed on drop.
pub struct Registry {
    port: u16,
    password: Mutex<Option<String>>,
    child: ChildGuard,
    // Last: the process must die before its storage is deleted.
    dir: TempDir,
}

impl Registry {
    /// Starts a registry that requires `AWS:<password>` (Basic auth).
    pub async fn start(password: &str) -> Registry {
        Self::start_with(Some(password)).await
    }

    /// Starts a registry without auth, e.g. for containerd to pull from
    /// directly.
    pub async fn start_open() -> Registry {
        Self::start_with(None).await
    }

    async fn start_with(password: Option<&str>) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("registry")
            .tempdir()
            .expect("registry tempdir");
        let port = free_port();
        if let Some(password) = password {
            write_htpasswd(&htpasswd_path(dir.path()), password);
        }
        std::fs::write(
            config_path(dir.path()),
            config_yaml(dir.path(), port, password.is_some()),
        )
        .expect("write registry config");
        let mut child = spawn(dir.path());
        child.wait_for_port(port).await;
        Registry {
            port,
            password: Mutex::new(password.map(str::to_owned)),
            child,
            dir,
        }
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// The password it currently accepts, `None` for an open registry.
    pub fn password(&self) -> Option<String> {
        self.password.lock().expect("password lock").clone()
    }

    /// `Basic …` for the current password, `None` for an open registry.
    pub fn auth_header(&self) -> Option<String> {
        self.password().map(|p| basic_auth(USER, &p))
    }

    /// Makes the registry accept `new` (and only `new`) from now on.
    ///
    /// The htpasswd file is replaced atomically (write + rename), since the
    /// registry may read it at any moment. Panics on an open registry.
    pub fn set_password(&self, new: &str) {
        let mut current = self.password.lock().expect("password lock");
        assert!(current.is_some(), "set_password on a registry without auth");
        write_htpasswd(&htpasswd_path(self.dir.path()), new);
        *current = Some(new.to_owned());
    }

    /// Stops the registry; requests fail with "connection refused" until
    /// [`Registry::restart`].
    pub fn stop(&mut self) {
        self.child.kill();
    }

    /// Stops the registry (if running) and starts it again on the same port
    /// with the same storage, password and access log.
    pub async fn restart(&mut self) {
        self.child.kill();
        self.child = spawn(self.dir.path());
        self.child.wait_for_port(self.port).await;
    }

    /// The registry's stderr (logrus lines) so far, for debugging.
    pub fn log(&self) -> String {
        self.child.stderr()
    }

    /// Every request in the access log so far, oldest first.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.child
            .stdout()
            .lines()
            .filter_map(parse_access_log_line)
            .collect()
    }

    /// The request URIs (path and query) in the access log so far.
    pub fn paths_seen(&self) -> Vec<String> {
        self.requests().into_iter().map(|(_, uri, _)| uri).collect()
    }

    /// Forgets the requests logged so far (e.g. the ones a push made).
    pub fn clear_requests(&self) {
        // The registry's stdout is opened with O_APPEND, so after the
        // truncation its next line lands at offset 0.
        std::fs::File::options()
            .write(true)
            .open(self.child.stdout_path())
            .and_then(|f| f.set_len(0))
            .expect("truncate registry access log");
    }

    /// Waits until the access log has a `method` request for exactly `uri`
    /// and returns its status. See the module doc for why waiting is needed.
    /// Panics, listing what was logged, if it never shows up.
    pub async fn wait_for_request(&self, method: &str, uri: &str) -> u16 {
        let found = try_eventually(|| {
            self.requests()
                .into_iter()
                .find(|(m, u, _)| m == method && u == uri)
                .map(|(_, _, status)| status)
        })
        .await;
        found.unwrap_or_else(|| {
            panic!(
                "{method} {uri} never showed up in the registry access log; logged:\n{}",
                self.requests()
                    .iter()
                    .map(|(m, u, s)| format!("  {m} {u} {s}\n"))
                    .collect::<String>()
            )
        })
    }

    /// Waits until the access log has any request for exactly `uri` and
    /// returns its method and status (e.g. containerd resolves a tag with
    /// `HEAD`, falling back to `GET`).
    pub async fn wait_for_path(&self, uri: &str) -> (String, u16) {
        let found = try_eventually(|| {
            self.requests()
                .into_iter()
                .find(|(_, u, _)| u == uri)
                .map(|(m, _, status)| (m, status))
        })
        .await;
        found.unwrap_or_else(|| {
            panic!(
                "{uri} never showed up in the registry access log; logged:\n{}",
                self.requests()
                    .iter()
                    .map(|(m, u, s)| format!("  {m} {u} {s}\n"))
                    .collect::<String>()
            )
        })
    }

    /// Pushes `image` as `repo:tag`: every blob, then (for an index) each
    /// platform manifest by digest, then the root manifest by tag.
    pub async fn push(&self, repo: &str, tag: &str, image: &Image) {
        for blob in image.blobs() {
            self.push_blob(repo, blob).await;
        }
        if image.is_index() {
            // Distribution refuses an index whose manifests it lacks.
            for m in &image.manifests {
                self.put_manifest(repo, m.digest(), &m.manifest).await;
            }
        }
        self.put_manifest(repo, tag, &image.root).await;
    }

    /// Pushes `image` as [`Registry::push`] does, then deletes the blob
    /// `skip_digest` from `repo`, leaving the image present with one blob
    /// missing (GET for it answers 404 `BLOB_UNKNOWN`).
    ///
    /// Simply not uploading it does not work: distribution rejects a
    /// manifest that references a blob it does not have.
    pub async fn push_without_blob(&self, repo: &str, tag: &str, image: &Image, skip_digest: &str) {
        assert!(
            image.blob(skip_digest).is_some(),
            "{skip_digest} is not a config or layer of the image"
        );
        self.push(repo, tag, image).await;
        self.delete_blob(repo, skip_digest).await;
    }

    /// Uploads one blob (monolithic: POST for an upload URL, then PUT
    /// `?digest=`).
    pub async fn push_blob(&self, repo: &str, blob: &Blob) {
        let url = format!("{}/v2/{repo}/blobs/uploads/", self.base_url());
        let resp = self.send(Method::POST, &url, &[], Bytes::new()).await;
        assert_eq!(
            resp.status(),
            StatusCode::ACCEPTED,
            "POST {url}: {}",
            String::from_utf8_lossy(resp.body())
        );
        let location = resp
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .expect("upload Location header");
        let location = if location.starts_with('/') {
            format!("{}{location}", self.base_url())
        } else {
            location.to_owned()
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={}", blob.digest);
        let resp = self
            .send(
                Method::PUT,
                &url,
                &[("content-type", "application/octet-stream")],
                blob.bytes.clone(),
            )
            .await;
        assert_eq!(
            resp.status(),
            StatusCode::CREATED,
            "PUT blob {}: {}",
            blob.digest,
            String::from_utf8_lossy(resp.body())
        );
    }

    /// PUTs `manifest` (a manifest or index blob) as `repo:reference`.
    pub async fn put_manifest(&self, repo: &str, reference: &str, manifest: &Blob) {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base_url());
        let resp = self
            .send(
                Method::PUT,
                &url,
                &[("content-type", manifest.media_type)],
                manifest.bytes.clone(),
            )
            .await;
        assert_eq!(
            resp.status(),
            StatusCode::CREATED,
            "PUT {url}: {}",
            String::from_utf8_lossy(resp.body())
        );
    }

    /// Deletes blob `digest` from `repo` (storage.delete is enabled).
    pub async fn delete_blob(&self, repo: &str, digest: &str) {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base_url());
        let resp = self.send(Method::DELETE, &url, &[], Bytes::new()).await;
        assert_eq!(
            resp.status(),
            StatusCode::ACCEPTED,
            "DELETE {url}: {}",
            String::from_utf8_lossy(resp.body())
        );
    }

    /// GETs `/v2/<repo>/manifests/<reference>` directly (not through the
    /// proxy), with the registry's credentials and an `Accept` for OCI
    /// manifests and indexes.
    pub async fn get_manifest(&self, repo: &str, reference: &str) -> Response<Bytes> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base_url());
        self.send(Method::GET, &url, &[("accept", ACCEPT)], Bytes::new())
            .await
    }

    /// GETs `/v2/<repo>/blobs/<digest>` directly, with credentials.
    pub async fn get_blob(&self, repo: &str, digest: &str) -> Response<Bytes> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base_url());
        self.send(Method::GET, &url, &[], Bytes::new()).await
    }

    /// One request with the registry's credentials (if any) added.
    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Response<Bytes> {
        let auth = self.auth_header();
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(auth) = &auth {
            all.push(("authorization", auth));
        }
        send(request_with_body(method.clone(), url, &all, body))
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}\nregistry log:\n{}", self.log()))
    }
}

/// Parses one combined-log-format line into (method, uri, status).
///
/// `127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 401 87 "" "ua"`
pub fn parse_access_log_line(line: &str) -> Option<LoggedRequest> {
    let (_, rest) = line.split_once('"')?;
    let (request_line, rest) = rest.split_once('"')?;
    let mut parts = request_line.split(' ');
    let method = parts.next()?;
    let uri = parts.next()?;
    let status = rest.split_whitespace().next()?.parse().ok()?;
    Some((method.to_owned(), uri.to_owned(), status))
}

fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.yml")
}

fn htpasswd_path(dir: &Path) -> PathBuf {
    dir.join("htpasswd")
}

fn spawn(dir: &Path) -> ChildGuard {
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve").arg(config_path(dir));
    // Keep the environment from overriding the config file: distribution
    // reads REGISTRY_* variables on top of it.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("REGISTRY_") {
            cmd.env_remove(key);
        }
    }
    ChildGuard::spawn("docker-registry", &mut cmd, dir)
}

fn config_yaml(dir: &Path, port: u16, with_auth: bool) -> String {
    let data = dir.join("data");
    let auth = if with_auth {
        format!(
            "auth:\n  htpasswd:\n    realm: pullthrough-test\n    path: {}\n",
            htpasswd_path(dir).display()
        )
    } else {
        String::new()
    };
    // http.secret: avoids the "no HTTP secret" warning and makes upload
    // state survive a restart. health/uploadpurging: no background work.
    format!(
        "\
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {data}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: pullthrough-integration-tests
health:
  storagedriver:
    enabled: false
{auth}",
        data = data.display(),
    )
}

/// Writes `AWS:<bcrypt(password)>` to `path` atomically.
fn write_htpasswd(path: &Path, password: &str) {
    let out = Command::new("htpasswd")
        .args(["-Bbn", USER, password])
        .output()
        .expect("run htpasswd (apache2-utils)");
    assert!(
        out.status.success(),
        "htpasswd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &out.stdout).expect("write htpasswd.tmp");
    // The registry reloads when the mtime differs from the one it last
    // read. File mtimes come from a coarse clock, so two writes in quick
    // succession could share one; force the new file's mtime forward.
    let mut mtime = SystemTime::now();
    if let Ok(old) = std::fs::metadata(path).and_then(|m| m.modified()) {
        mtime = mtime.max(old + Duration::from_millis(1));
    }
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .and_then(|f| f.set_modified(mtime))
        .expect("set htpasswd mtime");
    std::fs::rename(&tmp, path).expect("rename htpasswd into place");
}

#[test]
fn parses_combined_log_lines() {
    let line = r#"127.0.0.1 - - [27/Nov/2026:22:01:18 +0000] "GET /v2/library/alpine/manifests/3.19?ns=docker.io HTTP/1.1" 404 94 "" "curl/7.88.1""#;
    assert_eq!(
        parse_access_log_line(line),
        Some((
            "GET".to_owned(),
            "/v2/library/alpine/manifests/3.19?ns=docker.io".to_owned(),
            404
        ))
    );
    assert_eq!(parse_access_log_line("garbage"), None);
}
