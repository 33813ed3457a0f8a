//! The cluster mode's store thread: several instances share one table of
//! requested affinities through etcd (`[cluster]`; docs/cluster.md).
//!
//! The thread runs on the control core and is the only part of pktdist
//! that talks to etcd. The control thread hands it [`StoreOp`]s and reads
//! back [`StoreEvent`]s through a [`StoreHandle`], never waiting on it:
//! workers read only their instance's local lock-free table, and the control
//! thread stays its only writer.
//!
//! Every affinity change is a compare-and-set on the key's etcd mod
//! revision, so two instances can never both win a key, and exactly one
//! instance commits the deletion that ends an affinity (and sends its
//! notice). The backends' declared states (BACKEND_STATE, `pktdist backend
//! drain`) are shared beside the affinities: each declaration is one key,
//! written by whoever declared last.

pub mod etcd;
pub mod record;

use std::net::IpAddr;
use std::sync::mpsc;

use crate::control::state_file::SavedAffinity;
use crate::types::{Declared, PortMatch};

/// An etcd mod revision. 0: the key does not exist.
pub type Revision = i64;

/// The control thread's number for one change, echoed in its outcome.
pub type Ticket = u64;

/// Which affinity a store key holds: service by name, client network and
/// ports (the owner is in the value).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StoreKey {
    pub service: String,
    pub client: IpAddr,
    pub prefix_len: u8,
    pub ports: PortMatch,
}

impl StoreKey {
    pub fn of(a: &SavedAffinity) -> StoreKey {
        StoreKey {
            service: a.service.clone(),
            client: a.client,
            prefix_len: a.prefix_len,
            ports: a.ports,
        }
    }
}

/// One affinity as the store keeps it: what the state file keeps, and who
/// wrote it when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredAffinity {
    pub affinity: SavedAffinity,
    /// The instance (`[cluster] instance`) that wrote this version.
    pub writer: String,
    /// The writer's wall clock just before it committed, Unix ms (the
    /// receivers' propagation delay is measured from it).
    pub written_unix_ms: u64,
}

impl StoredAffinity {
    pub fn key(&self) -> StoreKey {
        StoreKey::of(&self.affinity)
    }
}

/// Which declaration a store key holds: what the application
/// (`by_admin` false) or the operator declared for one backend, named by
/// its service and its own name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeclarationKey {
    pub service: String,
    pub backend: String,
    pub by_admin: bool,
}

/// A declared state as the store keeps it. UP is kept as the key's
/// absence: a backend nobody declared anything for is up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDeclaration {
    pub key: DeclarationKey,
    pub state: Declared,
    /// The instance that wrote it, and its wall clock then (Unix ms).
    pub writer: String,
    pub written_unix_ms: u64,
}

/// A change the control thread asks the store for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// Write `value` if its key's mod revision is still `expect` (0: the
    /// key must not exist).
    Put {
        ticket: Ticket,
        value: StoredAffinity,
        expect: Revision,
    },
    /// Delete `key` if its mod revision is still `expect`.
    Delete {
        ticket: Ticket,
        key: StoreKey,
        expect: Revision,
    },
    /// End an affinity: delete `key` if its mod revision is still
    /// `expect`, and in the same commit leave this instance's mark, so that
    /// a commit whose answer is lost still reaches this instance (as
    /// [`Change::Ended`] or a load's `ended`) and it sends the notice.
    End {
        ticket: Ticket,
        key: StoreKey,
        expect: Revision,
    },
    /// Write a declaration whatever the key holds (delete it for UP): the
    /// last declaration wins.
    Declare {
        ticket: Ticket,
        value: StoredDeclaration,
    },
}

impl StoreOp {
    pub fn ticket(&self) -> Ticket {
        match self {
            StoreOp::Put { ticket, .. }
            | StoreOp::Delete { ticket, .. }
            | StoreOp::End { ticket, .. }
            | StoreOp::Declare { ticket, .. } => *ticket,
        }
    }
}

/// How a [`StoreOp`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Committed at `revision` (the key's new mod revision for a put).
    Committed { revision: Revision },
    /// The key's revision was not the one expected: what it holds now
    /// (None: it does not exist). Nothing was written. (Never for a
    /// declaration, which expects nothing.)
    Moved {
        current: Option<(StoredAffinity, Revision)>,
    },
    /// Not known to be committed: etcd did not answer in time (it may or
    /// may not have been: the watch will tell), was unreachable (not sent),
    /// refused the transaction, or holds an unreadable value at the key.
    Unavailable { error: String },
}

/// A committed change to the table, from the watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Put(StoredAffinity),
    Deleted(StoreKey),
    /// A declaration written, or deleted (`Declared::Up`).
    Declared {
        key: DeclarationKey,
        state: Declared,
    },
    /// This instance's [`StoreOp::End`] of `key`, which found it at
    /// `expect`, committed (the key's deletion follows in the same
    /// revision; this comes first).
    Ended {
        key: StoreKey,
        expect: Revision,
    },
}

/// What the store thread tells the control thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreEvent {
    /// The outcome of the op with this ticket. Every op gets exactly one.
    Done { ticket: Ticket, outcome: Outcome },
    /// The whole table and every declaration as of `revision` (at start
    /// and after every reconnection): they replace what the instance had.
    /// `ended`: the ends this instance committed whose marks are still in
    /// the store (key and the revision each found), answered or not.
    /// The watch goes on from `revision + 1`.
    Loaded {
        revision: Revision,
        affinities: Vec<(StoredAffinity, Revision)>,
        declarations: Vec<(StoredDeclaration, Revision)>,
        ended: Vec<(StoreKey, Revision)>,
    },
    /// A change committed at `revision` (by any instance, this one
    /// included), in commit order, after the `Loaded` it follows.
    Changed { revision: Revision, change: Change },
    /// etcd stopped answering; a `Loaded` follows when it is back.
    Unreachable { error: String },
    /// A value under the prefix's affinity or declaration keys that this
    /// build cannot read (counted and skipped).
    Unreadable { key: String, error: String },
}

/// The store thread ended (it panicked): no more events will come, and no
/// op sent reaches etcd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreGone;

/// The control thread's end of the store thread.
pub struct StoreHandle {
    ops: tokio::sync::mpsc::UnboundedSender<StoreOp>,
    events: mpsc::Receiver<StoreEvent>,
}

/// The store thread's end (and the tests' stand-in for it).
pub struct StorePeer {
    pub ops: tokio::sync::mpsc::UnboundedReceiver<StoreOp>,
    pub events: mpsc::Sender<StoreEvent>,
}

impl StoreHandle {
    /// A connected handle and peer.
    pub fn pair() -> (StoreHandle, StorePeer) {
        let (ops_tx, ops_rx) = tokio::sync::mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::channel();
        (
            StoreHandle {
                ops: ops_tx,
                events: ev_rx,
            },
            StorePeer {
                ops: ops_rx,
                events: ev_tx,
            },
        )
    }

    /// Queues an op; false if the store thread is gone.
    pub fn submit(&self, op: StoreOp) -> bool {
        self.ops.send(op).is_ok()
    }

    /// The next event, without waiting; `Err` once the store thread has
    /// ended and every event it sent was taken.
    pub fn try_event(&self) -> Result<Option<StoreEvent>, StoreGone> {
        match self.events.try_recv() {
            Ok(ev) => Ok(Some(ev)),
            Err(mpsc::TryRecvError::Empty) => Ok(None),
            Err(mpsc::TryRecvError::Disconnected) => Err(StoreGone),
        }
    }
}
