//! The webhook's rewrite decision: whether (and to what) a parsed image [`Reference`] is
//! rewritten onto the ECR pull-through cache. Pure, no IO: the webhook and `pullthrough rewrite`
//! call it, and the ECR path itself comes from [`crate::mirror::map`], the mapping the mirror
//! uses, so a rewritten pod pulls exactly what the node mirror would have.
//!
//! The decision is deliberately conservative. A reference is rewritten only when its registry,
//! after normalization, is exactly a configured upstream (aliases folded by
//! [`crate::oci::RegistryHost`]); hosts are compared whole, never by prefix, so
//! `docker.io.evil.example/x` stays as it is. Anything doubtful (an invalid reference, a
//! node-local or IP registry, a name ECR would refuse, a digest ECR cannot fill its cache from)
//! is left unchanged with a [`Reason`], because a pod that keeps its original image still runs.

use std::collections::BTreeMap;

use crate::config::upstreams::Upstream;
use crate::mirror::map::{self, MapError};
use crate::oci::reference::{Domain, Reference, ReferenceError};
use crate::oci::{MAX_NAME_LEN, RegistryHost};

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
    pub ecr: RegistryHost,
    /// Upstream registries and their pull-through prefixes ([`crate::config::Config::upstreams`]).
    pub upstreams: BTreeMap<RegistryHost, Upstream>,
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
        let mut upstreams: BTreeMap<RegistryHost, Upstream> = crate::config::DEFAULT_UPSTREAMS
            .iter()
            .map(|(r, p)| {
                let reg = RegistryHost::parse(r).unwrap();
                let up = Upstream {
                    prefix: (*p).into(),
                    server: reg.default_server(),
                };
                (reg, up)
            })
            .collect();
        upstreams
            .get_mut(&RegistryHost::parse("ghcr.io").unwrap())
            .unwrap()
            .prefix = LONG_PREFIX.into();
        Rules {
            ecr: RegistryHost::parse(ECR).unwrap(),
            upstreams,
            digest_refs,
            exclude: vec![
                ImagePattern::parse("docker.io/acme/internal-*").unwrap(),
                ImagePattern::parse("quay.io/*:debug").unwrap(),
            ],
        }
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
