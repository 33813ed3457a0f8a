//! Validation tests: a small valid configuration broken one rule at a
//! time, and the files in config/ parsed as they ship.

use super::testing::{with_backend_macs, WEB};
use super::*;
use std::sync::LazyLock;

/// A small valid configuration; tests edit it to break one rule each.
static BASE: LazyLock<String> = LazyLock::new(|| format!("{HEAD}{WEB}{REST}"));

/// BASE up to the web service.
const HEAD: &str = r#"[eal]
args = ["--no-huge", "--no-pci"]

[cores]
control = 0
workers = [1, 2]

[[ports]]
name = "p0"
device = "net_ring0"
gateway_mac = "02:00:00:00:00:fe"

[[ports]]
name = "p1"
device = "net_ring1"
forward_to = "p0"

[flow]
capacity = 4096
syn_timeout = "5s"

[control]
listen = "127.0.0.1:7400"

[control.keys]
admin = "000102030405060708090a0b0c0d0e0f"

[traffic]
port = "p1"
"#;

/// BASE after the web service's own keys: its backends and the rest.
const REST: &str = r#"
[[services.backends]]
name = "be1"
address = "10.0.0.1"
weight = 100

[[services.backends]]
name = "be2"
address = "10.0.0.2"

[[services]]
name = "dns6"
vip = "2001:db8::53"
port = 53
protocol = "udp"
forwarding = "l2"
auto_affinity = { linger = "30s" }

[[services.backends]]
name = "ns1"
address = "2001:db8:1::1"
mac = "02:00:00:00:01:01"

[[affinities]]
service = "web"
client = "203.0.113.0/24"
client_port = "1000-2000"
backend = "be2"
"#;

fn err(text: &str) -> ConfigError {
    match Config::parse(text, "t.toml") {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e,
    }
}

/// Replaces exactly one occurrence of `from`.
fn edit(from: &str, to: &str) -> String {
    assert_eq!(BASE.matches(from).count(), 1, "{from:?} must occur once");
    BASE.replace(from, to)
}

/// Line of the `n`th (0-based) line containing `needle`.
fn nth_line_of(text: &str, needle: &str, n: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .nth(n)
        .map(|(i, _)| i + 1)
        .expect("needle in text")
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .expect("needle in text")
}

/// Checks the key and that the line is where `needle` is.
fn check(text: &str, key: &str, needle: &str, msg_part: &str) {
    let e = err(text);
    assert_eq!(e.key, key, "{e}");
    assert_eq!(e.line, line_of(text, needle), "{e}");
    assert!(e.message.contains(msg_part), "{e}");
    let shown = e.to_string();
    assert!(shown.starts_with(&format!("t.toml:{}:", e.line)), "{shown}");
    assert!(shown.contains(key), "{shown}");
}

/// Checks BASE with `args` added to `[eal] args`: refused with `refusal`
/// where the case says so, else accepted.
fn check_eal_args(cases: &[(&str, bool)], refusal: &str) {
    for &(args, refused) in cases {
        let t = edit(
            "args = [\"--no-huge\", \"--no-pci\"]",
            &format!("args = [\"--no-huge\", \"--no-pci\", {args}]"),
        );
        if refused {
            check(&t, "eal.args", "args = [", refusal);
        } else {
            assert!(Config::parse(&t, "t.toml").is_ok(), "{args}");
        }
    }
}

/// A core list in [eal] args must put EAL's main thread (the control
/// thread) on the control core, where the list says so plainly.
#[test]
fn eal_core_lists_must_start_with_the_control_core() {
    check_eal_args(
        &[
            ("\"-l\", \"1\"", true),
            ("\"-l1-3\"", true),
            ("\"-l\", \"0,3\"", false),
            ("\"-l\", \"3,0-1\"", false),
            ("\"-c\", \"0x6\"", true),
            ("\"-c\", \"0x7\"", false),
            ("\"-l\", \"0-3\", \"--main-lcore\", \"2\"", true),
            ("\"-l\", \"0-3\", \"--main-lcore=0\"", false),
            // Mapped by --lcores: checked by run once EAL has applied it.
            ("\"--lcores\", \"1@1\"", false),
        ],
        "not on [cores] control = 0",
    );
}

/// A pool driver that is not safe for several threads is refused.
#[test]
fn single_thread_mbuf_pools_are_refused() {
    check_eal_args(
        &[
            ("\"--mbuf-pool-ops-name\", \"ring_sp_sc\"", true),
            ("\"--mbuf-pool-ops-name=ring_mp_sc\"", true),
            ("\"--mbuf-pool-ops-name\", \"ring_mp_mc\"", false),
            ("\"--mbuf-pool-ops-name=stack\"", false),
        ],
        "several threads at once",
    );
}

/// A port is promiscuous as configured, else when it is a virtual device.
#[test]
fn promiscuous_by_default_on_virtual_devices_only() {
    let c = Config::parse(&BASE, "t.toml").unwrap();
    assert!(c.ports.iter().all(|p| p.promiscuous()));
    let t = BASE.replace("device = \"net_ring0\"", "device = \"0000:3b:00.0\"");
    let c = Config::parse(&t, "t.toml").unwrap();
    assert!(!c.ports[0].promiscuous() && c.ports[1].promiscuous());
    assert!(c.plan().contains("device 0000:3b:00.0 (PCI):"));
    assert!(c
        .plan()
        .contains("device net_ring1 (virtual, promiscuous):"));
    let t = t
        .replace(
            "device = \"0000:3b:00.0\"",
            "device = \"0000:3b:00.0\"\npromiscuous = true",
        )
        .replace(
            "device = \"net_ring1\"",
            "device = \"net_ring1\"\npromiscuous = false",
        );
    let c = Config::parse(&t, "t.toml").unwrap();
    assert!(c.ports[0].promiscuous() && !c.ports[1].promiscuous());
}

#[test]
fn base_is_valid() {
    let c = Config::parse(&BASE, "t.toml").unwrap();
    assert_eq!(c.cores.workers, vec![1, 2]);
    assert_eq!(c.ports[1].forward_to.as_deref(), Some("p0"));
    assert_eq!(c.ports[0].rx_descriptors, 1024);
    assert_eq!(c.flow.syn_timeout.0, std::time::Duration::from_secs(5));
    assert_eq!(
        c.flow_timeouts().established,
        std::time::Duration::from_secs(300)
    );
    assert_eq!(c.services[0].backends[1].weight, 100);
    assert_eq!(c.services[0].scheduler, Scheduler::Maglev);
    assert_eq!(c.services[0].maglev_size(), 65537);
    assert_eq!(c.services[1].protocol.number(), PROTO_UDP);
    assert_eq!(
        c.services[1].auto_affinity.map(|a| a.linger.0),
        Some(std::time::Duration::from_secs(30))
    );
    assert_eq!(c.affinities[0].client_port, PortMatch::Range(1000, 2000));
    assert_eq!(c.control.keys["admin"].0.len(), 16);
    assert_eq!(c.traffic.as_ref().map(|t| t.clients), Some(4096));
    let plan = c.plan();
    assert!(plan.contains("2 rx + 2 tx queues"), "{plan}");
    assert!(plan.contains("be1 10.0.0.1  weight 100 (50.0%)"), "{plan}");
    assert!(plan.contains("[2001:db8::53]:53"), "{plan}");
}

#[test]
fn core_listed_twice() {
    check(
        &edit("workers = [1, 2]", "workers = [1, 2, 1]"),
        "cores.workers[2]",
        "workers = [1, 2, 1]",
        "listed twice",
    );
}

#[test]
fn worker_equals_control() {
    check(
        &edit("workers = [1, 2]", "workers = [0, 2]"),
        "cores.workers[0]",
        "workers = [0, 2]",
        "control core",
    );
}

#[test]
fn workers_at_most_one_per_free_lcore_id() {
    let workers = |n: usize| format!("workers = [{}]\nshare_cpus = true", vec!["1"; n].join(", "));
    // Their receive rings need more buffers than the default.
    let text = edit("workers = [1, 2]", &workers(MAX_WORKERS)) + "\n[mempool]\nmbufs = 524287\n";
    Config::parse(&text, "t.toml").expect("MAX_WORKERS workers");
    check(
        &edit("workers = [1, 2]", &workers(MAX_WORKERS + 1)),
        "cores.workers",
        "workers = [",
        "128 workers: at most 127 (each takes a DPDK lcore id",
    );
}

#[test]
fn traffic_port_forwards_elsewhere_and_flows_have_two_packets() {
    check(
        &edit("[traffic]\nport = \"p1\"", "[traffic]\nport = \"p0\""),
        "traffic.port",
        "port = \"p0\"",
        "p0: its forward_to must name another port",
    );
    check(
        &edit(
            "[traffic]\nport = \"p1\"",
            "[traffic]\nport = \"p1\"\npackets_per_flow = 1",
        ),
        "traffic.packets_per_flow",
        "packets_per_flow = 1",
        "must be at least 2",
    );
}

#[test]
fn traffic_needs_a_client_per_64512_open_flows() {
    let traffic = |clients: u32, flows: u32| {
        edit(
            "[traffic]\nport = \"p1\"",
            &format!("[traffic]\nport = \"p1\"\nclients = {clients}\nconcurrent_flows = {flows}"),
        )
    };
    Config::parse(&traffic(2, 2 * TRAFFIC_SOURCE_PORTS), "t.toml").expect("two clients' ports");
    check(
        &traffic(2, 2 * TRAFFIC_SOURCE_PORTS + 1),
        "traffic.concurrent_flows",
        "concurrent_flows =",
        "129025 concurrent flows need at least 3 clients",
    );
}

#[test]
fn shared_cpus_only_when_asked() {
    let text = edit(
        "workers = [1, 2]",
        "workers = [1, 1, 0]\nshare_cpus = true\nidle_sleep = \"50us\"",
    );
    let c = Config::parse(&text, "t.toml").expect("share_cpus allows shared cores");
    assert_eq!(c.cores.shared_cpus(), vec![0, 1]);
    assert_eq!(
        c.cores.idle_sleep.map(|d| d.0),
        Some(Duration::from_micros(50))
    );
    let plan = c.plan();
    assert!(
        plan.contains("workers [1, 1, 0] (3 workers), CPUs [0, 1] shared (share_cpus), idle workers sleep 50us"),
        "{plan}"
    );
    for w in [
        "worker 0 on core 1",
        "worker 1 on core 1",
        "worker 2 on core 0",
    ] {
        assert!(plan.contains(w), "{w}: {plan}");
    }
    assert!(plan.contains("rx + tx queue 2 of p0, p1"), "{plan}");
    // Without it, the plan stays strict (core_listed_twice, worker_equals_control).
    let c = Config::parse(&BASE, "t.toml").unwrap();
    assert!(c.cores.shared_cpus().is_empty() && !c.cores.share_cpus);
    assert!(c.cores.idle_sleep.is_none());
}

#[test]
fn idle_sleep_bounds() {
    for bad in ["0s", "11ms"] {
        check(
            &edit(
                "workers = [1, 2]",
                &format!("workers = [1, 2]\nidle_sleep = \"{bad}\""),
            ),
            "cores.idle_sleep",
            "idle_sleep",
            "at most 10ms",
        );
    }
}

#[test]
fn plan_names_each_ports_spread() {
    let c = Config::parse(&BASE, "t.toml").unwrap();
    let plan = c.plan();
    // p1 is the traffic source's port; p0 a net_ring the workers receive on.
    assert!(
        plan.contains(
            "(one per worker; no RSS: the traffic source puts each flow on the queue RSS would)"
        ),
        "{plan}"
    );
    assert!(
        plan.contains("(one per worker; RSS only if the driver has it"),
        "{plan}"
    );
    let one = edit("workers = [1, 2]", "workers = [1]");
    let plan = Config::parse(&one, "t.toml").unwrap().plan();
    assert!(
        plan.contains("(one per worker; one queue, no RSS needed)"),
        "{plan}"
    );
}

/// scripts/pktdist-bgp.sh --config reads the metrics address from the
/// plan's control line, in this form.
#[test]
fn plan_gives_the_metrics_address_as_the_bgp_script_reads_it() {
    let on = edit(
        "[control]\n",
        "[control]\nmetrics_listen = \"127.0.0.1:9400\"\n",
    );
    assert_ne!(on, *BASE);
    let plan = Config::parse(&on, "t.toml").unwrap().plan();
    assert!(
        plan.lines().any(|l| l.starts_with("control: ")
            && l.contains(", metrics http://127.0.0.1:9400/metrics, ")),
        "{plan}"
    );
    let plan = Config::parse(&BASE, "t.toml").unwrap().plan();
    assert!(
        plan.lines()
            .any(|l| l.starts_with("control: ") && l.contains(", metrics off, ")),
        "{plan}"
    );
}

#[test]
fn af_packet_queue_pairs_match_the_workers() {
    check(
        &edit(
            "device = \"net_ring0\"",
            "device = \"net_af_packet0,iface=lb0\"",
        ),
        "ports[0].device",
        "net_af_packet0",
        "qpairs=1 for 2 workers: set qpairs=2",
    );
    let ok = edit(
        "device = \"net_ring0\"",
        "device = \"net_af_packet0,iface=lb0,qpairs=2\"",
    );
    let plan = Config::parse(&ok, "t.toml").unwrap().plan();
    assert!(plan.contains("kernel's packet fan-out"), "{plan}");
}

#[test]
fn backend_address_of_wrong_family() {
    let t = edit("address = \"2001:db8:1::1\"", "address = \"10.9.9.9\"");
    check(
        &t,
        "services[1].backends[0].address",
        "10.9.9.9",
        "is IPv4 but the service vip is IPv6",
    );
}

#[test]
fn weight_out_of_range() {
    let t = edit("weight = 100", "weight = 70000");
    check(
        &t,
        "services[0].backends[0].weight",
        "weight = 70000",
        "out of range",
    );
    // A negative weight is a type error, located the same way.
    let t = edit("weight = 100", "weight = -1");
    let e = err(&t);
    assert_eq!(e.key, "services[0].backends[0].weight", "{e}");
    assert_eq!(e.line, line_of(&t, "weight = -1"));
}

/// A traffic frame fits one buffer (2,048 bytes and the FCS), and the
/// source's flows fit in memory: larger values are refused where they are.
#[test]
fn traffic_frames_fit_a_buffer_and_flows_memory() {
    let ok = edit(
        "[traffic]\nport = \"p1\"",
        "[traffic]\nport = \"p1\"\npacket_size = 2052",
    );
    let c = Config::parse(&ok, "t.toml").expect("2052 bytes fit");
    assert_eq!(c.traffic.map(|t| t.packet_size), Some(2052));
    let t = edit(
        "[traffic]\nport = \"p1\"",
        "[traffic]\nport = \"p1\"\npacket_size = 2053",
    );
    check(
        &t,
        "traffic.packet_size",
        "packet_size = 2053",
        "must be in 64..=2052",
    );
    let t = edit(
        "[traffic]\nport = \"p1\"",
        "[traffic]\nport = \"p1\"\nconcurrent_flows = 16777217",
    );
    check(
        &t,
        "traffic.concurrent_flows",
        "concurrent_flows = 16777217",
        "at most 16777216",
    );
}

/// One device named two ways (a PCI address with and without its domain,
/// in either case) is one device.
#[test]
fn a_device_is_one_port_however_it_is_written() {
    let t = BASE
        .replace("device = \"net_ring0\"", "device = \"0000:3B:00.0\"")
        .replace("device = \"net_ring1\"", "device = \"3b:00.0,x=1\"");
    check(
        &t,
        "ports[1].device",
        "device = \"3b:00.0,x=1\"",
        "is used by two ports",
    );
}

#[test]
fn missing_port() {
    let t = edit("[traffic]\nport = \"p1\"", "[traffic]\nport = \"p9\"");
    check(&t, "traffic.port", "port = \"p9\"", "no port named \"p9\"");
    let t = edit("forward_to = \"p0\"", "forward_to = \"nope\"");
    check(
        &t,
        "ports[1].forward_to",
        "forward_to = \"nope\"",
        "no port named",
    );
    // Unmatched frames go to another port, never back out of their own.
    let t = edit(
        "forward_to = \"p0\"",
        "forward_to = \"p0\"\nunmatched_to = \"p0\"",
    );
    assert!(Config::parse(&t, "t.toml").is_ok());
    let t = edit("forward_to = \"p0\"", "unmatched_to = \"p1\"");
    check(
        &t,
        "ports[1].unmatched_to",
        "unmatched_to = \"p1\"",
        "\"p1\" is this port",
    );
    // No [[ports]] at all.
    let t = BASE
        .replace(
            "[[ports]]\nname = \"p0\"\ndevice = \"net_ring0\"\ngateway_mac = \"02:00:00:00:00:fe\"\n",
            "",
        )
        .replace(
            "[[ports]]\nname = \"p1\"\ndevice = \"net_ring1\"\nforward_to = \"p0\"\n",
            "",
        )
        .replace("[traffic]\nport = \"p1\"\n", "");
    let e = err(&t);
    assert_eq!(e.key, "ports", "{e}");
    assert!(e.message.contains("at least one port"), "{e}");
}

#[test]
fn duplicate_service() {
    // Same vip, port and protocol under another name.
    let t = edit(
        "vip = \"2001:db8::53\"\nport = 53\nprotocol = \"udp\"",
        "vip = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"",
    )
    .replace("address = \"2001:db8:1::1\"", "address = \"10.0.1.1\"");
    let e = err(&t);
    assert_eq!(e.key, "services[1].vip", "{e}");
    assert!(e.message.contains("already served by services[0]"), "{e}");
    assert_eq!(e.line, nth_line_of(&t, "vip = \"192.0.2.10\"", 1), "{e}");
    // Same name.
    let t = edit("name = \"dns6\"", "name = \"web\"");
    let e = err(&t);
    assert_eq!(e.key, "services[1].name", "{e}");
    assert!(e.message.contains("already used by services[0]"), "{e}");
    assert_eq!(e.line, nth_line_of(&t, "name = \"web\"", 1), "{e}");
}

#[test]
fn duplicate_backend_name() {
    let t = edit("name = \"be2\"", "name = \"be1\"");
    let e = err(&t);
    assert_eq!(e.key, "services[0].backends[1].name", "{e}");
    assert!(e.message.contains("appears twice"), "{e}");
    assert_eq!(e.line, nth_line_of(&t, "name = \"be1\"", 1), "{e}");
}

#[test]
fn l2_without_mac() {
    let t = edit("mac = \"02:00:00:00:01:01\"\n", "");
    let e = err(&t);
    assert_eq!(e.key, "services[1].backends[0].mac", "{e}");
    assert!(e.message.contains("needs the backend's mac"), "{e}");
    // A missing key is reported at its table's [[header]].
    assert_eq!(e.line, line_of(&t, "name = \"ns1\"") - 1, "{e}");
}

#[test]
fn ipip_backends_without_mac_need_the_forwarding_ports_gateway() {
    // p1 forwards out of p0: the gateway is p0's, not the receiving port's.
    let t = edit(
        "gateway_mac = \"02:00:00:00:00:fe\"\n\n[[ports]]\nname = \"p1\"\n",
        "\n[[ports]]\nname = \"p1\"\ngateway_mac = \"02:00:00:00:00:fe\"\n",
    );
    let e = err(&t);
    assert_eq!(e.key, "ports[0].gateway_mac", "{e}");
    for part in [
        "port \"p0\" has no gateway_mac",
        "backend \"be1\"",
        "\"web\"",
    ] {
        assert!(e.message.contains(part), "{part}: {e}");
    }
    // Backends with MACs of their own need no gateway.
    Config::parse(&with_backend_macs(&t), "t.toml").unwrap();
    // Nor do l2 services: their backends all have one.
    let t = edit("forwarding = \"ipip\"", "forwarding = \"l2\"")
        .replace("gateway_mac = \"02:00:00:00:00:fe\"\n", "")
        .replace("ipip_source = \"198.51.100.1\"\n", "");
    Config::parse(&with_backend_macs(&t), "t.toml").unwrap();
}

#[test]
fn ipv6_in_ipv6_needs_a_link_of_1320() {
    let v6 = edit(
        "forwarding = \"l2\"",
        "forwarding = \"ipip\"\nipip_source = \"2001:db8::1\"",
    );
    Config::parse(&v6, "t.toml").unwrap();
    let t = v6.replace(
        "device = \"net_ring0\"\n",
        "device = \"net_ring0\"\nmtu = 1319\n",
    );
    let e = err(&t);
    assert_eq!(e.key, "ports[0].mtu", "{e}");
    assert!(e.message.contains("at least 1320"), "{e}");
    assert!(e.message.contains("\"dns6\""), "{e}");
    Config::parse(&t.replace("mtu = 1319", "mtu = 1320"), "t.toml").unwrap();
    // IPv4 in IPv4 and l2 take the whole range.
    Config::parse(
        &BASE.replace(
            "device = \"net_ring0\"\n",
            "device = \"net_ring0\"\nmtu = 1280\n",
        ),
        "t.toml",
    )
    .unwrap();
}

#[test]
fn macs_and_addresses_name_one_station() {
    for (from, to, key, part) in [
        (
            "gateway_mac = \"02:00:00:00:00:fe\"",
            "gateway_mac = \"ff:ff:ff:ff:ff:ff\"",
            "ports[0].gateway_mac",
            "group",
        ),
        (
            "gateway_mac = \"02:00:00:00:00:fe\"",
            "gateway_mac = \"00:00:00:00:00:00\"",
            "ports[0].gateway_mac",
            "not a station",
        ),
        (
            "mac = \"02:00:00:00:01:01\"",
            "mac = \"01:00:5e:00:00:01\"",
            "services[1].backends[0].mac",
            "group",
        ),
        (
            "vip = \"192.0.2.10\"",
            "vip = \"0.0.0.0\"",
            "services[0].vip",
            "not the address of one host",
        ),
        (
            "ipip_source = \"198.51.100.1\"",
            "ipip_source = \"255.255.255.255\"",
            "services[0].ipip_source",
            "not the address of one host",
        ),
        (
            "address = \"10.0.0.2\"",
            "address = \"224.0.0.1\"",
            "services[0].backends[1].address",
            "not the address of one host",
        ),
        (
            "address = \"2001:db8:1::1\"",
            "address = \"ff02::1\"",
            "services[1].backends[0].address",
            "not the address of one host",
        ),
    ] {
        let t = edit(from, to);
        let e = err(&t);
        assert_eq!(e.key, key, "{to}: {e}");
        assert!(e.message.contains(part), "{to}: {e}");
    }
}

#[test]
fn ipip_without_source() {
    let t = edit("ipip_source = \"198.51.100.1\"\n", "");
    let e = err(&t);
    assert_eq!(e.key, "services[0].ipip_source", "{e}");
    assert!(e.message.contains("needs ipip_source"), "{e}");
    assert_eq!(e.line, line_of(&t, "name = \"web\"") - 1, "{e}");
    let t = edit(
        "ipip_source = \"198.51.100.1\"",
        "ipip_source = \"2001:db8::1\"",
    );
    check(
        &t,
        "services[0].ipip_source",
        "ipip_source",
        "IPv6 but the service vip is IPv4",
    );
    let t = edit("forwarding = \"ipip\"", "forwarding = \"l2\"");
    check(
        &t,
        "services[0].ipip_source",
        "ipip_source",
        "is for forwarding = \"ipip\"",
    );
}

#[test]
fn maglev_size_not_prime_or_too_small() {
    let t = edit(
        "forwarding = \"ipip\"",
        "forwarding = \"ipip\"\nmaglev_table_size = 1000",
    );
    check(
        &t,
        "services[0].maglev_table_size",
        "maglev_table_size",
        "not a prime",
    );
    let t = edit(
        "forwarding = \"ipip\"",
        "forwarding = \"ipip\"\nmaglev_table_size = 197",
    );
    check(
        &t,
        "services[0].maglev_table_size",
        "maglev_table_size",
        "below 100 x 2 backends",
    );
    let t = edit(
        "forwarding = \"ipip\"",
        "forwarding = \"ipip\"\nmaglev_table_size = 211",
    );
    assert_eq!(
        Config::parse(&t, "t.toml").unwrap().services[0].maglev_size(),
        211
    );
    // A huge prime is refused before its primality is tried (which would
    // take minutes) or its table allocated.
    let t = edit(
        "forwarding = \"ipip\"",
        "forwarding = \"ipip\"\nmaglev_table_size = 9223372036854775783",
    );
    check(
        &t,
        "services[0].maglev_table_size",
        "maglev_table_size",
        "above the largest table, 16777216",
    );
}

/// Durations the data path keeps in milliseconds are bounded, so that none
/// wraps into a short one.
#[test]
fn affinity_durations_are_bounded() {
    let t = edit(
        "forwarding = \"ipip\"",
        "forwarding = \"ipip\"\nmax_affinity_duration = \"366d\"",
    );
    check(
        &t,
        "services[0].max_affinity_duration",
        "max_affinity_duration",
        "must be at most 365d",
    );
    let t = edit(
        "forwarding = \"ipip\"",
        "forwarding = \"ipip\"\nmax_affinity_duration = \"365d\"",
    );
    Config::parse(&t, "t.toml").unwrap();
    let t = edit("linger = \"30s\"", "linger = \"2d\"");
    check(
        &t,
        "services[1].auto_affinity.linger",
        "linger",
        "the linger must be at most 1d",
    );
}

#[test]
fn static_affinity_errors() {
    let t = edit("service = \"web\"", "service = \"mail\"");
    check(
        &t,
        "affinities[0].service",
        "service = \"mail\"",
        "no service named",
    );
    let t = edit("backend = \"be2\"", "backend = \"be7\"");
    check(
        &t,
        "affinities[0].backend",
        "backend = \"be7\"",
        "no backend named",
    );
    let t = edit("client = \"203.0.113.0/24\"", "client = \"203.0.113.0/40\"");
    check(&t, "affinities[0].client", "client = ", "prefix length");
    let t = edit("client = \"203.0.113.0/24\"", "client = \"203.0.113.9/24\"");
    check(
        &t,
        "affinities[0].client",
        "client = ",
        "did you mean \"203.0.113.0/24\"",
    );
    let t = edit("client = \"203.0.113.0/24\"", "client = \"2001:db8::/64\"");
    check(
        &t,
        "affinities[0].client",
        "client = ",
        "is IPv6 but the service vip is IPv4",
    );
    let t = edit("client_port = \"1000-2000\"", "client_port = \"2000-1000\"");
    check(
        &t,
        "affinities[0].client_port",
        "client_port",
        "2000 > 1000",
    );
    let t = edit("client_port = \"1000-2000\"", "client_port = 443");
    assert_eq!(
        Config::parse(&t, "t.toml").unwrap().affinities[0].client_port,
        PortMatch::One(443)
    );
}

/// Two static affinities of one client and the same ports, however the
/// ports are spelled, are refused where the second is declared.
#[test]
fn static_affinities_of_the_same_key_are_refused() {
    for (first, second) in [
        ("\"443\"", "\"443-443\""),
        ("\"any\"", "\"0-65535\""),
        ("\"1000-2000\"", "\"1000-2000\""),
    ] {
        let t = edit(
            "client_port = \"1000-2000\"",
            &format!("client_port = {first}"),
        ) + &format!(
            "\n[[affinities]]\nservice = \"web\"\nclient = \"203.0.113.0/24\"\nclient_port = {second}\nbackend = \"be1\"\n"
        );
        let e = err(&t);
        assert_eq!(e.key, "affinities[1].client", "{first} {second}: {e}");
        assert!(e.message.contains("already pinned by affinities[0]"), "{e}");
    }
    // Other ports of the same client are another key.
    let t = BASE.to_string()
        + "\n[[affinities]]\nservice = \"web\"\nclient = \"203.0.113.0/24\"\nclient_port = \"2001-3000\"\nbackend = \"be1\"\n";
    assert_eq!(Config::parse(&t, "t.toml").unwrap().affinities.len(), 2);
}

#[test]
fn unknown_key() {
    let t = edit(
        "syn_timeout = \"5s\"",
        "syn_timeout = \"5s\"\nsyn_timout = \"5s\"",
    );
    check(
        &t,
        "flow.syn_timout",
        "syn_timout",
        "unknown field `syn_timout`",
    );
    let t = edit("weight = 100", "weight = 100\ncolour = \"blue\"");
    check(
        &t,
        "services[0].backends[0].colour",
        "colour",
        "unknown field",
    );
    let t = format!("{}\n[extra]\na = 1\n", *BASE);
    let e = err(&t);
    assert!(e.message.contains("unknown field `extra`"), "{e}");
    assert_eq!(e.line, line_of(&t, "[extra]"), "{e}");
}

#[test]
fn bad_duration() {
    let t = edit("syn_timeout = \"5s\"", "syn_timeout = \"5 parsecs\"");
    check(&t, "flow.syn_timeout", "parsecs", "bad duration");
    let t = edit("linger = \"30s\"", "linger = \"30\"");
    check(
        &t,
        "services[1].auto_affinity.linger",
        "linger",
        "bad duration",
    );
}

#[test]
fn other_value_errors() {
    let t = edit("mac = \"02:00:00:00:01:01\"", "mac = \"02:00:00:00:01\"");
    check(
        &t,
        "services[1].backends[0].mac",
        "mac = \"02:00:00:00:01\"",
        "bad MAC address",
    );
    let t = edit(
        "admin = \"000102030405060708090a0b0c0d0e0f\"",
        "admin = \"0001\"",
    );
    check(&t, "control.keys.admin", "admin = ", "at least 16 bytes");
    let t = edit("protocol = \"tcp\"", "protocol = \"sctp\"");
    check(&t, "services[0].protocol", "sctp", "unknown variant");
    let t = edit("vip = \"192.0.2.10\"", "vip = \"192.0.2.300\"");
    check(&t, "services[0].vip", "192.0.2.300", "");
    let t = edit("[cores]\ncontrol = 0", "[cores]\ncontrol = 0\n\n[flow2]");
    let e = err(&t);
    assert!(e.line > 0, "{e}");
}

#[test]
fn flow_capacities() {
    // capacity_v6 absent: a quarter of capacity.
    let c = Config::parse(&BASE, "t.toml").unwrap();
    assert_eq!((c.flow.capacity, c.flow.v6_capacity()), (4096, 1024));
    let plan = c.plan();
    assert!(
        plan.contains("4096 IPv4 + 1024 IPv6 flows per worker"),
        "{plan}"
    );
    let t = edit("capacity = 4096\n", "capacity = 4096\ncapacity_v6 = 102\n");
    let c = Config::parse(&t, "t.toml").unwrap();
    assert_eq!(c.flow.v6_capacity(), 102);
    // The plan shows them as the table rounds them.
    assert!(
        c.plan().contains("4096 IPv4 + 104 IPv6 flows"),
        "{}",
        c.plan()
    );
    let t = edit("capacity = 4096\n", "capacity = 4096\ncapacity_v6 = 0\n");
    check(&t, "flow.capacity_v6", "capacity_v6 = 0", "must be in 1..=");
    let too_big = format!("capacity = 4096\ncapacity_v6 = {}\n", MAX_FLOW_CAPACITY + 1);
    let t = edit("capacity = 4096\n", &too_big);
    check(&t, "flow.capacity_v6", "capacity_v6 = ", "must be in 1..=");
    let t = edit("capacity = 4096\n", "capacity = 0\n");
    check(&t, "flow.capacity", "capacity = 0", "must be in 1..=");
}

#[test]
fn syntax_error_names_line() {
    let t = edit("port = 80", "port = = 80");
    let e = err(&t);
    assert_eq!(e.line, line_of(&t, "port = = 80"), "{e}");
}

#[test]
fn missing_file() {
    let e = Config::load("/nonexistent/pktdist.toml").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/nonexistent/pktdist.toml: cannot read"),
        "{e}"
    );
}

#[test]
fn shipped_configs_are_valid() {
    for f in [
        "config/demo.toml",
        "config/real-nic.toml",
        "config/testbed.toml",
        "perf/pktgen/pktdist-memif.toml",
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
        // The state file's directory is the package's, which a test
        // machine need not have.
        let text = std::fs::read_to_string(&path).unwrap().replace(
            "\"/var/lib/pktdist/",
            &format!("\"{}/", std::env::temp_dir().display()),
        );
        let c = Config::parse(&text, f).unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.services.is_empty());
        assert!(!c.plan().is_empty());
    }
    let demo =
        Config::load(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml"))
            .unwrap();
    assert_eq!(demo.ports[0].device, "net_ring0");
    assert!(demo.traffic.is_some());
    let weights: Vec<u32> = demo.services[0].backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, vec![100, 200, 300]);
    assert_eq!(demo.services[0].forwarding, Forwarding::Ipip);
    assert!(demo
        .services
        .iter()
        .any(|s| s.auto_affinity.is_some() && s.forwarding == Forwarding::L2));
}

#[test]
fn missing_top_level_parts_are_located_at_the_start() {
    // No [[services]]: the root table's line, like a missing top-level key.
    let t = BASE.split("\n[[services]]").next().unwrap().to_string();
    let e = err(&t);
    assert_eq!((e.line, e.column), (1, 1), "{e}");
    assert_eq!(e.key, "services", "{e}");
    assert!(e.message.contains("at least one service"), "{e}");
    assert!(e.to_string().starts_with("t.toml:1:1: services: "), "{e}");
    // A missing top-level section: the same place, and no key of another
    // section is blamed.
    let t = BASE.replace("[cores]\ncontrol = 0\nworkers = [1, 2]\n", "");
    let e = err(&t);
    assert_eq!((e.line, e.column, e.key.as_str()), (1, 1, ""), "{e}");
    assert_eq!(e.to_string(), "t.toml:1:1: missing field `cores`");
    // A missing key of a section at the very start: that section.
    let t = format!(
        "[cores]\nworkers = [1]\n{}",
        BASE.replace("[cores]\ncontrol = 0\nworkers = [1, 2]\n", "")
    );
    let e = err(&t);
    assert_eq!((e.line, e.key.as_str()), (1, "cores"), "{e}");
    assert!(e.message.contains("missing field `control`"), "{e}");
}

#[test]
fn stop_delay_defaults_to_none_and_is_bounded() {
    let delay = |v: &str| edit("[control]\n", &format!("[control]\nstop_delay = \"{v}\"\n"));
    let c = Config::parse(&BASE, "t.toml").unwrap();
    assert!(c.control.stop_delay.0.is_zero());
    assert!(c.plan().contains("stop delay none"), "{}", c.plan());
    let c = Config::parse(&delay("2s"), "t.toml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.control.stop_delay.0, Duration::from_secs(2));
    assert!(c.plan().contains("stop delay 2s"), "{}", c.plan());
    // The bound itself is accepted.
    let c = Config::parse(&delay("5m"), "t.toml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.control.stop_delay.0, MAX_STOP_DELAY);
    check(
        &delay("301s"),
        "control.stop_delay",
        "stop_delay",
        "301s: must be at most 5m",
    );
    check(
        &delay("soon"),
        "control.stop_delay",
        "stop_delay",
        "bad duration \"soon\"",
    );
}

#[test]
fn max_clock_skew_is_bounded() {
    let skew = |v: &str| {
        edit(
            "[control]\n",
            &format!("[control]\nmax_clock_skew = \"{v}\"\n"),
        )
    };
    // The bound itself is accepted.
    let c = Config::parse(&skew("10m"), "t.toml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.control.max_clock_skew.0, MAX_CLOCK_SKEW);
    check(
        &skew("601s"),
        "control.max_clock_skew",
        "max_clock_skew",
        "601s: must be at most 10m",
    );
    // The most seconds a Duration holds: a skew that large would switch
    // the replay window's stale-timestamp check off.
    check(
        &skew("18446744073709551615s"),
        "control.max_clock_skew",
        "max_clock_skew",
        "must be at most 10m",
    );
    check(
        &skew("0s"),
        "control.max_clock_skew",
        "max_clock_skew",
        "must be longer than 0",
    );
}

#[test]
fn syn_flood_rate_is_a_count_per_second_or_off() {
    assert_eq!(
        Config::parse(&BASE, "t.toml").unwrap().flow.syn_flood_rate,
        crate::datapath::syn_guard::DEFAULT_RATE
    );
    for (v, want) in [("0", 0), ("250000", 250_000), ("4294967295", u32::MAX)] {
        let t = edit(
            "syn_timeout = \"5s\"\n",
            &format!("syn_timeout = \"5s\"\nsyn_flood_rate = {v}\n"),
        );
        let c = Config::parse(&t, "t.toml").unwrap_or_else(|e| panic!("{v}: {e}"));
        assert_eq!(c.flow.syn_flood_rate, want);
    }
    for (v, msg) in [
        ("-1", "invalid value"),
        ("1.5", "invalid type"),
        ("4294967296", "invalid value"),
    ] {
        let t = edit(
            "syn_timeout = \"5s\"\n",
            &format!("syn_timeout = \"5s\"\nsyn_flood_rate = {v}\n"),
        );
        check(&t, "flow.syn_flood_rate", "syn_flood_rate", msg);
    }
}

#[test]
fn flow_timeouts_are_bounded() {
    for key in [
        "syn_timeout",
        "established_timeout",
        "fin_timeout",
        "udp_timeout",
    ] {
        // BASE sets syn_timeout; the others are added beside it.
        let set = |v: &str| {
            let line = format!("{key} = \"{v}\"\n");
            if key == "syn_timeout" {
                edit("syn_timeout = \"5s\"\n", &line)
            } else {
                edit(
                    "syn_timeout = \"5s\"\n",
                    &format!("syn_timeout = \"5s\"\n{line}"),
                )
            }
        };
        let c = Config::parse(&set("1d"), "t.toml").unwrap_or_else(|e| panic!("{e}"));
        let t = c.flow_timeouts();
        let got = match key {
            "syn_timeout" => t.syn,
            "established_timeout" => t.established,
            "fin_timeout" => t.fin,
            _ => t.udp,
        };
        assert_eq!(got, MAX_FLOW_TIMEOUT, "{key}");
        let path = format!("flow.{key}");
        check(
            &set("24h1s"),
            &path,
            key,
            "86401s: a timeout must be at most 1d",
        );
        check(&set("365d"), &path, key, "must be at most 1d");
        check(&set("0s"), &path, key, "must be longer than 0");
    }
}

#[test]
fn duration_overflow_has_its_own_message() {
    for v in [
        // One second more than a Duration holds.
        "18446744073709551616s",
        // More days than a Duration holds.
        "213503982334602d",
        // More nanoseconds than the parser's sum holds.
        "99999999999999999999999999999999999999d",
        // A number too long to hold at all.
        "99999999999999999999999999999999999999999s",
    ] {
        let t = edit("syn_timeout = \"5s\"", &format!("syn_timeout = \"{v}\""));
        let e = err(&t);
        assert_eq!(e.key, "flow.syn_timeout", "{e}");
        assert_eq!(e.line, line_of(&t, "syn_timeout"), "{e}");
        assert!(e.message.contains("too large"), "{v}: {e}");
        assert!(!e.message.contains("expected a number"), "{v}: {e}");
    }
    // A malformed duration keeps its own message.
    let t = edit("syn_timeout = \"5s\"", "syn_timeout = \"5 s\"");
    let e = err(&t);
    assert!(e.message.contains("expected a number with a unit"), "{e}");
}

#[test]
fn metrics_listen_may_share_port_zero_with_listen() {
    let t = edit(
        "listen = \"127.0.0.1:7400\"",
        "listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"",
    );
    assert!(Config::parse(&t, "t.toml").is_ok());
    let t = edit(
        "listen = \"127.0.0.1:7400\"",
        "listen = \"127.0.0.1:7400\"\nmetrics_listen = \"127.0.0.1:7400\"",
    );
    check(
        &t,
        "control.metrics_listen",
        "metrics_listen",
        "same address as listen",
    );
}

#[test]
fn port_mtu_defaults_and_range() {
    let c = Config::parse(&BASE, "t.toml").unwrap();
    assert_eq!(c.ports[0].mtu, DEFAULT_MTU);
    assert!(c.plan().contains("mtu 1500"), "{}", c.plan());
    let t = edit(
        "device = \"net_ring1\"",
        "device = \"net_ring1\"\nmtu = 9000",
    );
    assert_eq!(Config::parse(&t, "t.toml").unwrap().ports[1].mtu, 9000);
    for bad in ["1279", "9217"] {
        let t = edit(
            "device = \"net_ring1\"",
            &format!("device = \"net_ring1\"\nmtu = {bad}"),
        );
        check(
            &t,
            "ports[1].mtu",
            &format!("mtu = {bad}"),
            "out of range 1280..=9216",
        );
    }
    // Not a number: a type error on the same line.
    let t = edit(
        "device = \"net_ring0\"",
        "device = \"net_ring0\"\nmtu = \"big\"",
    );
    let e = err(&t);
    assert_eq!(
        (e.key.as_str(), e.line),
        ("ports[0].mtu", line_of(&t, "mtu = \"big\""))
    );
}

#[test]
fn icmp_section_defaults_and_settings() {
    use crate::datapath::icmp::EchoPolicy;
    use crate::types::Family;
    let c = Config::parse(&BASE, "t.toml").unwrap();
    assert_eq!(c.icmp, IcmpConfig::default());
    let s = c.icmp_settings();
    assert_eq!(s.echo, EchoPolicy::Off);
    assert_eq!(
        (s.echo_rate, s.too_big_rate),
        (DEFAULT_ECHO_RATE, DEFAULT_TOO_BIG_RATE)
    );
    assert!(c.plan().contains("echo not answered"), "{}", c.plan());

    let t = format!(
        "{}\n[icmp]\necho = true\necho_rate = 50\ntoo_big_rate = 0\n",
        *BASE
    );
    let c = Config::parse(&t, "t.toml").unwrap();
    let s = c.icmp_settings();
    assert_eq!(s.echo, EchoPolicy::All);
    assert_eq!((s.echo_rate, s.too_big_rate), (50, 0));
    assert!(c.plan().contains("too-big answers off"), "{}", c.plan());

    let t = format!(
        "{}\n[icmp]\necho_vips = [\"2001:db8::53\", \"192.0.2.10\"]\n",
        *BASE
    );
    let s = Config::parse(&t, "t.toml").unwrap().icmp_settings();
    assert_eq!(
        s.echo,
        EchoPolicy::Only(vec![
            (Family::V6, 0x2001_0db8_0000_0000_0000_0000_0000_0053),
            (Family::V4, 0xc000_020a),
        ])
    );
    assert!(s.echo.answers(Family::V4, 0xc000_020a));
    assert!(!s.echo.answers(Family::V4, 0xc000_020b));
}

#[test]
fn icmp_section_errors_name_key_and_line() {
    let with = |icmp: &str| format!("{}\n[icmp]\n{icmp}\n", *BASE);
    let t = with("echo_vips = [\"192.0.2.10\", \"192.0.2.99\"]");
    check(
        &t,
        "icmp.echo_vips[1]",
        "echo_vips",
        "192.0.2.99 is not the vip of any service",
    );
    let t = with("echo_vips = [\"192.0.2.10\", \"192.0.2.10\"]");
    check(&t, "icmp.echo_vips[1]", "echo_vips", "listed twice");
    let t = with("echo = true\necho_vips = [\"192.0.2.10\"]");
    check(
        &t,
        "icmp.echo_vips",
        "echo_vips",
        "already answers every VIP",
    );
    let t = with("echo = true\necho_rate = 0");
    check(
        &t,
        "icmp.echo_rate",
        "echo_rate = 0",
        "must be in 1..=1000000",
    );
    let t = with("too_big_rate = 2000000");
    check(
        &t,
        "icmp.too_big_rate",
        "too_big_rate",
        "must be in 0..=1000000",
    );
    let t = with("echo = \"yes\"");
    let e = err(&t);
    assert_eq!(
        (e.key.as_str(), e.line),
        ("icmp.echo", line_of(&t, "echo = \"yes\""))
    );
    let t = with("ping = true");
    let e = err(&t);
    assert!(e.message.contains("unknown field"), "{e}");
    assert_eq!(e.line, line_of(&t, "ping = true"), "{e}");
}

#[test]
fn affinity_limits_default_and_settings() {
    let c = Config::parse(&BASE, "t.toml").unwrap();
    let web = c.services[0].affinity_limits();
    assert_eq!((web.min_prefix.ipv4, web.min_prefix.ipv6), (16, 48));
    assert_eq!(web.max_per_backend, None);
    assert_eq!(web.overlap, OverlapPolicy::Refuse);
    assert_eq!(
        (
            c.control.max_requests_per_second,
            c.control.admin_max_requests_per_second
        ),
        (20_000, 50_000)
    );
    let t = edit(
        "ipip_source = \"198.51.100.1\"\n",
        "ipip_source = \"198.51.100.1\"\nmin_prefix = { ipv4 = 24 }\n\
         max_affinities_per_backend = 100\naffinity_overlap = \"allow\"\n",
    )
    .replace(
        "[control]\n",
        "[control]\nmax_requests_per_second = 0\nadmin_max_requests_per_second = 10000000\n",
    );
    let c = Config::parse(&t, "t.toml").unwrap_or_else(|e| panic!("{e}"));
    let web = c.services[0].affinity_limits();
    assert_eq!((web.min_prefix.ipv4, web.min_prefix.ipv6), (24, 48));
    assert_eq!(web.max_per_backend, Some(100));
    assert_eq!(web.overlap, OverlapPolicy::Allow);
    assert_eq!(c.control.rate_limits().per_sender, 0);
    assert_eq!(c.control.rate_limits().admin, MAX_REQUEST_RATE);
    let plan = c.plan();
    assert!(
        plan.contains(
            "backends may pin /24 or longer, at most 100 affinities each, overlaps allowed"
        ),
        "{plan}"
    );
    assert!(
        plan.contains("requests per second per sender unlimited (admin 10000000)"),
        "{plan}"
    );
    // The default quota in the plan: 2 x 1048576 / 2 backends.
    let plan = Config::parse(&BASE, "t.toml").unwrap().plan();
    assert!(
        plan.contains("at most 1048576 affinities each (twice an even share of the table)"),
        "{plan}"
    );
}

#[test]
fn affinity_limit_errors_name_key_and_line() {
    let svc = |keys: &str| {
        edit(
            "ipip_source = \"198.51.100.1\"\n",
            &format!("ipip_source = \"198.51.100.1\"\n{keys}\n"),
        )
    };
    check(
        &svc("min_prefix = { ipv4 = 33 }"),
        "services[0].min_prefix.ipv4",
        "min_prefix",
        "/33 is longer than an address (0..=32)",
    );
    check(
        &svc("min_prefix = { ipv6 = 129 }"),
        "services[0].min_prefix.ipv6",
        "min_prefix",
        "0..=128",
    );
    let e = err(&svc("min_prefix = { ipv5 = 8 }"));
    assert!(e.message.contains("unknown field"), "{e}");
    check(
        &svc("max_affinities_per_backend = 0"),
        "services[0].max_affinities_per_backend",
        "max_affinities_per_backend",
        "must be at least 1",
    );
    let t = svc("affinity_overlap = \"sometimes\"");
    let e = err(&t);
    assert_eq!(
        (e.key.as_str(), e.line),
        (
            "services[0].affinity_overlap",
            line_of(&t, "affinity_overlap")
        ),
        "{e}"
    );
    assert!(
        e.message.contains("refuse") && e.message.contains("allow"),
        "{e}"
    );
    check(
        &edit(
            "[control]\n",
            "[control]\nmax_requests_per_second = 10000001\n",
        ),
        "control.max_requests_per_second",
        "max_requests_per_second",
        "out of range 0..=10000000 (0: no limit)",
    );
    check(
        &edit(
            "[control]\n",
            "[control]\nadmin_max_requests_per_second = 20000000\n",
        ),
        "control.admin_max_requests_per_second",
        "admin_max_requests_per_second",
        "out of range",
    );
}

#[test]
fn affinity_grace_defaults_to_30s_and_is_at_most_a_day() {
    let c = Config::parse(&BASE, "t.toml").unwrap();
    assert!(c
        .services
        .iter()
        .all(|s| s.affinity_grace.0 == Duration::from_secs(30)));
    let set = |v: &str| {
        edit(
            "[[services.backends]]\nname = \"be1\"",
            &format!("affinity_grace = \"{v}\"\n[[services.backends]]\nname = \"be1\""),
        )
    };
    let c = Config::parse(&set("0s"), "t.toml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.services[0].affinity_grace.0, Duration::ZERO, "0: at once");
    let c = Config::parse(&set("1d"), "t.toml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.services[0].affinity_grace.0, MAX_AFFINITY_GRACE);
    check(
        &set("1d1s"),
        "services[0].affinity_grace",
        "affinity_grace",
        "the grace must be at most 1d",
    );
}

/// BASE with `health` on web, written as `line`.
fn with_health(line: &str) -> String {
    edit(
        "[[services.backends]]\nname = \"be1\"",
        &format!("{line}\n\n[[services.backends]]\nname = \"be1\""),
    )
}

#[test]
fn health_checks_are_parsed_with_their_defaults() {
    let t = with_health("health = { kind = \"http\", path = \"/healthz\", expect = \"200,204\" }");
    let t = t.replacen(
        "address = \"10.0.0.2\"",
        "address = \"10.0.0.2\"\nhealth_address = \"192.168.0.2\"",
        1,
    );
    let c = Config::parse(&t, "t.toml").unwrap();
    let h = c.services[0].health.as_ref().unwrap();
    assert_eq!(h.kind, HealthKind::Http);
    assert_eq!((h.port_for(80), h.rise, h.fall), (80, 2, 3));
    assert_eq!(
        (h.interval.0, h.timeout()),
        (
            std::time::Duration::from_secs(2),
            std::time::Duration::from_secs(1)
        )
    );
    assert!(h.http_expect().contains(204) && !h.http_expect().contains(201));
    let b = &c.services[0].backends;
    assert_eq!(b[0].health_address(), b[0].address);
    assert_eq!(
        b[1].health_address(),
        "192.168.0.2".parse::<IpAddr>().unwrap()
    );
    let plan = c.plan();
    assert!(
        plan.contains("health: http port 80 every 2s (timeout 1s), down after 3 failed, up after 2 passed, GET /healthz expecting 200,204"),
        "{plan}"
    );
    assert!(plan.contains("checked at 192.168.0.2"), "{plan}");
    assert!(Config::parse(&BASE, "t.toml").unwrap().services[0]
        .health
        .is_none());
}

#[test]
fn bad_health_settings_name_key_and_line() {
    let h = "health = { kind = \"tcp\", ";
    for (line, key, msg) in [
        (format!("{h}rise = 0 }}"), "rise", "must be in 1..=100"),
        (format!("{h}fall = 0 }}"), "fall", "must be in 1..=100"),
        (
            format!("{h}interval = \"1s\", timeout = \"1s\" }}"),
            "timeout",
            "the timeout must be below the interval",
        ),
        (
            format!("{h}interval = \"100ms\", timeout = \"1s\" }}"),
            "timeout",
            "1s: the timeout must be below the interval (100ms)",
        ),
        (
            format!("{h}interval = \"2s\", timeout = \"5s\" }}"),
            "timeout",
            "the timeout must be below the interval",
        ),
        (
            format!("{h}timeout = \"0s\" }}"),
            "timeout",
            "longer than 0",
        ),
        (
            format!("{h}interval = \"10ms\" }}"),
            "interval",
            "must be in 100ms..=1h",
        ),
        (
            format!("{h}port = 0 }}"),
            "port",
            "port 0 cannot be checked",
        ),
        (
            format!("{h}path = \"/x\" }}"),
            "path",
            "a setting of http checks, and this check is tcp",
        ),
        (
            format!("{h}expect = \"200\" }}"),
            "expect",
            "a setting of http checks",
        ),
        (
            format!("{h}host = \"x\" }}"),
            "host",
            "a setting of http checks",
        ),
        (
            "health = { kind = \"http\", path = \"healthz\" }".to_string(),
            "path",
            "a path starts with '/'",
        ),
        (
            "health = { kind = \"http\", host = \"a b\" }".to_string(),
            "host",
            "no spaces",
        ),
    ] {
        let t = with_health(&line);
        check(&t, &format!("services[0].health.{key}"), "health = {", msg);
    }
    // Errors of the value itself come from the parser, still located.
    for (line, msg) in [
        (
            "health = { kind = \"http\", expect = \"399-200\" }",
            "bad status range \"399-200\"",
        ),
        (
            "health = { kind = \"http\", expect = \"2xx\" }",
            "bad status range",
        ),
        ("health = { kind = \"udp\" }", "unknown variant"),
        ("health = { kind = \"tcp\", port = 70000 }", "70000"),
        ("health = { kind = \"tcp\", rise = 2, oops = 1 }", "oops"),
    ] {
        let t = with_health(line);
        let e = err(&t);
        assert_eq!(e.line, line_of(&t, "health = {"), "{e}");
        assert!(e.column > 1, "{e}");
        assert!(e.to_string().contains(msg), "{line}: {e}");
    }
    // A UDP service's check needs its TCP port.
    let t = BASE.replace(
        "auto_affinity = { linger = \"30s\" }",
        "auto_affinity = { linger = \"30s\" }\nhealth = { kind = \"tcp\" }",
    );
    check(&t, "services[1].health.port", "health = {", "needs a port");
    let ok = t.replace(
        "health = { kind = \"tcp\" }",
        "health = { kind = \"tcp\", port = 53 }",
    );
    assert!(Config::parse(&ok, "t.toml").is_ok());
}

#[test]
fn a_health_timeout_left_out_follows_a_short_interval() {
    let timeout = |h: &str| {
        let c = Config::parse(&with_health(h), "t.toml").unwrap();
        c.services[0].health.as_ref().unwrap().timeout()
    };
    let ms = std::time::Duration::from_millis;
    // 1 s, or half the interval below 2 s: any interval alone is valid.
    assert_eq!(timeout("health = { kind = \"tcp\" }"), ms(1000));
    assert_eq!(
        timeout("health = { kind = \"tcp\", interval = \"1s\" }"),
        ms(500)
    );
    assert_eq!(
        timeout("health = { kind = \"tcp\", interval = \"100ms\" }"),
        ms(50)
    );
    assert_eq!(
        timeout("health = { kind = \"tcp\", interval = \"1s\", timeout = \"900ms\" }"),
        ms(900)
    );
    let plan = Config::parse(
        &with_health("health = { kind = \"tcp\", interval = \"1s\" }"),
        "t.toml",
    )
    .unwrap()
    .plan();
    assert!(plan.contains("every 1s (timeout 500ms)"), "{plan}");
}

#[test]
fn all_unhealthy_spreads_by_default_and_may_drop() {
    let c = Config::parse(&with_health("health = { kind = \"tcp\" }"), "t.toml").unwrap();
    assert_eq!(c.services[0].all_unhealthy, AllUnhealthy::Spread);
    assert!(
        c.plan()
            .contains("; all failing: new connections spread over them all"),
        "{}",
        c.plan()
    );
    let t = with_health("health = { kind = \"tcp\" }\nall_unhealthy = \"drop\"");
    let c = Config::parse(&t, "t.toml").unwrap();
    assert_eq!(c.services[0].all_unhealthy, AllUnhealthy::Drop);
    assert!(c.plan().contains("; all failing: new connections dropped"));
    let t = with_health("all_unhealthy = \"sometimes\"");
    let e = err(&t);
    assert!(e.to_string().contains("all_unhealthy"), "{e}");
    assert_eq!(e.line, line_of(&t, "all_unhealthy"), "{e}");
}

#[test]
fn a_health_address_is_one_hosts_and_said_unused_without_checks() {
    let with_address = |t: &str, a: &str| {
        t.replacen(
            "address = \"10.0.0.1\"",
            &format!("address = \"10.0.0.1\"\nhealth_address = \"{a}\""),
            1,
        )
    };
    let checked = with_health("health = { kind = \"tcp\" }");
    for bad in ["0.0.0.0", "224.0.0.1", "255.255.255.255", "::"] {
        let e = err(&with_address(&checked, bad));
        assert!(e.to_string().contains("health_address"), "{bad}: {e}");
        assert!(
            e.to_string().contains("not the address of one host"),
            "{bad}: {e}"
        );
    }
    let plan = Config::parse(&with_address(&checked, "192.168.0.1"), "t.toml")
        .unwrap()
        .plan();
    assert!(plan.contains(", checked at 192.168.0.1"), "{plan}");
    let plan = Config::parse(&with_address(&BASE, "192.168.0.1"), "t.toml")
        .unwrap()
        .plan();
    assert!(
        plan.contains(", health_address 192.168.0.1 unused (the service has no health key)"),
        "{plan}"
    );
}

#[test]
fn affinity_state_file_needs_an_existing_directory() {
    let with = |path: &str| {
        edit(
            "[control]\n",
            &format!("[affinity]\nstate_file = \"{path}\"\n\n[control]\n"),
        )
    };
    let dir = std::env::temp_dir();
    let good = dir.join("pktdist-config-test.state");
    let cfg = Config::parse(&with(good.to_str().unwrap()), "t.toml").unwrap();
    assert_eq!(cfg.affinity.state_file.as_deref(), Some(good.as_path()));
    assert!(cfg.plan().contains("state file"), "{}", cfg.plan());
    assert_eq!(
        Config::parse(&BASE, "t.toml").unwrap().affinity.state_file,
        None
    );
    check(
        &with("/no/such/dir/affinities.state"),
        "affinity.state_file",
        "state_file",
        "does not exist",
    );
    check(
        &with(dir.to_str().unwrap()),
        "affinity.state_file",
        "state_file",
        "is a directory",
    );
}

#[test]
fn cluster_section_is_checked_key_by_key() {
    let good = "[cluster]\nstore = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\", \"http://10.0.0.2:2379\"]\ninstance = \"lb-1.dc_a\"\n";
    let cfg = Config::parse(&format!("{}{good}", *BASE), "t.toml").unwrap();
    let c = cfg.cluster.as_ref().unwrap();
    assert_eq!((c.prefix.as_str(), c.timeout.0.as_secs()), ("/pktdist", 2));
    assert!(Config::parse(&BASE, "t.toml").unwrap().cluster.is_none());
    assert!(
        cfg.plan().contains(
            "cluster: instance lb-1.dc_a, affinities shared through etcd at \
             http://127.0.0.1:2379 http://10.0.0.2:2379 under /pktdist, without \
             authentication, requests time out after 2s"
        ),
        "{}",
        cfg.plan()
    );
    assert!(!Config::parse(&BASE, "t.toml")
        .unwrap()
        .plan()
        .contains("cluster:"));
    let with = |from: &str, to: &str| {
        assert_eq!(good.matches(from).count(), 1, "{from:?}");
        format!("{}{}", *BASE, good.replace(from, to))
    };
    let readable = std::env::temp_dir().join("pktdist-config-cluster-password");
    std::fs::write(&readable, "secret\n").unwrap();
    let readable = readable.display().to_string();
    for (text, key, needle, msg) in [
        (
            with("store = \"etcd\"", "store = \"consul\""),
            "",
            "consul",
            "unknown variant",
        ),
        (
            with(
                "[\"http://127.0.0.1:2379\", \"http://10.0.0.2:2379\"]",
                "[]",
            ),
            "cluster.endpoints",
            "endpoints",
            "at least one",
        ),
        (
            with("\"http://10.0.0.2:2379\"", "\"10.0.0.2:2379\""),
            "cluster.endpoints[1]",
            "endpoints",
            "http:// or https://",
        ),
        (
            with("lb-1.dc_a", "lb 1"),
            "cluster.instance",
            "instance",
            "A-Z",
        ),
        (with("lb-1.dc_a", ""), "cluster.instance", "instance", "A-Z"),
        (
            with("lb-1.dc_a", &"i".repeat(65)),
            "cluster.instance",
            "instance",
            "instance name of 65 bytes: names are at most 64 bytes",
        ),
        (
            with("instance", "prefix = \"pktdist\"\ninstance"),
            "cluster.prefix",
            "prefix",
            "starts with /",
        ),
        (
            with(
                "instance",
                &format!("password_file = \"{readable}\"\ninstance"),
            ),
            "cluster.password_file",
            "password_file",
            "needs user",
        ),
        (
            with(
                "instance",
                "user = \"pktdist\"\npassword_file = \"/no/such/file\"\ninstance",
            ),
            "cluster.password_file",
            "password_file",
            "cannot be read",
        ),
        (
            with("instance", &format!("cert_file = \"{readable}\"\ninstance")),
            "cluster.cert_file",
            "cert_file",
            "go together",
        ),
        (
            with("instance", &format!("ca_file = \"{readable}\"\ninstance")),
            "cluster.ca_file",
            "ca_file",
            "https://",
        ),
        (
            with("instance", "timeout = \"50ms\"\ninstance"),
            "cluster.timeout",
            "timeout = \"50ms\"",
            "between 100ms and 1m",
        ),
        (
            with("instance", "timeout = \"2m\"\ninstance"),
            "cluster.timeout",
            "timeout = \"2m\"",
            "between",
        ),
    ] {
        if key.is_empty() {
            let e = err(&text);
            assert!(e.message.contains(msg), "{e}");
            assert_eq!(e.line, line_of(&text, needle), "{e}");
            continue;
        }
        check(&text, key, needle, msg);
    }
    // TLS files with https endpoints and a user with a readable password
    // file are accepted.
    let tls = with(
        "\"http://10.0.0.2:2379\"",
        "\"https://10.0.0.2:2379\"",
    )
    .replace(
        "instance",
        &format!(
            "user = \"u\"\npassword_file = \"{readable}\"\nca_file = \"{readable}\"\ncert_file = \"{readable}\"\nkey_file = \"{readable}\"\ninstance"
        ),
    );
    Config::parse(&tls, "t.toml").unwrap();

    // The store keeps the affinities: no state file beside it.
    let both = format!(
        "{}{good}",
        edit(
            "[control]\n",
            "[affinity]\nstate_file = \"/tmp/pktdist.state\"\n\n[control]\n"
        )
    );
    check(
        &both,
        "affinity.state_file",
        "state_file",
        "exclude each other",
    );
}

#[test]
fn hash_input_per_service() {
    let c = Config::parse(&BASE, "t.toml").unwrap();
    assert!(c.services.iter().all(|s| s.hash == HashInput::Connection));
    assert!(c.plan().contains("maglev (table"), "{}", c.plan());
    let t = edit(
        "forwarding = \"ipip\"",
        "forwarding = \"ipip\"\nhash = \"client\"",
    );
    let c = Config::parse(&t, "t.toml").unwrap();
    assert_eq!(c.services[0].hash, HashInput::Client);
    assert_eq!(c.services[1].hash, HashInput::Connection);
    assert!(c.plan().contains("on the client address"), "{}", c.plan());
    let t = edit(
        "forwarding = \"ipip\"",
        "forwarding = \"ipip\"\nhash = \"source\"",
    );
    check(&t, "services[0].hash", "hash = ", "unknown variant");
    // Round robin reads no hash: asking it to hash clients is refused.
    let t = edit(
        "forwarding = \"ipip\"",
        "forwarding = \"ipip\"\nscheduler = \"round_robin\"\nhash = \"client\"",
    );
    let e = err(&t);
    assert_eq!(e.key, "services[0].hash", "{e}");
    assert!(e.message.contains("needs scheduler = \"maglev\""), "{e}");
}

/// Service and backend names travel in control messages and cluster
/// records, which carry at most 64 bytes: longer ones are refused where
/// they are written, not skipped later by the other instances.
#[test]
fn names_longer_than_the_wire_carries_are_refused() {
    let long = "n".repeat(65);
    let service = BASE.replacen("name = \"web\"", &format!("name = \"{long}\""), 1);
    assert_ne!(service, *BASE);
    let service = service.replace("service = \"web\"", &format!("service = \"{long}\""));
    check(
        &service,
        "services[0].name",
        &long,
        "service name of 65 bytes: names are at most 64 bytes",
    );
    let backend = BASE.replace("\"be1\"", &format!("\"{long}\""));
    assert_ne!(backend, *BASE);
    check(
        &backend,
        "services[0].backends[0].name",
        &long,
        "backend name of 65 bytes: names are at most 64 bytes",
    );
    // 64 bytes are fine.
    let fits = "n".repeat(64);
    Config::parse(&BASE.replace("\"be1\"", &format!("\"{fits}\"")), "t.toml").unwrap();
}

/// A request signed as `admin` is the operator's: a backend of that name
/// could not be told apart from it.
#[test]
fn no_backend_is_named_admin() {
    let admin = BASE.replace("\"be1\"", "\"admin\"");
    assert_ne!(admin, *BASE);
    check(
        &admin,
        "services[0].backends[0].name",
        "\"admin\"",
        "the operator's name",
    );
}
