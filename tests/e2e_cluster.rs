//! The cluster mode end to end: a real etcd server this test starts (a
//! temporary data directory, free ports on 127.0.0.1) and two or three
//! real `pktdist` instances sharing it, each on a `net_memif` port with
//! this process on the other end. An affinity made at one instance is
//! listed and honoured by SYNs at the others; the conflict check, the
//! cancel and the expiry hold across instances with exactly one notice; a
//! restarted instance gets the table back; with etcd stopped forwarding
//! goes on and changes (a backend's drain too) are answered UNAVAILABLE,
//! until etcd is back. A backend that declares itself draining at one
//! instance gets no new connections at any, also after a restart, until
//! it declares UP.
#![cfg(feature = "dpdk")]

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::memif::{hosts, MemifPeer, Tuples};
use common::{
    backend_key_hex, base_config, http_get, poll_until, serial, unhex, web_service, TempDir,
    ADMIN_KEY,
};
use pktdist::client::library::{AffinitySpec, ControlClient};
use pktdist::protocol::message::{AffinityEntry, AffinityKey, ReturnCode, ServiceAddr};
use pktdist::types::{BackendState, Declared, EndReason};

const WEB: &str = "192.0.2.10:80";
const BE1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const BE2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const BE3: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
/// How long to wait for anything pktdist or etcd does.
const PATIENCE: Duration = Duration::from_secs(15);

/// The configuration of instance `name` on the etcd at `endpoint`:
/// the same services everywhere, gentle idle workers (several instances
/// share two CPUs), metrics for `/ready`.
fn config(name: &str, endpoint: &str) -> String {
    [
        base_config(&["be1", "be2", "be3"])
            .replace("workers = [1]\n", "workers = [1]\nidle_sleep = \"200us\"\n")
            .replace(
                "status_interval = \"1s\"\n",
                "status_interval = \"1s\"\nmetrics_listen = \"127.0.0.1:0\"\n",
            ),
        web_service(
            "max_affinity_duration = \"10m\"\n",
            &[
                ("be1", "10.0.0.1", None),
                ("be2", "10.0.0.2", None),
                ("be3", "10.0.0.3", None),
            ],
        ),
        format!(
            "\n[cluster]\nstore = \"etcd\"\nendpoints = [\"{endpoint}\"]\n\
             prefix = \"/pktdist-test\"\ninstance = \"{name}\"\ntimeout = \"3s\"\n"
        ),
    ]
    .concat()
}

/// Starts instance `name` and waits until it reports itself ready (its
/// table loaded from etcd).
fn start(dir: &TempDir, name: &str, etcd: &Etcd) -> MemifPeer {
    let peer = MemifPeer::start(&dir.0, name, &config(name, &etcd.endpoint()));
    let metrics = peer.pktdist.metrics_addr(PATIENCE);
    if poll_until(PATIENCE, || http_get(metrics, "/ready")).is_none() {
        panic!(
            "instance {name} never became ready\n--- stderr\n{}",
            peer.pktdist.stderr_text()
        );
    }
    peer
}

fn spec(client: &str, prefix: u8) -> AffinitySpec {
    AffinitySpec::new(
        AffinityKey::new(
            ServiceAddr::tcp(WEB.parse().expect("service")),
            client.parse().expect("client"),
            prefix,
        )
        .expect("affinity key"),
    )
}

fn admin(control: SocketAddr) -> ControlClient {
    let mut c = ControlClient::new(control, "admin", &unhex(ADMIN_KEY)).expect("admin client");
    c.set_timeout(Duration::from_secs(3));
    c
}

/// Backend application `name` talking to the instance at `control`, on a
/// socket of its own where its notices arrive.
fn app(control: SocketAddr, name: &str) -> ControlClient {
    let mut c = ControlClient::bind(
        "127.0.0.1:0".parse().expect("addr"),
        control,
        name,
        &unhex(&backend_key_hex(name)),
    )
    .expect("backend client");
    c.set_timeout(Duration::from_secs(3));
    c
}

fn list(control: SocketAddr) -> Vec<AffinityEntry> {
    admin(control).list_affinities(None, None).expect("list")
}

/// Waits until the instance at `control` lists exactly `want` (keys and
/// owners); panics with what it lists if it does not within PATIENCE.
fn wait_listed(control: SocketAddr, want: &[(&AffinitySpec, &str)], who: &str) {
    let want: BTreeSet<String> = want
        .iter()
        .map(|(s, o)| format!("{:?} {o}", s.key))
        .collect();
    let mut last = Vec::new();
    let found = poll_until(PATIENCE, || {
        last = list(control);
        let got: BTreeSet<String> = last
            .iter()
            .map(|e| format!("{:?} {}", e.key, e.owner))
            .collect();
        (got == want).then_some(())
    });
    assert!(found.is_some(), "{who} lists {last:?}, expected {want:?}");
}

fn distinct(v: &[Ipv4Addr]) -> BTreeSet<Ipv4Addr> {
    v.iter().copied().collect()
}

#[test]
fn an_affinity_made_at_one_instance_holds_at_all_with_one_notice_per_end() {
    let _serial = serial();
    let dir = TempDir::new("e2e-cluster");
    let etcd = Etcd::start_new();
    let mut tuples = Tuples::default();
    let mut a = start(&dir, "a", &etcd);
    let mut b = start(&dir, "b", &etcd);
    let mut c = start(&dir, "c", &etcd);

    // Before any request the prefix's clients follow Maglev, which spreads
    // them (the same table at every instance).
    let clients = hosts([198, 51, 100], 24);
    let t = tuples.next(&clients, 1);
    let before = b.connect(WEB, &t);
    assert!(distinct(&before).len() > 1, "{before:?}");
    assert_eq!(before, c.connect(WEB, &t), "instances disagree on Maglev");

    // be2's application pins 198.51.100.0/24 at instance a.
    let pin = spec("198.51.100.0", 24);
    let mut be2 = app(a.control, "be2");
    let reply = be2
        .create_affinity(&pin, Duration::from_secs(120))
        .expect("create at a");
    assert_eq!(reply.code, ReturnCode::Ok, "{reply:?}");
    for (peer, who) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        wait_listed(peer.control, &[(&pin, "be2")], who);
    }
    let at_b = list(b.control);
    assert!((100..=120).contains(&at_b[0].remaining_secs), "{at_b:?}");
    for peer in [&mut a, &mut b, &mut c] {
        let t = tuples.next(&clients, 2);
        let got = peer.connect(WEB, &t);
        assert!(got.iter().all(|&x| x == BE2), "pinned: {got:?}");
    }

    // be1 cannot take the key at b: CONFLICT naming the owner.
    let reply = app(b.control, "be1")
        .create_affinity(&pin, Duration::from_secs(60))
        .expect("conflicting create is answered");
    assert_eq!(reply.code, ReturnCode::Conflict, "{reply:?}");
    assert_eq!(reply.owner.as_deref(), Some("be2"), "{reply:?}");
    // Renewing its own key elsewhere is fine (b answers for the cluster).
    let reply = app(b.control, "be2")
        .extend_affinity(&pin, Duration::from_secs(300))
        .expect("extend at b");
    assert_eq!(reply.code, ReturnCode::Ok, "{reply:?}");
    assert!(reply.remaining_secs > 120, "{reply:?}");

    // Cancelled at c: gone everywhere, and one notice reaches be2's
    // socket (the one it created the affinity from), not three.
    let reply = app(c.control, "be2")
        .cancel_affinity(&pin)
        .expect("cancel at c");
    assert_eq!(reply.code, ReturnCode::Ok, "{reply:?}");
    let n = be2
        .recv_ended(PATIENCE)
        .expect("receive")
        .unwrap_or_else(|| {
            panic!(
                "no AFFINITY_ENDED after the cancel\n--- c's stderr\n{}",
                c.pktdist.stderr_text()
            )
        });
    assert_eq!(
        (n.key, n.owner.as_str(), n.reason),
        (pin.key, "be2", EndReason::Cancelled)
    );
    for (peer, who) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        wait_listed(peer.control, &[], who);
    }
    let t = tuples.next(&clients, 1);
    let got = a.connect(WEB, &t);
    assert!(got.iter().any(|&x| x != BE2), "after the cancel: {got:?}");
    assert!(
        be2.recv_ended(Duration::from_secs(2))
            .expect("receive")
            .is_none(),
        "a second notice for one cancel"
    );

    // An affinity made at b, honoured at c, expires once for the whole
    // cluster: made long (it holds while c learns of it and the probe
    // runs, however slow the machine), then given three seconds from now
    // by its owner's EXTEND at b.
    let short = spec("198.51.101.0", 24);
    let mut be1 = app(b.control, "be1");
    let reply = be1
        .create_affinity(&short, Duration::from_secs(600))
        .expect("create at b");
    assert_eq!(reply.code, ReturnCode::Ok, "{reply:?}");
    wait_listed(c.control, &[(&short, "be1")], "c");
    let t = tuples.next(&hosts([198, 51, 101], 8), 1);
    let got = c.connect(WEB, &t);
    assert!(got.iter().all(|&x| x == BE1), "pinned at c: {got:?}");
    let reply = be1
        .extend_affinity(&short, Duration::from_secs(3))
        .expect("extend at b");
    assert_eq!(reply.code, ReturnCode::Ok, "{reply:?}");
    let n = be1
        .recv_ended(PATIENCE)
        .expect("receive")
        .expect("AFFINITY_ENDED at expiry");
    assert_eq!(
        (n.key, n.owner.as_str(), n.reason),
        (short.key, "be1", EndReason::Expired)
    );
    for (peer, who) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        wait_listed(peer.control, &[], who);
    }
    assert!(
        be1.recv_ended(Duration::from_secs(2))
            .expect("receive")
            .is_none(),
        "a second notice for one expiry"
    );

    c.finish();
    b.finish();
    a.finish();
}

#[test]
fn a_restarted_instance_gets_the_table_back_and_etcd_outages_refuse_changes_only() {
    let _serial = serial();
    let dir = TempDir::new("e2e-cluster-outage");
    let mut etcd = Etcd::start_new();
    let mut tuples = Tuples::default();
    let mut a = start(&dir, "a", &etcd);
    let b = start(&dir, "b", &etcd);

    let clients = hosts([203, 0, 113], 24);
    let pin = spec("203.0.113.0", 24);
    let mut be3 = app(a.control, "be3");
    let made = Instant::now();
    let reply = be3
        .create_affinity(&pin, Duration::from_secs(600))
        .expect("create at a");
    assert_eq!(reply.code, ReturnCode::Ok, "{reply:?}");
    wait_listed(b.control, &[(&pin, "be3")], "b");

    // b restarts: it loads the table before it is ready, and honours it.
    b.finish();
    let mut b = start(&dir, "b", &etcd);
    let l = list(b.control);
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!((l[0].key, l[0].owner.as_str()), (pin.key, "be3"));
    // What is left of its 600 s, however long the restart took.
    let left = 600 - made.elapsed().as_secs() as u32;
    assert!((left - 2..=600).contains(&l[0].remaining_secs), "{l:?}");
    let t = tuples.next(&clients, 1);
    let got = b.connect(WEB, &t);
    assert!(got.iter().all(|&x| x == BE3), "after b's restart: {got:?}");

    // etcd stops: both keep forwarding with what they have; changes are
    // refused with UNAVAILABLE (once the instances notice).
    etcd.stop();
    let other = spec("198.51.102.0", 24);
    for (peer, who) in [(&a, "a"), (&b, "b")] {
        let mut be1 = app(peer.control, "be1");
        let refused = poll_until(PATIENCE, || {
            let r = be1
                .create_affinity(&other, Duration::from_secs(60))
                .expect("answered while etcd is down");
            assert_ne!(
                r.code,
                ReturnCode::Ok,
                "{who} accepted a change it cannot share"
            );
            (r.code == ReturnCode::Unavailable).then_some(r)
        });
        assert!(refused.is_some(), "{who} never answered UNAVAILABLE");
        // A drain cannot be shared either: refused, nothing changes here.
        let r = app(peer.control, "be2")
            .set_backend_state(None, None, Declared::Drain)
            .expect("answered while etcd is down");
        assert_eq!(r.code, ReturnCode::Unavailable, "{who}: {r:?}");
        wait_be2(peer.control, BackendState::Up, Declared::Up, who);
    }
    for peer in [&mut a, &mut b] {
        let t = tuples.next(&clients, 1);
        let got = peer.connect(WEB, &t);
        assert!(got.iter().all(|&x| x == BE3), "while etcd is down: {got:?}");
        let t = tuples.next(&hosts([198, 51, 102], 16), 1);
        let got = peer.connect(WEB, &t);
        assert!(distinct(&got).len() > 1, "nothing pinned: {got:?}");
    }
    assert!(
        list(a.control).len() == 1 && list(b.control).len() == 1,
        "the table is kept"
    );

    // etcd is back: changes flow again and reach the other instance.
    etcd.start();
    let mut be1 = app(b.control, "be1");
    let ok = poll_until(PATIENCE, || {
        let r = be1
            .create_affinity(&other, Duration::from_secs(60))
            .expect("answered");
        (r.code == ReturnCode::Ok).then_some(r)
    });
    assert!(ok.is_some(), "changes refused after etcd came back");
    let r = app(b.control, "be2")
        .set_backend_state(None, None, Declared::Drain)
        .expect("drain after the outage");
    assert_eq!(r.code, ReturnCode::Ok, "{r:?}");
    wait_be2(a.control, BackendState::Draining, Declared::Drain, "a");
    wait_listed(a.control, &[(&pin, "be3"), (&other, "be1")], "a");
    let t = tuples.next(&hosts([198, 51, 102], 8), 1);
    let got = a.connect(WEB, &t);
    assert!(
        got.iter().all(|&x| x == BE1),
        "made after the outage: {got:?}"
    );

    b.finish();
    a.finish();
}

/// Waits until the instance at `control` has be2 of web in `state`, with
/// what its application declared `app`; panics with what it lists if not.
fn wait_be2(control: SocketAddr, state: BackendState, app: Declared, who: &str) {
    let mut last = Vec::new();
    let found = poll_until(PATIENCE, || {
        last = admin(control).backend_list(Some("web")).expect("backends");
        last.iter()
            .any(|b| b.backend == "be2" && b.state == state && b.app == app)
            .then_some(())
    });
    assert!(
        found.is_some(),
        "{who}: be2 is not {state:?} by {app:?}: {last:?}"
    );
}

#[test]
fn a_backend_draining_itself_at_one_instance_drains_at_every_instance() {
    let _serial = serial();
    let dir = TempDir::new("e2e-cluster-drain");
    let etcd = Etcd::start_new();
    let mut tuples = Tuples::default();
    let mut a = start(&dir, "a", &etcd);
    let mut b = start(&dir, "b", &etcd);
    let clients = hosts([198, 51, 103], 24);
    let t = tuples.next(&clients, 1);
    let before = b.connect(WEB, &t);
    assert!(
        before.contains(&BE2),
        "be2 takes its share first: {before:?}"
    );

    // be2's application declares DRAIN at a: answered once etcd has it,
    // and b sends it nothing new.
    let mut be2 = app(a.control, "be2");
    let reply = be2
        .set_backend_state(None, None, Declared::Drain)
        .expect("drain at a");
    assert_eq!(reply.code, ReturnCode::Ok, "{reply:?}");
    assert_eq!(reply.message, "web/be2 draining");
    wait_be2(b.control, BackendState::Draining, Declared::Drain, "b");
    for peer in [&mut a, &mut b] {
        let t = tuples.next(&clients, 1);
        let got = peer.connect(WEB, &t);
        assert!(
            !got.contains(&BE2),
            "new connections reach a draining be2: {got:?}"
        );
    }

    // b restarted: its first load brings the drain with the table.
    b.finish();
    let mut b = start(&dir, "b", &etcd);
    wait_be2(
        b.control,
        BackendState::Draining,
        Declared::Drain,
        "restarted b",
    );
    let t = tuples.next(&clients, 1);
    assert!(!b.connect(WEB, &t).contains(&BE2));

    // The operator's UP at b leaves the application's DRAIN (two
    // declarations, as in a lone instance); the application's UP at b
    // ends it at a too.
    let reply = admin(b.control)
        .set_backend_state(Some("web"), Some("be2"), Declared::Up)
        .expect("admin up at b");
    assert_eq!(reply.code, ReturnCode::Ok, "{reply:?}");
    wait_be2(a.control, BackendState::Draining, Declared::Drain, "a");
    let reply = app(b.control, "be2")
        .set_backend_state(None, None, Declared::Up)
        .expect("up at b");
    assert_eq!(reply.code, ReturnCode::Ok, "{reply:?}");
    wait_be2(a.control, BackendState::Up, Declared::Up, "a");
    let t = tuples.next(&clients, 1);
    let got = a.connect(WEB, &t);
    assert!(got.contains(&BE2), "be2 is back: {got:?}");

    b.finish();
    a.finish();
}
