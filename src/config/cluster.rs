//! `[cluster]`: several instances sharing one affinity table through etcd.
//! Without the section pktdist runs alone and starts nothing else.

use std::path::PathBuf;

use serde::Deserialize;

use super::DurationStr;

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
