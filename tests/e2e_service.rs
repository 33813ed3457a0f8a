//! pktdist as a system service: systemd's readiness protocol against a
//! socket this test listens on, a real Prometheus (Debian's `prometheus`)
//! scraping a running instance, `promtool` on the `/metrics` text, and the
//! shipped alerting rules checked and unit-tested by `promtool`.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// config/demo.toml made fit for a test: this harness's EAL arguments, the
/// control protocol and the metrics on free ports, a gentle traffic rate.
fn demo_config(dir: &TempDir) -> std::path::PathBuf {
    let demo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml"))
        .expect("config/demo.toml");
    let mut out = String::new();
    let mut in_eal_args = false;
    for line in demo.lines() {
        if in_eal_args {
            in_eal_args = !line.starts_with(']');
            continue;
        }
        if line.starts_with("args = [") {
            out.push_str(&format!("args = {}\n", child_eal_args()));
            in_eal_args = true;
        } else if line.starts_with("listen = ") {
            out.push_str("listen = \"127.0.0.1:0\"\n");
        } else if line.starts_with("metrics_listen = ") {
            out.push_str("metrics_listen = \"127.0.0.1:0\"\n");
        } else if line.starts_with("rate_pps = ") {
            out.push_str("rate_pps = 20000\n");
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    let path = dir.path("pktdist.toml");
    std::fs::write(&path, out).expect("write config");
    path
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn prometheus_log(dir: &TempDir) -> String {
    std::fs::read_to_string(dir.path("prometheus.log")).unwrap_or_default()
}

/// A Prometheus server of its own, killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let cfg = dir.path("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: pktdist\n    static_configs:\n      \
                 - targets: [\"{target}\"]\n"
            ),
        )
        .expect("prometheus.yml");
        // A port free when picked may be another socket's by the time
        // Prometheus binds it: then another port.
        for _ in 0..3 {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let mut child = Command::new("prometheus")
                .arg(format!("--config.file={}", cfg.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path("prometheus.log")).expect("log"))
                .spawn()
                .expect("start prometheus (Debian package prometheus; scripts/install-deps.sh)");
            let deadline = Instant::now() + Duration::from_secs(60);
            let ready = loop {
                if http_get(addr, "/-/ready").is_some() {
                    break true;
                }
                if let Ok(Some(status)) = child.try_wait() {
                    let log = prometheus_log(&dir);
                    assert!(
                        log.contains("address already in use"),
                        "prometheus exited with {status}:\n{log}"
                    );
                    break false;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("prometheus not ready in 60 s:\n{}", prometheus_log(&dir));
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            if ready {
                return Prometheus {
                    child,
                    addr,
                    _dir: dir,
                };
            }
        }
        panic!("prometheus found no free port in three tries")
    }

    /// The result vector of an instant query.
    fn query(&self, expr: &str) -> Option<Vec<serde_json::Value>> {
        let body = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", urlencode(expr)),
        )?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["status"] == "success").then(|| v["data"]["result"].as_array().cloned())?
    }

    fn log(&self) -> String {
        prometheus_log(&self._dir)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn systemd_hears_ready_then_stopping() {
    let _serial = serial();
    let dir = TempDir::new("notify");
    let config = demo_config(&dir);
    let sock_path = dir.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");

    let pd = Pktdist::spawn_with_env(
        &["run", "--config", path_str(&config), "--quiet"],
        &[("NOTIFY_SOCKET", path_str(&sock_path))],
    );
    let mut buf = [0u8; 512];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY=1 from pktdist: {e}\n{}", pd.stderr_text()));
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready.contains("STATUS=forwarding on 2 port(s)"),
        "{ready:?}"
    );
    // READY comes once the control protocol answers: its line was written
    // before (this side reads the child's output on a thread of its own, so
    // it may see the line a moment after the datagram).
    assert!(
        pd.wait_stderr("control protocol on udp", Duration::from_secs(10))
            .is_some(),
        "{}",
        pd.stderr_text()
    );

    let done = pd.stop(Duration::from_secs(30));
    assert!(done.status.success(), "{}", done.stderr);
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    let stopping = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    // Log lines carry a level; outside the journal, no `<N>` prefix.
    assert!(
        done.stderr.lines().any(|l| l.contains(" INFO  stopping")),
        "{}",
        done.stderr
    );
    assert!(!done.stderr.contains("<6>"), "{}", done.stderr);
}

/// The value of an unlabelled metric in a `/metrics` text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `[control] stop_delay`: asked to stop, an instance is not ready at once
/// (BGP withdraws it) but forwards on until the delay ends, then stops as
/// it always does.
#[test]
fn a_stopping_instance_forwards_through_its_stop_delay() {
    let _serial = serial();
    let dir = TempDir::new("stop-delay");
    let config = demo_config(&dir);
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replacen("[control]\n", "[control]\nstop_delay = \"20s\"\n", 1),
    )
    .expect("write config");
    let (pd, _control) = Pktdist::run(&config);
    let metrics = pd.metrics_addr(Duration::from_secs(30));
    // `/ready` answers 200 when ready (http_get: Some), 503 when not (None,
    // while `/metrics` still answers).
    let ready = || http_get(metrics, "/ready").is_some();
    let answers = || http_get(metrics, "/metrics").is_some();
    assert!(
        poll_until(Duration::from_secs(30), || ready().then_some(())).is_some(),
        "never ready\n{}",
        pd.stderr_text()
    );

    pd.terminate();
    assert!(
        poll_until(Duration::from_secs(10), || (!ready() && answers())
            .then_some(()))
        .is_some(),
        "still ready after SIGTERM, or gone\n{}",
        pd.stderr_text()
    );
    // Not ready, and still forwarding: the transmitted count goes on
    // growing (the demo's traffic source runs until the workers stop).
    let sent = || {
        http_get(metrics, "/metrics").and_then(|t| metric(&t, "pktdist_transmitted_packets_total"))
    };
    let first = sent().expect("metrics answer while stopping");
    assert!(
        poll_until(Duration::from_secs(10), || sent().filter(|&n| n > first)).is_some(),
        "nothing forwarded after SIGTERM (transmitted stayed {first})\n{}",
        pd.stderr_text()
    );
    assert!(!ready() && answers(), "ready again while stopping");

    let done = pd.wait(Duration::from_secs(60));
    assert!(done.status.success(), "{}", done.stderr);
    let lines: Vec<&str> = done.stderr.lines().collect();
    let lingered = lines
        .iter()
        .position(|l| l.contains("stopping: not ready, forwarding for 20s more"))
        .unwrap_or_else(|| panic!("no stop-delay line\n{}", done.stderr));
    let stopped = lines
        .iter()
        .position(|l| l.contains(" INFO  stopping") && !l.contains("stopping:"))
        .unwrap_or_else(|| panic!("no stopping line\n{}", done.stderr));
    assert!(lingered < stopped, "{}", done.stderr);
}

#[test]
fn a_real_prometheus_scrapes_pktdist() {
    let _serial = serial();
    let dir = TempDir::new("prom-e2e");
    let config = demo_config(&dir);
    let (pd, _control) = Pktdist::run(&config);
    let metrics = pd.metrics_addr(Duration::from_secs(30));

    // The readiness endpoint a service manager or route announcer polls.
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(metrics, "/ready").is_none() {
        assert!(
            Instant::now() < deadline,
            "never ready\n{}",
            pd.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // promtool's own linter on the exposition text.
    let text = http_get(metrics, "/metrics").expect("/metrics");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let prom = Prometheus::start(metrics);
    let deadline = Instant::now() + Duration::from_secs(90);
    let rate = loop {
        if let Some(r) = prom.query("rate(pktdist_received_packets_total[5s])") {
            if let Some(v) = r.first().and_then(|s| s["value"][1].as_str()) {
                let v: f64 = v.parse().unwrap_or(0.0);
                if v > 0.0 {
                    break v;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw traffic\n{}\n{}",
            prom.log(),
            pd.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(rate > 0.0);

    // Every backend of config/demo.toml is up (no health checks there), as
    // Prometheus stored it, and so is the target. Asked until so: one slow
    // scrape (over its 1 s timeout) on a loaded machine marks the series
    // stale until the next.
    let expected = ["app/app1", "app/app2", "web/be1", "web/be2", "web/be3"];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let backends = prom.query("pktdist_backend_up").unwrap_or_default();
        let mut names: Vec<String> = backends
            .iter()
            .map(|s| {
                format!(
                    "{}/{}",
                    s["metric"]["service"].as_str().unwrap_or("?"),
                    s["metric"]["backend"].as_str().unwrap_or("?")
                )
            })
            .collect();
        names.sort();
        let up = prom.query("up{job=\"pktdist\"}").unwrap_or_default();
        if names == expected
            && backends.iter().all(|s| s["value"][1] == "1")
            && up.len() == 1
            && up[0]["value"][1] == "1"
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backends {backends:?}, up {up:?}\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn the_alerting_rules_pass_promtool() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/prometheus");
    for args in [
        ["check", "rules", "pktdist-rules.yml"],
        ["test", "rules", "pktdist-rules.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("promtool (Debian package prometheus)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
