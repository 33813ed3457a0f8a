//! What the checker checks: one [`Target`] per backend of a service with a
//! `health` key, resolved from the running configuration and the current
//! dataplane snapshot (so backends added or removed over the control
//! protocol are checked or dropped too).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::config::{Config, HealthConfig, HealthKind, StatusRanges};
use crate::datapath::snapshot::Dataplane;

/// How one backend is checked.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CheckSpec {
    pub kind: HealthKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// HTTP checks: what is asked and what passes.
    pub http: Option<HttpCheck>,
}

/// An HTTP check's request and the statuses that pass.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HttpCheck {
    pub path: String,
    /// The Host header.
    pub host: String,
    pub expect: StatusRanges,
}

impl CheckSpec {
    /// The check `h` sent to `addr` (also the HTTP check's default Host).
    pub fn from_config(h: &HealthConfig, addr: SocketAddr) -> CheckSpec {
        CheckSpec {
            kind: h.kind,
            interval: h.interval.0,
            timeout: h.timeout(),
            rise: h.rise,
            fall: h.fall,
            http: (h.kind == HealthKind::Http).then(|| HttpCheck {
                path: h.http_path().to_string(),
                host: h.host.clone().unwrap_or_else(|| addr.to_string()),
                expect: h.http_expect(),
            }),
        }
    }
}

/// One backend to check.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// Which span of checks of the backend this is: the monitor numbers a
    /// backend anew each time its checks start (0 until it does), so that
    /// the reports of a backend removed and added back are told apart.
    pub id: u64,
    pub service: String,
    pub backend: String,
    /// Where the probes connect.
    pub addr: SocketAddr,
    pub check: CheckSpec,
}

impl Target {
    /// The (service, backend) pair that names it.
    pub fn key(&self) -> (&str, &str) {
        (&self.service, &self.backend)
    }
}

/// Every backend of `dp` whose service has a health check in `cfg`: a
/// backend as the configuration declares it (same name and address) at its
/// configured `health_address`, any other (added or moved at run time over
/// the control protocol) at its address.
pub fn targets(cfg: &Config, dp: &Dataplane) -> Vec<Target> {
    let mut out = Vec::new();
    for s in &dp.services {
        let Some(sc) = cfg.services.iter().find(|c| c.name == s.name) else {
            continue;
        };
        let Some(h) = &sc.health else {
            continue;
        };
        let port = h.port_for(s.port);
        let configured: HashMap<&str, (IpAddr, IpAddr)> = sc
            .backends
            .iter()
            .map(|c| (c.name.as_str(), (c.address, c.health_address())))
            .collect();
        for &id in &s.backends {
            let Some(b) = dp.backend(id) else {
                continue;
            };
            let ip = match configured.get(b.name.as_str()) {
                Some(&(address, health)) if address == b.addr => health,
                _ => b.addr,
            };
            let addr = SocketAddr::new(ip, port);
            out.push(Target {
                id: 0,
                service: s.name.clone(),
                backend: b.name.clone(),
                addr,
                check: CheckSpec::from_config(h, addr),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::registry::ServiceRegistry;

    #[test]
    fn targets_follow_the_health_keys_and_addresses() {
        let text = crate::control::testing::config_text()
            .replacen(
                "max_affinity_duration = \"10m\"",
                "max_affinity_duration = \"10m\"\nhealth = { kind = \"http\", port = 8080, path = \"/healthz\", rise = 1 }",
                1,
            )
            .replacen(
                "address = \"10.0.0.1\"",
                "address = \"10.0.0.1\"\nhealth_address = \"192.168.7.1\"",
                1,
            );
        let cfg = Config::parse(&text, "t.toml").unwrap();
        let dp = ServiceRegistry::from_config(&cfg)
            .unwrap()
            .snapshot()
            .unwrap();
        let t = targets(&cfg, &dp);
        let first = &cfg.services[1];
        assert!(!t.is_empty());
        assert!(t.iter().all(|t| t.service == first.name));
        assert_eq!(t.len(), first.backends.len());
        assert_eq!(t[0].addr, "192.168.7.1:8080".parse().unwrap());
        let http = t[0].check.http.as_ref().unwrap();
        assert_eq!(
            (http.path.as_str(), http.host.as_str()),
            ("/healthz", "192.168.7.1:8080")
        );
        assert_eq!((t[0].check.rise, t[0].check.fall), (1, 3));
        assert_eq!(t[1].addr.ip(), first.backends[1].address);

        // Removed and added again at another address (over the control
        // protocol): checked where it now is, not at the configured
        // health address of the old one.
        let mut reg = ServiceRegistry::from_config(&cfg).unwrap();
        let name = first.backends[0].name.clone();
        reg.remove_backend(&first.name, &name).unwrap();
        let moved: IpAddr = "10.0.0.50".parse().unwrap();
        reg.add_backend(
            &first.name,
            crate::control::registry::NewBackend {
                name: name.clone(),
                addr: moved,
                mac: None,
                weight: 100,
            },
        )
        .unwrap();
        let t = targets(&cfg, &reg.snapshot().unwrap());
        let a = t.iter().find(|t| t.backend == name).unwrap();
        assert_eq!(a.addr, SocketAddr::new(moved, 8080));
    }
}
