//! `[webhook]`: the admission webhook's listeners, certificate files, rewrite policy and cache
//! warming, raw as written and validated, with errors naming file, line and key like the rest of
//! [`crate::config`]. `pullthrough rewrite` reads the same policy, so what it prints is what the
//! webhook does.
//!
//! The certificate files are only named here, not read: the mirror's DaemonSet may share this
//! file without mounting the webhook's Secret. `pullthrough webhook` loads them at start-up and
//! reports a bad file against the key's line through [`ConfigOrigin`].

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::rewrite::{DigestRefs, ImagePattern};
use crate::config::error::{ConfigError, Locator};

/// Default HTTPS address: the pod IP, where the Service sends the API server's calls.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
/// Default plain-HTTP address for `/healthz`, `/readyz` and `/metrics`.
pub const DEFAULT_OPS_LISTEN: &str = "0.0.0.0:8080";
/// Default certificate chain (PEM), where the manifests mount the Secret.
pub const DEFAULT_CERT_FILE: &str = "/etc/pullthrough/webhook-tls/tls.crt";
/// Default private key (PEM).
pub const DEFAULT_KEY_FILE: &str = "/etc/pullthrough/webhook-tls/tls.key";
/// Default annotation that records the original images of a rewritten pod.
pub const DEFAULT_ANNOTATION: &str = "pullthrough.io/original-images";
/// Namespaces skipped by default; the webhook's own namespace is always skipped as well.
pub const DEFAULT_SKIP_NAMESPACES: &[&str] = &["kube-system"];
/// Default time an (image, tag) warmed at admission is not warmed again: a Deployment's
/// replicas, and its restarts, all come with the same image, and ECR re-checks a cached tag
/// upstream at most once a day anyway.
pub const DEFAULT_WARM_DEDUPE: Duration = Duration::from_secs(3600);
/// Default number of warms waiting for a worker. Each is a few hundred bytes; a burst larger
/// than this (a whole cluster's rollout) drops the rest, which the next admission retries.
pub const DEFAULT_WARM_QUEUE: usize = 1024;
/// Largest `webhook.warm_queue`.
pub const MAX_WARM_QUEUE: usize = 1 << 20;
/// Default number of warms at once. A warm is a few manifest GETs, each answered by ECR once it
/// has imported the image; four keep a burst moving without a storm of imports.
pub const DEFAULT_WARM_WORKERS: usize = 4;
/// Largest `webhook.warm_workers`.
pub const MAX_WARM_WORKERS: usize = 64;

/// `[webhook]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    listen: Option<Spanned<String>>,
    ops_listen: Option<Spanned<String>>,
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    skip_namespaces: Option<Vec<Spanned<String>>>,
    exclude: Option<Vec<Spanned<String>>>,
    annotation: Option<Spanned<String>>,
    digest_refs: Option<Spanned<String>>,
    warm: Option<Spanned<bool>>,
    warm_dedupe: Option<Spanned<String>>,
    warm_queue: Option<Spanned<i64>>,
    warm_workers: Option<Spanned<i64>>,
}

/// What the webhook does with the rewrites it decides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// Patch the images (and record the originals in an annotation).
    #[default]
    Enforce,
    /// Patch nothing but an annotation saying what would change.
    DryRun,
    /// Patch nothing at all; only warm the cache for `name:tag@digest` images.
    Warm,
}

impl Mode {
    /// The config spelling, also used as a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::DryRun => "dry-run",
            Mode::Warm => "warm",
        }
    }
}

/// Where a config value was written, to report a problem found after loading (a certificate
/// file that cannot be read) the way load-time errors are reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigOrigin {
    path: String,
    line: usize,
    key: &'static str,
}

impl ConfigOrigin {
    /// A config error about this value.
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            line: self.line,
            key: self.key.to_owned(),
            message: message.into(),
        }
    }
}

/// The validated `[webhook]` section. Every field has a default, so a config without the
/// section runs the webhook with them.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// HTTPS listener for `/mutate`.
    pub listen: SocketAddr,
    /// Plain-HTTP listener for probes and metrics.
    pub ops_listen: SocketAddr,
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// Where `cert_file` and `key_file` were set, for errors when loading them.
    pub cert_origin: (ConfigOrigin, ConfigOrigin),
    /// Enforce or dry-run.
    pub mode: Mode,
    /// Namespaces whose pods are never changed.
    pub skip_namespaces: BTreeSet<String>,
    /// Images never rewritten.
    pub exclude: Vec<ImagePattern>,
    /// Annotation key recording the original images.
    pub annotation: String,
    /// References with a digest: keep (default) or rewrite.
    pub digest_refs: DigestRefs,
    /// Whether admitted `name:tag@digest` images are warmed by tag: `webhook.warm`, always on in
    /// warm mode.
    pub warm: bool,
    /// How long an (image, tag) once queued is not queued again.
    pub warm_dedupe: Duration,
    /// Warms waiting for a worker; more are dropped.
    pub warm_queue: usize,
    /// Warms at once.
    pub warm_workers: usize,
}

/// Validates `[webhook]`.
pub(crate) fn validate(raw: &RawWebhook, at: Locator<'_>) -> Result<WebhookConfig, ConfigError> {
    let addr = |v: &Option<Spanned<String>>, key: &str, default: &str| {
        at.socket_addr(v, key, default, "0.0.0.0:8443")
    };
    let listen = addr(&raw.listen, "webhook.listen", DEFAULT_LISTEN)?;
    let ops_listen = addr(&raw.ops_listen, "webhook.ops_listen", DEFAULT_OPS_LISTEN)?;
    if listen == ops_listen {
        let span = raw.ops_listen.as_ref().map(|s| s.span()).unwrap_or(0..0);
        return Err(at.err(
            &span,
            "webhook.ops_listen",
            "must differ from `webhook.listen`",
        ));
    }

    let file = |v: &Option<Spanned<String>>, key: &'static str, default: &str| {
        let (value, span) = match v {
            Some(s) => (s.get_ref().as_str(), s.span()),
            None => (default, 0..0),
        };
        if value.is_empty() {
            return Err(at.err(&span, key, "must not be empty"));
        }
        let origin = ConfigOrigin {
            path: at.path().to_owned(),
            line: at.line(&span),
            key,
        };
        Ok((PathBuf::from(value), origin))
    };
    let (cert_file, cert_at) = file(&raw.cert_file, "webhook.cert_file", DEFAULT_CERT_FILE)?;
    let (key_file, key_at) = file(&raw.key_file, "webhook.key_file", DEFAULT_KEY_FILE)?;

    let mode = match &raw.mode {
        None => Mode::default(),
        Some(s) => match s.get_ref().as_str() {
            "enforce" => Mode::Enforce,
            "dry-run" => Mode::DryRun,
            "warm" => Mode::Warm,
            other => {
                return Err(at.err(
                    &s.span(),
                    "webhook.mode",
                    format!("{other:?} is not a mode: use \"enforce\", \"dry-run\" or \"warm\""),
                ));
            }
        },
    };

    let skip_namespaces = match &raw.skip_namespaces {
        None => DEFAULT_SKIP_NAMESPACES
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        Some(list) => {
            let mut out = BTreeSet::new();
            for ns in list {
                if !is_dns_label(ns.get_ref()) {
                    return Err(at.err(
                        &ns.span(),
                        "webhook.skip_namespaces",
                        format!("{:?} is not a namespace name", ns.get_ref()),
                    ));
                }
                out.insert(ns.get_ref().clone());
            }
            out
        }
    };

    let mut exclude = Vec::new();
    for p in raw.exclude.iter().flatten() {
        exclude.push(ImagePattern::parse(p.get_ref()).ok_or_else(|| {
            at.err(
                &p.span(),
                "webhook.exclude",
                format!(
                    "{:?} is not an image pattern: non-empty, no spaces, e.g. \"docker.io/acme/*\"",
                    p.get_ref()
                ),
            )
        })?);
    }

    let annotation = match &raw.annotation {
        None => DEFAULT_ANNOTATION.to_owned(),
        Some(s) => {
            if !is_annotation_key(s.get_ref()) {
                return Err(at.err(
                    &s.span(),
                    "webhook.annotation",
                    format!(
                        "{:?} is not an annotation key like \"example.com/original-images\"",
                        s.get_ref()
                    ),
                ));
            }
            s.get_ref().clone()
        }
    };

    let digest_refs = match &raw.digest_refs {
        None => DigestRefs::default(),
        Some(s) => DigestRefs::parse(s.get_ref()).ok_or_else(|| {
            at.err(
                &s.span(),
                "webhook.digest_refs",
                format!(
                    "{:?} is not a policy: use \"keep\" or \"rewrite\"",
                    s.get_ref()
                ),
            )
        })?,
    };

    // Warming needs an AWS identity the webhook otherwise does without, so only warm mode
    // turns it on by itself (docs/webhook.md says why).
    let warm = match &raw.warm {
        None => mode == Mode::Warm,
        Some(w) if !*w.get_ref() && mode == Mode::Warm => {
            return Err(at.err(
                &w.span(),
                "webhook.warm",
                "mode = \"warm\" only warms: remove `warm = false`, or choose another mode",
            ));
        }
        Some(w) => *w.get_ref(),
    };
    let warm_dedupe =
        at.positive_duration(&raw.warm_dedupe, "webhook.warm_dedupe", DEFAULT_WARM_DEDUPE)?;
    let count = |v: &Option<Spanned<i64>>, key: &str, default: usize, max: usize, what: &str| {
        at.count(v, key, max, |n| {
            format!("{n} is not {what} from 1 to {max}, e.g. {default}")
        })
        .map(|c| c.unwrap_or(default))
    };
    let warm_queue = count(
        &raw.warm_queue,
        "webhook.warm_queue",
        DEFAULT_WARM_QUEUE,
        MAX_WARM_QUEUE,
        "a queue length",
    )?;
    let warm_workers = count(
        &raw.warm_workers,
        "webhook.warm_workers",
        DEFAULT_WARM_WORKERS,
        MAX_WARM_WORKERS,
        "a number of workers",
    )?;

    Ok(WebhookConfig {
        listen,
        ops_listen,
        cert_file,
        key_file,
        cert_origin: (cert_at, key_at),
        mode,
        skip_namespaces,
        exclude,
        annotation,
        digest_refs,
        warm,
        warm_dedupe,
        warm_queue,
        warm_workers,
    })
}

/// An RFC 1123 label, as namespace names are.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A Kubernetes annotation key: an optional DNS-subdomain prefix and `/`, then a name of at most
/// 63 alphanumerics and `-_.`, starting and ending alphanumeric.
fn is_annotation_key(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let name_ok = {
        let b = name.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    };
    let prefix_ok = prefix.is_none_or(|p| p.len() <= 253 && p.split('.').all(is_dns_label));
    name_ok && prefix_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use rstest::rstest;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, "pullthrough.toml")
    }

    #[test]
    fn defaults_without_the_section() {
        let w = load("").unwrap().webhook;
        assert_eq!(w.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(w.ops_listen.to_string(), DEFAULT_OPS_LISTEN);
        assert_eq!(w.cert_file, PathBuf::from(DEFAULT_CERT_FILE));
        assert_eq!(w.mode, Mode::Enforce);
        assert_eq!(w.digest_refs, DigestRefs::Keep);
        assert_eq!(w.annotation, DEFAULT_ANNOTATION);
        assert!(w.skip_namespaces.contains("kube-system"));
        assert!(w.exclude.is_empty());
        assert!(!w.warm);
        assert_eq!(w.warm_dedupe, DEFAULT_WARM_DEDUPE);
        assert_eq!(w.warm_queue, DEFAULT_WARM_QUEUE);
        assert_eq!(w.warm_workers, DEFAULT_WARM_WORKERS);
    }

    #[rstest]
    #[case::default_is_off("", Mode::Enforce, false)]
    #[case::on_in_enforce("warm = true\n", Mode::Enforce, true)]
    #[case::on_in_dry_run("mode = \"dry-run\"\nwarm = true\n", Mode::DryRun, true)]
    #[case::warm_mode_implies_it("mode = \"warm\"\n", Mode::Warm, true)]
    #[case::warm_mode_and_said_so("mode = \"warm\"\nwarm = true\n", Mode::Warm, true)]
    fn warming(#[case] keys: &str, #[case] mode: Mode, #[case] warm: bool) {
        let w = load(&format!("[webhook]\n{keys}")).unwrap().webhook;
        assert_eq!((w.mode, w.warm), (mode, warm));
    }

    #[test]
    fn full_section() {
        let w = load(
            r#"
[webhook]
listen = "127.0.0.1:9443"
ops_listen = "127.0.0.1:9080"
cert_file = "/tmp/c.pem"
key_file = "/tmp/k.pem"
mode = "dry-run"
skip_namespaces = ["kube-system", "monitoring"]
exclude = ["docker.io/acme/*", "quay.io/*:debug"]
annotation = "example.com/originals"
digest_refs = "rewrite"
warm = true
warm_dedupe = "10m"
warm_queue = 64
warm_workers = 2
"#,
        )
        .unwrap()
        .webhook;
        assert_eq!(w.listen.to_string(), "127.0.0.1:9443");
        assert_eq!(w.key_file, PathBuf::from("/tmp/k.pem"));
        assert_eq!(w.mode, Mode::DryRun);
        assert_eq!(w.skip_namespaces.len(), 2);
        assert_eq!(w.exclude[1].as_str(), "quay.io/*:debug");
        assert_eq!(w.annotation, "example.com/originals");
        assert_eq!(w.digest_refs, DigestRefs::Rewrite);
        assert!(w.warm);
        assert_eq!(w.warm_dedupe, Duration::from_secs(600));
        assert_eq!(w.warm_queue, 64);
        assert_eq!(w.warm_workers, 2);
        let err = w.cert_origin.0.error("unreadable").to_string();
        assert_eq!(err, "pullthrough.toml:5: webhook.cert_file: unreadable");
    }

    #[rstest]
    #[case::unknown_key(
        "[webhook]\nmodee = \"enforce\"\n",
        "pullthrough.toml:2: webhook.modee: unknown field `modee`"
    )]
    #[case::bad_mode(
        "[webhook]\nmode = \"audit\"\n",
        "pullthrough.toml:2: webhook.mode: \"audit\" is not a mode"
    )]
    #[case::bad_digest_refs(
        "[webhook]\n\ndigest_refs = \"pin\"\n",
        "pullthrough.toml:3: webhook.digest_refs: \"pin\" is not a policy"
    )]
    #[case::bad_listen(
        "[webhook]\nlisten = \"8443\"\n",
        "pullthrough.toml:2: webhook.listen: \"8443\" is not an IP:port address"
    )]
    #[case::same_ports(
        "[webhook]\nlisten = \"0.0.0.0:1\"\nops_listen = \"0.0.0.0:1\"\n",
        "pullthrough.toml:3: webhook.ops_listen: must differ"
    )]
    #[case::bad_namespace(
        "[webhook]\nskip_namespaces = [\n  \"kube-system\",\n  \"Bad_NS\",\n]\n",
        "pullthrough.toml:4: webhook.skip_namespaces: \"Bad_NS\" is not a namespace name"
    )]
    #[case::bad_pattern(
        "[webhook]\nexclude = [\"a b\"]\n",
        "pullthrough.toml:2: webhook.exclude: \"a b\" is not an image pattern"
    )]
    #[case::bad_annotation(
        "[webhook]\nannotation = \"pullthrough.io/\"\n",
        "pullthrough.toml:2: webhook.annotation: \"pullthrough.io/\" is not an annotation key"
    )]
    #[case::empty_cert(
        "[webhook]\ncert_file = \"\"\n",
        "pullthrough.toml:2: webhook.cert_file: must not be empty"
    )]
    #[case::warm_mode_without_warming(
        "[webhook]\nmode = \"warm\"\nwarm = false\n",
        "pullthrough.toml:3: webhook.warm: mode = \"warm\" only warms"
    )]
    #[case::warm_not_a_bool(
        "[webhook]\nwarm = \"yes\"\n",
        "pullthrough.toml:2: webhook.warm: invalid type: string \"yes\", expected a boolean"
    )]
    #[case::zero_dedupe(
        "[webhook]\nwarm_dedupe = \"0s\"\n",
        "pullthrough.toml:2: webhook.warm_dedupe: \"0s\" is not a positive duration, e.g. \"1h\""
    )]
    #[case::zero_queue(
        "[webhook]\nwarm_queue = 0\n",
        "pullthrough.toml:2: webhook.warm_queue: 0 is not a queue length from 1 to 1048576"
    )]
    #[case::negative_queue(
        "[webhook]\nwarm_queue = -1\n",
        "pullthrough.toml:2: webhook.warm_queue: -1 is not a queue length"
    )]
    #[case::too_many_workers(
        "[webhook]\nwarm_workers = 65\n",
        "pullthrough.toml:2: webhook.warm_workers: 65 is not a number of workers from 1 to 64, e.g. 4"
    )]
    #[case::wrong_type(
        "[webhook]\nexclude = \"docker.io/*\"\n",
        "pullthrough.toml:2: webhook.exclude: invalid type"
    )]
    fn invalid(#[case] text: &str, #[case] want: &str) {
        let err = load(text).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} does not contain {want:?}");
    }

    #[rstest]
    #[case::plain("original-images", true)]
    #[case::prefixed("pullthrough.io/original-images", true)]
    #[case::dotted_name("a.b/c.d_e", true)]
    #[case::empty("", false)]
    #[case::upper_prefix("Pullthrough.io/x", false)]
    #[case::two_slashes("a/b/c", false)]
    #[case::long_name(&"a".repeat(64), false)]
    fn annotation_keys(#[case] key: &str, #[case] want: bool) {
        assert_eq!(is_annotation_key(key), want);
    }
}
