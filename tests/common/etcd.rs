//! A real etcd server for the cluster tests and benchmark: Debian's
//! `/usr/bin/etcd` on free 127.0.0.1 ports with a temporary data directory,
//! killed (and waited for) when its guard goes. `stop()` and `start()` again
//! on the same data directory and ports stage an outage. Self-contained
//! (no other harness module) so that perf/cluster_store.rs includes it too.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A CA, and a client certificate and key it signed (PEM files).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Etcd {
    /// Holds `data/` and `etcd.log`; removed on drop.
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// More etcd flags, given at every start.
    flags: Vec<String>,
    /// Clients must use TLS with these files (`Etcd::start_tls`).
    tls: Option<TlsFiles>,
    child: Option<Child>,
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Etcd {
    /// A new, empty etcd, answering when this returns.
    pub fn start_new() -> Etcd {
        Etcd::start_with(&[])
    }

    /// [`Etcd::start_new`] serving https only, to clients with a certificate
    /// of its CA: a CA, a server certificate for 127.0.0.1 and a client
    /// certificate are made with `openssl` in its directory.
    pub fn start_tls() -> Etcd {
        Etcd::start_inner(&[], true)
    }

    /// [`Etcd::start_new`] with more etcd flags (e.g. `--auth-token-ttl`).
    pub fn start_with(flags: &[&str]) -> Etcd {
        Etcd::start_inner(flags, false)
    }

    fn start_inner(flags: &[&str], tls: bool) -> Etcd {
        let client_port = free_port();
        let mut peer_port = free_port();
        while peer_port == client_port {
            peer_port = free_port();
        }
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pktdist-etcd-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd temp dir");
        let mut e = Etcd {
            dir,
            client_port,
            peer_port,
            flags: flags.iter().map(|f| f.to_string()).collect(),
            tls: None,
            child: None,
        };
        if tls {
            let files = e.make_certificates();
            let server = |n: &str| e.dir.join(n).to_str().expect("utf-8 path").to_string();
            e.flags.extend([
                "--cert-file".to_string(),
                server("server.pem"),
                "--key-file".to_string(),
                server("server.key"),
                "--client-cert-auth".to_string(),
                "--trusted-ca-file".to_string(),
                server("ca.pem"),
            ]);
            e.tls = Some(files);
        }
        // A port free when picked may be another socket's by the time etcd
        // binds it: then new ports, and a data directory etcd never used.
        for _ in 0..3 {
            match e.spawn_and_wait() {
                Ok(()) => return e,
                Err(log) if log.contains("address already in use") => {
                    let _ = std::fs::remove_dir_all(e.dir.join("data"));
                    let _ = std::fs::remove_file(e.dir.join("etcd.log"));
                    e.client_port = free_port();
                    e.peer_port = free_port();
                    while e.peer_port == e.client_port {
                        e.peer_port = free_port();
                    }
                }
                Err(log) => panic!("{log}"),
            }
        }
        panic!("etcd found no free ports in three tries: {}", e.log())
    }

    /// The client URL (https with `start_tls`).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The CA and client certificate of a `start_tls` server.
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    fn make_certificates(&self) -> TlsFiles {
        let d = |n: &str| self.dir.join(n);
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&self.dir)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=pktdist test CA",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            ]
            .concat(),
        );
        for (name, usage) in [
            ("server", "serverAuth,clientAuth"),
            ("client", "clientAuth"),
        ] {
            let ext = format!(
                "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage={usage}\n"
            );
            std::fs::write(d(&format!("{name}.ext")), ext).expect("ext");
            openssl(
                &[
                    &["req"][..],
                    &ec,
                    &[
                        "-keyout",
                        &format!("{name}.key"),
                        "-out",
                        &format!("{name}.csr"),
                        "-subj",
                        &format!("/CN=pktdist test {name}"),
                    ],
                ]
                .concat(),
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &format!("{name}.pem"),
                "-extfile",
                &format!("{name}.ext"),
            ]);
        }
        TlsFiles {
            ca: d("ca.pem"),
            cert: d("client.pem"),
            key: d("client.key"),
        }
    }

    /// Starts etcd again on the same data directory and ports and waits
    /// until it answers.
    pub fn start(&mut self) {
        if let Err(e) = self.spawn_and_wait() {
            panic!("{e}");
        }
    }

    /// Starts etcd and waits until it answers; the reason and its log if
    /// it exits first.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "etcd already running");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .expect("etcd log");
        let mut cmd = Command::new("etcd");
        // Debian's /etc/default/etcd is for its service; none of it here.
        for (k, _) in std::env::vars() {
            if k.starts_with("ETCD") {
                cmd.env_remove(k);
            }
        }
        cmd.args([
            "--name",
            "test",
            "--data-dir",
            self.dir.join("data").to_str().expect("utf-8 path"),
            "--listen-client-urls",
            &self.endpoint(),
            "--advertise-client-urls",
            &self.endpoint(),
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("test={peer}"),
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ])
        .args(&self.flags)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
        self.child = Some(
            cmd.spawn()
                .expect("start /usr/bin/etcd (scripts/install-deps.sh)"),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self
                .etcdctl_output(&["endpoint", "health", "--command-timeout=1s"])
                .status
                .success();
            if ok {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(format!("etcd exited with {status}: {}", self.log()));
            }
            if Instant::now() > deadline {
                panic!("etcd did not answer within 30 s: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills etcd and waits for it (an outage: the data directory stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The end of etcd's log, for a failure's message.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        let mut start = text.len().saturating_sub(4000);
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        text[start..].to_string()
    }

    fn etcdctl_output(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()));
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.ca.display()))
                .arg(format!("--cert={}", t.cert.display()))
                .arg(format!("--key={}", t.key.display()));
        }
        cmd.args(args)
            .output()
            .expect("run etcdctl (scripts/install-deps.sh)")
    }

    /// Runs `etcdctl` on this server; its output. Panics if it fails.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl_output(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
