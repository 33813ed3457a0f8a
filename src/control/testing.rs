//! Fixtures for the control thread's tests: a configuration with two
//! services, a control plane built from it, affinity requests and a peer
//! that talks the protocol over UDP.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::affinity::manager::AffinityManager;
use crate::affinity::table::{AffinityReader, AffinityTable};
use crate::config::Config;
use crate::control::handler::Response;
use crate::control::plane::ControlPlane;
use crate::control::registry::ServiceRegistry;
use crate::datapath::snapshot::DataplaneCell;
use crate::protocol::auth::{unix_ms, Key};
use crate::protocol::message::{
    encode_request, AffinityKey, AffinityOp, EndedNotice, Envelope, Header, MsgType, Reply,
    Request, ServiceAddr, MAX_DATAGRAM,
};
use crate::types::{PortMatch, ServiceId};

/// The first service of the test configuration, before web.
const MAIL: &str = r#"
[[services]]
name = "mail"
vip = "192.0.2.25"
port = 25
protocol = "tcp"
forwarding = "ipip"
ipip_source = "198.51.100.1"
[[services.backends]]
name = "m1"
address = "10.0.2.1"
"#;

/// The rest of the test configuration's web service.
const WEB_REST: &str = r#"
max_affinity_duration = "10m"
[[services.backends]]
name = "a"
address = "10.0.0.1"
[[services.backends]]
name = "b"
address = "10.0.0.2"
"#;

/// The id of the web service (mail is 0).
pub(crate) const WEB: ServiceId = 1;

/// Services mail (backend m1) and web (backends a and b, affinities of up
/// to ten minutes).
pub(crate) fn config_text() -> String {
    use crate::config::testing::{with_services, WEB};
    with_services(&format!("{MAIL}{WEB}{WEB_REST}"))
}

/// A control plane for the configuration `text`, and a reader of its
/// affinity table.
pub(crate) fn plane(text: &str) -> (ControlPlane, AffinityReader) {
    let cfg = Config::parse(text, "t.toml").unwrap();
    let mut registry = ServiceRegistry::from_config(&cfg).unwrap();
    let cell = Arc::new(DataplaneCell::new(registry.snapshot().unwrap()));
    let (writer, reader) = AffinityTable::new(1024);
    let p = ControlPlane::new(
        registry,
        cell,
        AffinityManager::new(writer),
        Vec::new(),
        Instant::now(),
    );
    (p, reader)
}

/// The time the plane's first listed affinity has left, in ms.
pub(crate) fn first_time_left(p: &ControlPlane) -> Option<u64> {
    let (_, record) = p.affinities().list().next().expect("an affinity");
    record.remaining_ms(p.now_ms())
}

/// Where the tests' requests come from.
pub(crate) fn src() -> SocketAddr {
    "127.0.0.1:5000".parse().unwrap()
}

/// An affinity operation on web for `client`/`plen`, any port, notifying
/// [`src`].
pub(crate) fn op<'a>(client: &str, plen: u8, owner: Option<&'a str>, secs: u32) -> AffinityOp<'a> {
    AffinityOp {
        key: AffinityKey::new(
            ServiceAddr::tcp("192.0.2.10:80".parse().unwrap()),
            client.parse().unwrap(),
            plen,
        )
        .unwrap()
        .with_ports(PortMatch::Any),
        duration_secs: secs,
        owner,
        notify: Some(src()),
    }
}

/// `req` from `sender` (the admin if it is named so) to the plane.
pub(crate) fn call(p: &mut ControlPlane, sender: &str, req: Request<'_>) -> Response {
    p.handle(sender, sender == "admin", &req)
}

/// A protocol peer on a UDP socket of its own: signs requests with its key
/// and opens what comes back.
pub(crate) struct Peer {
    sock: UdpSocket,
    name: String,
    key: Key,
    nonce: u64,
}

/// What a peer received.
#[derive(Debug)]
pub(crate) enum Received {
    Reply(Reply),
    Ended(EndedNotice),
}

impl Peer {
    pub(crate) fn new(name: &str, key: &[u8]) -> Peer {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        Peer {
            sock,
            name: name.to_string(),
            key: Key::new(key).unwrap(),
            nonce: 1,
        }
    }

    /// The same socket signing with another key.
    pub(crate) fn with_key(mut self, key: &[u8]) -> Peer {
        self.key = Key::new(key).unwrap();
        self
    }

    /// Sends `req`, signed and stamped now, to `to`.
    pub(crate) fn send(&mut self, to: SocketAddr, req: &Request<'_>) {
        let mut buf = [0u8; MAX_DATAGRAM];
        self.nonce += 1;
        let h = Header {
            msg_type: 0,
            request_id: self.nonce as u32,
            timestamp_ms: unix_ms(SystemTime::now()),
            nonce: self.nonce,
            name: &self.name,
        };
        let n = encode_request(&mut buf, &h, &self.key, req).unwrap();
        self.sock.send_to(&buf[..n], to).unwrap();
    }

    /// The next datagram, checked to be signed with `key` under this
    /// peer's name; None if nothing came within the socket's timeout.
    pub(crate) fn recv_signed(&self, key: &[u8]) -> Option<Received> {
        let mut buf = [0u8; MAX_DATAGRAM];
        let (n, _) = self.sock.recv_from(&mut buf).ok()?;
        let env = Envelope::open(&buf[..n]).unwrap();
        assert_eq!(env.header.name, self.name);
        assert!(env.verify(&Key::new(key).unwrap()), "signed with {key:?}");
        Some(match MsgType::from_u8(env.header.msg_type) {
            Some(MsgType::Reply) => Received::Reply(Reply::decode_body(env.body).unwrap()),
            Some(MsgType::AffinityEnded) => {
                Received::Ended(EndedNotice::decode_body(env.body).unwrap())
            }
            other => panic!("unexpected message {other:?}"),
        })
    }
}
