//! `[cluster]`: several instances sharing one affinity table through etcd.
//! Without the section pktdist runs alone and starts nothing else.

use std::path::PathBuf;

use serde::Deserialize;

use super::error::KeyPath;
use super::{fail, too_long, Check, DurationStr};

/// The store that keeps the shared affinity table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// etcd v3 (its gRPC API).
    Etcd,
}

fn default_prefix() -> String {
    "/pktdist".to_string()
}

fn default_timeout() -> DurationStr {
    DurationStr::secs(2)
}

/// The `[cluster]` section.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub store: StoreKind,
    /// etcd client URLs, e.g. `["http://10.0.0.1:2379"]` (https with TLS).
    pub endpoints: Vec<String>,
    /// Every key of the cluster lives under it; instances sharing a table
    /// share the prefix.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// This instance's name, unique in the cluster.
    pub instance: String,
    /// etcd user (with `password_file`).
    #[serde(default)]
    pub user: Option<String>,
    /// File holding the etcd user's password (its first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify etcd's certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd's client authentication.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// How long one etcd request (connect, transaction, read) may take
    /// before etcd counts as unreachable.
    #[serde(default = "default_timeout")]
    pub timeout: DurationStr,
}

/// The shortest and longest `timeout`.
const MIN_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);
const MAX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl ClusterConfig {
    /// Checks the section (`p` is `[cluster]`'s path); files named must be
    /// readable.
    pub(super) fn validate(&self, p: &KeyPath) -> Check {
        if self.endpoints.is_empty() {
            return fail(p.key("endpoints"), "name at least one etcd endpoint");
        }
        let mut https = false;
        for (i, e) in self.endpoints.iter().enumerate() {
            let rest = if let Some(r) = e.strip_prefix("https://") {
                https = true;
                r
            } else if let Some(r) = e.strip_prefix("http://") {
                r
            } else {
                return fail(
                    p.key("endpoints").index(i),
                    format!("{e:?}: an endpoint is an http:// or https:// URL"),
                );
            };
            if rest.is_empty() || rest.starts_with('/') || rest.contains(char::is_whitespace) {
                return fail(
                    p.key("endpoints").index(i),
                    format!("{e:?}: the URL names no host"),
                );
            }
        }
        if self.instance.is_empty()
            || !self
                .instance
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return fail(
                p.key("instance"),
                format!(
                    "{:?}: an instance name is 1 or more of A-Z a-z 0-9 . _ -",
                    self.instance
                ),
            );
        }
        if let Some(e) = too_long("instance", &self.instance) {
            return fail(p.key("instance"), e);
        }
        if !self.prefix.starts_with('/') {
            return fail(
                p.key("prefix"),
                format!("{:?}: the prefix starts with /", self.prefix),
            );
        }
        if self.password_file.is_some() && self.user.is_none() {
            return fail(p.key("password_file"), "password_file needs user");
        }
        if self.user.is_some() && self.password_file.is_none() {
            return fail(p.key("user"), "user needs password_file");
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            let k = if self.cert_file.is_some() {
                "cert_file"
            } else {
                "key_file"
            };
            return fail(p.key(k), "cert_file and key_file go together");
        }
        for (k, f) in [
            ("password_file", &self.password_file),
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ] {
            let Some(path) = f else { continue };
            if k != "password_file" && !https {
                return fail(
                    p.key(k),
                    format!("{k} is for TLS: it needs https:// endpoints"),
                );
            }
            if let Err(e) = std::fs::File::open(path) {
                return fail(p.key(k), format!("{}: cannot be read: {e}", path.display()));
            }
        }
        let t = self.timeout.0;
        if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&t) {
            return fail(
                p.key("timeout"),
                format!(
                    "{}: must be between {} and {}",
                    self.timeout,
                    DurationStr(MIN_TIMEOUT),
                    DurationStr(MAX_TIMEOUT)
                ),
            );
        }
        Ok(())
    }
}
