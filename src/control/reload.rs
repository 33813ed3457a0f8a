//! Reload: re-reading the configuration file (SIGHUP, `pktdist reload`) and
//! applying what can change while running: services and backends (one new
//! snapshot; workers pick it up without stopping, kept backends keep their
//! ids, so established connections stay), static affinities, keys and
//! allowed networks. A bad file changes nothing. Sections that need a
//! restart are named in the answer; a change to `[cluster]` is refused.

use std::path::PathBuf;

use crate::config::Config;
use crate::control::plane::ControlPlane;
use crate::control::server::ServerAuth;
use crate::control::statics;

/// The configuration file and what was last applied from it.
pub struct ConfigFile {
    /// None: the configuration did not come from a file; reload refuses.
    path: Option<PathBuf>,
    running: Config,
    /// The static affinities of the running configuration (indexes in its
    /// `[[affinities]]`) not installed when it was applied (the key held by
    /// another backend's requested affinity, or the table full):
    /// [`ConfigFile::install_waiting_statics`] tries them again, and only
    /// them (one the operator cancelled since stays cancelled).
    statics_waiting: Vec<usize>,
}

/// What a reload applied.
pub struct Reloaded {
    /// What was done, for the operator.
    pub message: String,
    /// The new configuration's keys and allowed networks, for the server.
    pub auth: ServerAuth,
}

impl ConfigFile {
    pub fn new(path: Option<PathBuf>, running: Config) -> ConfigFile {
        ConfigFile {
            path,
            running,
            statics_waiting: Vec::new(),
        }
    }

    /// The configuration running now.
    pub fn running(&self) -> &Config {
        &self.running
    }

    /// Re-reads the file and applies it to `plane`; the caller hands the
    /// returned keys and networks to the server.
    pub fn reload(&mut self, plane: &mut ControlPlane) -> Result<Reloaded, String> {
        let path = self
            .path
            .as_ref()
            .ok_or("no configuration file is known to reload")?;
        let mut next = Config::load(path).map_err(|e| e.to_string())?;
        if next.cluster != self.running.cluster {
            // The store thread, the instance's name and its view of the
            // shared table are set up once, at start.
            return Err("restart to change [cluster]".into());
        }
        let restart = restart_sections(&self.running, &next);
        // What runs from here on: the file, but for the settings that wait
        // for a restart. The file's services may count on settings not
        // running yet (a port's gateway_mac for ipip backends without a
        // MAC, a port's MTU for IPv6 in IPv6): checked against what runs.
        for (_, _, keep) in RESTART_ONLY {
            keep(&mut next, &self.running);
        }
        // The running [icmp] may name echo VIPs the file's services no
        // longer have: they answer nothing until the restart takes the
        // file's [icmp] (checked against its services when it was read).
        let mut checked = next.clone();
        let vips: Vec<_> = checked.services.iter().map(|s| s.vip).collect();
        checked.icmp.echo_vips.retain(|v| vips.contains(v));
        checked.check().map_err(|e| {
            format!(
                "{}: not applied: with the settings running until a restart ([{}]), {e}",
                path.display(),
                restart.join("], [")
            )
        })?;
        let auth = ServerAuth::from_config(&next)?;
        let removed = plane.replace_services(&next).map_err(|e| e.to_string())?;
        let dropped = statics::remove_dropped(plane, &self.running, &next);
        let mut message = format!(
            "reloaded {}: {} service(s), {} backend(s) removed",
            path.display(),
            next.services.len(),
            removed.len(),
        );
        self.statics_waiting = match statics::install(plane, &next) {
            Ok(()) => Vec::new(),
            Err(e) => {
                message.push_str(&format!("; {e} (each installed once it can be)"));
                e.indexes
            }
        };
        if dropped > 0 {
            message.push_str(&format!("; {dropped} static affinit(ies) removed"));
        }
        if !restart.is_empty() {
            message.push_str(&format!(
                "; changes to [{}] take effect at the next restart",
                restart.join("], [")
            ));
        }
        self.running = next;
        Ok(Reloaded { message, auth })
    }

    /// Installs the static affinities the last reload could not, those it
    /// can now (their keys free, room in the table); the control thread
    /// calls it every tick, after the affinities due have ended.
    pub fn install_waiting_statics(&mut self, plane: &mut ControlPlane) {
        if self.statics_waiting.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut self.statics_waiting);
        match statics::install_these(plane, &self.running, waiting) {
            Ok(()) => {
                log::info!("static affinities: every one of the configuration is installed")
            }
            Err(e) => self.statics_waiting = e.indexes,
        }
    }
}

/// A setting that takes effect only at a restart: its name, whether two
/// configurations differ in it, and how to put the running one's into
/// another.
type RestartOnly = (
    &'static str,
    fn(&Config, &Config) -> bool,
    fn(&mut Config, &Config),
);

/// The [`RestartOnly`] entry of the setting at a field path of [`Config`].
macro_rules! restart_only {
    ($name:literal, $($field:ident).+) => {
        (
            $name,
            |a, b| a.$($field).+ != b.$($field).+,
            |c, r| c.$($field).+ = r.$($field).+.clone(),
        )
    };
}

const RESTART_ONLY: [RestartOnly; 12] = [
    restart_only!("eal", eal),
    restart_only!("cores", cores),
    restart_only!("ports", ports),
    restart_only!("mempool", mempool),
    restart_only!("flow", flow),
    restart_only!("affinity", affinity),
    restart_only!("icmp", icmp),
    restart_only!("control.listen", control.listen),
    // The protocol server's replay window is sized once: widening it while
    // running would accept again requests it has forgotten.
    restart_only!("control.max_clock_skew", control.max_clock_skew),
    restart_only!("control.metrics_listen", control.metrics_listen),
    restart_only!("control.status_interval", control.status_interval),
    restart_only!("traffic", traffic),
];

/// The settings `next` changes that take effect only at the next restart.
fn restart_sections(running: &Config, next: &Config) -> Vec<&'static str> {
    RESTART_ONLY
        .iter()
        .filter(|(_, differ, _)| differ(running, next))
        .map(|(name, _, _)| *name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::handler::Payload;
    use crate::control::testing::{call, config_text, op, plane};
    use crate::protocol::message::{AffinityKey, Request, ReturnCode, ServiceAddr};
    use crate::types::{EndReason, Family, PortMatch};

    #[test]
    fn reload_that_removes_a_service_keeps_the_others_ids_and_affinities() {
        let (mut p, r) = plane(&config_text());
        let text = config_text();
        let path = std::env::temp_dir().join(format!("pktdist-plane-{}.toml", std::process::id()));
        std::fs::write(&path, &text).unwrap();
        let mut file = ConfigFile::new(Some(path.clone()), Config::parse(&text, "t.toml").unwrap());
        assert_eq!(
            call(
                &mut p,
                "b",
                Request::AffinityCreate(op("198.18.0.0", 24, Some("b"), 60))
            )
            .code,
            ReturnCode::Ok
        );
        // An affinity on the service the reload removes.
        let mut on_mail = op("198.18.1.0", 24, Some("m1"), 60);
        on_mail.key = AffinityKey::new(
            ServiceAddr::tcp("192.0.2.25:25".parse().unwrap()),
            "198.18.1.0".parse().unwrap(),
            24,
        )
        .unwrap()
        .with_ports(PortMatch::Any);
        assert_eq!(
            call(&mut p, "m1", Request::AffinityCreate(on_mail)).code,
            ReturnCode::Ok
        );
        assert_eq!(r.lookup(0, Family::V4, 0xc612_0101, 1), Some(0));
        p.take_notices();
        assert_eq!(p.dataplane().service_named("web").unwrap().id, 1);
        // Remove the first service: web moves to the front but keeps its id.
        let start = text.find("[[services]]").unwrap();
        let second = start + 1 + text[start + 1..].find("[[services]]").unwrap();
        let next = format!("{}{}", &text[..start], &text[second..]);
        std::fs::write(&path, &next).unwrap();
        let msg = file.reload(&mut p).unwrap().message;
        assert!(msg.contains("1 backend(s) removed"), "{msg}");
        assert_eq!(p.dataplane().services[0].name, "web");
        assert_eq!(p.dataplane().service(1).unwrap().name, "web");
        assert!(p.dataplane().service(0).is_none());
        // The removed service's affinity ended with its backend.
        assert_eq!(r.lookup(0, Family::V4, 0xc612_0101, 1), None);
        let notices = p.take_notices();
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert_eq!(notices[0].1.reason, EndReason::BackendRemoved);
        assert_eq!(
            r.lookup(1, Family::V4, 0xc612_0001, 1),
            Some(2),
            "stayed with web"
        );
        assert_eq!(r.lookup(0, Family::V4, 0xc612_0001, 1), None);
        let list = call(
            &mut p,
            "admin",
            Request::AffinityList {
                service: None,
                owner: None,
                offset: 0,
                limit: 0,
            },
        );
        let Payload::Affinities { entries, .. } = list.payload else {
            panic!("no list")
        };
        assert_eq!(entries[0].key.service.port, 80);
        std::fs::remove_file(&path).unwrap();
    }

    /// A reload's services are checked against the settings that run
    /// until a restart, not the file's: a file that gives the port a next
    /// hop and drops the backends' own MACs is refused (their packets
    /// would have no way out until a restart), and a port change pending a
    /// restart stays named at every reload until then.
    #[test]
    fn a_reload_is_checked_against_the_ports_that_run() {
        use crate::config::testing::with_backend_macs;
        let gateway = "gateway_mac = \"02:00:00:00:00:fe\"\n";
        let running = with_backend_macs(&config_text())
            .replace(gateway, "")
            .replace(
                "address = \"10.0.2.1\"\n",
                "address = \"10.0.2.1\"\nmac = \"02:00:00:00:00:03\"\n",
            );
        let (mut p, _) = plane(&running);
        let path = std::env::temp_dir().join(format!("pktdist-ports-{}.toml", std::process::id()));
        let mut file = ConfigFile::new(
            Some(path.clone()),
            Config::parse(&running, "t.toml").unwrap(),
        );
        // Valid as a file, with a gateway the running port does not have.
        std::fs::write(&path, config_text()).unwrap();
        Config::load(&path).unwrap();
        let err = file.reload(&mut p).err().expect("refused");
        assert!(err.contains("not applied"), "{err}");
        assert!(err.contains("[ports]"), "{err}");
        assert!(err.contains("gateway_mac"), "{err}");
        let web = p.dataplane().service_named("web").unwrap().id;
        assert!(p
            .dataplane()
            .backends
            .iter()
            .flatten()
            .filter(|b| b.service == web)
            .all(|b| b.mac.is_some()));
        assert_eq!(file.running().ports[0].gateway_mac, None);

        // A port change that the services do not need applies the rest, and
        // stays pending, named, at the next reload.
        let mtu = running.replace(
            "device = \"net_ring0\"\n",
            "device = \"net_ring0\"\nmtu = 1400\n",
        );
        std::fs::write(&path, &mtu).unwrap();
        for _ in 0..2 {
            let msg = file.reload(&mut p).unwrap().message;
            assert!(
                msg.contains("changes to [ports] take effect at the next restart"),
                "{msg}"
            );
            assert_eq!(
                file.running().ports,
                Config::parse(&running, "t").unwrap().ports
            );
        }
        std::fs::remove_file(&path).unwrap();
    }

    /// A service listed in the running `echo_vips` moves to another VIP:
    /// the services apply, and the file's `[icmp]` (which follows it)
    /// waits for the restart.
    #[test]
    fn a_reload_moves_a_service_the_running_echo_vips_name() {
        let with_icmp =
            |text: &str, vip: &str| format!("{text}\n[icmp]\necho_vips = [\"{vip}\"]\n");
        let running = with_icmp(&config_text(), "192.0.2.10");
        let (mut p, _) = plane(&running);
        let path = std::env::temp_dir().join(format!("pktdist-echo-{}.toml", std::process::id()));
        let mut file = ConfigFile::new(
            Some(path.clone()),
            Config::parse(&running, "t.toml").unwrap(),
        );
        let moved = with_icmp(
            &config_text().replace("vip = \"192.0.2.10\"", "vip = \"192.0.2.20\""),
            "192.0.2.20",
        );
        std::fs::write(&path, &moved).unwrap();
        let reloaded = file.reload(&mut p);
        std::fs::remove_file(&path).unwrap();
        let msg = reloaded.unwrap().message;
        assert!(
            msg.contains("changes to [icmp] take effect at the next restart"),
            "{msg}"
        );
        assert!(p
            .dataplane()
            .service_named("web")
            .is_some_and(|s| s.vip_bits == 0xc000_0214));
        assert_eq!(
            file.running().icmp.echo_vips,
            ["192.0.2.10".parse::<std::net::IpAddr>().unwrap()]
        );
    }

    #[test]
    fn restart_sections_are_those_that_differ() {
        let running = Config::parse(&config_text(), "t.toml").unwrap();
        assert!(restart_sections(&running, &running.clone()).is_empty());
        let mut next = running.clone();
        next.cores.workers.push(2);
        next.flow.syn_timeout.0 += std::time::Duration::from_secs(1);
        next.control.keys.clear();
        assert_eq!(restart_sections(&running, &next), ["cores", "flow"]);
        next.icmp.echo = true;
        next.ports[0].mtu = 9000;
        assert_eq!(
            restart_sections(&running, &next),
            ["cores", "ports", "flow", "icmp"]
        );
        let mut next = running.clone();
        next.control.max_clock_skew.0 += std::time::Duration::from_secs(1);
        next.control.metrics_listen = Some("127.0.0.1:9999".parse().unwrap());
        next.control.status_interval.0 += std::time::Duration::from_secs(1);
        assert_eq!(
            restart_sections(&running, &next),
            [
                "control.max_clock_skew",
                "control.metrics_listen",
                "control.status_interval"
            ]
        );
        let mut next = running.clone();
        next.traffic = Some(
            Config::parse(
                &format!(
                    "{}\n[[ports]]\nname = \"p1\"\ndevice = \"net_ring1\"\nforward_to = \"p0\"\n[traffic]\nport = \"p1\"\n",
                    config_text()
                ),
                "t.toml",
            )
            .map(|c| c.traffic.unwrap())
            .unwrap(),
        );
        assert_eq!(restart_sections(&running, &next), ["traffic"]);
    }
}
