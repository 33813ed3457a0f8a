//! The store thread on etcd v3: `pktdist-store`, a current-thread tokio
//! runtime of its own that connects, loads the table, watches it and runs
//! the control thread's compare-and-set changes (docs/cluster.md, "The
//! store: keys, values, transactions").
//!
//! One connection at a time: load (one range read of `<prefix>/`: the
//! affinities, the declared backend states and this instance's end
//! marks), then a watch from the next revision, while ops are batched into
//! transactions (one nested transaction per op, several transactions in
//! flight), with the removal of the end marks already reported beside
//! them. When
//! the watch or a transaction loses etcd, the thread says `Unreachable`,
//! answers every op `Unavailable` at once, and reconnects with backoff
//! (100 ms doubling to 1 s) until a fresh `Loaded`. It ends when the
//! `StoreHandle` is dropped.
//!
//! An etcd member cut off from the rest of its cluster keeps the
//! connection and the watch open and delivers nothing more, so the thread
//! also checks, every [`FRESHNESS_INTERVAL`], that its watch keeps up with
//! the cluster's quorum: a linearizable read gives the revision the quorum
//! has reached, and one interval later the watch, asked for its progress,
//! must have reached it by the interval after that, or at least moved.
//! Two reads in a row that fail (one may be a leader election), or a watch
//! behind that does not move, are a lost connection like any other.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    AuthClient, Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions,
    Identity, KvClient, TlsOptions, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
    WatchStream, Watcher,
};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinSet;

use super::record::{encode_declaration, encode_mark, encode_value, Entry, KeyKind, KeySpace};
use super::{Change, Outcome, Revision, StoreEvent, StoreHandle, StoreOp, Ticket};
use crate::config::ClusterConfig;
use crate::types::Declared;

/// Most ops in one transaction (end marks' removals included). etcd
/// refuses a transaction with more than `--max-txn-ops` (default 128)
/// operations in a branch, and counts a nested transaction's branch against
/// what its parent leaves: a success branch of N nested transactions of
/// at most two ops each (an end's delete and its mark) needs N + 2 <= 128.
pub const MAX_BATCH: usize = 126;

/// How often marks that no change took away along get a transaction of
/// their own ([`Tuning::sweep_interval`]'s default).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Another instance's end mark older than this (by the clock it wrote in
/// it) is taken away by any instance that loads the table: the instance
/// that left it has been gone that long.
const ORPHAN_MARK_MS: u64 = 3_600_000;

/// Transactions in flight at once (perf/README.md, "Cluster store").
pub const MAX_IN_FLIGHT: usize = 8;

/// The first wait before reconnecting, doubled on each failure up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How often the thread checks that its watch keeps up with etcd's quorum
/// (a member cut off from its cluster would deliver nothing more): such a
/// member is given up within about three of these and twice the
/// `[cluster] timeout`.
const FRESHNESS_INTERVAL: Duration = Duration::from_secs(3);

/// Largest table the load accepts in its one range read (gRPC's default of
/// 4 MiB would hold only about 15,000 affinities).
const MAX_LOAD_BYTES: usize = 1 << 30;

/// How the thread batches; [`Tuning::default`] is what pktdist runs with,
/// the benchmark tries others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Most ops per transaction (1..=[`MAX_BATCH`]).
    pub max_batch: usize,
    /// Most transactions waiting for etcd at once (at least 1).
    pub max_in_flight: usize,
    /// How often end marks that no change took away along get a
    /// transaction of their own (more than 0).
    pub sweep_interval: Duration,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            max_batch: MAX_BATCH,
            max_in_flight: MAX_IN_FLIGHT,
            sweep_interval: SWEEP_INTERVAL,
        }
    }
}

/// How often an idle connection to etcd is pinged (etcd's default
/// --grpc-keepalive-min-time is 5 s; a client pinging more often is
/// disconnected with "too many pings").
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Starts the store thread for `cfg`. Errors: the configuration cannot work
/// (no endpoints, a URL that is neither http nor https, unreadable
/// password or certificate files). etcd being down is not an error: the
/// thread says `Unreachable` and keeps trying.
pub fn spawn(cfg: &ClusterConfig) -> Result<StoreHandle, String> {
    spawn_tuned(cfg, Tuning::default())
}

/// [`spawn`] with other batching.
pub fn spawn_tuned(cfg: &ClusterConfig, tuning: Tuning) -> Result<StoreHandle, String> {
    if tuning.max_batch == 0
        || tuning.max_batch > MAX_BATCH
        || tuning.max_in_flight == 0
        || tuning.sweep_interval.is_zero()
    {
        return Err(format!(
            "store batching {tuning:?}: max_batch must be 1..={MAX_BATCH}, max_in_flight at \
             least 1, sweep_interval more than 0"
        ));
    }
    let settings = Settings::of(cfg, tuning)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the store thread's runtime: {e}"))?;
    let (handle, peer) = StoreHandle::pair();
    std::thread::Builder::new()
        .name("pktdist-store".to_string())
        .spawn(move || runtime.block_on(run(settings, peer.ops, peer.events)))
        .map_err(|e| format!("cannot start the store thread: {e}"))?;
    Ok(handle)
}

/// What the thread needs from the configuration, checked and read.
struct Settings {
    endpoints: Vec<String>,
    options: ConnectOptions,
    /// User and password, to authenticate again when etcd's token expires.
    user: Option<(String, String)>,
    keys: Arc<KeySpace>,
    /// `[cluster] instance`: the name in this instance's end marks.
    instance: Arc<str>,
    tuning: Tuning,
}

impl Settings {
    fn of(cfg: &ClusterConfig, tuning: Tuning) -> Result<Settings, String> {
        if cfg.endpoints.is_empty() {
            return Err("[cluster] endpoints is empty: name at least one etcd URL".into());
        }
        let mut https = 0;
        for e in &cfg.endpoints {
            if e.starts_with("https://") {
                https += 1;
            } else if !e.starts_with("http://") {
                return Err(format!(
                    "[cluster] endpoint {e:?}: expected an http:// or https:// URL"
                ));
            }
        }
        if https != 0 && https != cfg.endpoints.len() {
            return Err("[cluster] endpoints mix http:// and https://: use one".into());
        }
        let timeout = cfg.timeout.0;
        if timeout.is_zero() {
            return Err("[cluster] timeout must be more than 0".into());
        }
        // Keep-alive pings find a silent peer (a partition, not a refused
        // connection) within KEEP_ALIVE_INTERVAL plus a timeout. Not more
        // often: etcd closes the connection of a client that pings more
        // often than its --grpc-keepalive-min-time (5 s by default).
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, timeout)
            .with_keep_alive_while_idle(true);
        let mut login = None;
        match (&cfg.user, &cfg.password_file) {
            (Some(user), Some(file)) => {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| format!("[cluster] password_file {}: {e}", file.display()))?;
                let password = text.lines().next().unwrap_or("");
                if password.is_empty() {
                    return Err(format!(
                        "[cluster] password_file {}: its first line is empty",
                        file.display()
                    ));
                }
                options = options.with_user(user.clone(), password.to_string());
                login = Some((user.clone(), password.to_string()));
            }
            (Some(_), None) => {
                return Err("[cluster] user needs password_file (the password's file)".into())
            }
            (None, Some(_)) => return Err("[cluster] password_file needs user".into()),
            (None, None) => {}
        }
        let read = |what: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("[cluster] {what} {}: {e}", p.display()))
        };
        let tls_files = cfg.ca_file.is_some() || cfg.cert_file.is_some() || cfg.key_file.is_some();
        if https == 0 && tls_files {
            return Err(
                "[cluster] ca_file, cert_file and key_file are for https:// endpoints".into(),
            );
        }
        if https > 0 {
            let ca = cfg.ca_file.as_ref().ok_or(
                "[cluster] https:// endpoints need ca_file (the CA that signed etcd's certificate)",
            )?;
            let mut tls =
                TlsOptions::new().ca_certificate(Certificate::from_pem(read("ca_file", ca)?));
            match (&cfg.cert_file, &cfg.key_file) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(Identity::from_pem(
                        read("cert_file", cert)?,
                        read("key_file", key)?,
                    ));
                }
                (None, None) => {}
                _ => return Err("[cluster] cert_file and key_file go together".into()),
            }
            options = options.with_tls(tls);
        }
        Ok(Settings {
            endpoints: cfg.endpoints.clone(),
            options,
            user: login,
            keys: Arc::new(KeySpace::new(&cfg.prefix)),
            instance: cfg.instance.as_str().into(),
            tuning,
        })
    }
}

/// Why a connection ended.
enum End {
    /// The `StoreHandle` is gone: the thread ends.
    Closed,
    /// etcd stopped answering, or the watch ended.
    Lost(String),
}

/// The thread: connect and load, serve, and after a loss reconnect.
async fn run(s: Settings, mut ops: UnboundedReceiver<StoreOp>, events: mpsc::Sender<StoreEvent>) {
    let mut backoff = FIRST_BACKOFF;
    // The error of the current outage, once reported (None: connected, or
    // not reported yet).
    let mut outage: Option<String> = None;
    loop {
        let attempt = connect_and_load(&s);
        tokio::pin!(attempt);
        let connected = loop {
            tokio::select! {
                r = &mut attempt => break r,
                op = ops.recv() => match op {
                    None => return,
                    Some(op) => {
                        let why = outage.as_deref().unwrap_or("not connected yet");
                        if !refuse(&events, op, why) {
                            return;
                        }
                    }
                },
            }
        };
        let end = match connected {
            Ok(session) => {
                backoff = FIRST_BACKOFF;
                outage = None;
                if !session.send_load(&events) {
                    return;
                }
                session.serve(&s, &mut ops, &events).await
            }
            Err(e) => End::Lost(e),
        };
        let error = match end {
            End::Closed => return,
            End::Lost(e) => e,
        };
        if outage.is_none() {
            let report = StoreEvent::Unreachable {
                error: error.clone(),
            };
            if events.send(report).is_err() {
                return;
            }
        }
        outage = Some(error);
        // Wait before the next attempt, refusing ops meanwhile.
        let wait = tokio::time::sleep(backoff);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                op = ops.recv() => match op {
                    None => return,
                    Some(op) => {
                        if !refuse(&events, op, outage.as_deref().unwrap_or("")) {
                            return;
                        }
                    }
                },
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Answers `op` Unavailable because etcd is not reachable; false if the
/// control thread is gone.
fn refuse(events: &mpsc::Sender<StoreEvent>, op: StoreOp, why: &str) -> bool {
    events
        .send(StoreEvent::Done {
            ticket: op.ticket(),
            outcome: Outcome::Unavailable {
                error: format!("etcd unreachable: {why}"),
            },
        })
        .is_ok()
}

/// A connection with its table loaded and its watch started.
struct Session {
    kv: KvClient,
    /// Shares the connection's token with `kv`.
    auth: AuthClient,
    /// Kept (dropping it would end the watch), and asked for the watch's
    /// progress.
    watcher: Watcher,
    stream: WatchStream,
    revision: Revision,
    /// The highest revision the watch's member has reported (in any watch
    /// response's header): how far the watch has got.
    watched_to: Revision,
    loaded: Vec<StoreEvent>,
    /// End marks to take away (key, the mark's mod revision): this
    /// instance's once the store has told the control thread of them, and
    /// orphans found by the load. Each goes with a later transaction.
    sweep: HashMap<String, Revision>,
}

async fn connect_and_load(s: &Settings) -> Result<Session, String> {
    let client = Client::connect(&s.endpoints, Some(s.options.clone()))
        .await
        .map_err(|e| format!("connecting to {}: {}", s.endpoints.join(","), describe(&e)))?;
    let mut kv = client.kv_client().max_decoding_message_size(MAX_LOAD_BYTES);
    let root = s.keys.root();
    let resp = kv
        .get(root, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| format!("reading {root}: {}", describe(&e)))?;
    let revision = resp
        .header()
        .map(|h| h.revision())
        .ok_or("etcd answered the load without a header")?;
    let mut affinities = Vec::with_capacity(resp.kvs().len());
    let mut declarations = Vec::new();
    let mut unreadable = Vec::new();
    let mut ended = Vec::new();
    let mut sweep = HashMap::new();
    let now_ms = unix_ms();
    for kv in resp.kvs() {
        if s.keys.kind(kv.key()) == KeyKind::Mark {
            // An unreadable mark is not this build's: left alone.
            if let Ok(mark) = s.keys.decode_mark(kv.key(), kv.value()) {
                let own = *mark.instance == *s.instance;
                if own {
                    ended.push((mark.key, mark.expect));
                }
                if own || now_ms.saturating_sub(mark.written_unix_ms) > ORPHAN_MARK_MS {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    sweep.insert(key, kv.mod_revision());
                }
            }
            continue;
        }
        match s.keys.decode_entry(kv.key(), kv.value()) {
            None => {}
            Some(Ok(Entry::Affinity(a))) => affinities.push((a, kv.mod_revision())),
            Some(Ok(Entry::Declaration(d))) => declarations.push((d, kv.mod_revision())),
            Some(Err(error)) => unreadable.push(StoreEvent::Unreadable {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                error,
            }),
        }
    }
    let mut loaded = vec![StoreEvent::Loaded {
        revision,
        affinities,
        declarations,
        ended,
    }];
    loaded.extend(unreadable);
    let (watcher, stream) = client
        .watch_client()
        .watch(
            root,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await
        .map_err(|e| format!("watching {root}: {}", describe(&e)))?;
    Ok(Session {
        kv,
        auth: client.auth_client(),
        watcher,
        stream,
        revision,
        watched_to: revision,
        loaded,
        sweep,
    })
}

/// The wall clock, Unix ms.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What one transaction task gives back: the events for its ops, or the
/// error that left their outcome unknown.
type TxnResult = Result<Vec<StoreEvent>, etcd_client::Error>;

/// What a quorum read gives back: the revision etcd's quorum has reached.
type QuorumResult = Result<Revision, etcd_client::Error>;

impl Session {
    /// Sends the `Loaded` (and the `Unreadable`s found by the load).
    fn send_load(&self, events: &mpsc::Sender<StoreEvent>) -> bool {
        self.loaded.iter().all(|e| events.send(e.clone()).is_ok())
    }

    async fn serve(
        mut self,
        s: &Settings,
        ops: &mut UnboundedReceiver<StoreOp>,
        events: &mpsc::Sender<StoreEvent>,
    ) -> End {
        let mut out = InFlight::default();
        // An op taken from the channel that could not join the last batch
        // (its key was already in it); it starts the next one.
        let mut carried: Option<StoreOp> = None;
        // The freshness check (module doc): the quorum read in flight, the
        // revision the last one gave, and the revision the watch was asked
        // to report progress beyond at the last tick.
        let mut freshness = tokio::time::interval_at(
            tokio::time::Instant::now() + FRESHNESS_INTERVAL,
            FRESHNESS_INTERVAL,
        );
        freshness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut quorum_read: Option<tokio::task::JoinHandle<QuorumResult>> = None;
        let mut quorum_at: Option<Revision> = None;
        // The revision the watch owes, and how far it had got when asked.
        let mut owed: Option<(Revision, Revision)> = None;
        let mut failed_reads = 0;
        let mut sweep_tick = tokio::time::interval(s.tuning.sweep_interval);
        sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Once the handle is gone nobody reads an answer: the thread ends
        // at once (the transactions out are dropped with it).
        let end = loop {
            let room = out.tasks.len() < s.tuning.max_in_flight;
            if room {
                if let Some(first) = carried.take() {
                    let Some(batch) =
                        take_batch(&s.keys, first, ops, s.tuning.max_batch, &mut carried)
                    else {
                        return End::Closed;
                    };
                    self.spawn_batch(s, &mut out, batch);
                    continue;
                }
            }
            tokio::select! {
                biased;
                msg = self.stream.message() => {
                    if let Err(e) = self.watched(s, msg, events) {
                        break e;
                    }
                }
                Some(done) = out.tasks.join_next_with_id(), if !out.tasks.is_empty() => {
                    match out.finish(done, events, &mut self.sweep) {
                        Ok(None) => {}
                        Ok(Some(lost)) => break End::Lost(lost),
                        Err(()) => return End::Closed,
                    }
                }
                op = ops.recv(), if room && carried.is_none() => {
                    let Some(first) = op else { return End::Closed };
                    let Some(batch) =
                        take_batch(&s.keys, first, ops, s.tuning.max_batch, &mut carried)
                    else {
                        return End::Closed;
                    };
                    self.spawn_batch(s, &mut out, batch);
                }
                _ = freshness.tick() => {
                    if let Some((due, asked_at)) = owed.take() {
                        // Behind, and not moving: a slow watch catching up
                        // under load moves.
                        if self.watched_to < due && self.watched_to == asked_at {
                            break End::Lost(format!(
                                "the watch fell behind etcd's quorum (at revision {}, the quorum \
                                 at {due} over {} s earlier): its member may be cut off from \
                                 its cluster",
                                self.watched_to,
                                FRESHNESS_INTERVAL.as_secs()
                            ));
                        }
                    }
                    if let Some(due) = quorum_at.take() {
                        if let Err(e) = self.watcher.request_progress().await {
                            break End::Lost(format!("watch: {}", describe(&e)));
                        }
                        owed = Some((due, self.watched_to));
                    }
                    if quorum_read.is_none() {
                        quorum_read = Some(tokio::spawn(self.quorum_revision(s)));
                    }
                }
                read = async { quorum_read.as_mut().expect("guarded").await },
                    if quorum_read.is_some() =>
                {
                    quorum_read = None;
                    // One failed read may be a leader election; two in a
                    // row are not.
                    match read {
                        Ok(Ok(revision)) => {
                            quorum_at = Some(revision);
                            failed_reads = 0;
                        }
                        Ok(Err(e)) if failed_reads >= 1 => {
                            break End::Lost(format!(
                                "etcd did not answer two linearizable reads in a row (no quorum?): {}",
                                describe(&e)
                            ))
                        }
                        Ok(Err(_)) => failed_reads += 1,
                        Err(e) => break End::Lost(format!("the quorum read failed: {e}")),
                    }
                }
                // Marks that no change took away: a transaction of their
                // own, one at a time, as soon as they fill one, else at
                // most once a sweep interval.
                _ = std::future::ready(()),
                    if room
                        && out.sweeping.is_none()
                        && self.sweep.len() >= s.tuning.max_batch =>
                {
                    self.spawn_batch(s, &mut out, Vec::new());
                }
                _ = sweep_tick.tick() => {
                    if room && out.sweeping.is_none() && !self.sweep.is_empty() {
                        self.spawn_batch(s, &mut out, Vec::new());
                    }
                }
            }
        };
        if let Some(read) = quorum_read {
            read.abort();
        }
        let End::Lost(why) = &end else { return end };
        // Connection lost: the transactions still out finish (or time out)
        // on their own; each op still gets its one answer, and new ops are
        // refused meanwhile.
        if let Some(op) = carried.take() {
            if !refuse(events, op, why) {
                return End::Closed;
            }
        }
        while !out.tasks.is_empty() {
            tokio::select! {
                Some(done) = out.tasks.join_next_with_id() => {
                    if out.finish(done, events, &mut self.sweep).is_err() {
                        return End::Closed;
                    }
                }
                op = ops.recv() => {
                    let Some(op) = op else { return End::Closed };
                    if !refuse(events, op, why) {
                        return End::Closed;
                    }
                }
            }
        }
        end
    }

    /// `Ended` for a watch event that writes one of this instance's end
    /// marks (the mark then to be taken away); None for any other event.
    fn own_mark(&mut self, s: &Settings, ev: &etcd_client::Event) -> Option<Change> {
        let kv = ev.kv()?;
        if ev.event_type() != EventType::Put || s.keys.kind(kv.key()) != KeyKind::Mark {
            return None;
        }
        let mark = s.keys.decode_mark(kv.key(), kv.value()).ok()?;
        if *mark.instance != *s.instance {
            return None;
        }
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        self.sweep.insert(key, kv.mod_revision());
        Some(Change::Ended {
            key: mark.key,
            expect: mark.expect,
        })
    }

    /// Turns one watch message into `Changed` (or `Unreadable`) events, in
    /// commit order, each revision's `Ended` for this instance's end marks
    /// ahead of its other changes (the deletion committed with each).
    fn watched(
        &mut self,
        s: &Settings,
        msg: Result<Option<etcd_client::WatchResponse>, etcd_client::Error>,
        events: &mpsc::Sender<StoreEvent>,
    ) -> Result<(), End> {
        let keys = &s.keys;
        let resp = match msg {
            Ok(Some(resp)) => resp,
            Ok(None) => return Err(End::Lost("the watch stream ended".into())),
            Err(e) => return Err(End::Lost(format!("watch: {}", describe(&e)))),
        };
        if resp.compact_revision() > 0 {
            return Err(End::Lost(format!(
                "watch: etcd compacted its history past revision {} (now from {})",
                self.revision + 1,
                resp.compact_revision()
            )));
        }
        if resp.canceled() {
            return Err(End::Lost(format!(
                "watch cancelled by etcd: {}",
                resp.cancel_reason()
            )));
        }
        if let Some(h) = resp.header() {
            self.watched_to = self.watched_to.max(h.revision());
        }
        let all = resp.events();
        for (i, ev) in all.iter().enumerate() {
            let Some(kv) = ev.kv() else { continue };
            let revision = kv.mod_revision();
            // A revision's first event: its own marks go first (etcd puts
            // a revision's events in one message, in the order of its
            // transaction, where the deletion comes before its mark).
            if i == 0 || all[i - 1].kv().map(|k| k.mod_revision()) != Some(revision) {
                let same = all[i..]
                    .iter()
                    .take_while(|e| e.kv().map(|k| k.mod_revision()) == Some(revision));
                for e in same {
                    if let Some(change) = self.own_mark(s, e) {
                        if events
                            .send(StoreEvent::Changed { revision, change })
                            .is_err()
                        {
                            return Err(End::Closed);
                        }
                    }
                }
            }
            self.revision = self.revision.max(revision);
            let change = if ev.event_type() == EventType::Put {
                match keys.decode_entry(kv.key(), kv.value()) {
                    None => continue,
                    Some(Ok(Entry::Affinity(a))) => Ok(Change::Put(a)),
                    Some(Ok(Entry::Declaration(d))) => Ok(Change::Declared {
                        key: d.key,
                        state: d.state,
                    }),
                    Some(Err(error)) => Err(error),
                }
            } else {
                // A stray key's deletion changes nothing: its put was
                // reported as Unreadable.
                match keys.kind(kv.key()) {
                    KeyKind::Affinity => match keys.parse_key(kv.key()) {
                        Ok(k) => Ok(Change::Deleted(k)),
                        Err(_) => continue,
                    },
                    KeyKind::Declaration => match keys.parse_declaration_key(kv.key()) {
                        Ok(key) => Ok(Change::Declared {
                            key,
                            state: Declared::Up,
                        }),
                        Err(_) => continue,
                    },
                    KeyKind::Mark | KeyKind::Other => continue,
                }
            };
            let event = match change {
                Ok(change) => StoreEvent::Changed { revision, change },
                Err(error) => StoreEvent::Unreadable {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    error,
                },
            };
            if events.send(event).is_err() {
                return Err(End::Closed);
            }
        }
        Ok(())
    }
}

/// The transactions out, with the tickets of each, so that even a task
/// that failed to finish answers its ops, and the marks each takes away,
/// kept to be taken away again if it fails.
#[derive(Default)]
struct InFlight {
    tasks: JoinSet<TxnResult>,
    tickets: HashMap<tokio::task::Id, Vec<Ticket>>,
    sweeps: HashMap<tokio::task::Id, Vec<(String, Revision)>>,
    /// The transaction that takes marks away and nothing else, if one is
    /// out.
    sweeping: Option<tokio::task::Id>,
}

impl InFlight {
    fn spawn(
        &mut self,
        task: impl std::future::Future<Output = TxnResult> + Send + 'static,
        tickets: Vec<Ticket>,
        sweep: Vec<(String, Revision)>,
    ) {
        let sweep_only = tickets.is_empty();
        let id = self.tasks.spawn(task).id();
        self.tickets.insert(id, tickets);
        self.sweeps.insert(id, sweep);
        if sweep_only {
            self.sweeping = Some(id);
        }
    }

    /// Sends what a finished transaction answers; the marks of one that
    /// failed go back to `sweep`. Ok(Some(error)): etcd is out of reach;
    /// Err: the control thread is gone.
    fn finish(
        &mut self,
        done: Result<(tokio::task::Id, TxnResult), tokio::task::JoinError>,
        events: &mpsc::Sender<StoreEvent>,
        sweep: &mut HashMap<String, Revision>,
    ) -> Result<Option<String>, ()> {
        let id = match &done {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        if self.sweeping == Some(id) {
            self.sweeping = None;
        }
        let marks = self.sweeps.remove(&id).unwrap_or_default();
        if !matches!(done, Ok((_, Ok(_)))) {
            for (key, revision) in marks {
                sweep.entry(key).or_insert(revision);
            }
        }
        let (id, result) = match done {
            Ok((id, result)) => (id, result),
            Err(e) => {
                let tickets = self.tickets.remove(&e.id()).unwrap_or_default();
                let error = format!("the transaction's task failed: {e}");
                return if unavailable(events, &tickets, &error) {
                    Ok(Some(error))
                } else {
                    Err(())
                };
            }
        };
        let tickets = self.tickets.remove(&id).unwrap_or_default();
        match result {
            Ok(answers) => {
                if answers.into_iter().all(|e| events.send(e).is_ok()) {
                    Ok(None)
                } else {
                    Err(())
                }
            }
            Err(error) => {
                let text = describe(&error);
                if !unavailable(events, &tickets, &text) {
                    return Err(());
                }
                Ok(connection_lost(&error).then(|| format!("transaction: {text}")))
            }
        }
    }
}

/// The ops of one transaction, each with the etcd key it writes.
type Batch = Vec<(String, StoreOp)>;

fn tickets_of(batch: &Batch) -> Vec<Ticket> {
    batch.iter().map(|(_, op)| op.ticket()).collect()
}

/// `first` and every op already waiting, up to `max` and with distinct keys
/// (etcd refuses a transaction that writes one key twice): the op whose key
/// is already in the batch is `carried` to the next one. None: the channel
/// is closed (the handle is gone).
fn take_batch(
    keys: &KeySpace,
    first: StoreOp,
    ops: &mut UnboundedReceiver<StoreOp>,
    max: usize,
    carried: &mut Option<StoreOp>,
) -> Option<Batch> {
    let key = op_key(keys, &first);
    let mut written = HashSet::from([key.clone()]);
    let mut batch = vec![(key, first)];
    while batch.len() < max {
        match ops.try_recv() {
            Ok(op) => {
                let key = op_key(keys, &op);
                if !written.insert(key.clone()) {
                    *carried = Some(op);
                    break;
                }
                batch.push((key, op));
            }
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Disconnected) => return None,
        }
    }
    Some(batch)
}

/// The etcd key `op` writes.
fn op_key(keys: &KeySpace, op: &StoreOp) -> String {
    match op {
        StoreOp::Put { value, .. } => keys.key(&value.key()),
        StoreOp::Delete { key, .. } | StoreOp::End { key, .. } => keys.key(key),
        StoreOp::Declare { value, .. } => keys.declaration_key(&value.key),
    }
}

impl Session {
    /// The task that reads the revision etcd's quorum has reached: a
    /// linearizable read (of the prefix's root key itself, which holds
    /// nothing), which only a member in contact with its cluster's leader
    /// answers. Authenticates again once if the token expired.
    fn quorum_revision(
        &self,
        s: &Settings,
    ) -> impl std::future::Future<Output = QuorumResult> + Send + 'static {
        let mut kv = self.kv.clone();
        let login = s.user.clone().map(|u| (self.auth.clone(), u));
        let key = s.keys.root().to_string();
        async move {
            let mut read = kv.get(key.clone(), None).await;
            if let (Err(e), Some((mut auth, (user, password)))) = (&read, login) {
                if is_unauthenticated(e) {
                    auth.remove_client_auth();
                    auth.set_client_auth(user, password).await?;
                    read = kv.get(key, None).await;
                }
            }
            Ok(read?.header().map_or(0, |h| h.revision()))
        }
    }

    /// Starts the transaction for `batch`, with as many of the marks to
    /// take away as there is room for beside it (not one that an end of
    /// the batch writes: etcd refuses a transaction that writes a key
    /// twice).
    fn spawn_batch(&mut self, s: &Settings, out: &mut InFlight, batch: Batch) {
        let written: HashSet<String> = batch
            .iter()
            .filter_map(|(_, op)| match op {
                StoreOp::End { key, expect, .. } => Some(s.keys.mark_key(key, *expect)),
                _ => None,
            })
            .collect();
        let room = s.tuning.max_batch.saturating_sub(batch.len());
        let taken: Vec<String> = self
            .sweep
            .keys()
            .filter(|k| !written.contains(*k))
            .take(room)
            .cloned()
            .collect();
        let sweep: Vec<(String, Revision)> = taken
            .into_iter()
            .filter_map(|k| self.sweep.remove_entry(&k))
            .collect();
        let login = s.user.clone().map(|u| (self.auth.clone(), u));
        let mark = Mark {
            instance: s.instance.clone(),
            unix_ms: unix_ms(),
        };
        let tickets = tickets_of(&batch);
        let task = run_batch(
            self.kv.clone(),
            login,
            s.keys.clone(),
            batch,
            mark,
            sweep.clone(),
        );
        out.spawn(task, tickets, sweep);
    }
}

/// Who writes the marks of a batch's ends, and when.
struct Mark {
    instance: Arc<str>,
    unix_ms: u64,
}

/// One transaction for `batch`: a nested transaction per op, `if
/// mod_revision(key) == expect then put/delete else get` (an end's delete
/// with its mark beside it, a declaration's without a condition), then one
/// per mark in `sweep`, `if mod_revision(mark) == revision then delete`.
/// etcd's
/// authentication tokens expire (`--auth-token-ttl`, 5 minutes by default)
/// and the client does not renew them: a transaction refused for its token
/// authenticates again (the token is shared by the connection's clients)
/// and is sent once more, as etcd applied nothing of it.
async fn run_batch(
    mut kv: KvClient,
    login: Option<(AuthClient, (String, String))>,
    keys: Arc<KeySpace>,
    batch: Batch,
    mark: Mark,
    sweep: Vec<(String, Revision)>,
) -> TxnResult {
    let mut nested: Vec<TxnOp> = batch
        .iter()
        .map(|(key, op)| {
            let key = key.clone();
            let (expect, write) = match op {
                StoreOp::End {
                    key: ended, expect, ..
                } => {
                    // Its failing branch also reads the mark, which says
                    // whether this end has committed already (sent before,
                    // its answer lost).
                    let mark_key = keys.mark_key(ended, *expect);
                    let value = encode_mark(&mark.instance, mark.unix_ms);
                    let writes = [
                        TxnOp::delete(key.clone(), None),
                        TxnOp::put(mark_key.clone(), value, None),
                    ];
                    return TxnOp::txn(
                        Txn::new()
                            .when([Compare::mod_revision(
                                key.clone(),
                                CompareOp::Equal,
                                *expect,
                            )])
                            .and_then(writes)
                            .or_else([TxnOp::get(key, None), TxnOp::get(mark_key, None)]),
                    );
                }
                StoreOp::Put { value, expect, .. } => {
                    (*expect, TxnOp::put(key.clone(), encode_value(value), None))
                }
                StoreOp::Delete { expect, .. } => (*expect, TxnOp::delete(key.clone(), None)),
                StoreOp::Declare { value, .. } => {
                    let write = if value.state == Declared::Up {
                        TxnOp::delete(key, None)
                    } else {
                        TxnOp::put(key, encode_declaration(value), None)
                    };
                    return TxnOp::txn(Txn::new().and_then([write]));
                }
            };
            TxnOp::txn(
                Txn::new()
                    .when([Compare::mod_revision(key.clone(), CompareOp::Equal, expect)])
                    .and_then([write])
                    .or_else([TxnOp::get(key, None)]),
            )
        })
        .collect();
    nested.extend(sweep.into_iter().map(|(key, revision)| {
        TxnOp::txn(
            Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([TxnOp::delete(key, None)]),
        )
    }));
    let txn = Txn::new().and_then(nested);
    let mut result = kv.txn(txn.clone()).await;
    if let (Err(e), Some((mut auth, (user, password)))) = (&result, login) {
        if is_unauthenticated(e) {
            auth.remove_client_auth();
            auth.set_client_auth(user, password).await?;
            result = kv.txn(txn).await;
        }
    }
    Ok(outcomes(&keys, &mark.instance, &batch, &result?))
}

/// Each op's `Done` from the batch's answer. An end whose compare failed
/// but whose mark names `instance` has committed already (sent before, its
/// answer lost): Committed at the mark's revision.
fn outcomes(keys: &KeySpace, instance: &str, batch: &Batch, resp: &TxnResponse) -> Vec<StoreEvent> {
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let answers = resp.op_responses();
    let mut out = Vec::with_capacity(batch.len());
    for (i, (_, op)) in batch.iter().enumerate() {
        let marked = match (op, answers.get(i)) {
            (StoreOp::End { .. }, Some(TxnOpResponse::Txn(t))) if !t.succeeded() => {
                own_mark_read(keys, instance, t)
            }
            _ => None,
        };
        let outcome = match (answers.get(i), marked) {
            (Some(TxnOpResponse::Txn(t)), _) if t.succeeded() => Outcome::Committed { revision },
            (_, Some(at)) => Outcome::Committed { revision: at },
            (Some(TxnOpResponse::Txn(t)), None) => match t.op_responses().first() {
                Some(TxnOpResponse::Get(g)) => match g.kvs().first() {
                    None => Outcome::Moved { current: None },
                    Some(kv) => match keys.decode(kv.key(), kv.value()) {
                        Ok(a) => Outcome::Moved {
                            current: Some((a, kv.mod_revision())),
                        },
                        Err(error) => {
                            // Nothing was written, but what holds the key
                            // cannot be named: the op cannot succeed as asked.
                            out.push(StoreEvent::Unreadable {
                                key: String::from_utf8_lossy(kv.key()).into_owned(),
                                error: error.clone(),
                            });
                            Outcome::Unavailable {
                                error: format!(
                                    "the key holds a value this build cannot read: {error}"
                                ),
                            }
                        }
                    },
                },
                _ => Outcome::Unavailable {
                    error: "etcd's answer lacks the key's read".into(),
                },
            },
            _ => Outcome::Unavailable {
                error: "etcd's answer lacks this op's transaction".into(),
            },
        };
        out.push(StoreEvent::Done {
            ticket: op.ticket(),
            outcome,
        });
    }
    out
}

/// The revision of the end mark a failed end read back (its second read),
/// if the mark is `instance`'s.
fn own_mark_read(
    keys: &KeySpace,
    instance: &str,
    t: &etcd_client::TxnResponse,
) -> Option<Revision> {
    let reads = t.op_responses();
    let Some(TxnOpResponse::Get(g)) = reads.get(1) else {
        return None;
    };
    let kv = g.kvs().first()?;
    let mark = keys.decode_mark(kv.key(), kv.value()).ok()?;
    (mark.instance == instance).then(|| kv.mod_revision())
}

/// Answers `tickets` Unavailable with `error`; false if the control thread
/// is gone.
fn unavailable(events: &mpsc::Sender<StoreEvent>, tickets: &[Ticket], error: &str) -> bool {
    tickets.iter().all(|&ticket| {
        events
            .send(StoreEvent::Done {
                ticket,
                outcome: Outcome::Unavailable {
                    error: error.to_string(),
                },
            })
            .is_ok()
    })
}

/// `e` for the log: a gRPC status as its code and message, then the
/// transport's own errors under it (a TLS alert, a refused or closed
/// connection), which the client's `Display` leaves out.
fn describe(e: &etcd_client::Error) -> String {
    use std::error::Error as _;
    let (mut text, mut cause) = match e {
        etcd_client::Error::GRpcStatus(s) => {
            (format!("{:?}: {}", s.code(), s.message()), s.source())
        }
        etcd_client::Error::TransportError(t) => (t.to_string(), t.source()),
        other => (other.to_string(), None),
    };
    while let Some(c) = cause {
        let line = c.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = c.source();
    }
    text
}

/// Whether etcd refused a request for its authentication token (gRPC
/// UNAUTHENTICATED: "invalid auth token", an expired one).
fn is_unauthenticated(e: &etcd_client::Error) -> bool {
    const UNAUTHENTICATED: i32 = 16;
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() as i32 == UNAUTHENTICATED)
}

/// Whether `e` means etcd is not reachable (rather than that it refused
/// this one request: too large, malformed, not permitted).
fn connection_lost(e: &etcd_client::Error) -> bool {
    // gRPC status codes (grpc/doc/statuscodes.md): the ones etcd answers
    // for a request it refuses while reachable.
    const NOT_FOUND: i32 = 5;
    const ALREADY_EXISTS: i32 = 6;
    const PERMISSION_DENIED: i32 = 7;
    const RESOURCE_EXHAUSTED: i32 = 8;
    const FAILED_PRECONDITION: i32 = 9;
    const OUT_OF_RANGE: i32 = 11;
    const INVALID_ARGUMENT: i32 = 3;
    match e {
        etcd_client::Error::GRpcStatus(s) => !matches!(
            s.code() as i32,
            INVALID_ARGUMENT
                | NOT_FOUND
                | ALREADY_EXISTS
                | PERMISSION_DENIED
                | RESOURCE_EXHAUSTED
                | FAILED_PRECONDITION
                | OUT_OF_RANGE
        ),
        _ => true,
    }
}
