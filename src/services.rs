//! The control thread's model of services and backends.
//!
//! [`ServiceRegistry`] is mutable and owned by the control thread: it takes
//! runtime changes (weights, added and removed backends, reloaded
//! configurations) and turns them into immutable [`Dataplane`] snapshots for
//! the workers, rebuilding a service's Maglev table only when its backends
//! or weights changed.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ip_bits, Config, Forwarding, Protocol, Scheduler, ServiceConfig};
use crate::dataplane::{
    AutoAffinity, Backend, BackendId, Dataplane, ForwardMode, SchedulerKind, Service, ServiceId,
    MAX_BACKENDS, MAX_SERVICES,
};
use crate::packet::Family;
use crate::sched::maglev::{is_prime, MaglevTable};

/// Largest weight a backend may have.
pub const MAX_WEIGHT: u32 = 65535;

/// Why a change was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryError {
    NoSuchService(String),
    NoSuchBackend {
        service: String,
        backend: String,
    },
    DuplicateBackend {
        service: String,
        backend: String,
    },
    /// A value that cannot be applied (wrong family, weight out of range...).
    Invalid(String),
    /// No backend id left.
    Full,
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::NoSuchService(s) => write!(f, "no service named {s:?}"),
            RegistryError::NoSuchBackend { service, backend } => {
                write!(f, "service {service:?} has no backend {backend:?}")
            }
            RegistryError::DuplicateBackend { service, backend } => {
                write!(f, "service {service:?} already has a backend {backend:?}")
            }
            RegistryError::Invalid(m) => f.write_str(m),
            RegistryError::Full => write!(f, "no backend id left (at most {MAX_BACKENDS})"),
        }
    }
}

impl std::error::Error for RegistryError {}

/// A backend as an operator describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub name: String,
    pub addr: IpAddr,
    pub mac: Option<[u8; 6]>,
    pub weight: u32,
}

#[derive(Clone, Debug)]
struct ServiceEntry {
    name: String,
    vip: IpAddr,
    port: u16,
    proto: u8,
    mode: ForwardMode,
    scheduler: SchedulerKind,
    /// Configured Maglev size; None = the default for the backend count.
    maglev_size: Option<usize>,
    auto_affinity: Option<AutoAffinity>,
    max_affinity: Duration,
    backends: Vec<(BackendId, BackendSpec)>,
    /// The table for the current backends and weights, if built.
    maglev: Option<Arc<MaglevTable>>,
}

impl ServiceEntry {
    fn from_config(s: &ServiceConfig) -> Result<ServiceEntry, RegistryError> {
        let mode = match s.forwarding {
            Forwarding::L2 => ForwardMode::L2,
            Forwarding::Ipip => ForwardMode::IpIp {
                source: s.ipip_source.map(ip_bits).ok_or_else(|| {
                    RegistryError::Invalid(format!("service {}: ipip needs ipip_source", s.name))
                })?,
            },
        };
        Ok(ServiceEntry {
            name: s.name.clone(),
            vip: s.vip,
            port: s.port,
            proto: match s.protocol {
                Protocol::Tcp => crate::packet::PROTO_TCP,
                Protocol::Udp => crate::packet::PROTO_UDP,
            },
            mode,
            scheduler: match s.scheduler {
                Scheduler::Maglev => SchedulerKind::Maglev,
                Scheduler::RoundRobin => SchedulerKind::RoundRobin,
            },
            maglev_size: s.maglev_table_size,
            auto_affinity: s
                .auto_affinity
                .as_ref()
                .map(|a| AutoAffinity { linger: a.linger.0 }),
            max_affinity: s.max_affinity_duration.0,
            backends: Vec::new(),
            maglev: None,
        })
    }

    fn family(&self) -> Family {
        match self.vip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn maglev_table(&mut self) -> Result<Arc<MaglevTable>, RegistryError> {
        if let Some(t) = &self.maglev {
            return Ok(Arc::clone(t));
        }
        let size = self
            .maglev_size
            .unwrap_or_else(|| MaglevTable::default_size(self.backends.len()));
        let names: Vec<(&str, u32)> = self
            .backends
            .iter()
            .map(|(_, b)| (b.name.as_str(), b.weight))
            .collect();
        let table = Arc::new(
            MaglevTable::new(&names, size)
                .map_err(|e| RegistryError::Invalid(format!("service {}: {e}", self.name)))?,
        );
        self.maglev = Some(Arc::clone(&table));
        Ok(table)
    }

    fn check_backend(&self, b: &BackendSpec) -> Result<(), RegistryError> {
        if b.name.is_empty() || b.name.len() > 64 {
            return Err(RegistryError::Invalid(
                "backend name must be 1 to 64 bytes".into(),
            ));
        }
        if b.addr.is_ipv4() != self.vip.is_ipv4() {
            return Err(RegistryError::Invalid(format!(
                "backend {} address {} is not of the family of the vip {}",
                b.name, b.addr, self.vip
            )));
        }
        if b.weight > MAX_WEIGHT {
            return Err(RegistryError::Invalid(format!(
                "weight {} is out of range (0..={MAX_WEIGHT})",
                b.weight
            )));
        }
        if self.mode == ForwardMode::L2 && b.mac.is_none() {
            return Err(RegistryError::Invalid(format!(
                "backend {}: l2 forwarding needs a mac",
                b.name
            )));
        }
        if let Some(size) = self.maglev_size {
            let n = self.backends.len() + 1;
            if size < 100 * n || !is_prime(size) {
                return Err(RegistryError::Invalid(format!(
                    "service {}: maglev_table_size {size} is too small for {n} backends (needs a prime >= {})",
                    self.name,
                    100 * n
                )));
            }
        }
        Ok(())
    }
}

/// Services and backends as the control thread knows them.
#[derive(Clone, Debug)]
pub struct ServiceRegistry {
    generation: u64,
    services: Vec<ServiceEntry>,
    /// Next backend id to try; ids are handed out in increasing order and
    /// reused only once every id was used, so that a stale flow entry is
    /// unlikely to meet a new backend under its old id.
    next_id: BackendId,
    in_use: Vec<bool>,
}

impl ServiceRegistry {
    /// The registry for a validated configuration.
    pub fn from_config(cfg: &Config) -> Result<ServiceRegistry, RegistryError> {
        if cfg.services.len() > MAX_SERVICES {
            return Err(RegistryError::Invalid(format!(
                "{} services configured, at most {MAX_SERVICES}",
                cfg.services.len()
            )));
        }
        let mut reg = ServiceRegistry {
            generation: 0,
            services: Vec::with_capacity(cfg.services.len()),
            next_id: 0,
            in_use: vec![false; MAX_BACKENDS],
        };
        for s in &cfg.services {
            let mut entry = ServiceEntry::from_config(s)?;
            for b in &s.backends {
                let spec = BackendSpec {
                    name: b.name.clone(),
                    addr: b.address,
                    mac: b.mac.map(|m| m.0),
                    weight: b.weight,
                };
                let id = reg.allocate_id()?;
                entry.backends.push((id, spec));
            }
            reg.services.push(entry);
        }
        Ok(reg)
    }

    fn allocate_id(&mut self) -> Result<BackendId, RegistryError> {
        for step in 0..MAX_BACKENDS {
            let id = (self.next_id as usize + step) % MAX_BACKENDS;
            if !self.in_use[id] {
                self.in_use[id] = true;
                self.next_id = ((id + 1) % MAX_BACKENDS) as BackendId;
                return Ok(id as BackendId);
            }
        }
        Err(RegistryError::Full)
    }

    fn service_mut(&mut self, name: &str) -> Result<(ServiceId, &mut ServiceEntry), RegistryError> {
        self.services
            .iter_mut()
            .enumerate()
            .find(|(_, s)| s.name == name)
            .map(|(i, s)| (i as ServiceId, s))
            .ok_or_else(|| RegistryError::NoSuchService(name.to_string()))
    }

    /// The id of a backend of a service.
    pub fn backend_id(&self, service: &str, backend: &str) -> Option<BackendId> {
        let s = self.services.iter().find(|s| s.name == service)?;
        s.backends
            .iter()
            .find(|(_, b)| b.name == backend)
            .map(|(id, _)| *id)
    }

    /// Builds the next snapshot (Maglev tables rebuilt only where needed).
    pub fn snapshot(&mut self) -> Result<Dataplane, RegistryError> {
        self.generation += 1;
        let mut services = Vec::with_capacity(self.services.len());
        let mut backends = Vec::new();
        for (i, s) in self.services.iter_mut().enumerate() {
            let maglev = s.maglev_table()?;
            services.push(Service {
                id: i as ServiceId,
                name: s.name.clone(),
                vip: s.vip,
                vip_bits: ip_bits(s.vip),
                family: s.family(),
                port: s.port,
                proto: s.proto,
                mode: s.mode,
                scheduler: s.scheduler,
                backends: s.backends.iter().map(|(id, _)| *id).collect(),
                maglev,
                auto_affinity: s.auto_affinity,
                max_affinity: s.max_affinity,
            });
            for (id, b) in &s.backends {
                backends.push(Backend {
                    id: *id,
                    service: i as ServiceId,
                    name: b.name.clone(),
                    addr: b.addr,
                    addr_bits: ip_bits(b.addr),
                    mac: b.mac,
                    weight: b.weight,
                });
            }
        }
        Ok(Dataplane::new(self.generation, services, backends))
    }

    /// Changes a backend's weight (0 drains it).
    pub fn set_weight(
        &mut self,
        service: &str,
        backend: &str,
        weight: u32,
    ) -> Result<(), RegistryError> {
        if weight > MAX_WEIGHT {
            return Err(RegistryError::Invalid(format!(
                "weight {weight} is out of range (0..={MAX_WEIGHT})"
            )));
        }
        let (_, s) = self.service_mut(service)?;
        let sname = s.name.clone();
        let b = s
            .backends
            .iter_mut()
            .find(|(_, b)| b.name == backend)
            .ok_or(RegistryError::NoSuchBackend {
                service: sname,
                backend: backend.to_string(),
            })?;
        if b.1.weight != weight {
            b.1.weight = weight;
            s.maglev = None;
        }
        Ok(())
    }

    /// Adds a backend to a service.
    pub fn add_backend(
        &mut self,
        service: &str,
        spec: BackendSpec,
    ) -> Result<BackendId, RegistryError> {
        {
            let (_, s) = self.service_mut(service)?;
            if s.backends.iter().any(|(_, b)| b.name == spec.name) {
                return Err(RegistryError::DuplicateBackend {
                    service: service.to_string(),
                    backend: spec.name,
                });
            }
            s.check_backend(&spec)?;
        }
        let id = self.allocate_id()?;
        let (_, s) = self.service_mut(service)?;
        s.backends.push((id, spec));
        s.maglev = None;
        Ok(id)
    }

    /// Removes a backend; returns its id so its affinities can be ended.
    pub fn remove_backend(
        &mut self,
        service: &str,
        backend: &str,
    ) -> Result<BackendId, RegistryError> {
        let (_, s) = self.service_mut(service)?;
        let pos = s
            .backends
            .iter()
            .position(|(_, b)| b.name == backend)
            .ok_or_else(|| RegistryError::NoSuchBackend {
                service: service.to_string(),
                backend: backend.to_string(),
            })?;
        let (id, _) = s.backends.remove(pos);
        s.maglev = None;
        self.in_use[id as usize] = false;
        Ok(id)
    }

    /// Applies a new configuration's services and backends (hot reload).
    /// Services are matched by name, backends by (service, name): those kept
    /// keep their ids, so established connections stay where they are.
    /// Returns the ids of backends that are gone. On error nothing changes.
    pub fn reload(&mut self, cfg: &Config) -> Result<Vec<BackendId>, RegistryError> {
        let mut next = self.clone();
        let mut services = Vec::with_capacity(cfg.services.len());
        let mut kept = vec![false; MAX_BACKENDS];
        for s in &cfg.services {
            let mut entry = ServiceEntry::from_config(s)?;
            let old = self.services.iter().find(|o| {
                o.name == s.name && o.vip == s.vip && o.port == s.port && o.proto == entry.proto
            });
            for b in &s.backends {
                let spec = BackendSpec {
                    name: b.name.clone(),
                    addr: b.address,
                    mac: b.mac.map(|m| m.0),
                    weight: b.weight,
                };
                let reuse = old.and_then(|o| {
                    o.backends
                        .iter()
                        .find(|(_, ob)| ob.name == b.name && ob.addr == b.address)
                        .map(|(id, _)| *id)
                });
                let id = match reuse {
                    Some(id) => id,
                    None => next.allocate_id()?,
                };
                kept[id as usize] = true;
                entry.backends.push((id, spec));
            }
            // Keep the Maglev table if nothing it depends on changed.
            if let Some(o) = old {
                let same = o.maglev_size == entry.maglev_size
                    && o.backends.len() == entry.backends.len()
                    && o.backends
                        .iter()
                        .zip(&entry.backends)
                        .all(|((_, a), (_, b))| a.name == b.name && a.weight == b.weight);
                if same {
                    entry.maglev = o.maglev.clone();
                }
            }
            services.push(entry);
        }
        let removed: Vec<BackendId> = self
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|(id, _)| *id))
            .filter(|id| !kept[*id as usize])
            .collect();
        for id in &removed {
            next.in_use[*id as usize] = false;
        }
        next.services = services;
        // Build the tables now so that a bad table size is refused here.
        for s in next.services.iter_mut() {
            s.maglev_table()?;
        }
        *self = next;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backends of the test configuration's web service.
    const WEB_BACKENDS: &str = r#"
[[services.backends]]
name = "a"
address = "10.0.0.1"
weight = 100
[[services.backends]]
name = "b"
address = "10.0.0.2"
weight = 300
"#;

    fn config_text() -> String {
        use crate::config::testing::{with_services, WEB};
        with_services(&format!("{WEB}{WEB_BACKENDS}"))
    }

    fn registry() -> ServiceRegistry {
        ServiceRegistry::from_config(&Config::parse(&config_text(), "t.toml").unwrap()).unwrap()
    }

    #[test]
    fn snapshot_has_services_backends_and_tables() {
        let mut r = registry();
        let dp = r.snapshot().unwrap();
        assert_eq!(dp.generation, 1);
        let s = &dp.services[0];
        assert_eq!(s.port, 80);
        assert_eq!(
            s.mode,
            ForwardMode::IpIp {
                source: 0xc633_6401
            }
        );
        let shares = s.maglev.shares();
        assert!(shares[1] > 2 * shares[0]);
        assert_eq!(dp.find_backend(0, "b").unwrap().addr_bits, 0x0a00_0002);
    }

    #[test]
    fn weight_changes_rebuild_only_that_table() {
        let mut r = registry();
        let t1 = Arc::clone(&r.snapshot().unwrap().services[0].maglev);
        let t2 = Arc::clone(&r.snapshot().unwrap().services[0].maglev);
        assert!(Arc::ptr_eq(&t1, &t2), "unchanged service keeps its table");
        r.set_weight("web", "a", 0).unwrap();
        let dp = r.snapshot().unwrap();
        assert_eq!(dp.services[0].maglev.shares()[0], 0);
        assert_eq!(
            r.set_weight("web", "zz", 1),
            Err(RegistryError::NoSuchBackend {
                service: "web".into(),
                backend: "zz".into()
            })
        );
        assert!(matches!(
            r.set_weight("web", "a", 70000),
            Err(RegistryError::Invalid(_))
        ));
    }

    #[test]
    fn add_and_remove_backends() {
        let mut r = registry();
        let spec = BackendSpec {
            name: "c".into(),
            addr: "10.0.0.3".parse().unwrap(),
            mac: None,
            weight: 100,
        };
        let id = r.add_backend("web", spec.clone()).unwrap();
        assert_eq!(id, 2);
        assert!(matches!(
            r.add_backend("web", spec.clone()),
            Err(RegistryError::DuplicateBackend { .. })
        ));
        let v6 = BackendSpec {
            name: "d".into(),
            addr: "2001:db8::1".parse().unwrap(),
            ..spec
        };
        assert!(matches!(
            r.add_backend("web", v6),
            Err(RegistryError::Invalid(_))
        ));
        let dp = r.snapshot().unwrap();
        assert_eq!(dp.services[0].backends, vec![0, 1, 2]);
        assert_eq!(r.remove_backend("web", "a").unwrap(), 0);
        let dp = r.snapshot().unwrap();
        assert!(dp.backend(0).is_none());
        assert_eq!(dp.services[0].backends, vec![1, 2]);
        assert!(r.remove_backend("nope", "a").is_err());
    }

    #[test]
    fn reload_keeps_ids_of_kept_backends() {
        let mut r = registry();
        r.snapshot().unwrap();
        let text = config_text().replace(
            "name = \"a\"\naddress = \"10.0.0.1\"\nweight = 100",
            "name = \"c\"\naddress = \"10.0.0.3\"\nweight = 100",
        );
        let removed = r.reload(&Config::parse(&text, "t.toml").unwrap()).unwrap();
        assert_eq!(removed, vec![0]);
        let dp = r.snapshot().unwrap();
        assert_eq!(r.backend_id("web", "b"), Some(1));
        assert_eq!(dp.find_backend(0, "c").unwrap().id, 2);
    }
}
