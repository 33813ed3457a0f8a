//! One probe in flight: a non-blocking TCP connection to a backend, driven
//! by readiness events. A TCP check passes once the connection is made; an
//! HTTP check then sends its request and passes when the status line's
//! code is expected. Either closes with a reset (SO_LINGER 0) when the
//! probe is dropped. Timeouts are the checker's: it drops the probe at its
//! deadline and reports [`Probe::timeout_error`].

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use socket2::SockRef;

use crate::config::StatusRanges;
use crate::health::http::{self, StatusLine, MAX_STATUS_LINE};
use crate::health::target::HttpCheck;

/// Where a probe is.
#[derive(Debug)]
enum Phase {
    Connecting,
    /// HTTP: the request, this many bytes of it written.
    Sending(usize),
    /// HTTP: the response's first bytes.
    Receiving(Vec<u8>),
}

/// A probe's outcome: None passed, Some(why) failed.
pub type Outcome = Option<String>;

/// Why a probe did not start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartError {
    /// This host is short of something (file descriptors, buffers): not
    /// the backend's failure; the probe is tried again shortly.
    Local(String),
    /// The check failed at once (no route to the backend, ...).
    Failed(String),
}

/// Linux errno values of a host short of something a probe needs, which
/// passes: descriptors, buffers, memory (EMFILE, ENFILE, ENOBUFS, ENOMEM)
/// or a free local port (EADDRNOTAVAIL). Lasting faults of this host (its
/// firewall, its interface down) fail the check: a probe that waited for
/// them would hold its backend's state for good, unseen.
const LOCAL_ERRNOS: [i32; 5] = [24, 23, 105, 12, 99];

fn start_error(what: &str, e: io::Error) -> StartError {
    let why = format!("{what}: {e}");
    if e.raw_os_error().is_some_and(|n| LOCAL_ERRNOS.contains(&n)) {
        StartError::Local(why)
    } else {
        StartError::Failed(why)
    }
}

/// One check of one backend, in flight.
#[derive(Debug)]
pub struct Probe {
    stream: TcpStream,
    phase: Phase,
    /// HTTP: the request and the statuses that pass.
    http: Option<(Vec<u8>, StatusRanges)>,
}

impl Probe {
    /// Starts connecting to `addr` and registers the socket under `token`.
    pub fn start(
        addr: SocketAddr,
        http: Option<&HttpCheck>,
        registry: &Registry,
        token: Token,
    ) -> Result<Probe, StartError> {
        let mut stream = TcpStream::connect(addr).map_err(|e| start_error("connect", e))?;
        let sock = SockRef::from(&stream);
        // A reset when the probe ends: no TIME_WAIT per check on this host.
        sock.set_linger(Some(Duration::ZERO))
            .and_then(|()| sock.set_tcp_nodelay(true))
            .map_err(|e| StartError::Local(format!("socket options: {e}")))?;
        registry
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| StartError::Local(format!("poll registration: {e}")))?;
        Ok(Probe {
            stream,
            phase: Phase::Connecting,
            http: http.map(|h| (http::request(h), h.expect.clone())),
        })
    }

    /// Goes as far as the socket allows after a readiness event: Some when
    /// the probe is over.
    pub fn advance(&mut self) -> Option<Outcome> {
        loop {
            match &mut self.phase {
                Phase::Connecting => {
                    match self.stream.take_error() {
                        Ok(None) => {}
                        Ok(Some(e)) | Err(e) => return Some(Some(format!("connect: {e}"))),
                    }
                    match self.stream.peer_addr() {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => return None,
                        Err(e) => return Some(Some(format!("connect: {e}"))),
                    }
                    if self.http.is_none() {
                        return Some(None);
                    }
                    self.phase = Phase::Sending(0);
                }
                Phase::Sending(done) => {
                    let Some((request, _)) = &self.http else {
                        return Some(None);
                    };
                    if *done == request.len() {
                        self.phase = Phase::Receiving(Vec::with_capacity(256));
                        continue;
                    }
                    match self.stream.write(&request[*done..]) {
                        Ok(0) => {
                            return Some(Some("sending the request: connection closed".into()))
                        }
                        Ok(n) => *done += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Some(Some(format!("sending the request: {e}"))),
                    }
                }
                Phase::Receiving(buf) => {
                    let mut chunk = [0u8; 512];
                    match self.stream.read(&mut chunk) {
                        Ok(0) if buf.is_empty() => {
                            return Some(Some("connection closed without a response".into()))
                        }
                        Ok(0) => {
                            return Some(Some(match http::status_line(buf) {
                                StatusLine::Garbage(why) => why,
                                _ => "connection closed inside the status line".into(),
                            }))
                        }
                        Ok(n) => {
                            let room = MAX_STATUS_LINE + 2 - buf.len().min(MAX_STATUS_LINE + 2);
                            buf.extend_from_slice(&chunk[..n.min(room)]);
                            let expect = self.http.as_ref().map(|(_, e)| e);
                            match (http::status_line(buf), expect) {
                                (StatusLine::Incomplete, _) => {}
                                (StatusLine::Garbage(why), _) => return Some(Some(why)),
                                (StatusLine::Status(code), Some(expect)) => {
                                    return Some(
                                        (!expect.contains(code))
                                            .then(|| format!("status {code}, expected {expect}")),
                                    )
                                }
                                (StatusLine::Status(_), None) => return Some(None),
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Some(Some(format!("reading the response: {e}"))),
                    }
                }
            }
        }
    }

    /// The failure of a probe still here at its deadline.
    pub fn timeout_error(&self, timeout: Duration) -> String {
        let what = match self.phase {
            Phase::Connecting => "no connection",
            Phase::Sending(_) => "request not taken",
            Phase::Receiving(_) => "no response",
        };
        format!(
            "timeout: {what} within {}",
            crate::config::DurationStr(timeout)
        )
    }

    /// Takes the socket out of the poll; dropping the probe then closes it.
    pub fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_of_this_host_are_not_the_backends() {
        let err = |n| start_error("connect", io::Error::from_raw_os_error(n));
        // EMFILE, ENOBUFS, EADDRNOTAVAIL: this host is short of something.
        for n in [24, 105, 99] {
            assert!(matches!(err(n), StartError::Local(_)), "errno {n}");
        }
        // ECONNREFUSED, ENETUNREACH, EHOSTUNREACH: the backend's (or its
        // network's); EPERM, ENETDOWN: lasting faults here, which must show.
        for n in [111, 101, 113, 1, 100] {
            assert!(matches!(err(n), StartError::Failed(_)), "errno {n}");
        }
        assert_eq!(
            err(111),
            StartError::Failed(format!("connect: {}", io::Error::from_raw_os_error(111)))
        );
    }
}
