//! `GET /metrics` of a real running `pktdist` (DPDK, a `net_pcap` port fed
//! a pcap file) against the README: every metric family the README names
//! is exported, every exported family is in the README, and the families
//! the README once named without an export carry the run's real figures.
#![cfg(feature = "dpdk")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::{
    base_config, http_get, ipip_service, path_str, poll_until, port_toml, read_pcap, serial,
    web_service, write_pcap, Pktdist, TempDir,
};
use pktdist::types::tcp_flags;
use pktdist::wire::build::FrameSpec;

/// Clients opening a connection to the automatic-affinity service: more
/// than its table of 16 pins holds (`auto_capacity = 1`: two buckets of 8).
const AUTO_CLIENTS: u8 = 24;
const AUTO_TABLE: u64 = 16;

/// The metric families the README names: every `pktdist_...` name in
/// backquotes. A name ending in `*` would name no family: refused.
fn readme_families() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let mut names = BTreeSet::new();
    for (at, _) in readme.match_indices("`pktdist_") {
        let rest = &readme[at + 1..];
        let len = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(rest.len());
        let next = rest[len..].chars().next();
        assert!(
            matches!(next, Some('`') | Some('{')),
            "README names metrics by a pattern, not a family: {:?}",
            &rest[..(len + 12).min(rest.len())]
        );
        names.insert(rest[..len].to_string());
    }
    names
}

/// The body of `GET /metrics`.
/// The text of `/metrics`.
fn scrape(addr: SocketAddr) -> Option<String> {
    http_get(addr, "/metrics")
}

/// An exposition: family -> type, and sample (name with labels) -> value.
struct Exposition {
    families: BTreeMap<String, String>,
    samples: BTreeMap<String, f64>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut families = BTreeMap::new();
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                families.insert(name.to_string(), kind.to_string());
            } else if !line.starts_with('#') && !line.is_empty() {
                let (name, value) = line.rsplit_once(' ').expect("sample value");
                samples.insert(name.to_string(), value.parse().expect("number"));
            }
        }
        Exposition { families, samples }
    }

    fn get(&self, sample: &str) -> Option<f64> {
        self.samples.get(sample).copied()
    }

    /// Whether `family` has at least one sample (a summary's are its
    /// quantiles, `_sum` and `_count`).
    fn has_samples(&self, family: &str) -> bool {
        self.samples.keys().any(|s| {
            let name = s.split('{').next().unwrap_or(s);
            name == family
                || name
                    .strip_prefix(family)
                    .is_some_and(|rest| rest == "_sum" || rest == "_count")
        })
    }
}

#[test]
fn every_family_the_readme_names_is_exported_and_the_other_way_round() {
    let _serial = serial();
    let dir = TempDir::new("e2e-metrics");
    let input = dir.path("in.pcap");
    let output = dir.path("out.pcap");
    let config = dir.path("pktdist.toml");

    // SYNs that stay open (the SYN timeout outlasts the test): some to the
    // web service, one per client to the automatic-affinity service.
    let app_vip = [192, 0, 2, 20];
    let mut frames: Vec<Vec<u8>> = (0..10u8)
        .map(|i| {
            FrameSpec::tcp_v4([10, 1, 0, i], 40000, [192, 0, 2, 10], 80, tcp_flags::SYN)
                .build()
                .expect("frame")
        })
        .collect();
    for i in 0..AUTO_CLIENTS {
        frames.push(
            FrameSpec::tcp_v4([10, 2, 0, i], 41000, app_vip, 8080, tcp_flags::SYN)
                .build()
                .expect("frame"),
        );
    }
    write_pcap(&input, &frames);
    let frame_bytes: usize = frames.iter().map(Vec::len).sum();

    let health_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("health listener");
    let health_port = health_listener.local_addr().expect("listener").port();
    // Accepted and closed, so that the backlog never fills however long
    // the test runs (a TCP check passes once the connection is made).
    std::thread::spawn(move || {
        for conn in health_listener.incoming() {
            drop(conn);
        }
    });
    let toml = [
        base_config(&["be1", "be2", "app1", "app2"])
            .replace("auto_capacity = 1024", "auto_capacity = 1")
            .replace(
                "capacity = 65536\n",
                "capacity = 65536\nsyn_timeout = \"1h\"\n",
            )
            .replace(
                "status_interval = \"1s\"\n",
                "status_interval = \"1s\"\nmetrics_listen = \"127.0.0.1:0\"\n",
            ),
        port_toml(&format!(
            "net_pcap0,rx_pcap={},tx_pcap={}",
            path_str(&input),
            path_str(&output)
        )),
        // Health checks on web: be1's at a listener of the test, be2's at
        // the same port on 127.0.0.2, where nothing listens (down after
        // one refused check). fall = 1: a timeout of 1.5 s, so that be1's
        // checks pass on a loaded machine too.
        web_service(
            &format!(
                "health = {{ kind = \"tcp\", port = {health_port}, interval = \"2s\", timeout = \"1500ms\", rise = 1, fall = 1 }}\n"
            ),
            &[("be1", "10.0.0.1", None), ("be2", "10.0.0.2", None)],
        )
        .replace(
            "address = \"10.0.0.1\"\n",
            "address = \"10.0.0.1\"\nhealth_address = \"127.0.0.1\"\n",
        )
        .replace(
            "address = \"10.0.0.2\"\n",
            "address = \"10.0.0.2\"\nhealth_address = \"127.0.0.2\"\n",
        ),
        ipip_service(
            "app",
            "192.0.2.20",
            8080,
            "tcp",
            "auto_affinity = { linger = \"1h\" }\n",
            &[("app1", "10.0.1.1", None), ("app2", "10.0.1.2", None)],
        ),
    ]
    .concat();
    assert!(toml.contains("metrics_listen"), "{toml}");
    std::fs::write(&config, toml).expect("write config");

    let (pd, _control) = Pktdist::run(&config);
    let addr = pd.metrics_addr(Duration::from_secs(30));

    // The text is rendered about once a second: wait for one that has
    // counted the whole pcap.
    let frames_in = frames.len() as f64;
    let m = poll_until(Duration::from_secs(30), || {
        let m = Exposition::parse(&scrape(addr)?);
        (m.get("pktdist_received_packets_total") == Some(frames_in)
            && m.get("pktdist_backend_up{service=\"web\",backend=\"be2\"}") == Some(0.0)
            && m.has_samples("pktdist_health_probe_seconds")
            && m.get("pktdist_port_received_packets_total{port=\"p0\"}") == Some(frames_in)
            && m.get("pktdist_port_transmitted_packets_total{port=\"p0\"}") == Some(frames_in))
        .then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "the metrics never counted {frames_in} packets: {:?}\n{}",
            scrape(addr),
            pd.stderr_text()
        )
    });

    let readme = readme_families();
    let exported: BTreeSet<String> = m.families.keys().cloned().collect();
    // Cluster mode's families exist only with `[cluster]` (this instance
    // runs alone); the cluster tests scrape them.
    let missing: Vec<&String> = readme
        .difference(&exported)
        .filter(|f| !f.starts_with("pktdist_cluster_"))
        .collect();
    assert!(
        missing.is_empty(),
        "the README names families /metrics does not export: {missing:?}"
    );
    let undocumented: Vec<&String> = exported.difference(&readme).collect();
    assert!(
        undocumented.is_empty(),
        "/metrics exports families the README does not name: {undocumented:?}"
    );
    for family in &exported {
        assert!(m.has_samples(family), "{family} has no samples");
    }

    // The automatic-affinity families carry the run's figures: every
    // automatic-affinity client was either pinned or found the table full.
    let pins = m.get("pktdist_auto_affinity_pins").expect("pins");
    let full = m
        .get("pktdist_auto_affinity_table_full_total")
        .expect("table full");
    assert_eq!(
        pins + full,
        f64::from(AUTO_CLIENTS),
        "pins {pins} full {full}"
    );
    assert!(pins as u64 <= AUTO_TABLE, "pins {pins}");
    assert!(
        full as u64 >= u64::from(AUTO_CLIENTS) - AUTO_TABLE,
        "full {full}"
    );
    assert_eq!(
        m.get("pktdist_port_received_bytes_total{port=\"p0\"}"),
        Some(frame_bytes as f64)
    );
    // Every SYN was forwarded, out of the same port; what the device
    // counted sending is what the pcap it wrote holds.
    let sent_packets = m
        .get("pktdist_port_transmitted_packets_total{port=\"p0\"}")
        .expect("tx packets");
    let sent_bytes = m
        .get("pktdist_port_transmitted_bytes_total{port=\"p0\"}")
        .expect("tx bytes");
    // The health checks: be2 went down once, be1 stayed up, and the one
    // change was logged.
    let backend =
        |family: &str, b: &str| m.get(&format!("{family}{{service=\"web\",backend=\"{b}\"}}"));
    assert_eq!(backend("pktdist_backend_up", "be1"), Some(1.0));
    assert_eq!(
        backend("pktdist_backend_state_changes_total", "be1"),
        Some(0.0)
    );
    assert_eq!(
        backend("pktdist_backend_state_changes_total", "be2"),
        Some(1.0)
    );
    assert_eq!(
        m.get("pktdist_backend_up{service=\"app\",backend=\"app1\"}"),
        Some(1.0),
        "a backend without checks is up"
    );
    assert!(
        pd.stderr_text()
            .contains("backend web/be2 is down (health check to 127.0.0.2:"),
        "{}",
        pd.stderr_text()
    );
    let finished = pd.stop(Duration::from_secs(10));
    assert!(finished.status.success(), "{}", finished.stderr);
    let out = read_pcap(&output);
    assert_eq!(out.len(), frames.len(), "forwarded frames");
    assert_eq!(sent_packets, out.len() as f64);
    assert_eq!(sent_bytes, out.iter().map(Vec::len).sum::<usize>() as f64);
}
