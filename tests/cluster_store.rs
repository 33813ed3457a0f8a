//! The etcd store thread (src/cluster/etcd.rs) against a real etcd the
//! tests start themselves: commits and their propagation to a second store
//! thread, compare-and-set conflicts, racing deletes, the load at start,
//! an etcd outage and its end, unreadable values, thousands of ops in
//! flight, and the backends' declared states beside the affinities. The
//! tests run one at a time (one etcd each, two cores).

mod common;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use pktdist::cluster::etcd::{spawn, spawn_tuned, Tuning};
use pktdist::cluster::{
    Change, DeclarationKey, Outcome, Revision, StoreEvent, StoreHandle, StoreKey, StoreOp,
    StoredAffinity, StoredDeclaration,
};
use pktdist::config::{ClusterConfig, DurationStr, StoreKind};
use pktdist::control::state_file::SavedAffinity;
use pktdist::protocol::message::ServiceAddr;
use pktdist::types::{Declared, PortMatch};

/// How long any expected event may take before the test fails (generous:
/// the machine is shared; nothing here measures time).
const PATIENCE: Duration = Duration::from_secs(30);

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn config(endpoint: &str, instance: &str) -> ClusterConfig {
    ClusterConfig {
        store: StoreKind::Etcd,
        endpoints: vec![endpoint.to_string()],
        prefix: "/test".to_string(),
        instance: instance.to_string(),
        user: None,
        password_file: None,
        ca_file: None,
        cert_file: None,
        key_file: None,
        timeout: DurationStr(Duration::from_secs(2)),
    }
}

/// One store thread and the events it sent that no check took yet.
struct Store {
    h: StoreHandle,
    pending: VecDeque<StoreEvent>,
    name: &'static str,
}

impl Store {
    fn new(etcd: &Etcd, name: &'static str) -> Store {
        Store::new_at(&etcd.endpoint(), name)
    }

    /// A store on the etcd at `endpoint`.
    fn new_at(endpoint: &str, name: &'static str) -> Store {
        Store::of(config(endpoint, name), name)
    }

    /// [`Store::new`] with another `[cluster] timeout`.
    fn with_timeout(etcd: &Etcd, name: &'static str, timeout: Duration) -> Store {
        let mut cfg = config(&etcd.endpoint(), name);
        cfg.timeout = DurationStr(timeout);
        Store::of(cfg, name)
    }

    /// [`Store::new`] with other batching.
    fn tuned(etcd: &Etcd, name: &'static str, tuning: Tuning) -> Store {
        Store {
            h: spawn_tuned(&config(&etcd.endpoint(), name), tuning).expect("spawn"),
            pending: VecDeque::new(),
            name,
        }
    }

    fn of(cfg: ClusterConfig, name: &'static str) -> Store {
        Store {
            h: spawn(&cfg).expect("spawn"),
            pending: VecDeque::new(),
            name,
        }
    }

    /// The first event (oldest first) `pick` accepts, waiting for it;
    /// the others stay for later checks.
    fn take<T>(&mut self, what: &str, mut pick: impl FnMut(&StoreEvent) -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        let mut looked = 0;
        loop {
            while looked < self.pending.len() {
                if let Some(t) = pick(&self.pending[looked]) {
                    self.pending.remove(looked);
                    return t;
                }
                looked += 1;
            }
            match self.h.try_event().expect("the store thread is running") {
                Some(e) => self.pending.push_back(e),
                None => {
                    assert!(
                        Instant::now() < deadline,
                        "{}: no {what} (had {:?})",
                        self.name,
                        self.pending
                    );
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    fn loaded(&mut self) -> (Revision, Vec<(StoredAffinity, Revision)>) {
        let (revision, affinities, _) = self.loaded_all();
        (revision, affinities)
    }

    /// The load with its declarations.
    #[allow(clippy::type_complexity)]
    fn loaded_all(
        &mut self,
    ) -> (
        Revision,
        Vec<(StoredAffinity, Revision)>,
        Vec<(StoredDeclaration, Revision)>,
    ) {
        self.take("Loaded", |e| match e {
            StoreEvent::Loaded {
                revision,
                affinities,
                declarations,
                ..
            } => Some((*revision, affinities.clone(), declarations.clone())),
            _ => None,
        })
    }

    /// The load's ends of this instance still marked in the store.
    fn loaded_ends(&mut self) -> Vec<(StoreKey, Revision)> {
        self.take("Loaded", |e| match e {
            StoreEvent::Loaded { ended, .. } => Some(ended.clone()),
            _ => None,
        })
    }

    fn declare(&self, ticket: u64, value: &StoredDeclaration) {
        assert!(self.h.submit(StoreOp::Declare {
            ticket,
            value: value.clone(),
        }));
    }

    fn done(&mut self, ticket: u64) -> Outcome {
        self.take(&format!("Done {ticket}"), |e| match e {
            StoreEvent::Done { ticket: t, outcome } if *t == ticket => Some(outcome.clone()),
            _ => None,
        })
    }

    fn changed(&mut self) -> (Revision, Change) {
        self.take("Changed", |e| match e {
            StoreEvent::Changed { revision, change } => Some((*revision, change.clone())),
            _ => None,
        })
    }

    fn unreachable(&mut self) -> String {
        self.take("Unreachable", |e| match e {
            StoreEvent::Unreachable { error } => Some(error.clone()),
            _ => None,
        })
    }

    fn put(&self, ticket: u64, value: &StoredAffinity, expect: Revision) {
        assert!(self.h.submit(StoreOp::Put {
            ticket,
            value: value.clone(),
            expect,
        }));
    }

    fn delete(&self, ticket: u64, key: &StoreKey, expect: Revision) {
        assert!(self.h.submit(StoreOp::Delete {
            ticket,
            key: key.clone(),
            expect,
        }));
    }

    fn end(&self, ticket: u64, key: &StoreKey, expect: Revision) {
        assert!(self.h.submit(StoreOp::End {
            ticket,
            key: key.clone(),
            expect,
        }));
    }

    fn committed(&mut self, ticket: u64) -> Revision {
        match self.done(ticket) {
            Outcome::Committed { revision } => revision,
            o => panic!("{}: ticket {ticket}: {o:?}", self.name),
        }
    }
}

fn affinity(service: &str, client: u32, owner: &str, writer: &str) -> StoredAffinity {
    StoredAffinity {
        affinity: SavedAffinity {
            service: service.to_string(),
            service_addr: ServiceAddr {
                addr: Ipv4Addr::new(10, 0, 0, 1).into(),
                port: 80,
                proto: 6,
            },
            owner: owner.to_string(),
            client: IpAddr::V4(Ipv4Addr::from(client)),
            prefix_len: 32,
            ports: PortMatch::Any,
            expires_unix_ms: 2_000_000_000_000,
            created_unix_ms: 1_700_000_000_000,
            notify: None,
        },
        writer: writer.to_string(),
        written_unix_ms: 1_700_000_000_001,
    }
}

#[test]
fn a_put_commits_and_both_stores_see_it_and_compare_and_set_holds() {
    let _s = serial();
    let etcd = Etcd::start_new();
    let mut a = Store::new(&etcd, "a");
    let mut b = Store::new(&etcd, "b");
    assert_eq!(a.loaded().1, vec![]);
    assert_eq!(b.loaded().1, vec![]);

    // expect 0 on an absent key matches (etcd compares a missing key's mod
    // revision as 0).
    let web = affinity("web", 0xc000_0201, "b1", "a");
    a.put(1, &web, 0);
    let rev = a.committed(1);
    assert_eq!(b.changed(), (rev, Change::Put(web.clone())));
    assert_eq!(a.changed(), (rev, Change::Put(web.clone())));

    // What etcdctl shows: the documented key and a JSON value.
    let shown = etcd.etcdctl(&["get", "--prefix", "/test/a/"]);
    assert!(shown.contains("/test/a/web/192.0.2.1/32/any\n"), "{shown}");
    assert!(shown.contains("\"format\":1"), "{shown}");
    assert!(shown.contains("\"owner\":\"b1\""), "{shown}");

    // A create on an existing key: Moved with what is there.
    let theirs = affinity("web", 0xc000_0201, "b2", "b");
    b.put(2, &theirs, 0);
    assert_eq!(
        b.done(2),
        Outcome::Moved {
            current: Some((web.clone(), rev))
        }
    );
    // A delete with a stale revision: Moved, nothing deleted.
    b.delete(3, &web.key(), rev - 1);
    assert_eq!(
        b.done(3),
        Outcome::Moved {
            current: Some((web.clone(), rev))
        }
    );
    // An update at the right revision, then a delete at the new one.
    let mut longer = web.clone();
    longer.affinity.expires_unix_ms += 60_000;
    longer.writer = "b".into();
    b.put(4, &longer, rev);
    let rev2 = b.committed(4);
    assert!(rev2 > rev);
    assert_eq!(a.changed(), (rev2, Change::Put(longer.clone())));
    a.delete(5, &web.key(), rev2);
    let rev3 = a.committed(5);
    assert_eq!(b.changed().1, Change::Put(longer));
    assert_eq!(b.changed(), (rev3, Change::Deleted(web.key())));
    // Deleting what is gone: Moved to nothing.
    b.delete(6, &web.key(), rev2);
    assert_eq!(b.done(6), Outcome::Moved { current: None });
}

/// Two stores, a and b, loaded, and `n` affinities a wrote: each with
/// its revision.
fn two_stores_and_affinities(
    etcd: &Etcd,
    n: u32,
) -> (Store, Store, Vec<StoredAffinity>, Vec<Revision>) {
    let mut a = Store::new(etcd, "a");
    let mut b = Store::new(etcd, "b");
    a.loaded();
    b.loaded();
    let keys: Vec<StoredAffinity> = (0..n)
        .map(|i| affinity("race", 0x0a00_0000 + i, "b1", "a"))
        .collect();
    for (i, k) in keys.iter().enumerate() {
        a.put(i as u64, k, 0);
    }
    let revs: Vec<Revision> = (0..keys.len()).map(|i| a.committed(i as u64)).collect();
    (a, b, keys, revs)
}

#[test]
fn racing_deletes_of_one_key_commit_exactly_once() {
    let _s = serial();
    let etcd = Etcd::start_new();
    let (mut a, mut b, keys, revs) = two_stores_and_affinities(&etcd, 50);
    for (i, k) in keys.iter().enumerate() {
        a.delete(1000 + i as u64, &k.key(), revs[i]);
        b.delete(1000 + i as u64, &k.key(), revs[i]);
    }
    for i in 0..keys.len() as u64 {
        let outcomes = [a.done(1000 + i), b.done(1000 + i)];
        let won = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Committed { .. }))
            .count();
        assert_eq!(won, 1, "key {i}: {outcomes:?}");
        assert!(
            outcomes.contains(&Outcome::Moved { current: None }),
            "key {i}: {outcomes:?}"
        );
    }
}

/// The keys under `prefix` in `etcd`, as etcdctl lists them.
fn keys_under(etcd: &Etcd, prefix: &str) -> Vec<String> {
    let out = etcd.etcdctl(&["get", "--prefix", "--keys-only", prefix]);
    out.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Waits until the keys under `prefix` are `want`.
fn wait_for_keys(etcd: &Etcd, prefix: &str, want: &[&str]) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let keys = keys_under(etcd, prefix);
        if keys == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} keys under {prefix}, the first {:?}; want {want:?}",
            keys.len(),
            &keys[..keys.len().min(5)]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_end_leaves_its_mark_in_its_commit_and_takes_it_away_after() {
    let _s = serial();
    let etcd = Etcd::start_new();
    let mut a = Store::new(&etcd, "a");
    let mut b = Store::new(&etcd, "b");
    a.loaded();
    b.loaded();
    let web = affinity("web", 0xc000_0209, "b1", "a");
    a.put(1, &web, 0);
    let rev = a.committed(1);
    assert_eq!(a.changed(), (rev, Change::Put(web.clone())));
    assert_eq!(b.changed(), (rev, Change::Put(web.clone())));

    a.end(2, &web.key(), rev);
    let at = a.committed(2);
    // The ender's watch names its end before the deletion of the same
    // commit; the others' watches only see the deletion.
    assert_eq!(
        a.changed(),
        (
            at,
            Change::Ended {
                key: web.key(),
                expect: rev
            }
        )
    );
    assert_eq!(a.changed(), (at, Change::Deleted(web.key())));
    assert_eq!(b.changed(), (at, Change::Deleted(web.key())));
    // The mark, once seen, is taken away; nothing else is left.
    wait_for_keys(&etcd, "/test/", &[]);

    // An end that finds the key moved writes nothing.
    a.put(3, &web, 0);
    let rev = a.committed(3);
    a.put(4, &web, rev);
    let rev2 = a.committed(4);
    a.end(5, &web.key(), rev);
    assert_eq!(
        a.done(5),
        Outcome::Moved {
            current: Some((web.clone(), rev2))
        }
    );
    assert_eq!(keys_under(&etcd, "/test/e/"), Vec::<String>::new());
}

#[test]
fn racing_ends_mark_only_the_winner_s() {
    let _s = serial();
    let etcd = Etcd::start_new();
    let (mut a, mut b, keys, revs) = two_stores_and_affinities(&etcd, 20);
    for (i, k) in keys.iter().enumerate() {
        a.end(1000 + i as u64, &k.key(), revs[i]);
        b.end(1000 + i as u64, &k.key(), revs[i]);
    }
    let mut won: [Vec<StoreKey>; 2] = [Vec::new(), Vec::new()];
    for (i, k) in keys.iter().enumerate() {
        let t = 1000 + i as u64;
        let outcomes = [a.done(t), b.done(t)];
        for (w, o) in outcomes.iter().enumerate() {
            if matches!(o, Outcome::Committed { .. }) {
                won[w].push(k.key());
            }
        }
        assert_eq!(won[0].len() + won[1].len(), i + 1, "key {i}: {outcomes:?}");
    }
    // Each store's watch names exactly the ends it won.
    for (w, store) in [&mut a, &mut b].into_iter().enumerate() {
        let mut deleted = 0;
        let mut ended = Vec::new();
        while deleted < keys.len() {
            match store.changed() {
                (_, Change::Deleted(_)) => deleted += 1,
                (_, Change::Ended { key, .. }) => ended.push(key),
                _ => {}
            }
        }
        // Transactions in flight at once may commit in any order.
        let by_client = |k: &StoreKey| k.client;
        ended.sort_by_key(by_client);
        won[w].sort_by_key(by_client);
        assert_eq!(ended, won[w], "store {w}");
    }
    wait_for_keys(&etcd, "/test/e/", &[]);
}

#[test]
fn a_load_names_this_instance_s_marks_and_takes_them_and_orphans_away() {
    let _s = serial();
    let etcd = Etcd::start_new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    use pktdist::cluster::record::encode_mark;
    // Left as an end's delete leaves them: "a"'s, whose answer was lost;
    // "b"'s, recent (b is alive and takes its own away); "c"'s, two hours
    // old (c is gone).
    etcd.etcdctl(&[
        "put",
        "/test/e/web/192.0.2.9/32/any/7",
        &encode_mark("a", now),
    ]);
    etcd.etcdctl(&[
        "put",
        "/test/e/web/192.0.2.10/32/any/8",
        &encode_mark("b", now),
    ]);
    etcd.etcdctl(&[
        "put",
        "/test/e/web/192.0.2.11/32/any/9",
        &encode_mark("c", now - 7_200_000),
    ]);
    // Not pktdist's mark: left alone.
    etcd.etcdctl(&["put", "/test/e/web/garbage", "x"]);
    let mut a = Store::new(&etcd, "a");
    let key = affinity("web", 0xc000_0209, "b1", "a").key();
    assert_eq!(a.loaded_ends(), vec![(key, 7)]);
    wait_for_keys(
        &etcd,
        "/test/e/",
        &["/test/e/web/192.0.2.10/32/any/8", "/test/e/web/garbage"],
    );
}

#[test]
fn an_end_sent_again_after_its_commit_is_answered_committed_by_its_mark() {
    let _s = serial();
    let etcd = Etcd::start_new();
    // Its mark must outlive the watch's report of it: no sweep meanwhile.
    let slow_sweep = Tuning {
        sweep_interval: Duration::from_secs(3600),
        ..Tuning::default()
    };
    let mut a = Store::tuned(&etcd, "a", slow_sweep);
    a.loaded();
    let web = affinity("web", 0xc000_0209, "b1", "a");
    a.put(1, &web, 0);
    let rev = a.committed(1);
    // The end as committed with its answer lost: the key gone and a's
    // mark there (written here by hand, in two commits).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mark = format!("/test/e/web/192.0.2.9/32/any/{rev}");
    etcd.etcdctl(&["del", "/test/a/web/192.0.2.9/32/any"]);
    etcd.etcdctl(&[
        "put",
        &mark,
        &pktdist::cluster::record::encode_mark("a", now),
    ]);
    let marked = loop {
        if let (at, Change::Ended { key, expect }) = a.changed() {
            assert_eq!((key, expect), (web.key(), rev));
            break at;
        }
    };
    // Sent again, it finds the key gone and the mark its own: Committed
    // at the mark's revision, not Moved.
    a.end(2, &web.key(), rev);
    assert_eq!(a.done(2), Outcome::Committed { revision: marked });
    // Another instance's mark is not: b's end of the same version moved.
    let mut b = Store::new(&etcd, "b");
    b.loaded();
    b.end(3, &web.key(), rev);
    assert_eq!(b.done(3), Outcome::Moved { current: None });
}

#[test]
fn the_load_at_start_holds_what_exists_and_the_watch_follows_it() {
    let _s = serial();
    let etcd = Etcd::start_new();
    let mut a = Store::new(&etcd, "a");
    a.loaded();
    let mut want = HashMap::new();
    for i in 0..3 {
        let v = affinity("web", 0xc633_6400 + i, "b1", "a");
        a.put(i as u64, &v, 0);
        want.insert(v.key(), (v, a.committed(i as u64)));
    }
    let mut c = Store::new(&etcd, "c");
    let (revision, table) = c.loaded();
    assert_eq!(table.len(), 3);
    for (v, rev) in &table {
        assert_eq!(want[&v.key()], (v.clone(), *rev));
        assert!(*rev <= revision);
    }
    let late = affinity("web", 0xc633_64ff, "b2", "a");
    a.put(9, &late, 0);
    let rev = a.committed(9);
    let (changed_rev, change) = c.changed();
    assert_eq!((changed_rev, change), (rev, Change::Put(late)));
    assert!(changed_rev > revision);
}

/// The `[cluster] timeout` bounds each request, not the watch: a watch
/// idle for three times the timeout still delivers the next change, on the
/// same connection (no `Unreachable`, no second `Loaded` before it). Nor
/// does the freshness check (every 3 s) give up an idle watch on a
/// healthy member while other keys of the etcd change: its progress
/// reports keep it current over the two comparisons the wait spans.
#[test]
fn an_idle_watch_outlives_the_request_timeout() {
    let _s = serial();
    let etcd = Etcd::start_new();
    // Not shorter: one slow fsync on a loaded machine must not cut the
    // connection whose watch the test checks.
    let timeout = Duration::from_secs(3);
    let mut a = Store::with_timeout(&etcd, "a", timeout);
    let mut b = Store::with_timeout(&etcd, "b", timeout);
    a.loaded();
    b.loaded();
    // Four freshness checks (3 s apart) and a second: two of them compare
    // the watch with the quorum.
    let idle_until = Instant::now() + Duration::from_secs(13).max(3 * timeout);
    let mut n = 0;
    while Instant::now() < idle_until {
        etcd.etcdctl(&["put", &format!("/elsewhere/{n}"), "x"]);
        n += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let v = affinity("web", 0xc000_0263, "b1", "b");
    b.put(1, &v, 0);
    let rev = b.committed(1);
    let seen = a.take("Changed, or a sign of a reconnection", |e| match e {
        StoreEvent::Changed { .. } | StoreEvent::Unreachable { .. } | StoreEvent::Loaded { .. } => {
            Some(e.clone())
        }
        _ => None,
    });
    assert_eq!(
        seen,
        StoreEvent::Changed {
            revision: rev,
            change: Change::Put(v)
        },
        "the watch was cut while idle"
    );
}

/// A table kept the way the control thread keeps it: Loaded replaces it,
/// Changed edits it.
#[derive(Default)]
struct Mirror {
    table: HashMap<StoreKey, (StoredAffinity, Revision)>,
    loads: usize,
}

impl Mirror {
    fn apply(&mut self, e: &StoreEvent) {
        match e {
            StoreEvent::Loaded { affinities, .. } => {
                self.loads += 1;
                self.table = affinities
                    .iter()
                    .map(|(a, r)| (a.key(), (a.clone(), *r)))
                    .collect();
            }
            StoreEvent::Changed { revision, change } => match change {
                Change::Put(a) => {
                    self.table.insert(a.key(), (a.clone(), *revision));
                }
                Change::Deleted(k) => {
                    self.table.remove(k);
                }
                Change::Declared { .. } | Change::Ended { .. } => {}
            },
            _ => {}
        }
    }
}

#[test]
fn etcd_down_means_unreachable_and_unavailable_and_back_means_a_fresh_load() {
    let _s = serial();
    let mut etcd = Etcd::start_new();
    let mut a = Store::new(&etcd, "a");
    a.loaded();
    let before = affinity("web", 0xc000_0201, "b1", "a");
    a.put(1, &before, 0);
    a.committed(1);

    etcd.stop();
    let error = a.unreachable();
    assert!(!error.is_empty());
    // Ops are refused at once, not queued.
    for t in 10..20 {
        a.put(t, &affinity("web", 0xc000_0300 + t as u32, "b1", "a"), 0);
    }
    for t in 10..20 {
        match a.done(t) {
            Outcome::Unavailable { error } => assert!(error.contains("unreachable"), "{error}"),
            o => panic!("ticket {t} while etcd is down: {o:?}"),
        }
    }

    etcd.start();
    // A change made by someone else as soon as etcd is back: in the fresh
    // load or in the watch after it, either way in the table.
    etcd.etcdctl(&[
        "put",
        "/test/a/web/192.0.2.2/32/any",
        &pktdist::cluster::record::encode_value(&affinity("web", 0xc000_0202, "b3", "x")),
    ]);
    let mut mirror = Mirror::default();
    let (revision, affinities) = a.loaded();
    mirror.apply(&StoreEvent::Loaded {
        revision,
        affinities,
        declarations: Vec::new(),
        ended: Vec::new(),
    });
    let after = affinity("web", 0xc000_0203, "b1", "a");
    a.put(30, &after, 0);
    let rev = a.committed(30);
    while mirror.table.get(&after.key()).map(|x| x.1) != Some(rev) {
        let (revision, change) = a.changed();
        mirror.apply(&StoreEvent::Changed { revision, change });
    }
    let mut owners: Vec<(u32, String)> = mirror
        .table
        .values()
        .map(|(v, _)| {
            let IpAddr::V4(c) = v.affinity.client else {
                unreachable!()
            };
            (u32::from(c), v.affinity.owner.clone())
        })
        .collect();
    owners.sort();
    assert_eq!(
        owners,
        vec![
            (0xc000_0201, "b1".to_string()),
            (0xc000_0202, "b3".to_string()),
            (0xc000_0203, "b1".to_string())
        ]
    );
}

#[test]
fn a_store_started_while_etcd_is_down_says_so_and_loads_when_it_comes() {
    let _s = serial();
    let mut etcd = Etcd::start_new();
    etcd.stop();
    let mut a = Store::new(&etcd, "a");
    a.unreachable();
    a.put(1, &affinity("web", 1, "b1", "a"), 0);
    assert!(matches!(a.done(1), Outcome::Unavailable { .. }));
    etcd.start();
    assert_eq!(a.loaded().1, vec![]);
    a.put(2, &affinity("web", 1, "b1", "a"), 0);
    a.committed(2);
}

#[test]
fn garbage_under_the_prefix_is_unreadable_not_a_crash() {
    let _s = serial();
    let etcd = Etcd::start_new();
    let mut a = Store::new(&etcd, "a");
    a.loaded();
    etcd.etcdctl(&["put", "/test/a/web/192.0.2.9/32/any", "garbage"]);
    etcd.etcdctl(&["put", "/test/a/not/an/affinity", "{\"format\":1}"]);
    etcd.etcdctl(&["put", "/test/a/web/192.0.2.8/32/any", "{\"format\":7}"]);
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(a.take("Unreadable", |e| match e {
            StoreEvent::Unreadable { key, error } => Some((key.clone(), error.clone())),
            _ => None,
        }));
    }
    seen.sort();
    assert_eq!(seen[0].0, "/test/a/not/an/affinity");
    assert_eq!(seen[1].0, "/test/a/web/192.0.2.8/32/any");
    assert!(seen[1].1.contains("format 7"), "{seen:?}");
    assert_eq!(seen[2].0, "/test/a/web/192.0.2.9/32/any");

    // The thread goes on: a good put commits, a put on the garbage key is
    // refused with why.
    a.put(1, &affinity("web", 0xc000_0207, "b1", "a"), 0);
    a.committed(1);
    a.put(2, &affinity("web", 0xc000_0209, "b1", "a"), 0);
    match a.done(2) {
        Outcome::Unavailable { error } => assert!(error.contains("cannot read"), "{error}"),
        o => panic!("{o:?}"),
    }
    // A new store's load skips the garbage and names it.
    let mut c = Store::new(&etcd, "c");
    let (_, table) = c.loaded();
    assert_eq!(table.len(), 1);
    let unreadable = c.take("Unreadable", |e| match e {
        StoreEvent::Unreadable { key, .. } => Some(key.clone()),
        _ => None,
    });
    assert!(unreadable.starts_with("/test/a/"));
}

#[test]
fn five_thousand_ops_in_flight_are_all_answered() {
    let _s = serial();
    let etcd = Etcd::start_new();
    // Full transactions of ends on a shared machine: no request timeout in
    // the way of what this checks.
    let mut a = Store::with_timeout(&etcd, "a", Duration::from_secs(10));
    let mut b = Store::with_timeout(&etcd, "b", Duration::from_secs(10));
    a.loaded();
    b.loaded();
    const N: u64 = 5000;
    for t in 0..N {
        a.put(t, &affinity("bulk", 0x0b00_0000 + t as u32, "b1", "a"), 0);
    }
    // And 100 creates of one key among them: exactly one wins.
    let one = affinity("bulk", 0x0c00_0000, "b1", "a");
    for t in N..N + 100 {
        a.put(t, &one, 0);
    }
    let mut done: HashMap<u64, Outcome> = HashMap::new();
    a.take("every Done", |e| {
        if let StoreEvent::Done { ticket, outcome } = e {
            assert!(
                done.insert(*ticket, outcome.clone()).is_none(),
                "two Done for {ticket}"
            );
        }
        (done.len() as u64 == N + 100).then_some(())
    });
    for t in 0..N {
        assert!(
            matches!(done[&t], Outcome::Committed { .. }),
            "{t}: {:?}",
            done[&t]
        );
    }
    let won = (N..N + 100)
        .filter(|t| matches!(done[t], Outcome::Committed { .. }))
        .count();
    assert_eq!(won, 1);
    let mut changes = 0;
    let mut last = 0;
    b.take("every Changed", |e| {
        if let StoreEvent::Changed { revision, .. } = e {
            assert!(*revision >= last, "out of order");
            last = *revision;
            changes += 1;
        }
        (changes == N + 1).then_some(())
    });
    // Full batches of ends (a delete and a mark each: the most ops a
    // transaction can hold): every one commits, and their 5,000 marks are
    // taken away after.
    for t in 0..N {
        let Outcome::Committed { revision } = done[&t] else {
            unreachable!()
        };
        let key = affinity("bulk", 0x0b00_0000 + t as u32, "b1", "a").key();
        a.end(2 * N + t, &key, revision);
    }
    let mut ended = 0;
    a.take("every end's Done", |e| {
        if let StoreEvent::Done { ticket, outcome } = e {
            if *ticket >= 2 * N {
                assert!(
                    matches!(outcome, Outcome::Committed { .. }),
                    "{ticket}: {outcome:?}"
                );
                ended += 1;
            }
        }
        (ended == N).then_some(())
    });
    wait_for_keys(&etcd, "/test/e/", &[]);
    assert_eq!(keys_under(&etcd, "/test/").len(), 1, "the one key left");
}

#[test]
fn the_thread_ends_when_its_handle_is_dropped() {
    let _s = serial();
    let etcd = Etcd::start_new();
    let count = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter(|t| {
                let comm = t.as_ref().unwrap().path().join("comm");
                std::fs::read_to_string(comm).unwrap_or_default().trim() == "pktdist-store"
            })
            .count()
    };
    let before = count();
    let mut a = Store::new(&etcd, "a");
    a.loaded();
    assert_eq!(count(), before + 1);
    drop(a);
    let deadline = Instant::now() + PATIENCE;
    while count() > before {
        assert!(
            Instant::now() < deadline,
            "the store thread is still running"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn configuration_errors_are_clear() {
    let mut cfg = config("http://127.0.0.1:1", "a");
    cfg.endpoints.clear();
    assert!(spawn(&cfg).err().unwrap().contains("endpoints is empty"));
    let mut cfg = config("ftp://127.0.0.1:1", "a");
    assert!(spawn(&cfg).err().unwrap().contains("ftp://"));
    cfg.endpoints = vec!["http://127.0.0.1:1".into()];
    cfg.user = Some("root".into());
    assert!(spawn(&cfg).err().unwrap().contains("password_file"));
    cfg.password_file = Some("/nonexistent/pktdist-etcd.pass".into());
    assert!(spawn(&cfg)
        .err()
        .unwrap()
        .contains("/nonexistent/pktdist-etcd.pass"));
    let mut cfg = config("http://127.0.0.1:1", "a");
    cfg.ca_file = Some("/etc/ssl/certs/ca-certificates.crt".into());
    assert!(spawn(&cfg).err().unwrap().contains("https://"));
    let cfg = config("https://127.0.0.1:1", "a");
    assert!(spawn(&cfg).err().unwrap().contains("ca_file"));
}

#[test]
fn a_user_and_password_file_authenticate_and_an_expired_token_is_renewed() {
    let _s = serial();
    // Tokens that expire after a second, so the store must renew its own.
    let etcd = Etcd::start_with(&["--auth-token-ttl", "1"]);
    etcd.etcdctl(&["user", "add", "root:s3cret"]);
    etcd.etcdctl(&["auth", "enable"]);
    let dir = std::env::temp_dir().join(format!("pktdist-etcd-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good");
    let bad = dir.join("bad");
    std::fs::write(&good, "s3cret\nignored second line\n").unwrap();
    std::fs::write(&bad, "wrong\n").unwrap();
    let with = |file: &std::path::Path| {
        let mut cfg = config(&etcd.endpoint(), "a");
        cfg.user = Some("root".into());
        cfg.password_file = Some(file.to_path_buf());
        Store::of(cfg, "auth")
    };
    let mut a = with(&good);
    a.loaded();
    a.put(1, &affinity("web", 1, "b1", "a"), 0);
    a.committed(1);
    std::thread::sleep(Duration::from_secs(3));
    a.put(2, &affinity("web", 2, "b1", "a"), 0);
    a.committed(2);
    assert!(
        !a.pending
            .iter()
            .any(|e| matches!(e, StoreEvent::Unreachable { .. })),
        "{:?}",
        a.pending
    );
    let mut b = with(&bad);
    let error = b.unreachable();
    assert!(error.contains("authentication failed"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tls_with_a_client_certificate_connects() {
    let _s = serial();
    let etcd = Etcd::start_tls();
    let files = etcd.tls_files().expect("tls").clone();
    let mut cfg = config(&etcd.endpoint(), "a");
    cfg.ca_file = Some(files.ca.clone());
    cfg.cert_file = Some(files.cert.clone());
    cfg.key_file = Some(files.key.clone());
    let mut a = Store::of(cfg.clone(), "tls");
    a.loaded();
    a.put(1, &affinity("web", 1, "b1", "a"), 0);
    a.committed(1);
    // Without the client certificate etcd refuses the connection. Under
    // TLS 1.3 the client's part of the handshake ends before etcd checks
    // its certificate, so the refusal arrives as etcd's alert
    // (BadCertificate) or, when the first request is already on its way,
    // as the connection closing or a broken pipe: a transport error, with
    // the transport's own words after it, and never an answer from etcd.
    cfg.cert_file = None;
    cfg.key_file = None;
    let mut b = Store::of(cfg, "no client certificate");
    let error = b.unreachable();
    assert!(error.contains("transport error: "), "{error}");
}

fn declaration(backend: &str, by_admin: bool, state: Declared, writer: &str) -> StoredDeclaration {
    StoredDeclaration {
        key: DeclarationKey {
            service: "web".to_string(),
            backend: backend.to_string(),
            by_admin,
        },
        state,
        writer: writer.to_string(),
        written_unix_ms: 1_700_000_000_002,
    }
}

#[test]
fn declarations_are_last_writer_wins_watched_and_loaded_beside_the_affinities() {
    let _s = serial();
    let etcd = Etcd::start_new();
    let mut a = Store::new(&etcd, "a");
    let mut b = Store::new(&etcd, "b");
    a.loaded_all();
    b.loaded_all();

    // A drain written at a reaches b's watch, under the documented key.
    let drain = declaration("be2", false, Declared::Drain, "a");
    a.declare(1, &drain);
    let rev = a.committed(1);
    let declared = |d: &StoredDeclaration| Change::Declared {
        key: d.key.clone(),
        state: d.state,
    };
    assert_eq!(b.changed(), (rev, declared(&drain)));
    let shown = etcd.etcdctl(&["get", "--prefix", "/test/d/"]);
    assert!(shown.contains("/test/d/web/be2/app\n"), "{shown}");
    assert!(shown.contains("\"state\":\"drain\""), "{shown}");

    // No compare: b's DOWN over a's DRAIN commits, and wins; the
    // operator's declaration is a key of its own.
    let down = declaration("be2", false, Declared::Down, "b");
    b.declare(2, &down);
    let rev2 = b.committed(2);
    assert!(rev2 > rev);
    let admin = declaration("be2", true, Declared::Drain, "b");
    b.declare(3, &admin);
    let rev3 = b.committed(3);
    // An affinity beside them, in the same store.
    let pin = affinity("web", 0xc000_0209, "be1", "a");
    a.put(4, &pin, 0);
    let rev4 = a.committed(4);
    assert_eq!(a.changed(), (rev, declared(&drain)));
    assert_eq!(a.changed(), (rev2, declared(&down)));
    assert_eq!(a.changed(), (rev3, declared(&admin)));
    assert_eq!(a.changed(), (rev4, Change::Put(pin.clone())));

    // UP deletes the key, and the watch says UP.
    let up = declaration("be2", false, Declared::Up, "a");
    a.declare(5, &up);
    let rev5 = a.committed(5);
    for _ in 0..3 {
        b.changed();
    }
    assert_eq!(b.changed(), (rev5, declared(&up)));
    let shown = etcd.etcdctl(&["get", "--prefix", "/test/d/"]);
    assert!(!shown.contains("/test/d/web/be2/app"), "{shown}");
    // UP where nothing is declared commits too (nothing to delete).
    a.declare(6, &up);
    a.committed(6);

    // A store thread started now loads both kinds, with their revisions;
    // a key that is neither is not pktdist's and is left alone, a bad
    // declaration is reported, not loaded.
    etcd.etcdctl(&["put", "/test/x/other", "anything"]);
    etcd.etcdctl(&["put", "/test/d/web/be3/root", "{}"]);
    let mut c = Store::new(&etcd, "c");
    let (_, affinities, declarations) = c.loaded_all();
    assert_eq!(affinities, vec![(pin, rev4)]);
    assert_eq!(declarations, vec![(admin, rev3)]);
    let bad = c.take("Unreadable", |e| match e {
        StoreEvent::Unreadable { key, .. } => Some(key.clone()),
        _ => None,
    });
    assert_eq!(bad, "/test/d/web/be3/root");
    assert!(
        c.pending
            .iter()
            .all(|e| !matches!(e, StoreEvent::Unreadable { .. })),
        "{:?}",
        c.pending
    );
}

/// A three-member etcd cluster whose third member lives in a network
/// namespace of its own, reached by clients over one veth pair and by its
/// peers over another: taking the peers' link down cuts it off from its
/// cluster while its clients still reach it (a partition as a member on
/// the wrong side of a switch failure sees it). Everything goes on drop.
struct CutOffBed {
    netns: String,
    /// The root-side names of the client and peer veth pairs.
    links: [String; 2],
    dir: std::path::PathBuf,
    children: Vec<std::process::Child>,
    /// Client URLs of the members: two in this namespace, the third's.
    endpoints: [String; 3],
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl CutOffBed {
    /// None where network namespaces or veth pairs cannot be made (not
    /// root, no `ip`).
    fn start() -> Option<CutOffBed> {
        let n = std::process::id() % 100_000;
        let netns = format!("pdcut{n}");
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        let made = Command::new("ip").args(["netns", "add", &netns]).output();
        if !made.is_ok_and(|o| o.status.success()) {
            return None;
        }
        let dir = std::env::temp_dir().join(format!("pktdist-etcd-cut-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut bed = CutOffBed {
            netns: netns.clone(),
            links: [format!("pdc{n}"), format!("pdp{n}")],
            dir,
            children: Vec::new(),
            endpoints: Default::default(),
        };
        // 198.19.251.0/24 for clients, 198.19.252.0/24 for peers (of the
        // benchmarking block, 198.18.0.0/15, which no host routes).
        for (link, net) in bed.links.clone().iter().zip(["198.19.251", "198.19.252"]) {
            let inner = format!("{link}n");
            let _ = Command::new("ip").args(["link", "del", link]).output();
            let veth = Command::new("ip")
                .args(["link", "add", link, "type", "veth", "peer", "name", &inner])
                .output();
            if !veth.is_ok_and(|o| o.status.success()) {
                return None;
            }
            ip(&["link", "set", &inner, "netns", &netns]);
            ip(&["addr", "add", &format!("{net}.1/24"), "dev", link]);
            ip(&["link", "set", link, "up"]);
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{net}.2/24"),
                "dev",
                &inner,
            ]);
            ip(&["-n", &netns, "link", "set", &inner, "up"]);
        }
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        let port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port()
        };
        let clients = [
            format!("http://127.0.0.1:{}", port()),
            format!("http://127.0.0.1:{}", port()),
            format!("http://198.19.251.2:{}", port()),
        ];
        let peers = [
            format!("http://198.19.252.1:{}", port()),
            format!("http://198.19.252.1:{}", port()),
            format!("http://198.19.252.2:{}", port()),
        ];
        let cluster = (0..3)
            .map(|i| format!("m{i}={}", peers[i]))
            .collect::<Vec<_>>()
            .join(",");
        for i in 0..3 {
            let mut cmd = if i == 2 {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &netns, "etcd"]);
                c
            } else {
                Command::new("etcd")
            };
            for (k, _) in std::env::vars() {
                if k.starts_with("ETCD") {
                    cmd.env_remove(k);
                }
            }
            let log = std::fs::File::create(bed.dir.join(format!("m{i}.log"))).expect("log");
            cmd.args([
                "--name",
                &format!("m{i}"),
                "--data-dir",
                bed.dir.join(format!("m{i}")).to_str().expect("utf-8"),
                "--listen-client-urls",
                &clients[i],
                "--advertise-client-urls",
                &clients[i],
                "--listen-peer-urls",
                &peers[i],
                "--initial-advertise-peer-urls",
                &peers[i],
                "--initial-cluster",
                &cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &netns,
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
            bed.children.push(cmd.spawn().expect("start etcd"));
        }
        bed.endpoints = clients;
        let deadline = Instant::now() + PATIENCE;
        while !bed.healthy() {
            assert!(
                Instant::now() < deadline,
                "the cluster did not form: {}",
                bed.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(bed)
    }

    /// Every member answers a linearizable read.
    fn healthy(&self) -> bool {
        (0..3).all(|i| self.answers(i))
    }

    /// Member `i` answers a linearizable read (it is in contact with a
    /// leader).
    fn answers(&self, i: usize) -> bool {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                &format!("--endpoints={}", self.endpoints[i]),
                "get",
                "x",
                "--command-timeout=1s",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Takes the third member's link to its peers down (or up again).
    fn cut_off(&self, cut: bool) {
        let inner = format!("{}n", self.links[1]);
        let state = if cut { "down" } else { "up" };
        ip(&["-n", &self.netns, "link", "set", &inner, state]);
    }

    fn logs(&self) -> String {
        (0..3)
            .map(|i| {
                std::fs::read_to_string(self.dir.join(format!("m{i}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for CutOffBed {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for link in &self.links {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A member cut off from its cluster keeps its connections and its watch
/// open and delivers nothing more. A store thread connected to it does not
/// go on as if its table were current: the freshness check finds it behind
/// (or unable to read with the quorum), says `Unreachable`, refuses
/// changes, and once the member is back loads the table with what the
/// majority wrote meanwhile.
#[test]
fn a_member_cut_off_from_its_cluster_is_given_up_not_trusted() {
    let _s = serial();
    let Some(bed) = CutOffBed::start() else {
        assert!(
            !common::testbed::required(),
            "no network namespace can be made here, and test beds are required"
        );
        eprintln!("skipped: no network namespace can be made here");
        return;
    };
    let mut a_cfg = config(&bed.endpoints[2], "a");
    // Short, so that the member is given up soon, but not so short that a
    // slow answer before the cut already reconnects.
    a_cfg.timeout = DurationStr(Duration::from_secs(2));
    let mut a = Store::of(a_cfg, "a");
    let mut b = Store::new_at(&bed.endpoints[0], "b");
    // c knows all three members: its reads and writes go to each in turn,
    // its watch to one of them.
    let mut c_cfg = config(&bed.endpoints[0], "c");
    c_cfg.endpoints = bed.endpoints.to_vec();
    c_cfg.timeout = DurationStr(Duration::from_secs(2));
    let mut c = Store::of(c_cfg, "c");
    a.loaded();
    b.loaded();
    c.loaded();
    let before = affinity("web", 0xc000_0201, "b1", "b");
    b.put(1, &before, 0);
    b.committed(1);
    assert_eq!(a.changed().1, Change::Put(before));

    bed.cut_off(true);
    // The majority elects a leader of its own if the cut-off member led.
    let deadline = Instant::now() + PATIENCE;
    while !bed.answers(0) {
        assert!(
            Instant::now() < deadline,
            "the majority lost its quorum: {}",
            bed.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let during = affinity("web", 0xc000_0202, "b1", "b");
    b.put(2, &during, 0);
    let rev = b.committed(2);
    // c gets the majority's write: by its watch, or (its watch on the
    // cut-off member, found behind) by a new load.
    let got = c.take("the majority's write", |e| match e {
        StoreEvent::Changed { revision, change } if *change == Change::Put(during.clone()) => {
            Some(*revision)
        }
        StoreEvent::Loaded { affinities, .. } => affinities
            .iter()
            .find(|(v, _)| *v == during)
            .map(|(_, r)| *r),
        _ => None,
    });
    assert_eq!(got, rev);
    let why = a.unreachable();
    assert!(
        why.contains("behind etcd's quorum") || why.contains("linearizable"),
        "{why}"
    );
    let stale = affinity("web", 0xc000_0203, "a1", "a");
    a.put(3, &stale, 0);
    assert!(
        matches!(a.done(3), Outcome::Unavailable { .. }),
        "a change through a cut-off member is refused"
    );

    bed.cut_off(false);
    let (_, table) = a.loaded();
    assert!(
        table.iter().any(|(v, r)| *v == during && *r == rev),
        "the majority's write is in the new load: {table:?}"
    );
}
