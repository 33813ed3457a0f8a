//! Readiness notification for systemd's `Type=notify` services
//! (sd_notify(3)): `READY=1` once EAL, the ports, the workers and the
//! control protocol are up, `STOPPING=1` when the shutdown begins, and
//! `STATUS=` lines an operator sees in `systemctl status`.
//!
//! The messages are datagrams to the Unix socket named by `NOTIFY_SOCKET`
//! (a path, or `@name` for an abstract socket). Without that variable, as
//! outside systemd, every call does nothing; a socket that cannot be reached
//! is reported once and then left alone, never stopping the run.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The notification socket, if the process was started with one.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`; a bad value is logged and ignored.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            match connect(&path) {
                Ok(t) => Some(t),
                Err(e) => {
                    log::warn!("NOTIFY_SOCKET={path}: {e}; systemd will not hear from pktdist");
                    None
                }
            }
        });
        Notifier { target }
    }

    /// Whether a notification socket is set.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one message (newline-separated `KEY=value` assignments).
    pub fn send(&mut self, message: &str) {
        if let Some((sock, addr)) = &self.target {
            if let Err(e) = sock.send_to_addr(message.as_bytes(), addr) {
                log::warn!("notifying systemd ({message:?}): {e}; no further notifications");
                self.target = None;
            }
        }
    }

    pub fn ready(&mut self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn stopping(&mut self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }
}

fn connect(path: &str) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    let addr = match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())?
        }
        None if path.starts_with('/') => SocketAddr::from_pathname(path)?,
        None => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither an absolute path nor an abstract name (@...)",
            ))
        }
    };
    Ok((UnixDatagram::unbound()?, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("pktdist-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let (sock, addr) = connect(path.to_str().unwrap()).unwrap();
        let mut n = Notifier {
            target: Some((sock, addr)),
        };
        n.ready("serving");
        n.stopping();
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1\nSTATUS=stopping");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn abstract_names_are_accepted_and_relative_paths_refused() {
        assert!(connect("@pktdist-test-abstract").is_ok());
        assert!(connect("relative/notify.sock").is_err());
    }

    #[test]
    fn a_vanished_socket_disables_notifications() {
        let dir = std::env::temp_dir().join(format!("pktdist-notify-gone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let (sock, addr) = connect(path.to_str().unwrap()).unwrap();
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        let mut n = Notifier {
            target: Some((sock, addr)),
        };
        n.ready("serving");
        assert!(!n.enabled());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
