//! Each backend's state as the control plane keeps it.
//!
//! A backend's state ([`BackendState`]: up, draining, down) combines what
//! its health checks say, what its application and the operator declared
//! (BACKEND_STATE, `pktdist backend drain`) and its weight. [`BackendStates`]
//! holds those inputs per backend id, with when the current state began
//! and the error of the last failed check, and runs the grace timer: a
//! backend down longer than its service's `affinity_grace` has its
//! requested affinities ended, once per spell down. Time comes in as
//! milliseconds from the caller, so tests inject it.

use crate::types::{BackendId, BackendState, Declared, MAX_BACKENDS};

/// The state of one backend and what it was combined from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendStatus {
    /// What the backend's application declared for itself.
    pub app: Declared,
    /// What the operator declared for it.
    pub admin: Declared,
    /// The health checks' verdict: `None` while nothing was reported
    /// (checks off, or never failed: the checker reports changes only).
    pub healthy: Option<bool>,
    /// Why the last check failed (kept while it is down).
    pub check_error: Option<String>,
    /// The state as combined at the last [`BackendStates::settle`].
    pub state: BackendState,
    /// When (ms on the plane's clock) `state` began.
    pub since_ms: u64,
    /// Its requested affinities were ended in the current spell down.
    grace_spent: bool,
}

impl BackendStatus {
    fn new(now_ms: u64) -> BackendStatus {
        BackendStatus {
            app: Declared::Up,
            admin: Declared::Up,
            healthy: None,
            check_error: None,
            state: BackendState::Up,
            since_ms: now_ms,
            grace_spent: false,
        }
    }

    /// The state these inputs give a backend of `weight`.
    pub fn combined(&self, weight: u32) -> BackendState {
        BackendState::combine(self.app, self.admin, self.healthy != Some(false), weight)
    }
}

/// A change of one backend's state, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateChange {
    pub backend: BackendId,
    pub from: BackendState,
    pub to: BackendState,
}

/// The states of all backends, by id.
#[derive(Clone, Debug)]
pub struct BackendStates {
    slots: Vec<Option<BackendStatus>>,
}

impl Default for BackendStates {
    fn default() -> Self {
        BackendStates::new()
    }
}

impl BackendStates {
    pub fn new() -> BackendStates {
        BackendStates {
            slots: vec![None; MAX_BACKENDS],
        }
    }

    /// The status of backend `id`, if it has one.
    pub fn get(&self, id: BackendId) -> Option<&BackendStatus> {
        self.slots.get(id as usize)?.as_ref()
    }

    /// The status of `id`, made up (all up) at `now_ms` if it has none.
    fn entry(&mut self, id: BackendId, now_ms: u64) -> Option<&mut BackendStatus> {
        let slot = self.slots.get_mut(id as usize)?;
        Some(slot.get_or_insert_with(|| BackendStatus::new(now_ms)))
    }

    /// Forgets a removed backend: an id reused later starts up.
    pub fn remove(&mut self, id: BackendId) {
        if let Some(slot) = self.slots.get_mut(id as usize) {
            *slot = None;
        }
    }

    /// Records what the application (`by_admin` false) or the operator
    /// declared for `id`. Takes effect at the next [`settle`](Self::settle).
    pub fn declare(&mut self, id: BackendId, by_admin: bool, state: Declared, now_ms: u64) {
        if let Some(s) = self.entry(id, now_ms) {
            if by_admin {
                s.admin = state;
            } else {
                s.app = state;
            }
        }
    }

    /// Records a health verdict for `id`: down with why its check failed,
    /// up with no error (its checks pass), or up with a reason it counts
    /// as up without passing checks (its checks stopped: no verdict any
    /// more). Takes effect at the next [`settle`](Self::settle).
    pub fn set_health(&mut self, id: BackendId, up: bool, error: Option<String>, now_ms: u64) {
        if let Some(s) = self.entry(id, now_ms) {
            s.healthy = match (up, &error) {
                (false, _) => Some(false),
                (true, None) => Some(true),
                (true, Some(_)) => None,
            };
            s.check_error = if up { None } else { error };
        }
    }

    /// Makes `error` the check error of `id` if its checks hold it down.
    pub fn note_check_error(&mut self, id: BackendId, error: Option<&str>) {
        let Some(s) = self.slots.get_mut(id as usize).and_then(Option::as_mut) else {
            return;
        };
        if s.healthy == Some(false) && s.check_error.as_deref() != error {
            s.check_error = error.map(String::from);
        }
    }

    /// What the state of `id` would be with `weight` and its checks
    /// passing: what its declarations and weight alone make it.
    pub fn combined_unchecked(&self, id: BackendId, weight: u32) -> BackendState {
        let (app, admin) = self
            .get(id)
            .map_or((Declared::Up, Declared::Up), |s| (s.app, s.admin));
        BackendState::combine(app, admin, true, weight)
    }

    /// What the state of `id` would be with `weight`, its inputs as they
    /// are now (up for a backend not known yet).
    pub fn combined(&self, id: BackendId, weight: u32) -> BackendState {
        match self.get(id) {
            Some(s) => s.combined(weight),
            None => BackendState::combine(Declared::Up, Declared::Up, true, weight),
        }
    }

    /// Makes `state` the state of `id` at `now_ms`; returns the change, if
    /// it is one. Entering down starts the grace timer.
    pub fn settle(
        &mut self,
        id: BackendId,
        state: BackendState,
        now_ms: u64,
    ) -> Option<StateChange> {
        let s = self.entry(id, now_ms)?;
        if s.state == state {
            return None;
        }
        let change = StateChange {
            backend: id,
            from: s.state,
            to: state,
        };
        s.state = state;
        s.since_ms = now_ms;
        s.grace_spent = false;
        Some(change)
    }

    /// The backends down for at least their grace (`grace_ms` gives it per
    /// backend; `None` skips the backend) whose requested affinities were
    /// not ended yet in this spell; each is returned once per spell.
    pub fn grace_over(
        &mut self,
        now_ms: u64,
        grace_ms: impl Fn(BackendId) -> Option<u64>,
    ) -> Vec<BackendId> {
        let mut due = Vec::new();
        for (id, slot) in self.slots.iter_mut().enumerate() {
            let Some(s) = slot else { continue };
            if s.state != BackendState::Down || s.grace_spent {
                continue;
            }
            let id = id as BackendId;
            let Some(grace) = grace_ms(id) else { continue };
            if now_ms.saturating_sub(s.since_ms) >= grace {
                s.grace_spent = true;
                due.push(id);
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_combine_and_changes_are_reported_once() {
        let mut st = BackendStates::new();
        assert_eq!(st.combined(3, 100), BackendState::Up);
        assert_eq!(st.settle(3, BackendState::Up, 0), None, "starts up");
        st.declare(3, false, Declared::Drain, 10);
        assert_eq!(st.combined(3, 100), BackendState::Draining);
        let c = st.settle(3, BackendState::Draining, 10).unwrap();
        assert_eq!((c.from, c.to), (BackendState::Up, BackendState::Draining));
        assert_eq!(st.settle(3, BackendState::Draining, 11), None);
        assert_eq!(st.get(3).unwrap().since_ms, 10);
        // The operator's UP does not undo the application's DRAIN.
        st.declare(3, true, Declared::Up, 12);
        assert_eq!(st.combined(3, 100), BackendState::Draining);
        // Failed checks make it down, whatever was declared; the error
        // stays while it is down and goes when a check passes.
        st.set_health(3, false, Some("connect: refused".into()), 20);
        assert_eq!(st.combined(3, 100), BackendState::Down);
        assert_eq!(
            st.get(3).unwrap().check_error.as_deref(),
            Some("connect: refused")
        );
        st.set_health(3, true, None, 30);
        assert_eq!(st.get(3).unwrap().check_error, None);
        assert_eq!(st.get(3).unwrap().healthy, Some(true));
        // Up because its checks stopped: no verdict any more.
        st.set_health(3, true, Some("checks stopped".into()), 30);
        assert_eq!(
            (
                st.get(3).unwrap().healthy,
                st.get(3).unwrap().check_error.clone()
            ),
            (None, None)
        );
        st.declare(3, false, Declared::Up, 31);
        assert_eq!(st.combined(3, 100), BackendState::Up);
        assert_eq!(st.combined(3, 0), BackendState::Draining, "weight 0 drains");
        // Removed: forgotten, and a reused id starts up.
        st.declare(3, true, Declared::Down, 40);
        st.remove(3);
        assert_eq!(st.get(3), None);
        assert_eq!(st.combined(3, 1), BackendState::Up);
        // Ids out of range are ignored, never a panic.
        st.declare(MAX_BACKENDS as BackendId, true, Declared::Down, 0);
        assert_eq!(
            st.settle(MAX_BACKENDS as BackendId, BackendState::Down, 0),
            None
        );
    }

    #[test]
    fn grace_timer_fires_once_per_spell_down() {
        let mut st = BackendStates::new();
        let grace = |id: BackendId| (id != 9).then_some(30_000);
        st.set_health(1, false, None, 1_000);
        st.settle(1, BackendState::Down, 1_000);
        st.settle(9, BackendState::Down, 1_000);
        st.settle(2, BackendState::Draining, 1_000);
        assert!(st.grace_over(30_999, grace).is_empty(), "not yet");
        assert_eq!(st.grace_over(31_000, grace), vec![1], "down 30 s");
        assert!(st.grace_over(90_000, grace).is_empty(), "once per spell");
        // Up again, then down again: a new spell, a new timer.
        st.settle(1, BackendState::Up, 100_000);
        assert!(st.grace_over(200_000, grace).is_empty());
        st.settle(1, BackendState::Down, 200_000);
        assert!(st.grace_over(229_999, grace).is_empty());
        assert_eq!(st.grace_over(230_000, grace), vec![1]);
        // Back up before the grace ran out: nothing ends.
        st.settle(1, BackendState::Up, 231_000);
        st.settle(1, BackendState::Down, 300_000);
        st.settle(1, BackendState::Draining, 310_000);
        assert!(st.grace_over(400_000, grace).is_empty());
        // A grace of 0 ends them at the first look.
        st.settle(4, BackendState::Down, 500_000);
        assert_eq!(st.grace_over(500_000, |id| (id == 4).then_some(0)), vec![4]);
    }
}
