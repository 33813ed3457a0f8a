//! The Prometheus text that `GET /metrics` serves, checked by an independent
//! parser: the official Python client's (prometheus_client.parser), which
//! scripts/install-deps.sh installs.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;

use pktdist::config::Config;
use pktdist::control::registry::ServiceRegistry;
use pktdist::datapath::counters::WorkerCounters;
use pktdist::datapath::latency::Percentiles;
use pktdist::health::view::{BackendHealth, HealthSummary, ProbeTimes};
use pktdist::report::metrics::render;
use pktdist::report::summary::{ControlSummary, EndedSummary, PortSummary, Summary};
use pktdist::types::{DropReason, IcmpDrop};

const PARSE: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        print(f"{fam.type} {s.name} {labels} {s.value}")
"#;

fn parsed(text: &str) -> Vec<String> {
    let mut child = Command::new("python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn metrics_parse_with_the_prometheus_client_parser() {
    let cfg = Config::load(concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml")).unwrap();
    let dp = ServiceRegistry::from_config(&cfg)
        .unwrap()
        .snapshot()
        .unwrap();
    let workers: Vec<Arc<WorkerCounters>> = (0..2)
        .map(|_| Arc::new(WorkerCounters::default()))
        .collect();
    for (i, w) in workers.iter().enumerate() {
        w.rx_packets.add(1000);
        w.tx_packets.add(990);
        w.drops[DropReason::NoService as usize].add(10);
        w.backends[0].connections.add(7 + i as u64);
        w.services[0].affinity_hits.add(3);
        w.latency.record(250);
        w.icmp_forwarded.add(4);
        w.icmp_drops[IcmpDrop::BadChecksum as usize].add(1);
    }
    let mut s = Summary::collect(&workers, &dp, 2.0, 5, &Default::default());
    s.ports.push(PortSummary {
        name: "p0".into(),
        ipackets: 2000,
        ibytes: 128_000,
        obytes: 126_720,
        ..PortSummary::default()
    });
    s.auto_affinity_pins = 12;
    s.auto_affinity_table_full = 3;
    s.extra.control = Some(ControlSummary {
        refused: [("bad_hmac".to_string(), 2)].into(),
        by_code: [("OK".to_string(), 4)].into(),
        ended: EndedSummary {
            expired: 1,
            ..EndedSummary::default()
        },
        ..ControlSummary::default()
    });
    s.extra.health = Some(HealthSummary {
        backends: vec![BackendHealth {
            service: "web".into(),
            backend: "be2".into(),
            state: "down".into(),
            changes: 3,
            ..BackendHealth::default()
        }],
        probes: vec![ProbeTimes {
            service: "web".into(),
            kind: "http".into(),
            time_ns: Percentiles {
                count: 40,
                p50: 2_000_000,
                p90: 3_000_000,
                p99: 9_000_000,
                p999: 9_000_000,
                max: 9_500_000,
                mean: 2_500_000.0,
            },
        }],
        checker_down: false,
        checker_restarts: 2,
    });
    let samples = parsed(&render(&s));
    let has = |line: &str| samples.iter().any(|l| l == line);
    assert!(
        has("counter pktdist_received_packets_total  2000"),
        "{samples:#?}"
    );
    assert!(has(
        "counter pktdist_dropped_packets_total reason=no_service 20"
    ));
    assert!(has(
        "counter pktdist_backend_connections_total backend=be1,service=web 15"
    ));
    assert!(has("counter pktdist_affinity_hits_total service=web 6"));
    assert!(has(
        "counter pktdist_port_received_packets_total port=p0 2000"
    ));
    assert!(has(
        "counter pktdist_port_received_bytes_total port=p0 128000"
    ));
    assert!(has(
        "counter pktdist_port_transmitted_bytes_total port=p0 126720"
    ));
    assert!(has("gauge pktdist_auto_affinity_pins  12"));
    assert!(has("counter pktdist_auto_affinity_table_full_total  3"));
    assert!(has(
        "counter pktdist_control_refused_total reason=bad_hmac 2"
    ));
    assert!(has("gauge pktdist_affinities  5"));
    assert!(
        has("counter pktdist_icmp_forwarded_total  8"),
        "{samples:#?}"
    );
    assert!(has(
        "counter pktdist_icmp_dropped_total reason=bad_checksum 2"
    ));
    assert!(has("counter pktdist_fragments_sent_total  0"));
    assert!(has(
        "gauge pktdist_backend_weight backend=be3,service=web 300"
    ));
    assert!(samples
        .iter()
        .any(|l| l.starts_with("summary pktdist_packet_processing_seconds quantile=0.99 ")));
    assert!(has("summary pktdist_packet_processing_seconds_count  2"));
    assert!(has("gauge pktdist_backend_up backend=be1,service=web 1"));
    assert!(has("gauge pktdist_backend_up backend=be2,service=web 0"));
    assert!(has(
        "counter pktdist_backend_state_changes_total backend=be2,service=web 3"
    ));
    assert!(
        has("summary pktdist_health_probe_seconds kind=http,quantile=0.5,service=web 0.002"),
        "{samples:#?}"
    );
    assert!(has(
        "summary pktdist_health_probe_seconds_count kind=http,service=web 40"
    ));
    assert!(has(
        "summary pktdist_health_probe_seconds_sum kind=http,service=web 0.1"
    ));
    assert!(has("gauge pktdist_health_checker_up  1"));
    assert!(has("counter pktdist_health_checker_restarts_total  2"));
}
