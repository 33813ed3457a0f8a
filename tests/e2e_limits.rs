//! The limits on what one backend may pin, end to end: the real `pktdist`
//! binary (real DPDK, a `net_ring` port) answers backends and the operator
//! over the control protocol. A backend is held to its service's shortest
//! prefix, its quota and the overlap rule while the operator is not; a
//! backend at its quota leaves its neighbours alone; a flood of requests
//! from one backend is answered RATE_LIMITED while the others' requests are
//! answered as usual, and it recovers; a reload that lowers the quota keeps
//! what a backend holds until it ends. The statistics count each refusal.
#![cfg(feature = "dpdk")]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{
    backend_key_hex, base_config, poll_until, port_toml, serial, unhex, web_service, Pktdist,
    TempDir, ADMIN_KEY,
};
use pktdist::client::library::{AffinitySpec, ClientError, ControlClient};
use pktdist::protocol::message::{AffinityKey, Reply, Request, ReturnCode, ServiceAddr};

/// How long to wait for anything pktdist does.
const PATIENCE: Duration = Duration::from_secs(10);
/// Requests per second each backend may make in these tests.
const RATE: u32 = 200;

/// Service web (be1, be2, be3): backends may pin /24 and longer, 5 each.
fn config_text(quota: u32) -> String {
    [
        base_config(&["be1", "be2", "be3"]).replace(
            "status_interval = \"1s\"\n",
            &format!(
                "status_interval = \"1s\"\nmax_requests_per_second = {RATE}\n\
                 admin_max_requests_per_second = 100000\n"
            ),
        ),
        port_toml("net_ring0"),
        web_service(
            &format!(
                "max_affinity_duration = \"10m\"\nmin_prefix = {{ ipv4 = 24 }}\n\
                 max_affinities_per_backend = {quota}\n"
            ),
            &[
                ("be1", "10.0.0.1", None),
                ("be2", "10.0.0.2", None),
                ("be3", "10.0.0.3", None),
            ],
        ),
    ]
    .concat()
}

fn client(server: SocketAddr, name: &str) -> ControlClient {
    let key = if name == "admin" {
        unhex(ADMIN_KEY)
    } else {
        unhex(&backend_key_hex(name))
    };
    let mut c = ControlClient::new(server, name, &key).expect("client");
    c.set_timeout(Duration::from_secs(2));
    c
}

fn spec(client: &str, prefix: u8, owner: Option<&str>) -> AffinitySpec {
    let key = AffinityKey::new(
        ServiceAddr::tcp("192.0.2.10:80".parse().unwrap()),
        client.parse().unwrap(),
        prefix,
    )
    .expect("key");
    let mut s = AffinitySpec::new(key);
    s.owner = owner.map(str::to_string);
    s
}

/// The reply to a request, whatever its code.
fn answered(r: Result<Reply, ClientError>) -> Reply {
    r.unwrap_or_else(|e| panic!("no answer: {e}"))
}

fn create(c: &mut ControlClient, client: &str, prefix: u8, owner: Option<&str>) -> Reply {
    answered(c.create_affinity(&spec(client, prefix, owner), Duration::from_secs(300)))
}

fn cancel(c: &mut ControlClient, client: &str, prefix: u8) -> Reply {
    answered(c.cancel_affinity(&spec(client, prefix, None)))
}

fn stats(admin: &mut ControlClient) -> serde_json::Value {
    serde_json::from_str(&admin.stats().expect("stats")).expect("stats JSON")
}

fn start(dir: &TempDir, quota: u32) -> (Pktdist, SocketAddr, std::path::PathBuf) {
    let path = dir.path("limits.toml");
    std::fs::write(&path, config_text(quota)).expect("write");
    let (p, addr) = Pktdist::run(Path::new(&path));
    (p, addr, path)
}

#[test]
fn prefix_quota_and_overlap_hold_backends_not_the_operator() {
    let _serial = serial();
    let dir = TempDir::new("e2e-limits");
    let (p, server, _) = start(&dir, 5);
    let mut be1 = client(server, "be1");
    let mut be2 = client(server, "be2");
    let mut admin = client(server, "admin");

    // The shortest prefix: /24 passes, /23 does not; the operator may.
    assert_eq!(
        create(&mut be1, "198.51.100.0", 24, None).code,
        ReturnCode::Ok
    );
    let short = create(&mut be1, "198.51.102.0", 23, None);
    assert_eq!(short.code, ReturnCode::Invalid, "{short:?}");
    assert!(short.message.contains("min_prefix.ipv4 = 24"), "{short:?}");
    assert_eq!(
        create(&mut admin, "10.0.0.0", 8, Some("be3")).code,
        ReturnCode::Ok
    );

    // The quota: be1 holds 1; four more, then one over.
    for h in 1..=4 {
        let r = create(&mut be1, &format!("198.18.0.{h}"), 32, None);
        assert_eq!(r.code, ReturnCode::Ok, "{r:?}");
    }
    let over = create(&mut be1, "198.18.0.5", 32, None);
    assert_eq!(over.code, ReturnCode::QuotaExceeded, "{over:?}");
    assert!(over.message.contains("quota is 5"), "{over:?}");
    // Its neighbour is unaffected; after a cancel be1 has room again.
    assert_eq!(
        create(&mut be2, "198.19.0.1", 32, None).code,
        ReturnCode::Ok
    );
    assert_eq!(cancel(&mut be1, "198.18.0.4", 32).code, ReturnCode::Ok);
    assert_eq!(
        create(&mut be1, "198.18.0.5", 32, None).code,
        ReturnCode::Ok
    );

    // Overlaps, both ways: be2 inside be1's /24, be1 around be2's /32.
    let inner = create(&mut be2, "198.51.100.7", 32, None);
    assert_eq!(
        (inner.code, inner.owner.as_deref()),
        (ReturnCode::Conflict, Some("be1")),
        "{inner:?}"
    );
    let outer = create(&mut be2, "10.1.2.0", 24, None);
    assert_eq!(
        (outer.code, outer.owner.as_deref()),
        (ReturnCode::Conflict, Some("be3")),
        "be3's /8 holds it: {outer:?}"
    );

    let s = stats(&mut admin);
    let control = &s["extra"]["control"];
    assert_eq!(control["limited"]["min_prefix"], 1, "{control}");
    assert_eq!(control["limited"]["quota"], 1, "{control}");
    assert_eq!(control["limited"]["overlap"], 2, "{control}");
    assert_eq!(control["by_code"]["QUOTA_EXCEEDED"], 1, "{control}");
    let backends = s["services"][0]["backends"].as_array().expect("backends");
    let held: Vec<(String, u64, u64)> = backends
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["affinities"].as_u64().unwrap(),
                b["affinity_quota"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        held,
        [
            ("be1".into(), 5, 5),
            ("be2".into(), 1, 5),
            ("be3".into(), 1, 5)
        ]
    );
    p.stop(PATIENCE);
}

/// be1 floods from four threads; be2 and be3 keep asking meanwhile and are
/// answered every time; be1 is told RATE_LIMITED, and is answered as usual
/// once it slows down.
#[test]
fn a_flood_from_one_backend_leaves_the_others_answered() {
    let _serial = serial();
    let dir = TempDir::new("e2e-limits-flood");
    let (p, server, _) = start(&dir, 1000);
    let stop = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut be1 = client(server, "be1");
                be1.set_timeout(Duration::from_millis(200));
                be1.set_retries(0);
                let (mut limited, mut other) = (0u64, 0u64);
                let service = ServiceAddr::tcp("192.0.2.10:80".parse().unwrap());
                while !stop.load(Ordering::Relaxed) {
                    match be1.request(&Request::AffinityList {
                        service: Some(service),
                        owner: None,
                        offset: 0,
                        limit: 1,
                    }) {
                        Ok(r) if r.code == ReturnCode::RateLimited => limited += 1,
                        _ => other += 1,
                    }
                }
                (limited, other)
            })
        })
        .collect();
    // Until the flood has been refused a good many times, be2 and be3
    // create and cancel: every request answered OK.
    let mut be2 = client(server, "be2");
    let mut be3 = client(server, "be3");
    let mut admin = client(server, "admin");
    let mut rounds = 0;
    let flooded = poll_until(Duration::from_secs(60), || {
        for (c, net) in [(&mut be2, "198.51.100.0"), (&mut be3, "198.51.101.0")] {
            let r = create(c, net, 24, None);
            assert_eq!(r.code, ReturnCode::Ok, "during the flood: {r:?}");
            assert_eq!(cancel(c, net, 24).code, ReturnCode::Ok);
        }
        rounds += 1;
        let limited = stats(&mut admin)["extra"]["control"]["rate_limited"]["be1"]
            .as_u64()
            .unwrap_or(0);
        (rounds >= 10 && limited >= 1000).then_some(limited)
    });
    stop.store(true, Ordering::Relaxed);
    let mut limited = 0;
    for f in flooders {
        limited += f.join().expect("flooder").0;
    }
    assert!(flooded.is_some(), "the flood was never rate limited");
    assert!(limited >= 1000, "{limited}");
    let control = stats(&mut admin)["extra"]["control"].clone();
    assert!(
        control["refused"]["rate_limited"].as_u64().unwrap() >= 1000,
        "{control}"
    );
    assert_eq!(control["rate_limited"]["be2"], 0, "{control}");
    assert_eq!(control["rate_limited"]["be3"], 0, "{control}");
    // Recovered: once it stops flooding, be1 is answered as usual.
    let mut be1 = client(server, "be1");
    let ok = poll_until(PATIENCE, || {
        let r = create(&mut be1, "198.51.102.0", 24, None);
        match r.code {
            ReturnCode::RateLimited => {
                std::thread::sleep(Duration::from_millis(100));
                None
            }
            code => Some(code),
        }
    });
    assert_eq!(ok, Some(ReturnCode::Ok));
    p.stop(PATIENCE);
}

/// A reload that lowers the quota: what be1 holds stays until it ends; it
/// creates again once below the new quota.
#[test]
fn a_lowered_quota_keeps_what_is_held() {
    let _serial = serial();
    let dir = TempDir::new("e2e-limits-reload");
    let (p, server, path) = start(&dir, 5);
    let mut be1 = client(server, "be1");
    let mut admin = client(server, "admin");
    for h in 1..=5 {
        let r = create(&mut be1, &format!("198.18.0.{h}"), 32, None);
        assert_eq!(r.code, ReturnCode::Ok, "{r:?}");
    }
    std::fs::write(&path, config_text(3)).expect("write");
    let r = answered(admin.request(&Request::Reload));
    assert_eq!(r.code, ReturnCode::Ok, "{r:?}");
    let held =
        answered(be1.create_affinity(&spec("198.18.0.1", 32, None), Duration::from_secs(300)));
    assert_eq!(held.code, ReturnCode::Ok, "renewing one it holds: {held:?}");
    assert_eq!(
        be1.list_affinities(None, Some("be1")).expect("list").len(),
        5,
        "all five kept"
    );
    let over = create(&mut be1, "198.18.0.9", 32, None);
    assert_eq!(over.code, ReturnCode::QuotaExceeded, "{over:?}");
    assert!(over.message.contains("quota is 3"), "{over:?}");
    for h in 1..=3 {
        assert_eq!(
            cancel(&mut be1, &format!("198.18.0.{h}"), 32).code,
            ReturnCode::Ok
        );
    }
    assert_eq!(
        create(&mut be1, "198.18.0.9", 32, None).code,
        ReturnCode::Ok
    );
    let s = stats(&mut admin);
    assert_eq!(s["services"][0]["backends"][0]["affinity_quota"], 3);
    p.stop(PATIENCE);
}
