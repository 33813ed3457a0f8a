//! `pktdist stats --watch`: a live view of a running instance, 80 columns
//! wide, redrawn in place on a terminal and printed as plain blocks of lines
//! when the output is a pipe or a file.
//!
//! Rates come from two successive snapshots of the instance's [`Summary`].

use std::fmt::Write as _;

use crate::report::summary::Summary;

/// Width the view is laid out for.
pub const WIDTH: usize = 80;

/// ANSI: cursor home, clear screen.
const CLEAR: &str = "\x1b[H\x1b[2J";

fn rate(prev: Option<u64>, cur: u64, secs: f64) -> Option<f64> {
    let p = prev?;
    (secs > 0.0).then(|| cur.saturating_sub(p) as f64 / secs)
}

fn fmt_rate(r: Option<f64>) -> String {
    match r {
        None => "-".into(),
        Some(v) if v >= 1e6 => format!("{:.2}M", v / 1e6),
        Some(v) if v >= 1e4 => format!("{:.1}k", v / 1e3),
        Some(v) => format!("{v:.0}"),
    }
}

fn fmt_count(v: u64) -> String {
    if v >= 10_000_000 {
        format!("{:.1}M", v as f64 / 1e6)
    } else if v >= 100_000 {
        format!("{:.0}k", v as f64 / 1e3)
    } else {
        v.to_string()
    }
}

/// Seconds as the largest two units: `42s`, `5m3s`, `2h10m`, `3d4h`.
pub fn fmt_secs(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// Renders one frame of the view: `cur` with rates against `prev`, over
/// the time between them by the server's clock (their `seconds`: the
/// client's would add the requests' round trips); none against a `prev`
/// of a run that has since restarted. With `terminal` the frame starts by
/// clearing the screen; without, it is a block of plain lines ending with
/// a blank line.
pub fn render(server: &str, prev: Option<&Summary>, cur: &Summary, terminal: bool) -> String {
    let prev = prev.filter(|p| p.seconds < cur.seconds);
    let secs = prev.map_or(0.0, |p| cur.seconds - p.seconds);
    let mut o = String::new();
    if terminal {
        o.push_str(CLEAR);
    }
    let r = |get: fn(&Summary) -> u64| rate(prev.map(get), get(cur), secs);
    let _ = writeln!(
        o,
        "pktdist {server}  up {:.0}s  {} worker(s)  affinities {}  flows {}",
        cur.seconds,
        cur.workers,
        cur.affinities,
        fmt_count(cur.active_flows)
    );
    let drops: u64 = cur.drops.values().sum();
    let _ = writeln!(
        o,
        "rx {} pps  tx {} pps  drop {}/s  new conn {}/s  syn {}/s",
        fmt_rate(r(|s| s.rx_packets)),
        fmt_rate(r(|s| s.tx_packets)),
        fmt_rate(rate(prev.map(|p| p.drops.values().sum()), drops, secs)),
        fmt_rate(r(|s| s.new_connections)),
        fmt_rate(r(|s| s.syns)),
    );
    let _ = writeln!(
        o,
        "affinity hits {} misses {} auto {}   unknown flows {}{}",
        fmt_count(cur.affinity_hits),
        fmt_count(cur.affinity_misses),
        fmt_count(cur.auto_affinity_hits),
        fmt_count(cur.unknown_flows),
        if cur.syn_guard_workers > 0 {
            format!(
                "   SYN flood guard on {} worker(s), {} SYNs untracked",
                cur.syn_guard_workers,
                fmt_count(cur.syns_untracked)
            )
        } else {
            String::new()
        }
    );
    let l = &cur.packet_latency_ns;
    let _ = writeln!(
        o,
        "latency ns/pkt p50 {} p90 {} p99 {} p99.9 {} max {}",
        l.p50, l.p90, l.p99, l.p999, l.max
    );
    for svc in &cur.services {
        let prev_svc = prev.and_then(|p| p.services.iter().find(|s| s.name == svc.name));
        let _ = writeln!(o);
        let head = format!(
            "{} {}:{}/{}  {} pps  {} conn/s",
            svc.name,
            svc.vip,
            svc.port,
            svc.protocol,
            fmt_rate(rate(prev_svc.map(|s| s.packets), svc.packets, secs)),
            fmt_rate(rate(
                prev_svc.map(|s| s.new_connections),
                svc.new_connections,
                secs
            )),
        );
        let _ = writeln!(o, "{}", clip(&head));
        let _ = writeln!(
            o,
            "  {:<14} {:>6} {:>7} {:>9} {:>7} {:>8} {:>9} state",
            "backend", "weight", "w-share", "conn/s", "c-share", "active", "pps"
        );
        for b in &svc.backends {
            let pb = prev_svc.and_then(|s| s.backends.iter().find(|x| x.name == b.name));
            let _ = writeln!(
                o,
                "  {:<14} {:>6} {:>6.1}% {:>9} {:>6.1}% {:>8} {:>9} {}",
                clip_to(&b.name, 14),
                b.weight,
                b.weight_share * 100.0,
                fmt_rate(rate(pb.map(|x| x.connections), b.connections, secs)),
                b.connection_share * 100.0,
                fmt_count(b.active_connections.max(0) as u64),
                fmt_rate(rate(pb.map(|x| x.packets), b.packets, secs)),
                b.state,
            );
            // A backend that is not up: since when, and why its checks fail.
            if !b.state.is_empty() && b.state != "up" {
                let mut line = format!(
                    "    {} {} for {}",
                    b.name,
                    b.state,
                    fmt_secs(b.state_for_secs)
                );
                if let Some(e) = &b.check_error {
                    let _ = write!(line, ": {e}");
                }
                let _ = writeln!(o, "{}", clip(&line));
            }
        }
    }
    if let Some(h) = &cur.extra.health {
        let down: Vec<_> = h.backends.iter().filter(|b| b.state != "up").collect();
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "{}",
            clip(&format!(
                "health: {} checked, {} up, {} down{}",
                h.backends.len(),
                h.backends.len() - down.len(),
                down.len(),
                if h.checker_down {
                    "; checker not running, states held"
                } else {
                    ""
                }
            ))
        );
        for b in down {
            let line = format!(
                "  {}/{} down {:.0}s  {} {}  {}",
                b.service,
                b.backend,
                b.seconds_in_state,
                b.kind,
                b.checked,
                b.last_error.as_deref().unwrap_or("last check passed")
            );
            let _ = writeln!(o, "{}", clip(&line));
        }
    }
    let nonzero: Vec<String> = cur
        .drops
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k} {}", fmt_count(*v)))
        .collect();
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{}",
        clip(&format!(
            "drops: {}",
            if nonzero.is_empty() {
                "none".to_string()
            } else {
                nonzero.join(", ")
            }
        ))
    );
    if let Some(limits) = cur.extra.control.as_ref().and_then(|c| c.limits()) {
        let _ = writeln!(o, "{}", clip(&format!("limits: {limits}")));
    }
    if !terminal {
        o.push('\n');
    }
    o
}

fn clip(s: &str) -> String {
    clip_to(s, WIDTH)
}

fn clip_to(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('~');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::control::registry::ServiceRegistry;
    use crate::datapath::counters::WorkerCounters;
    use std::sync::Arc;

    fn snapshot(packets: u64) -> Summary {
        snapshot_at(packets, 10.0)
    }

    fn snapshot_at(packets: u64, seconds: f64) -> Summary {
        let cfg = Config::load(concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml")).unwrap();
        let dp = ServiceRegistry::from_config(&cfg)
            .unwrap()
            .snapshot()
            .unwrap();
        let w = Arc::new(WorkerCounters::default());
        w.rx_packets.add(packets);
        w.tx_packets.add(packets);
        w.backends[0].connections.add(packets / 10);
        w.backends[0].packets.add(packets);
        w.services[0].packets.add(packets);
        Summary::collect(&[w], &dp, seconds, 3, &Default::default())
    }

    #[test]
    fn plain_mode_has_rates_backends_and_fits_80_columns() {
        let a = snapshot_at(1_000_000, 10.0);
        let b = snapshot_at(3_000_000, 12.0);
        let text = render("127.0.0.1:7400", Some(&a), &b, false);
        assert!(
            !text.contains('\x1b'),
            "no escape codes when not a terminal"
        );
        assert!(
            text.ends_with("\n\n"),
            "frames are separated by a blank line"
        );
        assert!(text.contains("rx 1.00M pps"), "{text}");
        assert!(text.contains("web 192.0.2.10:80/tcp"));
        let be1 = text
            .lines()
            .find(|l| l.trim_start().starts_with("be1"))
            .unwrap();
        assert!(be1.contains("16.7%"), "{be1}");
        assert!(be1.contains("100.0k"), "connection rate: {be1}");
        for line in text.lines() {
            assert!(line.chars().count() <= WIDTH, "too wide: {line:?}");
        }
    }

    #[test]
    fn backends_show_their_state_since_when_and_why() {
        let mut b = snapshot(10);
        let be2 = &mut b.services[0].backends[1];
        be2.state = "down".into();
        be2.state_for_secs = 125;
        be2.check_error = Some("connect: connection refused ".repeat(5));
        let text = render("x", None, &b, false);
        let row = |name: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(name))
                .unwrap()
                .to_string()
        };
        assert!(row("be1").ends_with(" up"), "{text}");
        assert!(row("be2").ends_with(" down"), "{text}");
        assert!(
            text.contains("    be2 down for 2m5s: connect: connection refused"),
            "{text}"
        );
        for line in text.lines() {
            assert!(line.chars().count() <= WIDTH, "too wide: {line:?}");
        }
        assert_eq!(
            [
                fmt_secs(42),
                fmt_secs(303),
                fmt_secs(7800),
                fmt_secs(273_600)
            ],
            ["42s", "5m3s", "2h10m", "3d4h"]
        );
    }

    #[test]
    fn no_rates_against_an_earlier_run() {
        let a = snapshot_at(1_000_000, 100.0);
        let b = snapshot_at(3_000_000, 2.0);
        let text = render("x", Some(&a), &b, false);
        assert!(text.contains("rx - pps"), "{text}");
    }

    #[test]
    fn first_frame_has_no_rates_and_terminal_mode_clears() {
        let b = snapshot(10);
        let text = render("x", None, &b, true);
        assert!(text.starts_with(CLEAR));
        assert!(text.contains("rx - pps"));
    }

    /// What the affinity limits and request rates refused shows under the
    /// drops, once they refused anything.
    #[test]
    fn refusals_by_limits_and_rates_are_shown() {
        use crate::report::summary::ControlSummary;
        let mut b = snapshot(10);
        b.extra.control = Some(ControlSummary::default());
        assert!(!render("x", None, &b, false).contains("limits:"));
        b.extra.control = Some(ControlSummary {
            limited: [("quota".to_string(), 4), ("overlap".to_string(), 0)].into(),
            rate_limited: [("be1".to_string(), 0), ("be2".to_string(), 7)].into(),
            ..ControlSummary::default()
        });
        let text = render("x", None, &b, false);
        assert!(
            text.contains(
                "limits: 4 affinity creates refused (quota 4), 7 requests rate limited (be2 7)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn checked_backends_that_are_down_are_listed_with_their_error() {
        use crate::health::view::{BackendHealth, HealthSummary};
        let mut b = snapshot(10);
        let health = |backend: &str, state: &str, error: Option<&str>| BackendHealth {
            service: "web".into(),
            backend: backend.into(),
            state: state.into(),
            seconds_in_state: 12.0,
            checked: "192.168.0.1:8080".into(),
            kind: "http".into(),
            last_error: error.map(String::from),
            ..BackendHealth::default()
        };
        b.extra.health = Some(HealthSummary {
            backends: vec![
                health("be1", "up", None),
                health("be2", "down", Some("status 503, expected 200-399")),
            ],
            probes: Vec::new(),
            checker_down: false,
            checker_restarts: 0,
        });
        let text = render("x", None, &b, false);
        assert!(text.contains("health: 2 checked, 1 up, 1 down\n"), "{text}");
        assert!(
            text.contains(
                "  web/be2 down 12s  http 192.168.0.1:8080  status 503, expected 200-399"
            ),
            "{text}"
        );
        assert!(!text.contains("web/be1 "), "{text}");
        for line in text.lines() {
            assert!(line.chars().count() <= WIDTH, "too wide: {line:?}");
        }
        b.extra.health.as_mut().unwrap().checker_down = true;
        let text = render("x", None, &b, false);
        assert!(
            text.contains("health: 2 checked, 1 up, 1 down; checker not running, states held\n"),
            "{text}"
        );
    }
}
