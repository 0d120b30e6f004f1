//! `[timeouts]`: towards the ECR endpoint, and the shutdown grace period every listener drains
//! within.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::error::{ConfigError, Locator};

/// `[timeouts]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    connect: Option<Spanned<String>>,
    response_headers: Option<Spanned<String>>,
    shutdown: Option<Spanned<String>>,
}

/// Timeouts. Defaults: connect 3 s, response headers 15 s, shutdown grace 20 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP (and TLS) connect to the registry endpoint.
    pub connect: Duration,
    /// From request sent to response headers received.
    pub response_headers: Duration,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(3),
            response_headers: Duration::from_secs(15),
            shutdown: Duration::from_secs(20),
        }
    }
}

/// Validates `[timeouts]`.
pub(crate) fn validate(raw: &RawTimeouts, at: Locator<'_>) -> Result<Timeouts, ConfigError> {
    let defaults = Timeouts::default();
    let dur = |v: &Option<Spanned<String>>, key: &str, default: Duration| {
        at.positive_duration(v, key, default)
    };
    Ok(Timeouts {
        connect: dur(&raw.connect, "timeouts.connect", defaults.connect)?,
        response_headers: dur(
            &raw.response_headers,
            "timeouts.response_headers",
            defaults.response_headers,
        )?,
        shutdown: dur(&raw.shutdown, "timeouts.shutdown", defaults.shutdown)?,
    })
}
