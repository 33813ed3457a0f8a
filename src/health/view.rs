//! What the control thread knows of its backends' health: for each checked
//! backend its state, since when, its last check's error and how often its
//! state changed; for each service and kind of check, how long probes take.
//! [`HealthView::summary`] gives it to the statistics (`pktdist stats`,
//! `stats --watch`, the summary JSON) and the Prometheus metrics.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::HealthKind;
use crate::datapath::latency::{new_histogram, Percentiles};
use crate::health::target::Target;
use crate::health::{HealthChange, ProbeResult};

/// One checked backend, as the control thread knows it.
#[derive(Clone, Debug)]
struct Entry {
    /// The [`Target::id`] of its checks.
    target: u64,
    up: bool,
    since: SystemTime,
    checked: SocketAddr,
    kind: HealthKind,
    /// The last probe's error (None: it passed).
    last_error: Option<String>,
    /// The last failed probe's error, kept until the backend is up again:
    /// why a backend the checks hold down is down.
    last_failure: Option<String>,
    checks: u64,
    failed: u64,
    changes: u64,
}

/// The health of the checked backends.
#[derive(Default)]
pub struct HealthView {
    backends: BTreeMap<(String, String), Entry>,
    /// Probe times (ns) by service and kind.
    probe_ns: BTreeMap<(String, HealthKind), hdrhistogram::Histogram<u64>>,
}

impl HealthView {
    /// Follows a new target list: backends kept keep their entries (the
    /// address and kind updated), new ones start up at `now`, those no
    /// longer checked go. Returns the backends that were down and are no
    /// longer checked: with no checks a backend counts as up again.
    pub fn set_targets(&mut self, targets: &[Target], now: SystemTime) -> Vec<HealthChange> {
        let mut next = BTreeMap::new();
        for t in targets {
            let key = (t.service.clone(), t.backend.clone());
            let entry = match self.backends.remove(&key) {
                Some(mut e) => {
                    e.target = t.id;
                    e.checked = t.addr;
                    e.kind = t.check.kind;
                    e
                }
                None => Entry {
                    target: t.id,
                    up: true,
                    since: now,
                    checked: t.addr,
                    kind: t.check.kind,
                    last_error: None,
                    last_failure: None,
                    checks: 0,
                    failed: 0,
                    changes: 0,
                },
            };
            next.insert(key, entry);
        }
        let stopped = std::mem::replace(&mut self.backends, next)
            .into_iter()
            .filter(|(_, e)| !e.up)
            .map(|((service, backend), e)| HealthChange {
                service,
                backend,
                up: true,
                error: Some("its health checks stopped".into()),
                checked: e.checked,
                at: now,
            })
            .collect();
        self.probe_ns.retain(|(service, kind), _| {
            targets
                .iter()
                .any(|t| &t.service == service && t.check.kind == *kind)
        });
        stopped
    }

    /// True when the backend is checked.
    pub fn is_checked(&self, service: &str, backend: &str) -> bool {
        self.backends
            .contains_key(&(service.to_string(), backend.to_string()))
    }

    /// Counts a probe's result of target `target` (if still checked).
    pub fn record_probe(&mut self, target: u64, p: &ProbeResult) {
        let key = (p.service.clone(), p.backend.clone());
        let Some(e) = self.backends.get_mut(&key).filter(|e| e.target == target) else {
            return;
        };
        e.checks += 1;
        e.failed += u64::from(p.error.is_some());
        e.last_error = p.error.clone();
        if p.error.is_some() {
            e.last_failure = p.error.clone();
        }
        let h = self
            .probe_ns
            .entry((p.service.clone(), p.kind))
            .or_insert_with(new_histogram);
        h.saturating_record(p.elapsed.as_nanos().min(u64::MAX as u128) as u64);
    }

    /// Applies a state change of target `target`; false when that target
    /// is no longer checked (a report sent before its checks stopped, of a
    /// backend that may since be checked anew under another id) or already
    /// in that state.
    pub fn apply(&mut self, target: u64, c: &HealthChange) -> bool {
        let key = (c.service.clone(), c.backend.clone());
        let Some(e) = self.backends.get_mut(&key).filter(|e| e.target == target) else {
            return false;
        };
        if e.up == c.up {
            return false;
        }
        e.up = c.up;
        e.since = c.at;
        e.changes += 1;
        if c.up {
            e.last_failure = None;
        }
        true
    }

    /// True unless the backend is checked and down.
    pub fn is_up(&self, service: &str, backend: &str) -> bool {
        self.backends
            .get(&(service.to_string(), backend.to_string()))
            .is_none_or(|e| e.up)
    }

    /// The (service, backend) names of the backends the checks hold down,
    /// each with its last failed check's error.
    pub fn down(&self) -> impl Iterator<Item = (&str, &str, Option<&str>)> {
        self.backends
            .iter()
            .filter(|(_, e)| !e.up)
            .map(|((s, b), e)| (s.as_str(), b.as_str(), e.last_failure.as_deref()))
    }

    /// The view for the statistics, at `now`.
    pub fn summary(&self, now: SystemTime) -> HealthSummary {
        HealthSummary {
            backends: self
                .backends
                .iter()
                .map(|((service, backend), e)| BackendHealth {
                    service: service.clone(),
                    backend: backend.clone(),
                    state: if e.up { "up" } else { "down" }.to_string(),
                    since_unix_ms: e
                        .since
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0),
                    seconds_in_state: now
                        .duration_since(e.since)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(0.0),
                    checked: e.checked.to_string(),
                    kind: e.kind.name().to_string(),
                    last_error: e.last_error.clone(),
                    checks: e.checks,
                    failed: e.failed,
                    changes: e.changes,
                })
                .collect(),
            probes: self
                .probe_ns
                .iter()
                .map(|((service, kind), h)| ProbeTimes {
                    service: service.clone(),
                    kind: kind.name().to_string(),
                    time_ns: Percentiles::of(h),
                })
                .collect(),
            ..HealthSummary::default()
        }
    }
}

/// The health checks in the statistics.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct HealthSummary {
    /// Every checked backend.
    pub backends: Vec<BackendHealth>,
    /// Probe times by service and kind of check.
    pub probes: Vec<ProbeTimes>,
    /// True while backends are to be checked and the checker thread does
    /// not run (it could not start, or it ended): their states stand still
    /// until it is started again.
    pub checker_down: bool,
    /// Times the checker was started again after it could not start or
    /// ended.
    pub checker_restarts: u64,
}

impl HealthSummary {
    /// The entry of a checked backend.
    #[cfg(test)]
    pub(crate) fn backend(&self, service: &str, backend: &str) -> Option<&BackendHealth> {
        self.backends
            .iter()
            .find(|b| b.service == service && b.backend == backend)
    }
}

/// One checked backend's health.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct BackendHealth {
    pub service: String,
    pub backend: String,
    /// "up" or "down".
    pub state: String,
    /// When it entered the state (Unix time, ms).
    pub since_unix_ms: u64,
    /// How long it has been in the state.
    pub seconds_in_state: f64,
    /// Where its checks go.
    pub checked: String,
    /// "tcp" or "http".
    pub kind: String,
    /// The last check's error (None: it passed, or none ran yet).
    pub last_error: Option<String>,
    /// Checks run, and failed.
    pub checks: u64,
    pub failed: u64,
    /// State changes.
    pub changes: u64,
}

/// How long a service's probes of one kind take.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ProbeTimes {
    pub service: String,
    pub kind: String,
    /// Probe times in ns (a timed-out probe counts its timeout).
    pub time_ns: Percentiles,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::target::CheckSpec;
    use std::time::Duration;

    fn target(backend: &str, kind: HealthKind) -> Target {
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        Target {
            id: 1,
            service: "web".into(),
            backend: backend.into(),
            addr,
            check: CheckSpec {
                kind,
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
                rise: 2,
                fall: 3,
                http: None,
            },
        }
    }

    /// Records a probe of target 1 (web/a, tcp) that failed with `error`
    /// (None: passed).
    fn probe(v: &mut HealthView, error: Option<&str>) {
        v.record_probe(
            1,
            &ProbeResult {
                service: "web".into(),
                backend: "a".into(),
                kind: HealthKind::Tcp,
                elapsed: Duration::from_millis(3),
                error: error.map(String::from),
            },
        )
    }

    fn change(backend: &str, up: bool, at: SystemTime) -> HealthChange {
        HealthChange {
            service: "web".into(),
            backend: backend.into(),
            up,
            error: (!up).then(|| "connect: refused".into()),
            checked: "127.0.0.1:8080".parse().unwrap(),
            at,
        }
    }

    #[test]
    fn a_down_backend_is_down_for_its_last_failed_check() {
        let t0 = SystemTime::now();
        let mut v = HealthView::default();
        v.set_targets(&[target("a", HealthKind::Tcp)], t0);
        let down = |v: &HealthView| {
            v.down()
                .map(|(s, b, e)| (s.to_string(), b.to_string(), e.map(String::from)))
                .collect::<Vec<_>>()
        };
        probe(&mut v, Some("connect: refused"));
        assert!(v.apply(1, &change("a", false, t0)));
        let why = |e: &str| vec![("web".into(), "a".into(), Some(e.to_string()))];
        assert_eq!(down(&v), why("connect: refused"));
        // One check passes (rise is 2): still down, for the failed one.
        probe(&mut v, None);
        assert_eq!(down(&v), why("connect: refused"));
        assert_eq!(
            v.summary(t0).backends[0].last_error,
            None,
            "the last check passed"
        );
        // The next failure is the reason now.
        probe(&mut v, Some("connect: timed out after 500ms"));
        assert_eq!(down(&v), why("connect: timed out after 500ms"));
        // Up again, and down later for a new reason only.
        assert!(v.apply(1, &change("a", true, t0)));
        assert!(down(&v).is_empty());
        assert!(v.apply(1, &change("a", false, t0)));
        assert_eq!(down(&v), vec![("web".into(), "a".into(), None)]);
    }

    #[test]
    fn follows_changes_and_keeps_state_across_new_target_lists() {
        let t0 = SystemTime::now();
        let mut v = HealthView::default();
        assert!(v
            .set_targets(
                &[target("a", HealthKind::Tcp), target("b", HealthKind::Tcp)],
                t0
            )
            .is_empty());
        assert!(v.is_up("web", "a"));
        let t1 = t0 + Duration::from_secs(5);
        assert!(v.apply(1, &change("a", false, t1)));
        assert!(!v.apply(1, &change("a", false, t1)), "no change twice");
        assert!(!v.is_up("web", "a"));
        probe(&mut v, Some("connect: refused"));
        // The kind changes (a new check): a stays down, c is new and up.
        let next = [
            target("a", HealthKind::Http),
            target("b", HealthKind::Tcp),
            target("c", HealthKind::Tcp),
        ];
        assert!(v.set_targets(&next, t1 + Duration::from_secs(1)).is_empty());
        let s = v.summary(t1 + Duration::from_secs(2));
        let a = s.backend("web", "a").unwrap();
        assert_eq!(
            (a.state.as_str(), a.kind.as_str(), a.changes),
            ("down", "http", 1)
        );
        assert_eq!((a.checks, a.failed), (1, 1));
        assert_eq!(a.last_error.as_deref(), Some("connect: refused"));
        assert!((a.seconds_in_state - 2.0).abs() < 1e-6);
        assert_eq!(s.backend("web", "c").unwrap().state, "up");
        assert_eq!(
            s.probes.len(),
            1,
            "web's tcp probes (b and c are checked so)"
        );
        assert_eq!(s.probes[0].time_ns.count, 1);
        // Its checks stop: a down backend counts as up again.
        let stopped = v.set_targets(&[target("b", HealthKind::Tcp)], t1);
        assert_eq!(stopped.len(), 1);
        assert!(stopped[0].up && stopped[0].backend == "a");
        assert!(v.is_up("web", "a") && !v.is_checked("web", "a"));
        assert!(
            !v.apply(1, &change("a", false, t1)),
            "a stale report is ignored"
        );
    }
}
