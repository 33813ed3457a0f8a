//! `[affinity] state_file` end to end: the real `pktdist` binary on a
//! `net_ring` port, stopped and started again. Requested affinities come
//! back with the time they had left; one that expired while the instance
//! was stopped is notified once; a truncated file stops the start with an
//! error naming it; `--discard-bad-state` starts without it.
#![cfg(feature = "dpdk")]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    backend_key_hex, base_config, path_str, poll_until, port_toml, serial, unhex, web_service,
    Pktdist, TempDir, ADMIN_KEY,
};
use pktdist::client::library::{AffinitySpec, ControlClient};
use pktdist::protocol::message::{AffinityEntry, AffinityKey, ServiceAddr};
use pktdist::types::{EndReason, PortMatch};

const WEB: &str = "192.0.2.10:80";
/// How long to wait for anything pktdist does.
const PATIENCE: Duration = Duration::from_secs(30);

fn config_text(state: &Path) -> String {
    [
        base_config(&["be1", "be2"]).replace(
            "auto_capacity = 1024\n",
            &format!(
                "auto_capacity = 1024\nstate_file = \"{}\"\n",
                state.display()
            ),
        ),
        port_toml("net_ring0"),
        web_service(
            "max_affinity_duration = \"10m\"\n",
            &[("be1", "10.0.0.1", None), ("be2", "10.0.0.2", None)],
        ),
    ]
    .concat()
}

fn spec(client: &str, prefix: u8, ports: PortMatch) -> AffinitySpec {
    AffinitySpec::new(
        AffinityKey::new(
            ServiceAddr::tcp(WEB.parse().expect("service")),
            client.parse().expect("client"),
            prefix,
        )
        .expect("key")
        .with_ports(ports),
    )
}

fn admin(control: SocketAddr) -> ControlClient {
    let mut c = ControlClient::new(control, "admin", &unhex(ADMIN_KEY)).expect("admin client");
    c.set_timeout(Duration::from_secs(2));
    c
}

/// Every affinity of the instance at `control`, sorted by client.
fn list(control: SocketAddr) -> Vec<AffinityEntry> {
    let mut l = admin(control).list_affinities(None, None).expect("list");
    l.sort_by_key(|e| e.key.client);
    l
}

/// `pktdist check --config <config>`.
fn check(config: &Path) -> std::process::Output {
    std::process::Command::new(common::PKTDIST)
        .args(["check", "--config", path_str(config)])
        .output()
        .expect("run pktdist check")
}

/// Stops `p` with SIGTERM; it must end cleanly.
fn stop(p: Pktdist) -> String {
    let f = p.stop(PATIENCE);
    assert!(f.status.success(), "pktdist failed:\n{}", f.stderr);
    f.stderr
}

#[test]
fn requested_affinities_survive_a_restart_and_bad_files_are_refused() {
    let _one = serial();
    let dir = TempDir::new("e2e-state");
    let state = dir.path("affinities.state");
    let config = dir.path("pktdist.toml");
    std::fs::write(&config, config_text(&state)).expect("write config");

    // The backend application be1 keeps one socket (its notifications
    // arrive there across the instance's restarts).
    let (p, control) = Pktdist::run(&config);
    assert!(
        p.wait_stderr("none yet", PATIENCE).is_some(),
        "{}",
        p.stderr_text()
    );
    assert!(
        !p.stderr_text().contains("kept in memory only"),
        "{}",
        p.stderr_text()
    );
    let mut be1 = ControlClient::bind(
        "127.0.0.1:0".parse().expect("addr"),
        control,
        "be1",
        &unhex(&backend_key_hex("be1")),
    )
    .expect("be1 client");
    be1.set_timeout(Duration::from_secs(2));
    let long = spec("198.18.0.0", 24, PortMatch::Any);
    let short = spec("198.18.1.0", 24, PortMatch::Any);
    let made = Instant::now();
    be1.create_affinity(&long, Duration::from_secs(600))
        .expect("long");
    // Long enough to be saved at the shutdown below on a loaded machine.
    be1.create_affinity(&short, Duration::from_secs(5))
        .expect("short");
    let short_made = Instant::now();
    let mut for_be2 = spec("198.18.2.7", 32, PortMatch::Range(1000, 1999));
    for_be2.owner = Some("be2".into());
    admin(control)
        .create_affinity(&for_be2, Duration::from_secs(300))
        .expect("be2's");
    stop(p);
    assert!(state.exists(), "no state file written at shutdown");
    let checked = check(&config);
    assert!(checked.status.success(), "{checked:?}");
    let out = String::from_utf8_lossy(&checked.stdout).into_owned();
    assert!(out.contains("3 requested affinit(ies)"), "{out}");

    // Restarted once the short one is past its time: the long ones come
    // back with what they had left, the short one ends with one notice.
    std::thread::sleep(Duration::from_secs(6).saturating_sub(short_made.elapsed()));
    let (p, control) = Pktdist::run(&config);
    let line = p
        .wait_stderr("restored", PATIENCE)
        .unwrap_or_else(|| panic!("no restore line:\n{}", p.stderr_text()));
    assert!(
        line.contains("2 affinit(ies) restored, 1 expired"),
        "{line}"
    );
    let l = list(control);
    assert_eq!(l.len(), 2, "{l:?}");
    assert_eq!((l[0].key, l[0].owner.as_str()), (long.key, "be1"));
    // What is left of their 600 and 300 s, however long the restart took.
    let gone = made.elapsed().as_secs() as u32 + 2;
    assert!((600 - gone..=600).contains(&l[0].remaining_secs), "{l:?}");
    assert_eq!((l[1].key, l[1].owner.as_str()), (for_be2.key, "be2"));
    assert!((300 - gone..=300).contains(&l[1].remaining_secs), "{l:?}");
    let notice = be1
        .recv_ended(PATIENCE)
        .expect("receive")
        .expect("AFFINITY_ENDED of the affinity that expired while stopped");
    assert_eq!(
        (notice.key, notice.owner.as_str(), notice.reason),
        (short.key, "be1", EndReason::Expired)
    );
    // Saved again after the change (within a second, unless the machine
    // is loaded); a restart does not notify it a second time.
    let control_stats = poll_until(PATIENCE, || {
        let stats: serde_json::Value =
            serde_json::from_str(&admin(control).stats().expect("stats")).expect("JSON");
        let c = stats["extra"]["control"].clone();
        (c["state_file_writes"].as_u64() >= Some(1)).then_some(c)
    })
    .expect("the state file written again after the expiry");
    assert_eq!(control_stats["state_file_write_failures"], 0);
    stop(p);
    let (p, control) = Pktdist::run(&config);
    assert!(p.wait_stderr("restored", PATIENCE).is_some());
    assert_eq!(list(control).len(), 2);
    assert!(
        be1.recv_ended(Duration::from_secs(2))
            .expect("receive")
            .is_none(),
        "notified twice"
    );
    stop(p);

    // A truncated file: refused by run, naming the file and what is
    // wrong; check says so and passes (the configuration is good, and it
    // must not keep `run --discard-bad-state` from starting).
    let bytes = std::fs::read(&state).expect("read state");
    std::fs::write(&state, &bytes[..bytes.len() - 10]).expect("truncate");
    let checked = check(&config);
    let out = String::from_utf8_lossy(&checked.stdout).into_owned();
    assert!(
        checked.status.success()
            && out.contains("run would refuse to start")
            && out.contains(path_str(&state))
            && out.contains("truncated")
            && out.contains("--discard-bad-state starts without it"),
        "{checked:?}"
    );
    // A path it cannot read (a symbolic link to itself): the flag would
    // not help, and check does not offer it.
    std::fs::remove_file(&state).expect("remove state");
    std::os::unix::fs::symlink(&state, &state).expect("a link loop in its place");
    let checked = check(&config);
    let out = String::from_utf8_lossy(&checked.stdout).into_owned();
    assert!(
        out.contains("run would refuse to start") && !out.contains("--discard-bad-state"),
        "{checked:?}"
    );
    std::fs::remove_file(&state).expect("remove the link");
    std::fs::write(&state, &bytes[..bytes.len() - 10]).expect("truncate");
    let f = Pktdist::spawn(&["run", "--config", path_str(&config), "--quiet"]).wait(PATIENCE);
    assert!(!f.status.success(), "started on a truncated state file");
    assert!(
        f.stderr.contains(path_str(&state))
            && f.stderr.contains("truncated")
            && f.stderr.contains("--discard-bad-state"),
        "{}",
        f.stderr
    );

    // Told to, it starts without it (loudly), moving the file aside.
    let p = Pktdist::spawn(&[
        "run",
        "--config",
        path_str(&config),
        "--quiet",
        "--discard-bad-state",
    ]);
    let control = p.control_addr(PATIENCE);
    assert!(
        p.stderr_text()
            .contains("STARTING WITHOUT SAVED AFFINITIES"),
        "{}",
        p.stderr_text()
    );
    assert!(list(control).is_empty());
    assert!(dir.path("affinities.state.bad").exists());
    stop(p);
}
