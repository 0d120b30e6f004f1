//! Image references: parse a pod's `image` string with the distribution/reference grammar and
//! normalize it the way containerd and Docker do. Pure, no IO. Whether (and to what) a reference
//! is rewritten is the webhook's decision (`webhook::rewrite`); `ecr warm` and the
//! webhook's cache warming read references with it too.
//!
//! ```
//! use pullthrough::oci::reference::Reference;
//! let r = Reference::parse("index.docker.io/nginx").unwrap();
//! assert_eq!(r.registry(), "docker.io");
//! assert_eq!(r.repository(), "library/nginx");
//! assert_eq!(r.tag(), Some("latest"));
//! assert_eq!(r.to_string(), "docker.io/library/nginx:latest");
//! ```

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::oci::{MAX_NAME_LEN, RegistryHost, valid_name, valid_tag};

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
    RegistryHost(String),
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
    /// RegistryHost and repository together exceed the distribution limit.
    #[error("name is longer than {MAX_NAME_LEN} characters")]
    NameTooLong,
}

/// The registry part of a reference, normalized.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Domain {
    /// A DNS host name with an optional port, canonical: lower case, Docker Hub aliases folded
    /// to `docker.io`, an explicit `:443` dropped.
    Name(RegistryHost),
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
/// ([`RegistryHost::parse`]: lower case, `index.docker.io` and `registry-1.docker.io` are
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
    pub(crate) fn suffix(&self) -> String {
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
    Domain::Name(RegistryHost::parse(DOCKER_HUB).unwrap_or_else(|| unreachable!()))
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
    let bad = || ReferenceError::RegistryHost(clip(d));
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
    // RegistryHost::parse holds the host-name grammar (labels of letters, digits and inner `-`),
    // the port range and the Docker Hub aliases, so config keys and references agree.
    RegistryHost::parse(&joined)
        .map(Domain::Name)
        .ok_or_else(bad)
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

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    const SHA: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
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
    #[case::dist_ipv6_zone("[fe80::1%eth0]:5000/repo", Err("RegistryHost"))]
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
    #[case::port_not_numeric("quay.io:http/x", Err("RegistryHost"))]
    #[case::port_out_of_range("quay.io:99999/x", Err("RegistryHost"))]
    #[case::dash_label("-quay.io/x", Err("RegistryHost"))]
    #[case::underscore_host("my_registry.io/x", Err("RegistryHost"))]
    #[case::bad_ipv6("[zz::1]/x", Err("RegistryHost"))]
    #[case::ipv6_junk_after_bracket("[::1]x/y", Err("RegistryHost"))]
    #[case::ipv6_not_an_address("[FFFF]/y", Err("RegistryHost"))]
    #[case::ipv6_too_many_groups("[1:2:3:4:5:6:7:8:9]/y", Err("RegistryHost"))]
    #[case::scheme("https://nginx", Err("RegistryHost"))]
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
            &Domain::Name(RegistryHost::parse("quay.io").unwrap())
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
}
