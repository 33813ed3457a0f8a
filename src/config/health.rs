//! A service's active health check as the configuration writes it
//! (`health = { kind = "http", port = 8080, interval = "2s", ... }`), the
//! HTTP status ranges it accepts (`expect = "200-399"`), and the rules
//! `pktdist check` enforces on them.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::{fail, Check, DurationStr, KeyPath, Protocol};

/// Shortest check interval.
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(100);
/// Longest check interval.
pub const MAX_HEALTH_INTERVAL: Duration = Duration::from_secs(3600);
/// Largest `rise` and `fall`.
pub const MAX_RISE_FALL: u32 = 100;
/// Longest HTTP `path` and `host`.
pub const MAX_HTTP_FIELD: usize = 1024;

/// How a backend is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// A TCP connection that completes passes.
    Tcp,
    /// An HTTP/1.0 GET whose response status is in `expect` passes.
    Http,
}

impl HealthKind {
    pub fn name(self) -> &'static str {
        match self {
            HealthKind::Tcp => "tcp",
            HealthKind::Http => "http",
        }
    }
}

fn default_interval() -> DurationStr {
    DurationStr::secs(2)
}

/// The longest default timeout; a shorter interval gets half its own.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

fn default_rise() -> u32 {
    2
}

fn default_fall() -> u32 {
    3
}

/// What a service does while its health checks hold down every backend
/// that would otherwise take new connections (`all_unhealthy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllUnhealthy {
    /// Those backends take new connections as though they passed: checks
    /// that fail everywhere at once more likely fail on this side (the
    /// check network, this host's firewall) than on every backend, and
    /// dropping every new connection is an outage either way.
    #[default]
    Spread,
    /// New connections are dropped (`all_backends_down`).
    Drop,
}

impl AllUnhealthy {
    pub fn name(self) -> &'static str {
        match self {
            AllUnhealthy::Spread => "spread",
            AllUnhealthy::Drop => "drop",
        }
    }
}

/// A service's health check (`[[services]] health = { ... }`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    pub kind: HealthKind,
    /// TCP port checked (default: the service's port; required for a UDP
    /// service).
    #[serde(default)]
    pub port: Option<u16>,
    /// Time from one check's start to the next's.
    #[serde(default = "default_interval")]
    pub interval: DurationStr,
    /// How long one check may take (below `interval`; default
    /// [`HealthConfig::timeout`]'s).
    #[serde(default)]
    pub timeout: Option<DurationStr>,
    /// Checks passed in a row that bring a down backend up.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Checks failed in a row that take an up backend down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// HTTP: the path requested (default "/").
    #[serde(default)]
    pub path: Option<String>,
    /// HTTP: the status codes that pass (default "200-399").
    #[serde(default)]
    pub expect: Option<StatusRanges>,
    /// HTTP: the Host header (default: the checked address and port).
    #[serde(default)]
    pub host: Option<String>,
}

impl HealthConfig {
    /// The TCP port checked for a service on `service_port`.
    pub fn port_for(&self, service_port: u16) -> u16 {
        self.port.unwrap_or(service_port)
    }

    /// How long one check may take: as set, or 1 s, or half the interval
    /// when that is shorter (so that any valid interval alone is a valid
    /// check, as HAProxy's timeout follows its `inter`).
    pub fn timeout(&self) -> Duration {
        self.timeout
            .map_or_else(|| DEFAULT_TIMEOUT.min(self.interval.0 / 2), |t| t.0)
    }

    /// HTTP: the path requested.
    pub fn http_path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }

    /// HTTP: the status codes that pass.
    pub fn http_expect(&self) -> StatusRanges {
        self.expect.clone().unwrap_or_default()
    }

    /// Checks the settings of the health check at `p` of a service with
    /// `protocol`.
    pub(super) fn validate(&self, p: &KeyPath, protocol: Protocol) -> Check {
        if self.port == Some(0) {
            return fail(p.key("port"), "port 0 cannot be checked");
        }
        if self.port.is_none() && protocol == Protocol::Udp {
            return fail(
                p.key("port"),
                "a udp service's health check needs a port: the TCP port its backends answer checks on",
            );
        }
        let (interval, timeout) = (self.interval.0, self.timeout());
        if interval < MIN_HEALTH_INTERVAL || interval > MAX_HEALTH_INTERVAL {
            return fail(
                p.key("interval"),
                format!(
                    "{}: must be in {}..={}",
                    self.interval,
                    DurationStr(MIN_HEALTH_INTERVAL),
                    DurationStr(MAX_HEALTH_INTERVAL)
                ),
            );
        }
        if timeout.is_zero() {
            return fail(p.key("timeout"), "must be longer than 0");
        }
        if timeout >= interval {
            return fail(
                p.key("timeout"),
                format!(
                    "{}: the timeout must be below the interval ({})",
                    DurationStr(timeout),
                    self.interval
                ),
            );
        }
        for (k, v) in [("rise", self.rise), ("fall", self.fall)] {
            if v == 0 || v > MAX_RISE_FALL {
                return fail(p.key(k), format!("{v}: must be in 1..={MAX_RISE_FALL}"));
            }
        }
        if self.kind == HealthKind::Tcp {
            for (k, set) in [
                ("path", self.path.is_some()),
                ("expect", self.expect.is_some()),
                ("host", self.host.is_some()),
            ] {
                if set {
                    return fail(
                        p.key(k),
                        format!("{k} is a setting of http checks, and this check is tcp"),
                    );
                }
            }
        }
        if let Some(path) = &self.path {
            if !path.starts_with('/') || path.len() > MAX_HTTP_FIELD || !is_token_text(path) {
                return fail(
                    p.key("path"),
                    format!(
                        "{path:?}: a path starts with '/' and has at most {MAX_HTTP_FIELD} visible ASCII characters (no spaces)"
                    ),
                );
            }
        }
        if let Some(host) = &self.host {
            if host.is_empty() || host.len() > MAX_HTTP_FIELD || !is_token_text(host) {
                return fail(
                    p.key("host"),
                    format!(
                        "{host:?}: a host has 1 to {MAX_HTTP_FIELD} visible ASCII characters (no spaces)"
                    ),
                );
            }
        }
        Ok(())
    }
}

/// Visible ASCII without spaces: nothing that could end a request line or
/// a header.
fn is_token_text(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

/// HTTP status codes that pass a check: "200-399", "200", or a list such
/// as "200,204,300-399". Codes are 100-599.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StatusRanges(Vec<(u16, u16)>);

impl StatusRanges {
    /// True when `code` is one of the ranges.
    pub fn contains(&self, code: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&code))
    }
}

impl Default for StatusRanges {
    fn default() -> StatusRanges {
        StatusRanges(vec![(200, 399)])
    }
}

impl FromStr for StatusRanges {
    type Err = String;

    fn from_str(s: &str) -> Result<StatusRanges, String> {
        let bad = |why: &str| {
            format!("bad status range {s:?}: {why} (expected codes 100-599 like \"200-399\" or \"200,204\")")
        };
        let code = |t: &str| -> Result<u16, String> {
            let t = t.trim();
            match t.parse::<u16>() {
                Ok(c) if (100..=599).contains(&c) => Ok(c),
                Ok(c) => Err(bad(&format!("{c} is not a status code"))),
                Err(_) => Err(bad(&format!("{t:?} is not a number"))),
            }
        };
        let mut out = Vec::new();
        for part in s.split(',') {
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (code(a)?, code(b)?),
                None => {
                    let c = code(part)?;
                    (c, c)
                }
            };
            if lo > hi {
                return Err(bad(&format!("{lo} is above {hi}")));
            }
            out.push((lo, hi));
        }
        Ok(StatusRanges(out))
    }
}

impl fmt::Display for StatusRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for StatusRanges {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<StatusRanges, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_ranges() {
        let r: StatusRanges = "200-399".parse().unwrap();
        assert!(r.contains(200) && r.contains(399) && !r.contains(400) && !r.contains(199));
        let r: StatusRanges = "204, 300-302".parse().unwrap();
        assert!(r.contains(204) && r.contains(301) && !r.contains(200));
        assert_eq!(r.to_string(), "204,300-302");
        for bad in ["", "abc", "399-200", "200-", "600", "99", "200-700", "2xx"] {
            assert!(bad.parse::<StatusRanges>().is_err(), "{bad:?}");
        }
        assert!(StatusRanges::default().contains(302));
    }
}
