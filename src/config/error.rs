//! Where a config error is, and what is wrong: the leaf every config section uses.
//!
//! Each section (the root's own keys in [`super`], `[ecr]`, `[upstreams]`, `[timeouts]`, and the
//! sections that belong to one program: `[breaker]`, `[server]`, `[webhook]`, `[ecr_setup]`)
//! validates its raw TOML with a [`Locator`], which turns a byte span into `file:line: key:`.
//! Sections depend on this file alone, never on the root that composes them, so the config has
//! no import circle.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

/// A config error: where it is, and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{path}: cannot read config: {source}")]
    Read {
        /// The config file.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// The file was read, but a value is wrong. `line` is 1-based.
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        /// The config file.
        path: String,
        /// 1-based line of the offending key or value.
        line: usize,
        /// Dotted key path, e.g. `upstreams."docker.io".prefix`.
        key: String,
        /// What is wrong, and what would be right.
        message: String,
    },
}

/// Turns byte spans into line numbers and builds errors.
#[derive(Clone, Copy)]
pub struct Locator<'a> {
    pub(crate) text: &'a str,
    pub(crate) path: &'a str,
}

impl Locator<'_> {
    /// The config file's name, as errors show it.
    pub(crate) fn path(&self) -> &str {
        self.path
    }

    pub(crate) fn line(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    pub(crate) fn err(
        &self,
        span: &Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line: self.line(span),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    /// A positive duration such as `"5s"` or `"500ms"`, or `default` when the key is absent. The
    /// error's example is the default, so it reads as a value to copy.
    pub(crate) fn positive_duration(
        &self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        self.duration(value, key, default, false)
    }

    /// A duration such as `"5m"`, where `"0s"` means "off", or `default` when the key is absent.
    pub(crate) fn duration_or_off(
        &self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        self.duration(value, key, default, true)
    }

    fn duration(
        &self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
        zero_is_off: bool,
    ) -> Result<Duration, ConfigError> {
        let Some(s) = value else {
            return Ok(default);
        };
        match humantime::parse_duration(s.get_ref()) {
            Ok(d) if zero_is_off || !d.is_zero() => Ok(d),
            _ => {
                let example = humantime::format_duration(default);
                let what = if zero_is_off {
                    format!("is not a duration, e.g. \"{example}\", or \"0s\" for off")
                } else {
                    format!("is not a positive duration, e.g. \"{example}\" or \"500ms\"")
                };
                Err(self.err(&s.span(), key, format!("{:?} {what}", s.get_ref())))
            }
        }
    }

    /// A count from 1 to `max`, or `None` when the key is absent. `refused` words the error for
    /// the number written (0, a negative number, or more than `max`).
    pub(crate) fn count(
        &self,
        value: &Option<Spanned<i64>>,
        key: &str,
        max: usize,
        refused: impl FnOnce(i64) -> String,
    ) -> Result<Option<usize>, ConfigError> {
        let Some(n) = value else {
            return Ok(None);
        };
        usize::try_from(*n.get_ref())
            .ok()
            .filter(|c| (1..=max).contains(c))
            .map(Some)
            .ok_or_else(|| self.err(&n.span(), key, refused(*n.get_ref())))
    }

    /// An `IP:port` value, or `default` when the key is absent. `example` goes into the error.
    pub(crate) fn socket_addr(
        &self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: &str,
        example: &str,
    ) -> Result<SocketAddr, ConfigError> {
        match value {
            None => default
                .parse::<SocketAddr>()
                .map_err(|e| self.err(&(0..0), key, e.to_string())),
            Some(s) => s.get_ref().parse::<SocketAddr>().map_err(|_| {
                self.err(
                    &s.span(),
                    key,
                    format!(
                        "{:?} is not an IP:port address, e.g. \"{example}\"",
                        s.get_ref()
                    ),
                )
            }),
        }
    }
}
