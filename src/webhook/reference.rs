//! Image references: parse a pod's `image` string with the distribution/reference grammar,
//! normalize it the way containerd and Docker do, and decide whether (and to what) it is rewritten
//! on the ECR pull-through cache. Pure, no IO: the webhook and `pullthrough rewrite` call it, and
//! the ECR path itself comes from [`crate::mirror::map`], the mapping the mirror uses.
//!
//! The decision is deliberately conservative. A reference is rewritten only when its registry,
//! after normalization, is exactly a configured upstream (aliases folded by
//! [`crate::config::Registry`]); hosts are compared whole, never by prefix, so
//! `docker.io.evil.example/x` stays as it is. Anything doubtful (an invalid reference, a
//! node-local or IP registry, a name ECR would refuse, a digest ECR cannot fill its cache from)
//! is left unchanged with a [`Reason`], because a pod that keeps its original image still runs.
//!
//! ```
//! use pullthrough::webhook::reference::Reference;
//! let r = Reference::parse("index.docker.io/nginx").unwrap();
//! assert_eq!(r.registry(), "docker.io");
//! assert_eq!(r.repository(), "library/nginx");
//! assert_eq!(r.tag(), Some("latest"));
//! assert_eq!(r.to_string(), "docker.io/library/nginx:latest");
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::config::{Registry, Upstream};
use crate::mirror::map::{self, MapError};
use crate::mirror::route::{MAX_NAME_LEN, valid_name, valid_tag};

/// The tag a reference with neither tag nor digest gets.
pub const DEFAULT_TAG: &str = "latest";

/// Docker Hub's canonical registry name.
const DOCKER_HUB: &str = "docker.io";

/// Why a string is not an image reference. Such references are never rewritten: the API server
/// or the runtime will reject them, and a rewrite must not make them worse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The empty string.
    #[error("empty reference")]
    Empty,
    /// 64 hex digits alone: an image id, which the distribution grammar refuses as a name.
    #[error("a 64-character hexadecimal string is an image id, not a reference")]
    ImageId,
    /// The registry part breaks the host grammar (or its port is out of range).
    #[error("invalid registry host {0:?}")]
    Registry(String),
    /// The repository has upper-case letters.
    #[error("repository name {0:?} must be lowercase")]
    Uppercase(String),
    /// The repository breaks the name grammar.
    #[error("invalid repository name {0:?}")]
    Name(String),
    /// The tag breaks `[A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}`.
    #[error("invalid tag {0:?}")]
    Tag(String),
    /// Not a sha256, sha384 or sha512 digest of lower-case hex of the right length.
    #[error("invalid digest {0:?}")]
    Digest(String),
    /// Registry and repository together exceed the distribution limit.
    #[error("name is longer than {MAX_NAME_LEN} characters")]
    NameTooLong,
}

/// The registry part of a reference, normalized.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Domain {
    /// A DNS host name with an optional port, canonical: lower case, Docker Hub aliases folded
    /// to `docker.io`, an explicit `:443` dropped.
    Name(Registry),
    /// An IPv4 or bracketed IPv6 literal with an optional port, lower case.
    Ip(String),
}

impl Domain {
    /// The normalized registry as written in a reference, e.g. `docker.io` or `[::1]:5000`.
    pub fn as_str(&self) -> &str {
        match self {
            Domain::Name(r) => r.as_str(),
            Domain::Ip(s) => s,
        }
    }

    /// The explicit port, if any (never `443`, which normalization drops).
    pub fn port(&self) -> Option<&str> {
        let s = self.as_str();
        let after_host = match s.rfind(']') {
            Some(i) => &s[i + 1..],
            None => s,
        };
        after_host.rsplit_once(':').map(|(_, p)| p)
    }
}

/// The domain as written in a reference: [`Domain::as_str`], except that a single-label host
/// other than `localhost` keeps an explicit `:443`. Written bare, `quay/x` (from `Quay/x`, whose
/// upper case made it a registry) would read back as the Docker Hub image `docker.io/quay/x`:
/// a first component only names a registry with a `.`, a `:`, upper case, or as `localhost`.
/// Found by the `reference` fuzz target (a normalized form that did not parse back to itself).
impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Domain::Name(r) if !r.as_str().contains(['.', ':']) && r.as_str() != "localhost" => {
                write!(f, "{r}:443")
            }
            _ => f.write_str(self.as_str()),
        }
    }
}

/// A parsed, normalized image reference: `registry/repository[:tag][@digest]`.
///
/// Normalization follows containerd (distribution's `ParseDockerRef`): a first path component
/// with no `.` or `:`, not `localhost` and all lower case, is a Docker Hub namespace; Docker Hub
/// names with one component get `library/`; a reference with neither tag nor digest gets
/// `:latest`. On top of that the registry is canonicalized like config keys
/// ([`Registry::parse`]: lower case, `index.docker.io` and `registry-1.docker.io` are
/// `docker.io`), and `:443` is dropped. Tags keep their case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    domain: Domain,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl Reference {
    /// Parses and normalizes an image reference.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if s.len() == 64 && s.bytes().all(is_lower_hex) {
            return Err(ReferenceError::ImageId);
        }
        // Neither names nor tags contain `@`, so the first one starts the digest.
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d)),
            None => (s, None),
        };
        // A `:` after the last `/` starts the tag; one before it is a registry port.
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        let (domain, path) = match name.split_once('/') {
            Some((first, path)) if is_domain_component(first) => (parse_domain(first)?, path),
            _ => (docker_hub(), name),
        };
        if path.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ReferenceError::Uppercase(clip(path)));
        }
        if !valid_name(path) {
            return Err(ReferenceError::Name(clip(path)));
        }
        if let Some(t) = tag
            && !valid_tag(t)
        {
            return Err(ReferenceError::Tag(clip(t)));
        }
        if let Some(d) = digest
            && !valid_digest(d)
        {
            return Err(ReferenceError::Digest(clip(d)));
        }
        let repository = match &domain {
            Domain::Name(r) if r.is_docker_hub() && !path.contains('/') => {
                format!("library/{path}")
            }
            _ => path.to_owned(),
        };
        if domain.as_str().len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(ReferenceError::NameTooLong);
        }
        let tag = match (tag, digest) {
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            (t, _) => t.map(str::to_owned),
        };
        Ok(Reference {
            domain,
            repository,
            tag,
            digest: digest.map(str::to_owned),
        })
    }

    /// The normalized registry.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// The normalized registry as a string, e.g. `docker.io`.
    pub fn registry(&self) -> &str {
        self.domain.as_str()
    }

    /// The repository path, e.g. `library/nginx` or `bitnami/redis`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag: the one written, or `latest` when neither tag nor digest was. `None` only for a
    /// digest-only reference.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, e.g. `sha256:…`, if the reference has one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.repository)
    }

    /// The `:tag` and `@digest` suffix, as it follows the name.
    fn suffix(&self) -> String {
        let mut s = String::new();
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        }
        s
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}{}", self.domain, self.repository, self.suffix())
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

fn docker_hub() -> Domain {
    Domain::Name(Registry::parse(DOCKER_HUB).unwrap_or_else(|| unreachable!()))
}

/// distribution's `splitDockerDomain`: the first component names a registry when it has a `.`
/// or a `:`, is `localhost`, or has upper-case letters (which no repository name may have).
fn is_domain_component(first: &str) -> bool {
    first.contains(['.', ':'])
        || first == "localhost"
        || first.bytes().any(|b| b.is_ascii_uppercase())
}

/// The distribution `domainAndPort` grammar, then canonicalization.
fn parse_domain(d: &str) -> Result<Domain, ReferenceError> {
    let bad = || ReferenceError::Registry(clip(d));
    let (host, port) = if d.starts_with('[') {
        let close = d.find(']').ok_or_else(bad)?;
        let inside = &d[1..close];
        // distribution's grammar takes any run of hex digits and colons; only a real IPv6
        // address is taken here. `[FFFF]` (a registry only through its upper case) would
        // otherwise normalize to `[ffff]`, which reads back as a Docker Hub name, and is no
        // host anyway (found by the `reference` fuzz target).
        if !inside.bytes().all(|b| b.is_ascii_hexdigit() || b == b':')
            || inside.parse::<Ipv6Addr>().is_err()
        {
            return Err(bad());
        }
        let after = &d[close + 1..];
        let port = if after.is_empty() {
            None
        } else {
            Some(after.strip_prefix(':').ok_or_else(bad)?)
        };
        (&d[..=close], port)
    } else {
        match d.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (d, None),
        }
    };
    if let Some(p) = port
        && (p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    let port = port.filter(|p| *p != "443");
    let joined = match port {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    if host.starts_with('[') || host.parse::<Ipv4Addr>().is_ok() {
        return Ok(Domain::Ip(joined.to_ascii_lowercase()));
    }
    // Registry::parse holds the host-name grammar (labels of letters, digits and inner `-`),
    // the port range and the Docker Hub aliases, so config keys and references agree.
    Registry::parse(&joined).map(Domain::Name).ok_or_else(bad)
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

/// What containerd (go-digest) accepts: a known algorithm and lower-case hex of its length.
fn valid_digest(d: &str) -> bool {
    let Some((alg, hex)) = d.split_once(':') else {
        return false;
    };
    let len = match alg {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return false,
    };
    hex.len() == len && hex.bytes().all(is_lower_hex)
}

/// Keeps error messages (which end up in admission warnings) short.
fn clip(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// What to do with references that carry a digest (`name@sha256:…` or `name:tag@sha256:…`).
///
/// ECR pull-through cannot fill its cache on a first pull by digest (an open AWS limitation), and
/// the runtime pulls `tag@digest` by digest, so a rewritten digest reference fails until some
/// other pull has cached the image. `Keep` (the default) leaves them on their registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DigestRefs {
    /// Leave references with a digest unchanged.
    #[default]
    Keep,
    /// Rewrite them too, keeping tag and digest.
    Rewrite,
}

impl DigestRefs {
    /// Parses the config value: `keep` or `rewrite`.
    pub fn parse(s: &str) -> Option<DigestRefs> {
        match s {
            "keep" => Some(DigestRefs::Keep),
            "rewrite" => Some(DigestRefs::Rewrite),
            _ => None,
        }
    }
}

/// An exclusion glob. `*` matches any run of characters (`/` included), `?` one character; it is
/// matched against the normalized name (`docker.io/library/nginx`) and the normalized reference
/// (`docker.io/library/nginx:latest`), and excludes the image if either matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePattern(String);

impl ImagePattern {
    /// A pattern: non-empty printable ASCII with no spaces.
    pub fn parse(s: &str) -> Option<ImagePattern> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())).then(|| ImagePattern(s.into()))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `r` matches.
    pub fn matches(&self, r: &Reference) -> bool {
        glob(self.0.as_bytes(), r.name().as_bytes())
            || glob(self.0.as_bytes(), r.to_string().as_bytes())
    }
}

/// Iterative glob with one backtrack point: linear enough for short image names.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

/// What a rewrite needs: the ECR registry host, the configured upstreams and the policy.
#[derive(Debug, Clone)]
pub struct Rules {
    /// This account's ECR registry host, e.g. `123456789012.dkr.ecr.eu-west-1.amazonaws.com`.
    pub ecr: Registry,
    /// Upstream registries and their pull-through prefixes ([`crate::config::Config::upstreams`]).
    pub upstreams: BTreeMap<Registry, Upstream>,
    /// References with a digest: keep or rewrite.
    pub digest_refs: DigestRefs,
    /// Images never to rewrite.
    pub exclude: Vec<ImagePattern>,
}

/// The outcome for one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrite {
    /// The image's ECR pull-through reference.
    Rewritten(String),
    /// Left as written, and why.
    Unchanged(Reason),
}

/// Why an image is left unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    /// Not a valid reference.
    #[error("invalid reference: {0}")]
    Invalid(ReferenceError),
    /// Already on this account's ECR registry (a rewrite ran before).
    #[error("already on this account's ECR registry")]
    AlreadyRewritten,
    /// On an ECR registry of another account or region.
    #[error("{0} is another ECR registry")]
    ForeignEcr(String),
    /// On `localhost`, which only means something on the node.
    #[error("{0} is node-local")]
    Localhost(String),
    /// On an IP literal registry.
    #[error("{0} is an IP address, not a pull-through upstream")]
    IpLiteral(String),
    /// On a registry with an explicit port, which no pull-through rule names.
    #[error("{0} has an explicit port, which no pull-through upstream has")]
    Port(String),
    /// On a registry that is not a configured upstream.
    #[error("{0} is not a configured upstream")]
    NotConfigured(String),
    /// Matches an exclusion pattern.
    #[error("matches exclude pattern {0:?}")]
    Excluded(String),
    /// Has a digest and `digest_refs = "keep"`.
    #[error(
        "pinned by digest, which ECR pull-through cannot fill its cache from (digest_refs = \"keep\")"
    )]
    Digest,
    /// The ECR repository would exceed ECR's length limit.
    #[error("{0}")]
    TooLong(MapError),
    /// The rewritten name (ECR host, `/`, repository) would exceed the image-name limit that
    /// kubelet and containerd enforce, so the rewritten image could not be pulled.
    #[error("rewritten name {0:?} would exceed the {MAX_NAME_LEN}-character limit on image names")]
    NameTooLong(String),
    /// The ECR repository would break ECR's repository-name rules (`__`, `--`, ...).
    #[error("ECR repository name {0:?} breaks ECR's naming rules")]
    EcrName(String),
}

impl Reason {
    /// A short, stable label for metrics and JSON output.
    pub fn label(&self) -> &'static str {
        match self {
            Reason::Invalid(_) => "invalid",
            Reason::AlreadyRewritten => "already-rewritten",
            Reason::ForeignEcr(_) => "foreign-ecr",
            Reason::Localhost(_) => "localhost",
            Reason::IpLiteral(_) => "ip-literal",
            Reason::Port(_) => "port",
            Reason::NotConfigured(_) => "not-configured",
            Reason::Excluded(_) => "excluded",
            Reason::Digest => "digest",
            Reason::TooLong(_) | Reason::NameTooLong(_) => "too-long",
            Reason::EcrName(_) => "ecr-name",
        }
    }
}

/// Decides the rewrite of a parsed reference.
pub fn rewrite(r: &Reference, rules: &Rules) -> Rewrite {
    let unchanged = Rewrite::Unchanged;
    if r.registry() == rules.ecr.as_str() {
        return unchanged(Reason::AlreadyRewritten);
    }
    let registry = match r.domain() {
        Domain::Ip(ip) => return unchanged(Reason::IpLiteral(ip.clone())),
        Domain::Name(reg) => reg,
    };
    let host = registry
        .as_str()
        .split_once(':')
        .map_or(registry.as_str(), |(h, _)| h);
    if is_ecr_host(host) {
        return unchanged(Reason::ForeignEcr(registry.to_string()));
    }
    if host == "localhost" {
        return unchanged(Reason::Localhost(registry.to_string()));
    }
    if r.domain().port().is_some() {
        return unchanged(Reason::Port(registry.to_string()));
    }
    let Some(upstream) = rules.upstreams.get(registry) else {
        return unchanged(Reason::NotConfigured(registry.to_string()));
    };
    if let Some(p) = rules.exclude.iter().find(|p| p.matches(r)) {
        return unchanged(Reason::Excluded(p.as_str().to_owned()));
    }
    if r.digest().is_some() && rules.digest_refs == DigestRefs::Keep {
        return unchanged(Reason::Digest);
    }
    let repository = match map::ecr_repository(registry, r.repository(), upstream) {
        Ok(repo) => repo,
        Err(e) => return unchanged(Reason::TooLong(e)),
    };
    if !valid_ecr_repository(&repository) {
        return unchanged(Reason::EcrName(repository));
    }
    // ECR's own limit is on the repository alone; distribution's (which the kubelet and
    // Reference::parse apply) is on host + "/" + repository, and is the one that bites.
    if rules.ecr.as_str().len() + 1 + repository.len() > MAX_NAME_LEN {
        return unchanged(Reason::NameTooLong(format!("{}/{repository}", rules.ecr)));
    }
    Rewrite::Rewritten(format!("{}/{repository}{}", rules.ecr, r.suffix()))
}

/// Parses `image` and decides its rewrite; an invalid reference is [`Reason::Invalid`].
pub fn rewrite_str(image: &str, rules: &Rules) -> Rewrite {
    match Reference::parse(image) {
        Ok(r) => rewrite(&r, rules),
        Err(e) => Rewrite::Unchanged(Reason::Invalid(e)),
    }
}

/// ECR's repository-name pattern, `(?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)*[a-z0-9]+(?:[._-][a-z0-9]+)*`:
/// stricter than distribution's, which also allows `__` and runs of `-`.
pub fn valid_ecr_repository(name: &str) -> bool {
    let sep = |b: u8| matches!(b, b'.' | b'_' | b'-');
    (2..=map::ECR_MAX_REPOSITORY_LEN).contains(&name.len())
        && name.split('/').all(|c| {
            let b = c.as_bytes();
            !b.is_empty()
                && !sep(b[0])
                && !sep(b[b.len() - 1])
                && b.iter()
                    .all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || sep(x))
                && !b.windows(2).any(|w| sep(w[0]) && sep(w[1]))
        })
}

/// Whether `host` is an ECR private registry host name, any account, region or partition:
/// `<account>.dkr.ecr[-fips].<region>.amazonaws.com[.cn]` or the dual-stack
/// `<account>.dkr-ecr[-fips].<region>.on.aws`.
pub fn is_ecr_host(host: &str) -> bool {
    let labels: Vec<&str> = host.split('.').collect();
    let account = |l: &str| l.len() == 12 && l.bytes().all(|b| b.is_ascii_digit());
    let region = |l: &str| !l.is_empty() && l.contains('-');
    match labels.as_slice() {
        [a, "dkr", "ecr" | "ecr-fips", r, "amazonaws", "com"]
        | [a, "dkr", "ecr" | "ecr-fips", r, "amazonaws", "com", "cn"]
        | [a, "dkr-ecr" | "dkr-ecr-fips", r, "on", "aws"] => account(a) && region(r),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    const SHA: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const ECR: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";
    /// 30 characters: the longest pull-through prefix, to reach ECR's length limit.
    const LONG_PREFIX: &str = "ghcr-pull-through-cache-prefix";

    fn rules(digest_refs: DigestRefs) -> Rules {
        let mut upstreams: BTreeMap<Registry, Upstream> = crate::config::DEFAULT_UPSTREAMS
            .iter()
            .map(|(r, p)| {
                let reg = Registry::parse(r).unwrap();
                let up = Upstream {
                    prefix: (*p).into(),
                    server: reg.default_server(),
                };
                (reg, up)
            })
            .collect();
        upstreams
            .get_mut(&Registry::parse("ghcr.io").unwrap())
            .unwrap()
            .prefix = LONG_PREFIX.into();
        Rules {
            ecr: Registry::parse(ECR).unwrap(),
            upstreams,
            digest_refs,
            exclude: vec![
                ImagePattern::parse("docker.io/acme/internal-*").unwrap(),
                ImagePattern::parse("quay.io/*:debug").unwrap(),
            ],
        }
    }

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    /// `Ok(normalized)` or `Err(variant name)`.
    fn normalized(input: &str) -> Result<String, String> {
        Reference::parse(input).map(|r| r.to_string()).map_err(|e| {
            let dbg = format!("{e:?}");
            dbg.split('(').next().unwrap_or_default().to_owned()
        })
    }

    #[rstest]
    #[case::hub_short("nginx", Ok("docker.io/library/nginx:latest"))]
    #[case::hub_library("library/nginx", Ok("docker.io/library/nginx:latest"))]
    #[case::hub_explicit("docker.io/nginx", Ok("docker.io/library/nginx:latest"))]
    #[case::hub_index_alias("index.docker.io/library/nginx", Ok("docker.io/library/nginx:latest"))]
    #[case::hub_registry1_alias("registry-1.docker.io/nginx", Ok("docker.io/library/nginx:latest"))]
    #[case::hub_user_image("bitnami/redis:7.2", Ok("docker.io/bitnami/redis:7.2"))]
    #[case::hub_user_image_explicit(
        "docker.io/bitnami/redis",
        Ok("docker.io/bitnami/redis:latest")
    )]
    #[case::hub_nested("a/b/c:1", Ok("docker.io/a/b/c:1"))]
    #[case::hub_upper_registry("Docker.IO/nginx", Ok("docker.io/library/nginx:latest"))]
    #[case::upper_first_component_is_a_registry("Quay/x", Ok("quay:443/x:latest"))]
    #[case::single_label_443_kept_in_print("quay:443/x", Ok("quay:443/x:latest"))]
    #[case::single_label_other_port("quay:5000/x", Ok("quay:5000/x:latest"))]
    #[case::localhost_443("localhost:443/x", Ok("localhost/x:latest"))]
    #[case::tag_keeps_case("nginx:Alpine-3.19_RC1", Ok("docker.io/library/nginx:Alpine-3.19_RC1"))]
    #[case::tag_and_digest(&format!("nginx:1.27@{SHA}"), Ok(leak(format!("docker.io/library/nginx:1.27@{SHA}"))))]
    #[case::digest_only_gets_no_tag(&format!("nginx@{SHA}"), Ok(leak(format!("docker.io/library/nginx@{SHA}"))))]
    #[case::default_port_dropped(
        "quay.io:443/prometheus/node-exporter:v1",
        Ok("quay.io/prometheus/node-exporter:v1")
    )]
    #[case::other_port_kept("quay.io:8443/a/b", Ok("quay.io:8443/a/b:latest"))]
    #[case::localhost("localhost/foo", Ok("localhost/foo:latest"))]
    #[case::localhost_port("localhost:5000/foo:1", Ok("localhost:5000/foo:1"))]
    #[case::port_without_slash_is_a_tag("localhost:5000", Ok("docker.io/library/localhost:5000"))]
    #[case::dotted_without_slash_is_a_hub_name(
        "test.com:tag",
        Ok("docker.io/library/test.com:tag")
    )]
    #[case::ipv4("10.0.0.1:5000/app", Ok("10.0.0.1:5000/app:latest"))]
    #[case::ipv6_port("[::1]:5000/app", Ok("[::1]:5000/app:latest"))]
    #[case::ipv6_upper("[FE80::1]/app:v1", Ok("[fe80::1]/app:v1"))]
    #[case::k8s_single_segment_no_library(
        "registry.k8s.io/pause:3.9",
        Ok("registry.k8s.io/pause:3.9")
    )]
    #[case::separators("ghcr.io/a.b_c__d-e---f/g", Ok("ghcr.io/a.b_c__d-e---f/g:latest"))]
    // From distribution/reference's own tests (normalize_test.go, reference_test.go).
    #[case::dist_underscore_hub_name("foo_bar.com:8080", Ok("docker.io/library/foo_bar.com:8080"))]
    #[case::dist_long_path(
        "sub-dom1.foo.com/bar/baz/quux:some-long-tag",
        Ok("sub-dom1.foo.com/bar/baz/quux:some-long-tag")
    )]
    #[case::dist_dotted_path_and_tag(
        "b.gcr.io/test.example.com/my-app:test.example.com",
        Ok("b.gcr.io/test.example.com/my-app:test.example.com")
    )]
    #[case::dist_punycode(
        "xn--n3h.com/myimage:xn--n3h.com",
        Ok("xn--n3h.com/myimage:xn--n3h.com")
    )]
    #[case::dist_ipv4_port("192.168.1.1:5000/a", Ok("192.168.1.1:5000/a:latest"))]
    #[case::dist_bad_chars("aa/asdf$$^/aa", Err("Name"))]
    #[case::dist_ipv6_zone("[fe80::1%eth0]:5000/repo", Err("Registry"))]
    #[case::dist_upper_with_tag("Uppercase:tag", Err("Uppercase"))]
    #[case::empty("", Err("Empty"))]
    #[case::image_id(
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        Err("ImageId")
    )]
    #[case::upper_name("Nginx", Err("Uppercase"))]
    #[case::upper_path("docker.io/Library/nginx", Err("Uppercase"))]
    #[case::empty_tag("nginx:", Err("Tag"))]
    #[case::tag_starts_with_dash("nginx:-x", Err("Tag"))]
    #[case::tag_too_long(&format!("nginx:{}", "t".repeat(129)), Err("Tag"))]
    #[case::tag_128_ok(&format!("nginx:{}", "t".repeat(128)), Ok(leak(format!("docker.io/library/nginx:{}", "t".repeat(128)))))]
    #[case::short_digest("nginx@sha256:abc", Err("Digest"))]
    #[case::unknown_digest_alg("nginx@md5:0123456789abcdef0123456789abcdef", Err("Digest"))]
    #[case::upper_hex_digest(&format!("nginx@{}", SHA.to_uppercase().replace("SHA256", "sha256")), Err("Digest"))]
    #[case::empty_digest("nginx@", Err("Digest"))]
    #[case::two_digests(&format!("nginx@{SHA}@{SHA}"), Err("Digest"))]
    #[case::port_not_numeric("quay.io:http/x", Err("Registry"))]
    #[case::port_out_of_range("quay.io:99999/x", Err("Registry"))]
    #[case::dash_label("-quay.io/x", Err("Registry"))]
    #[case::underscore_host("my_registry.io/x", Err("Registry"))]
    #[case::bad_ipv6("[zz::1]/x", Err("Registry"))]
    #[case::ipv6_junk_after_bracket("[::1]x/y", Err("Registry"))]
    #[case::ipv6_not_an_address("[FFFF]/y", Err("Registry"))]
    #[case::ipv6_too_many_groups("[1:2:3:4:5:6:7:8:9]/y", Err("Registry"))]
    #[case::scheme("https://nginx", Err("Registry"))]
    #[case::space("nginx latest", Err("Name"))]
    #[case::leading_slash("/nginx", Err("Name"))]
    #[case::empty_component("a//b", Err("Name"))]
    #[case::trailing_separator("a/b-", Err("Name"))]
    #[case::registry_only("quay.io/", Err("Name"))]
    #[case::name_255_ok(&format!("quay.io/{}", "a".repeat(247)), Ok(leak(format!("quay.io/{}:latest", "a".repeat(247)))))]
    #[case::name_too_long(&format!("quay.io/{}", "a".repeat(248)), Err("NameTooLong"))]
    fn normalizes(#[case] input: &str, #[case] want: Result<&str, &str>) {
        let want = want.map(str::to_owned).map_err(str::to_owned);
        assert_eq!(normalized(input), want, "{input:?}");
        // The normalized form names the same image: it normalizes to itself.
        if let Ok(n) = want {
            assert_eq!(normalized(&n), Ok(n.clone()), "{input:?} → {n:?}");
        }
    }

    #[test]
    fn accessors() {
        let r = Reference::parse(&format!("Quay.io:443/org/app:V1@{SHA}")).unwrap();
        assert_eq!(r.registry(), "quay.io");
        assert_eq!(
            r.domain(),
            &Domain::Name(Registry::parse("quay.io").unwrap())
        );
        assert_eq!(r.repository(), "org/app");
        assert_eq!(r.tag(), Some("V1"));
        assert_eq!(r.digest(), Some(SHA));
        assert_eq!(r.name(), "quay.io/org/app");
        assert_eq!(
            "localhost:5000/x"
                .parse::<Reference>()
                .unwrap()
                .domain()
                .port(),
            Some("5000")
        );
        assert_eq!(Reference::parse("[::1]/x").unwrap().domain().port(), None);
        assert_eq!(
            Reference::parse("[::1]:80/x").unwrap().domain().port(),
            Some("80")
        );
    }

    /// `"=> X"`: rewritten to X (with `<ECR>` for the registry); otherwise a reason label.
    /// Every rewritten reference must itself parse and be seen as already rewritten, or the
    /// kubelet could not pull it and reinvocation would call it invalid.
    fn outcome(input: &str, policy: DigestRefs) -> String {
        let rules = rules(policy);
        match rewrite_str(input, &rules) {
            Rewrite::Rewritten(s) => {
                let again = Reference::parse(&s)
                    .unwrap_or_else(|e| panic!("{input:?} rewritten to unparsable {s:?}: {e}"));
                assert_eq!(
                    rewrite(&again, &rules),
                    Rewrite::Unchanged(Reason::AlreadyRewritten),
                    "{s:?}"
                );
                format!("=> {}", s.replace(ECR, "<ECR>"))
            }
            Rewrite::Unchanged(r) => r.label().to_owned(),
        }
    }

    #[rstest]
    #[case::hub_short("nginx", "=> <ECR>/docker-hub/library/nginx:latest")]
    #[case::hub_library("library/nginx", "=> <ECR>/docker-hub/library/nginx:latest")]
    #[case::hub_explicit("docker.io/nginx", "=> <ECR>/docker-hub/library/nginx:latest")]
    #[case::hub_index_alias(
        "index.docker.io/library/nginx",
        "=> <ECR>/docker-hub/library/nginx:latest"
    )]
    #[case::hub_registry1_alias(
        "registry-1.docker.io/nginx",
        "=> <ECR>/docker-hub/library/nginx:latest"
    )]
    #[case::hub_user_image_no_library("bitnami/redis:7.2", "=> <ECR>/docker-hub/bitnami/redis:7.2")]
    #[case::hub_nested("a/b/c:1", "=> <ECR>/docker-hub/a/b/c:1")]
    #[case::tag_keeps_case("nginx:Alpine", "=> <ECR>/docker-hub/library/nginx:Alpine")]
    #[case::quay_default_port(
        "quay.io:443/prometheus/node-exporter:v1.8.0",
        "=> <ECR>/quay/prometheus/node-exporter:v1.8.0"
    )]
    #[case::quay_upper_host("Quay.IO/org/app", "=> <ECR>/quay/org/app:latest")]
    #[case::k8s_no_library("registry.k8s.io/pause:3.9", "=> <ECR>/kubernetes/pause:3.9")]
    #[case::ecr_public(
        "public.ecr.aws/eks/coredns:v1.11",
        "=> <ECR>/ecr-public/eks/coredns:v1.11"
    )]
    #[case::gitlab(
        "registry.gitlab.com/group/project/image:main",
        "=> <ECR>/gitlab/group/project/image:main"
    )]
    #[case::ghcr("ghcr.io/org/app:v1", &format!("=> <ECR>/{LONG_PREFIX}/org/app:v1"))]
    #[case::lookalike_suffix("docker.io.evil.example/x", "not-configured")]
    #[case::lookalike_prefix("evildocker.io/x", "not-configured")]
    #[case::lookalike_subdomain("mirror.quay.io/x", "not-configured")]
    #[case::unconfigured("gcr.io/distroless/static:nonroot", "not-configured")]
    #[case::localhost("localhost/foo", "localhost")]
    #[case::localhost_port("localhost:5000/foo", "localhost")]
    #[case::configured_host_other_port("quay.io:5000/foo", "port")]
    #[case::ipv4("10.0.0.1:5000/app", "ip-literal")]
    #[case::ipv4_no_port("10.0.0.1/app", "ip-literal")]
    #[case::ipv6("[::1]:5000/app", "ip-literal")]
    #[case::already_rewritten(
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com/docker-hub/library/nginx:latest",
        "already-rewritten"
    )]
    #[case::already_rewritten_upper_host(
        "123456789012.DKR.ECR.eu-west-1.amazonaws.com/docker-hub/library/nginx",
        "already-rewritten"
    )]
    #[case::foreign_account("999999999999.dkr.ecr.eu-west-1.amazonaws.com/app:1", "foreign-ecr")]
    #[case::foreign_region("123456789012.dkr.ecr.us-east-1.amazonaws.com/app:1", "foreign-ecr")]
    #[case::foreign_fips("123456789012.dkr.ecr-fips.us-east-1.amazonaws.com/app", "foreign-ecr")]
    #[case::foreign_china("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/app", "foreign-ecr")]
    #[case::foreign_dual_stack("123456789012.dkr-ecr.eu-west-1.on.aws/app", "foreign-ecr")]
    #[case::invalid_upper("Nginx", "invalid")]
    #[case::invalid_empty("", "invalid")]
    #[case::invalid_tag("nginx:", "invalid")]
    #[case::excluded_name("acme/internal-tool:1", "excluded")]
    #[case::excluded_tag("quay.io/org/app:debug", "excluded")]
    #[case::not_excluded_other_tag("quay.io/org/app:v1", "=> <ECR>/quay/org/app:v1")]
    #[case::digest_only_kept(&format!("nginx@{SHA}"), "digest")]
    #[case::tag_digest_kept(&format!("nginx:1.27@{SHA}"), "digest")]
    #[case::ecr_double_underscore("docker.io/foo__bar/x", "ecr-name")]
    #[case::ecr_dash_run("quay.io/a--b/c", "ecr-name")]
    // 44 (ECR host) + 1 + 30 (prefix) + 1 + 179 = 255, distribution's limit on a name.
    #[case::name_length_limit_ok(&format!("ghcr.io/{}", "a".repeat(179)), &format!("=> <ECR>/{LONG_PREFIX}/{}:latest", "a".repeat(179)))]
    #[case::name_length_limit_exceeded(&format!("ghcr.io/{}", "a".repeat(180)), "too-long")]
    #[case::name_length_limit_exceeded_nested(&format!("ghcr.io/{}/{}", "a".repeat(100), "b".repeat(100)), "too-long")]
    #[case::ecr_repository_limit_exceeded(&format!("ghcr.io/{}", "a".repeat(226)), "too-long")]
    fn rewrites_with_digests_kept(#[case] input: &str, #[case] want: &str) {
        assert_eq!(outcome(input, DigestRefs::Keep), want, "{input:?}");
    }

    #[rstest]
    #[case::digest_only(&format!("nginx@{SHA}"), &format!("=> <ECR>/docker-hub/library/nginx@{SHA}"))]
    #[case::tag_and_digest_keeps_both(&format!("quay.io/a/b:v1@{SHA}"), &format!("=> <ECR>/quay/a/b:v1@{SHA}"))]
    #[case::already_rewritten_digest(&format!("{ECR}/docker-hub/library/nginx@{SHA}"), "already-rewritten")]
    fn rewrites_with_digests_rewritten(#[case] input: &str, #[case] want: &str) {
        assert_eq!(outcome(input, DigestRefs::Rewrite), want, "{input:?}");
    }

    #[test]
    fn a_rewrite_past_the_name_limit_names_the_full_name() {
        let input = format!("ghcr.io/{}", "a".repeat(180));
        let want = format!("{ECR}/{LONG_PREFIX}/{}", "a".repeat(180));
        assert_eq!(want.len(), MAX_NAME_LEN + 1);
        assert_eq!(
            rewrite_str(&input, &rules(DigestRefs::Keep)),
            Rewrite::Unchanged(Reason::NameTooLong(want))
        );
    }

    #[test]
    fn rewriting_is_idempotent() {
        let r = rules(DigestRefs::Rewrite);
        for input in [
            "nginx",
            "bitnami/redis:7.2",
            "quay.io/a/b:v1",
            &format!("x@{SHA}"),
        ] {
            let Rewrite::Rewritten(once) = rewrite_str(input, &r) else {
                panic!("{input} not rewritten");
            };
            assert_eq!(
                rewrite_str(&once, &r),
                Rewrite::Unchanged(Reason::AlreadyRewritten)
            );
        }
    }

    #[rstest]
    #[case::star_spans_slashes("docker.io/*", "bitnami/redis", true)]
    #[case::name_only("docker.io/library/nginx", "nginx:1", true)]
    #[case::full_reference("docker.io/library/nginx:1.*", "nginx:1.27", true)]
    #[case::question_mark("quay.io/a/b?", "quay.io/a/b1", true)]
    #[case::no_partial_match("docker.io/library/ngin", "nginx", false)]
    #[case::other_registry("quay.io/*", "nginx", false)]
    fn patterns(#[case] pattern: &str, #[case] image: &str, #[case] want: bool) {
        let p = ImagePattern::parse(pattern).unwrap();
        assert_eq!(p.matches(&Reference::parse(image).unwrap()), want);
    }

    #[rstest]
    #[case::empty("")]
    #[case::space("a b")]
    fn bad_patterns(#[case] pattern: &str) {
        assert!(ImagePattern::parse(pattern).is_none());
    }

    #[rstest]
    #[case::two_chars("ab", true)]
    #[case::one_char("a", false)]
    #[case::nested("docker-hub/library/nginx", true)]
    #[case::dot_underscore_dash("a.b_c-d/e", true)]
    #[case::double_underscore("a__b", false)]
    #[case::separator_run("a.-b", false)]
    #[case::leading_separator("-ab", false)]
    #[case::empty_component("ab//cd", false)]
    #[case::upper("Ab", false)]
    fn ecr_repository_names(#[case] name: &str, #[case] want: bool) {
        assert_eq!(valid_ecr_repository(name), want);
    }
}
