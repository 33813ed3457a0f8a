//! What the fuzz targets share: their configurations' common part, the
//! control-plane bed, and a control plane built from a configuration.

use std::sync::Arc;
use std::time::Instant;

use pktdist::affinity::manager::AffinityManager;
use pktdist::affinity::table::{AffinityReader, AffinityTable};
use pktdist::config::Config;
use pktdist::control::plane::ControlPlane;
use pktdist::control::registry::ServiceRegistry;
use pktdist::control::statics;
use pktdist::datapath::snapshot::{Dataplane, DataplaneCell};

/// The control plane's bed: a TCP service of three backends (one draining)
/// with its limits set low, a UDP service whose affinities may overlap, an
/// IPv6 service, and a static affinity. Maglev tables are small, so that a
/// run builds them quickly.
pub const CONTROL_BED: &str = r#"
[[ports]]
name = "in"
device = "net_ring0"
gateway_mac = "02:00:00:00:00:fe"
[affinity]
capacity = 16

[[services]]
name = "web"
maglev_table_size = 307
vip = "192.0.2.10"
port = 80
protocol = "tcp"
forwarding = "ipip"
ipip_source = "198.51.100.1"
max_affinity_duration = "10m"
max_affinities_per_backend = 4
min_prefix = { ipv4 = 8, ipv6 = 32 }
[[services.backends]]
name = "a"
address = "10.0.0.1"
[[services.backends]]
name = "b"
address = "10.0.0.2"
weight = 0
[[services.backends]]
name = "c"
address = "10.0.0.3"

[[services]]
name = "dns"
maglev_table_size = 101
vip = "192.0.2.10"
port = 53
protocol = "udp"
forwarding = "ipip"
ipip_source = "198.51.100.1"
affinity_overlap = "allow"
[[services.backends]]
name = "a"
address = "10.0.1.1"

[[services]]
name = "web6"
maglev_table_size = 101
vip = "2001:db8::10"
port = 80
protocol = "tcp"
forwarding = "ipip"
ipip_source = "2001:db8:ffff::1"
[[services.backends]]
name = "s1"
address = "2001:db8:1::1"

[[affinities]]
service = "web"
client = "198.18.0.0/16"
client_port = "1000-2000"
backend = "c"
"#;

/// A bed's configuration: `sections` after the EAL and core settings every
/// bed has.
pub fn config(sections: &str) -> Config {
    let text =
        format!("[eal]\nargs = [\"--no-huge\"]\n[cores]\ncontrol = 0\nworkers = [1]\n{sections}");
    Config::parse(&text, "fuzz.toml").expect("the bed's configuration")
}

/// The services and backends of an accepted configuration, and the data
/// plane's snapshot of them (what a start builds first).
pub fn dataplane(cfg: &Config) -> (ServiceRegistry, Dataplane) {
    let mut registry =
        ServiceRegistry::from_config(cfg).expect("an accepted configuration's services");
    let dp = registry
        .snapshot()
        .expect("an accepted configuration's snapshot");
    (registry, dp)
}

/// A control plane for `cfg` over an affinity table of `capacity` entries,
/// its static affinities installed (or not: the error is returned beside
/// it), and a reader of its table.
pub fn plane(
    cfg: &Config,
    capacity: usize,
) -> (
    ControlPlane,
    AffinityReader,
    Result<(), statics::NotInstalled>,
) {
    let (registry, dp) = dataplane(cfg);
    let (writer, reader) = AffinityTable::new(capacity);
    let mut plane = ControlPlane::new(
        registry,
        Arc::new(DataplaneCell::new(dp)),
        AffinityManager::new(writer),
        Vec::new(),
        Instant::now(),
    );
    let statics = statics::install(&mut plane, cfg);
    (plane, reader, statics)
}

/// The control plane of [`CONTROL_BED`].
pub fn control_bed() -> (ControlPlane, AffinityReader) {
    let cfg = config(CONTROL_BED);
    let (plane, reader, statics) = plane(&cfg, cfg.affinity.capacity);
    statics.expect("the bed's static affinity");
    (plane, reader)
}
