//! The affinity story end to end under real DPDK: the real `pktdist` binary
//! serves a `net_memif` port; this test process is the memif client (its
//! own EAL), injects TCP SYNs and reads back what pktdist forwarded, while
//! it drives affinities through the control protocol with the client
//! library, as a backend application and as the operator.
//!
//! Where a connection should "follow Maglev", the expected backend is
//! computed here from the same configuration with the project's Maglev
//! table: two instances built from one configuration must agree.
#![cfg(feature = "dpdk")]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::memif::{hosts, MemifPeer, Tuples};
use common::{
    backend_key_hex, base_config, ipip_service, port_toml, serial, unhex, web_service, TempDir,
    ADMIN_KEY,
};
use pktdist::client::library::{AffinitySpec, ClientError, ControlClient};
use pktdist::config::Config;
use pktdist::control::registry::ServiceRegistry;
use pktdist::datapath::snapshot::Dataplane;
use pktdist::protocol::message::{AffinityKey, ReturnCode, ServiceAddr};
use pktdist::types::EndReason;
use pktdist::types::{flow_hash, Family, FlowKey, PROTO_TCP};

const WEB: &str = "192.0.2.10:80";
const APP: &str = "192.0.2.20:8080";
const BE1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const BE2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const BE3: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
/// How long to wait for anything pktdist does (forwarding, replies).
const PATIENCE: Duration = Duration::from_secs(10);

fn services() -> String {
    [
        web_service(
            "max_affinity_duration = \"10m\"\n",
            &[
                ("be1", "10.0.0.1", None),
                ("be2", "10.0.0.2", None),
                ("be3", "10.0.0.3", None),
            ],
        ),
        ipip_service(
            "app",
            "192.0.2.20",
            8080,
            "tcp",
            "auto_affinity = { linger = \"5s\" }\n",
            &[
                ("a1", "10.0.1.1", None),
                ("a2", "10.0.1.2", None),
                ("a3", "10.0.1.3", None),
            ],
        ),
        "\n[[affinities]]\nservice = \"web\"\nclient = \"203.0.113.0/24\"\nbackend = \"be3\"\n"
            .into(),
    ]
    .concat()
}

/// A running pktdist on a memif port, this process on the other end, and
/// the registry the test computes Maglev's choices from.
struct Bed {
    peer: MemifPeer,
    registry: ServiceRegistry,
    dp: Dataplane,
    tuples: Tuples,
    _dir: TempDir,
}

impl Bed {
    fn start() -> Bed {
        let dir = TempDir::new("e2e-aff");
        let config = [base_config(&["be1", "be2", "be3"]), services()].concat();
        let cfg = Config::parse(&format!("{config}{}", port_toml("net_null0")), "test")
            .expect("test configuration is valid");
        let mut registry = ServiceRegistry::from_config(&cfg).expect("registry");
        let dp = registry.snapshot().expect("snapshot");
        let peer = MemifPeer::start(&dir.0, "pktdist", &config);
        Bed {
            peer,
            registry,
            dp,
            tuples: Tuples::default(),
            _dir: dir,
        }
    }

    fn admin(&self) -> ControlClient {
        ControlClient::new(self.peer.control, "admin", &unhex(ADMIN_KEY)).expect("admin client")
    }

    /// A backend application's client, on a socket of its own where its
    /// ended notifications arrive.
    fn backend_app(&self, name: &str) -> ControlClient {
        ControlClient::bind(
            "127.0.0.1:0".parse().expect("addr"),
            self.peer.control,
            name,
            &unhex(&backend_key_hex(name)),
        )
        .expect("backend client")
    }

    fn tuples(&mut self, clients: &[Ipv4Addr], per_client: usize) -> Vec<(Ipv4Addr, u16)> {
        self.tuples.next(clients, per_client)
    }

    fn connect(&mut self, service: &str, tuples: &[(Ipv4Addr, u16)]) -> Vec<Ipv4Addr> {
        self.peer.connect(service, tuples)
    }

    /// The backend Maglev picks for a new connection in snapshot `dp`.
    fn maglev_in(dp: &Dataplane, service: &str, (client, sport): (Ipv4Addr, u16)) -> Ipv4Addr {
        let svc_addr: SocketAddr = service.parse().expect("service");
        let IpAddr::V4(vip) = svc_addr.ip() else {
            panic!("IPv4 services only")
        };
        let key = FlowKey {
            src: u32::from(client) as u128,
            dst: u32::from(vip) as u128,
            sport,
            dport: svc_addr.port(),
            proto: PROTO_TCP,
            family: Family::V4,
        };
        let svc = dp.service_for(&key).expect("service in snapshot");
        let idx = svc.maglev.lookup(flow_hash(&key)).expect("maglev entry");
        match dp.backend(svc.backends[idx]).expect("backend").addr {
            IpAddr::V4(a) => a,
            IpAddr::V6(a) => panic!("IPv6 backend {a}"),
        }
    }

    fn maglev(&self, service: &str, tuples: &[(Ipv4Addr, u16)]) -> Vec<Ipv4Addr> {
        tuples
            .iter()
            .map(|&t| Bed::maglev_in(&self.dp, service, t))
            .collect()
    }

    /// Stops pktdist and checks it ended cleanly.
    fn finish(self) {
        self.peer.finish();
    }
}

fn spec(service: &str, client: &str, prefix: u8) -> AffinitySpec {
    AffinitySpec::new(
        AffinityKey::new(
            ServiceAddr::tcp(service.parse().expect("service")),
            client.parse().expect("client"),
            prefix,
        )
        .expect("affinity key"),
    )
}

fn distinct(v: &[Ipv4Addr]) -> BTreeSet<Ipv4Addr> {
    v.iter().copied().collect()
}

#[test]
fn affinity_pins_a_prefix_extend_keeps_it_cancel_ends_it() {
    let _serial = serial();
    let mut bed = Bed::start();

    // The static affinity of the configuration holds from the start.
    let statics = bed.tuples(&hosts([203, 0, 113], 24), 1);
    assert!(
        bed.maglev(WEB, &statics).iter().any(|&b| b != BE3),
        "Maglev alone would send these clients to be3: the test proves nothing"
    );
    let got = bed.connect(WEB, &statics);
    assert!(got.iter().all(|&b| b == BE3), "static affinity: {got:?}");
    let listed = bed
        .admin()
        .list_affinities(None, Some("be3"))
        .expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].key, spec(WEB, "203.0.113.0", 24).key);
    assert_eq!(listed[0].remaining_secs, u32::MAX, "static: never expires");

    // Before any request: the prefix follows Maglev like everyone else.
    let pinned_clients = hosts([198, 51, 100], 32);
    let t = bed.tuples(&pinned_clients, 1);
    let got = bed.connect(WEB, &t);
    assert_eq!(got, bed.maglev(WEB, &t), "no affinity yet");
    assert!(distinct(&got).len() > 1, "Maglev spreads: {got:?}");

    // be2's application pins 198.51.100.0/24 to itself.
    let mut be2 = bed.backend_app("be2");
    let pin = spec(WEB, "198.51.100.0", 24);
    let reply = be2
        .create_affinity(&pin, Duration::from_secs(60))
        .expect("create");
    assert_eq!(reply.code, ReturnCode::Ok, "{reply:?}");
    assert!((1..=60).contains(&reply.remaining_secs), "{reply:?}");

    let t = bed.tuples(&pinned_clients, 2);
    let got = bed.connect(WEB, &t);
    assert!(got.iter().all(|&b| b == BE2), "pinned prefix: {got:?}");
    // Others follow Maglev.
    let others = bed.tuples(&hosts([172, 16, 5], 32), 1);
    let got = bed.connect(WEB, &others);
    assert_eq!(got, bed.maglev(WEB, &others), "clients outside the prefix");
    assert!(distinct(&got).len() > 1, "{got:?}");

    // The table shows it; another backend cannot take it over.
    let listed = bed
        .admin()
        .list_affinities(None, Some("be2"))
        .expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].key, pin.key);
    let mut steal = pin.clone();
    steal.owner = Some("be1".into());
    let reply = bed
        .admin()
        .create_affinity(&steal, Duration::from_secs(60))
        .expect("conflicting create is answered");
    assert_eq!(reply.code, ReturnCode::Conflict, "{reply:?}");
    assert_eq!(reply.owner.as_deref(), Some("be2"));

    // Extend keeps it.
    let reply = be2
        .extend_affinity(&pin, Duration::from_secs(300))
        .expect("extend");
    assert_eq!(reply.code, ReturnCode::Ok, "{reply:?}");
    assert!(reply.remaining_secs > 60, "{reply:?}");
    let t = bed.tuples(&pinned_clients, 1);
    let got = bed.connect(WEB, &t);
    assert!(got.iter().all(|&b| b == BE2), "after extend: {got:?}");

    // Cancel ends it: the owner is told, and the prefix follows Maglev again.
    let reply = be2.cancel_affinity(&pin).expect("cancel");
    assert_eq!(reply.code, ReturnCode::Ok, "{reply:?}");
    let notice = be2
        .recv_ended(PATIENCE)
        .expect("receive")
        .expect("AFFINITY_ENDED after cancel");
    assert_eq!(notice.reason, EndReason::Cancelled);
    assert_eq!(notice.key, pin.key);
    assert_eq!(notice.owner, "be2");
    let t = bed.tuples(&pinned_clients, 1);
    let got = bed.connect(WEB, &t);
    assert_eq!(got, bed.maglev(WEB, &t), "after cancel");
    assert!(got.iter().any(|&b| b != BE2), "{got:?}");
    match be2.cancel_affinity(&pin) {
        Ok(r) => assert_eq!(r.code, ReturnCode::NotFound, "{r:?}"),
        Err(e) => panic!("second cancel: {e}"),
    }

    bed.finish();
}

#[test]
fn short_affinity_expires_and_its_owner_is_notified() {
    let _serial = serial();
    let mut bed = Bed::start();
    let mut be1 = bed.backend_app("be1");
    let clients = hosts([198, 51, 100], 32);
    let pin = spec(WEB, "198.51.100.0", 24);
    // Made long, so that it holds while the probe runs however slow the
    // machine, then given two seconds from now by its owner's EXTEND.
    let reply = be1
        .create_affinity(&pin, Duration::from_secs(600))
        .expect("create");
    assert_eq!(reply.code, ReturnCode::Ok, "{reply:?}");
    let t = bed.tuples(&clients, 1);
    let got = bed.connect(WEB, &t);
    assert!(got.iter().all(|&b| b == BE1), "pinned: {got:?}");
    let reply = be1
        .extend_affinity(&pin, Duration::from_secs(2))
        .expect("extend");
    assert_eq!(reply.code, ReturnCode::Ok, "{reply:?}");

    // Ended at its expiry (within the control thread's tick); the
    // deadline only guards against a hang on a loaded machine.
    let notice = be1
        .recv_ended(PATIENCE)
        .expect("receive")
        .unwrap_or_else(|| {
            panic!(
                "no AFFINITY_ENDED after the affinity's expiry\n--- pktdist stderr\n{}",
                bed.peer.pktdist.stderr_text()
            )
        });
    assert_eq!(notice.reason, EndReason::Expired);
    assert_eq!(notice.key, pin.key);
    assert_eq!(notice.owner, "be1");

    // Gone from the table and from the data path.
    let listed = bed
        .admin()
        .list_affinities(None, Some("be1"))
        .expect("list");
    assert!(listed.is_empty(), "{listed:?}");
    let t = bed.tuples(&clients, 1);
    let got = bed.connect(WEB, &t);
    assert_eq!(got, bed.maglev(WEB, &t), "after expiry");
    assert!(got.iter().any(|&b| b != BE1), "{got:?}");

    bed.finish();
}

#[test]
fn removing_a_backend_ends_its_affinities_with_that_reason() {
    let _serial = serial();
    let mut bed = Bed::start();
    let mut be2 = bed.backend_app("be2");
    let pins = [
        spec(WEB, "198.51.100.0", 24),
        spec(WEB, "198.51.101.128", 25),
    ];
    for p in &pins {
        let reply = be2
            .create_affinity(p, Duration::from_secs(300))
            .expect("create");
        assert_eq!(reply.code, ReturnCode::Ok, "{reply:?}");
    }
    let clients: Vec<Ipv4Addr> = hosts([198, 51, 100], 16)
        .into_iter()
        .chain((129..=144).map(|h| Ipv4Addr::new(198, 51, 101, h)))
        .collect();
    let t = bed.tuples(&clients, 1);
    let got = bed.connect(WEB, &t);
    assert!(got.iter().all(|&b| b == BE2), "pinned: {got:?}");

    // A backend may not remove backends; the operator may.
    match be2.remove_backend("web", "be2") {
        Ok(r) => assert_eq!(r.code, ReturnCode::NotAuthorized, "{r:?}"),
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, ReturnCode::NotAuthorized),
        Err(e) => panic!("{e}"),
    }
    let reply = bed.admin().remove_backend("web", "be2").expect("remove");
    assert_eq!(reply.code, ReturnCode::Ok, "{reply:?}");

    let mut ended = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while ended.len() < pins.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match be2.recv_ended(left).expect("receive") {
            Some(n) => ended.push(n),
            None => panic!("only {} of 2 AFFINITY_ENDED: {ended:?}", ended.len()),
        }
    }
    for n in &ended {
        assert_eq!(n.reason, EndReason::BackendRemoved, "{n:?}");
        assert_eq!(n.owner, "be2");
    }
    let keys: BTreeSet<String> = ended.iter().map(|n| format!("{:?}", n.key)).collect();
    let want: BTreeSet<String> = pins.iter().map(|p| format!("{:?}", p.key)).collect();
    assert_eq!(keys, want);
    assert!(bed
        .admin()
        .list_affinities(None, None)
        .expect("list")
        .iter()
        .all(|e| e.owner != "be2"));

    // New connections of the formerly pinned clients follow the rebuilt
    // Maglev table of the remaining backends.
    bed.registry
        .remove_backend("web", "be2")
        .expect("remove in the expected registry");
    let after = bed.registry.snapshot().expect("snapshot");
    let t = bed.tuples(&clients, 1);
    let got = bed.connect(WEB, &t);
    let want: Vec<Ipv4Addr> = t.iter().map(|&x| Bed::maglev_in(&after, WEB, x)).collect();
    assert_eq!(got, want, "after removal");
    assert!(got.iter().all(|&b| b != BE2), "{got:?}");

    bed.finish();
}

#[test]
fn auto_affinity_keeps_a_clients_parallel_connections_on_one_backend() {
    let _serial = serial();
    let mut bed = Bed::start();
    let clients = hosts([100, 64, 7], 12);
    let per_client = 16;

    // Sixteen connections of each client in flight at once.
    let t = bed.tuples(&clients, per_client);
    let got = bed.connect(APP, &t);
    let mut by_client: HashMap<Ipv4Addr, BTreeSet<Ipv4Addr>> = HashMap::new();
    for (&(c, _), &b) in t.iter().zip(&got) {
        by_client.entry(c).or_default().insert(b);
    }
    for (c, backends) in &by_client {
        assert_eq!(backends.len(), 1, "client {c} spread over {backends:?}");
    }
    let used: BTreeSet<Ipv4Addr> = by_client.values().flatten().copied().collect();
    assert!(used.len() > 1, "all clients on one backend: {used:?}");

    // The same client on a service without auto-affinity spreads.
    let t = bed.tuples(&clients[..1], per_client);
    let got = bed.connect(WEB, &t);
    assert_eq!(got, bed.maglev(WEB, &t));
    assert!(distinct(&got).len() > 1, "{got:?}");

    bed.finish();
}
