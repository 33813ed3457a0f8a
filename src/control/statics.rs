//! Static affinities: the configuration's `[[affinities]]`, installed at
//! start and on every reload, never expiring. A reload removes those the
//! previous configuration declared and the new one does not, or gives
//! another owner; one whose key another backend's requested affinity holds
//! waits for it to end ([`crate::control::reload::ConfigFile`] tries again
//! every tick).

use std::collections::HashSet;
use std::fmt;

use crate::affinity::key::TableKey;
use crate::config::{Config, StaticAffinityConfig};
use crate::control::plane::ControlPlane;
use crate::datapath::snapshot::Dataplane;
use crate::net::{family, ip_bits};
use crate::types::BackendId;

/// The static affinities that could not be installed: their indexes in
/// the configuration's `[[affinities]]`, and each as `affinities[i]: why`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotInstalled {
    pub indexes: Vec<usize>,
    pub reasons: Vec<String>,
}

impl fmt::Display for NotInstalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "static affinities not installed: {}",
            self.reasons.join(", ")
        )
    }
}

/// Installs the configuration's static affinities that are not there yet.
pub fn install(plane: &mut ControlPlane, cfg: &Config) -> Result<(), NotInstalled> {
    install_these(plane, cfg, 0..cfg.affinities.len())
}

/// [`install`] for the static affinities of `cfg` at `indexes` only (those
/// that were waiting: the others stay as they are, one the operator
/// cancelled too).
pub fn install_these(
    plane: &mut ControlPlane,
    cfg: &Config,
    indexes: impl IntoIterator<Item = usize>,
) -> Result<(), NotInstalled> {
    let mut failed = NotInstalled {
        indexes: Vec::new(),
        reasons: Vec::new(),
    };
    for i in indexes {
        let Some(a) = cfg.affinities.get(i) else {
            continue;
        };
        let result = resolve(plane.dataplane(), a).and_then(|(key, owner)| {
            // Installed already; a requested affinity of the same owner is
            // made static (below), not left to expire.
            if plane
                .affinities()
                .get(&key)
                .is_some_and(|r| r.owner == owner && r.expires.is_none())
            {
                return Ok(());
            }
            plane
                .create_static(key, owner)
                .map_err(|_| "refused (conflict or table full)")
        });
        if let Err(e) = result {
            failed.indexes.push(i);
            failed.reasons.push(format!("affinities[{i}]: {e}"));
        }
    }
    if failed.indexes.is_empty() {
        Ok(())
    } else {
        Err(failed)
    }
}

/// Cancels the static affinities `old` declared that `new` does not, or
/// gives another owner (those still as `old` installed them: same owner,
/// no expiry), so that [`install`] can put the new owner's in; returns how
/// many.
pub fn remove_dropped(plane: &mut ControlPlane, old: &Config, new: &Config) -> usize {
    let dp = plane.dataplane();
    let keep: HashSet<(TableKey, BackendId)> = keys(dp, new).flatten().collect();
    let gone: Vec<TableKey> = keys(dp, old)
        .flatten()
        .filter(|(k, owner)| {
            !keep.contains(&(*k, *owner))
                && plane
                    .affinities()
                    .get(k)
                    .is_some_and(|r| r.owner == *owner && r.expires.is_none())
        })
        .map(|(k, _)| k)
        .collect();
    gone.iter()
        .filter(|k| plane.cancel(k, None).is_ok())
        .count()
}

/// A configuration's static affinities as table keys and owners, against
/// the snapshot `dp`.
fn keys<'a>(
    dp: &'a Dataplane,
    cfg: &'a Config,
) -> impl Iterator<Item = Result<(TableKey, BackendId), &'static str>> + 'a {
    cfg.affinities.iter().map(|a| resolve(dp, a))
}

/// One static affinity as a table key and owner, against the snapshot
/// `dp`.
fn resolve(
    dp: &Dataplane,
    a: &StaticAffinityConfig,
) -> Result<(TableKey, BackendId), &'static str> {
    let svc = dp.service_named(&a.service).ok_or("no such service")?;
    let owner = dp
        .find_backend(svc.id, &a.backend)
        .ok_or("no such backend")?
        .id;
    let key = TableKey::new(
        svc.id,
        family(a.client.addr),
        ip_bits(a.client.addr),
        a.client.prefix,
        a.client_port,
    )
    .map_err(|_| "bad key")?;
    Ok((key, owner))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::reload::ConfigFile;
    use crate::control::testing::{call, config_text, op, plane, WEB};
    use crate::protocol::message::{Request, ReturnCode};
    use crate::types::Family;

    #[test]
    fn reload_adds_and_removes_static_affinities() {
        let with = format!(
            "{}\n[[affinities]]\nservice = \"web\"\nclient = \"203.0.113.0/24\"\nbackend = \"b\"\n",
            config_text()
        );
        let (mut p, r) = plane(&with);
        let path =
            std::env::temp_dir().join(format!("pktdist-statics-{}.toml", std::process::id()));
        let cfg = Config::parse(&with, "t.toml").unwrap();
        assert_eq!(install(&mut p, &cfg), Ok(()));
        let mut file = ConfigFile::new(Some(path.clone()), cfg);
        assert_eq!(r.lookup(WEB, Family::V4, 0xcb00_7105, 9), Some(2));
        std::fs::write(&path, config_text()).unwrap();
        let msg = file.reload(&mut p).unwrap().message;
        assert!(msg.contains("1 static affinit(ies) removed"), "{msg}");
        assert_eq!(r.lookup(WEB, Family::V4, 0xcb00_7105, 9), None);
        std::fs::write(&path, &with).unwrap();
        file.reload(&mut p).unwrap();
        assert_eq!(
            r.lookup(WEB, Family::V4, 0xcb00_7105, 9),
            Some(2),
            "added back"
        );
        // The same key given to another backend moves to it.
        std::fs::write(&path, with.replace("backend = \"b\"", "backend = \"a\"")).unwrap();
        let msg = file.reload(&mut p).unwrap().message;
        assert!(!msg.contains("refused"), "{msg}");
        assert_eq!(
            r.lookup(WEB, Family::V4, 0xcb00_7105, 9),
            Some(1),
            "a's now"
        );
        std::fs::remove_file(&path).unwrap();
    }

    /// A requested affinity of the key a reload declares static, held by
    /// the same backend, becomes static: it no longer expires and no
    /// longer counts among that backend's requested ones.
    /// The test configuration with b's static affinity on 203.0.113.0/24.
    fn with_static_b() -> Config {
        let text = format!(
            "{}\n[[affinities]]\nservice = \"web\"\nclient = \"203.0.113.0/24\"\nbackend = \"b\"\n",
            config_text()
        );
        Config::parse(&text, "t.toml").unwrap()
    }

    /// A static affinity's owner may not cancel it; the operator may.
    #[test]
    fn only_the_operator_cancels_a_static_affinity() {
        let (mut p, r) = plane(&config_text());
        let cfg = with_static_b();
        assert_eq!(install(&mut p, &cfg), Ok(()));
        let b = p.dataplane().find_backend(WEB, "b").unwrap().id;
        for (sender, owner) in [("b", Some("b")), ("admin", Some("b"))] {
            let no = call(
                &mut p,
                sender,
                Request::AffinityCancel(op("203.0.113.0", 24, owner, 0)),
            );
            assert_eq!(no.code, ReturnCode::NotAuthorized, "{sender}");
            assert!(no.message.contains("static"), "{}", no.message);
            assert_eq!(r.lookup(WEB, Family::V4, 0xcb00_7105, 9), Some(b));
        }
        // Another backend's: CONFLICT, as for any affinity it does not own.
        let other = call(
            &mut p,
            "a",
            Request::AffinityCancel(op("203.0.113.0", 24, Some("a"), 0)),
        );
        assert_eq!(other.code, ReturnCode::Conflict);
        let ok = call(
            &mut p,
            "admin",
            Request::AffinityCancel(op("203.0.113.0", 24, None, 0)),
        );
        assert_eq!(ok.code, ReturnCode::Ok);
        assert_eq!(r.lookup(WEB, Family::V4, 0xcb00_7105, 9), None);
    }

    #[test]
    fn a_requested_affinity_of_the_same_owner_becomes_static() {
        let (mut p, r) = plane(&config_text());
        let ok = call(
            &mut p,
            "b",
            Request::AffinityCreate(op("203.0.113.0", 24, Some("b"), 60)),
        );
        assert_eq!(ok.code, ReturnCode::Ok);
        let b = p.dataplane().find_backend(WEB, "b").unwrap().id;
        assert_eq!(p.affinities().requested_by(b), 1);
        let cfg = with_static_b();
        assert_eq!(install(&mut p, &cfg), Ok(()));
        let (_, rec) = p.affinities().list().next().unwrap();
        assert_eq!(rec.expires, None);
        assert_eq!(p.affinities().requested_by(b), 0);
        // Past the requested minute it is still there.
        let later = p.now_ms() + 61_000;
        p.expire_at(later);
        assert_eq!(p.affinities().len(), 1);
        assert_eq!(r.lookup(WEB, Family::V4, 0xcb00_7105, 9), Some(b));
    }

    /// A reload's static affinity whose key another backend's requested
    /// affinity holds is installed once that one ends; the retries leave
    /// the other statics alone (one the operator cancelled meanwhile stays
    /// cancelled until the next reload).
    #[test]
    fn a_static_affinity_held_off_by_a_reload_is_installed_when_its_key_is_free() {
        let (mut p, r) = plane(&config_text());
        let ok = call(
            &mut p,
            "a",
            Request::AffinityCreate(op("203.0.113.0", 24, Some("a"), 60)),
        );
        assert_eq!(ok.code, ReturnCode::Ok);
        let a = p.dataplane().find_backend(WEB, "a").unwrap().id;
        let b = p.dataplane().find_backend(WEB, "b").unwrap().id;
        let path =
            std::env::temp_dir().join(format!("pktdist-statics-wait-{}.toml", std::process::id()));
        let mut file = ConfigFile::new(
            Some(path.clone()),
            Config::parse(&config_text(), "t.toml").unwrap(),
        );
        std::fs::write(
            &path,
            format!(
                "{}\n[[affinities]]\nservice = \"web\"\nclient = \"203.0.113.0/24\"\nbackend = \"b\"\n\
                 \n[[affinities]]\nservice = \"web\"\nclient = \"198.51.100.0/24\"\nbackend = \"b\"\n",
                config_text()
            ),
        )
        .unwrap();
        let msg = file.reload(&mut p).unwrap().message;
        std::fs::remove_file(&path).unwrap();
        assert!(
            msg.contains("not installed: affinities[0]")
                && !msg.contains("affinities[1]")
                && msg.contains("once it can be"),
            "{msg}"
        );
        assert_eq!(r.lookup(WEB, Family::V4, 0xc633_6405, 9), Some(b));
        let cancelled = call(
            &mut p,
            "admin",
            Request::AffinityCancel(op("198.51.100.0", 24, None, 0)),
        );
        assert_eq!(cancelled.code, ReturnCode::Ok);
        file.install_waiting_statics(&mut p);
        assert_eq!(r.lookup(WEB, Family::V4, 0xcb00_7105, 9), Some(a));
        assert_eq!(
            r.lookup(WEB, Family::V4, 0xc633_6405, 9),
            None,
            "the operator's cancel undone by a retry"
        );
        let later = p.now_ms() + 61_000;
        p.expire_at(later);
        assert_eq!(r.lookup(WEB, Family::V4, 0xcb00_7105, 9), None);
        file.install_waiting_statics(&mut p);
        assert_eq!(r.lookup(WEB, Family::V4, 0xcb00_7105, 9), Some(b));
        assert_eq!(r.lookup(WEB, Family::V4, 0xc633_6405, 9), None);
        assert_eq!(p.affinities().len(), 1);
        let (_, rec) = p.affinities().list().next().unwrap();
        assert_eq!(rec.expires, None, "static");
    }

    #[test]
    fn unresolvable_static_affinities_are_named() {
        let (mut p, _) = plane(&config_text());
        let mut cfg = Config::parse(
            &format!(
                "{}\n[[affinities]]\nservice = \"web\"\nclient = \"203.0.113.0/24\"\nbackend = \"b\"\n",
                config_text()
            ),
            "t.toml",
        )
        .unwrap();
        cfg.affinities[0].backend = "zz".into();
        let e = install(&mut p, &cfg).unwrap_err();
        assert_eq!(
            e.to_string(),
            "static affinities not installed: affinities[0]: no such backend"
        );
        assert!(p.affinities().is_empty());
    }
}
