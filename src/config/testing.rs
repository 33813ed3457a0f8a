//! Configuration text for unit tests: the smallest valid header, to which a
//! test adds the services it is about.

/// EAL, one worker core, one ring port (with a next hop for `ipip`
/// backends without a MAC) and the control protocol: all a
/// valid configuration needs besides its `[[services]]`.
pub(crate) const HEADER: &str = r#"
[eal]
args = ["--no-huge"]
[cores]
control = 0
workers = [1]
[[ports]]
name = "p0"
device = "net_ring0"
gateway_mac = "02:00:00:00:00:fe"
[control]
listen = "127.0.0.1:7400"
allowed_networks = ["127.0.0.0/8"]
"#;

/// [`HEADER`] followed by `services` (TOML `[[services]]` tables and
/// whatever else the test needs).
pub(crate) fn with_services(services: &str) -> String {
    format!("{HEADER}{services}")
}

/// The "web" service, 192.0.2.10:80 over TCP by IPIP, for a test to follow
/// with more keys and its `[[services.backends]]`.
pub(crate) const WEB: &str = r#"
[[services]]
name = "web"
vip = "192.0.2.10"
port = 80
protocol = "tcp"
forwarding = "ipip"
ipip_source = "198.51.100.1"
"#;

/// `text` with MACs of their own for the backends at 10.0.0.1 and
/// 10.0.0.2 (so that `ipip` needs no gateway for them).
pub(crate) fn with_backend_macs(text: &str) -> String {
    text.replace(
        "address = \"10.0.0.1\"\n",
        "address = \"10.0.0.1\"\nmac = \"02:00:00:00:00:01\"\n",
    )
    .replace(
        "address = \"10.0.0.2\"\n",
        "address = \"10.0.0.2\"\nmac = \"02:00:00:00:00:02\"\n",
    )
}
