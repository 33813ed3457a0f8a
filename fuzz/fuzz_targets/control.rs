//! Control requests, as an authenticated sender's: any sequence of them is
//! answered without a panic, a request that encodes decodes to itself, the
//! workers' table answers as the control thread's records say (at each
//! record's address and ports, the owner of the most specific record
//! covering them), and once the clock is past every duration no requested
//! affinity is left, in the records or in the table.
//!
//! The input is a list of steps, each `[kind, sender, ...]`. Kinds 0-2
//! build an affinity create, extend or cancel from the bytes that follow
//! (service, client address, prefix length, ports, seconds, owner, notify
//! address), encode it as a client would and decode it as the server does;
//! kind 3 expires what is due; any other kind takes `[type, len,
//! body...]` as a raw request body of that message type. The sender is
//! one of the configuration's backends, the admin, or a name no service
//! has.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;

use pktdist::affinity::table::AffinityReader;
use pktdist::control::plane::ControlPlane;
use pktdist::protocol::message::{
    AffinityKey, AffinityOp, MsgType, Request, ServiceAddr, Writer, MAX_DATAGRAM,
};
use pktdist::types::{Family, PortMatch};

const SENDERS: [&str; 6] = ["a", "b", "c", "s1", "admin", "nobody"];

/// Reads the input front to back; past its end, zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (b, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        b
    }
}

fn service(i: u8) -> ServiceAddr {
    let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
    match i % 5 {
        0 => ServiceAddr::tcp(sa("192.0.2.10:80")),
        1 => ServiceAddr::udp(sa("192.0.2.10:53")),
        2 => ServiceAddr::tcp(sa("[2001:db8::10]:80")),
        // No such service, in each family.
        3 => ServiceAddr::tcp(sa("192.0.2.99:80")),
        _ => ServiceAddr::udp(sa("[2001:db8::10]:80")),
    }
}

/// An affinity operation from the input, or None when its fields make no
/// key (a client builds none such).
fn affinity_op(input: &mut Input<'_>) -> Option<AffinityOp<'static>> {
    let svc = service(input.u8());
    // Clients from a few networks, so that keys meet and overlap.
    let pick = input.u8();
    let client: IpAddr = match svc.addr {
        IpAddr::V4(_) => Ipv4Addr::new(198, 18, pick & 3, input.u8()).into(),
        IpAddr::V6(_) => Ipv6Addr::new(
            0x2001,
            0xdb8,
            0xc,
            u16::from(pick & 3),
            0,
            0,
            0,
            input.u16(),
        )
        .into(),
    };
    let plen = input.u8() % 140;
    let ports = match input.u8() % 4 {
        0 => PortMatch::Any,
        1 => PortMatch::One(input.u16()),
        _ => {
            let (lo, hi) = (input.u16(), input.u16());
            PortMatch::Range(lo.min(hi), lo.max(hi))
        }
    };
    let secs = match input.u8() % 4 {
        0 => input.u32(),
        n => u32::from(n) * u32::from(input.u8()),
    };
    let owner = match input.u8() % 8 {
        n @ 0..=5 => Some(SENDERS[usize::from(n)]),
        _ => None,
    };
    let notify = (input.u8() & 1 == 1).then(|| "127.0.0.1:9".parse().unwrap());
    let key = AffinityKey::new(svc, client, plen).ok()?.with_ports(ports);
    Some(AffinityOp {
        key,
        duration_secs: secs,
        owner,
        notify,
    })
}

/// The workers' table agrees with the records: a lookup at each record's
/// network address, at each end of its ports, finds the owner of the most
/// specific record covering that point.
fn check_table(plane: &ControlPlane, reader: &AffinityReader) {
    let records: Vec<_> = plane.affinities().list().collect();
    for (k, _) in &records {
        let ports = match k.ports() {
            PortMatch::Any => (0, u16::MAX),
            PortMatch::One(p) => (p, p),
            PortMatch::Range(lo, hi) => (lo, hi),
        };
        for port in [ports.0, ports.1] {
            let (service, family, client) = (k.service(), k.family(), k.addr());
            let expected = records
                .iter()
                .filter(|(c, _)| c.matches(service, family, client, port))
                .max_by_key(|(c, _)| c.specificity())
                .map(|(_, r)| r.owner);
            assert_eq!(
                reader.lookup(service, family, client, port),
                expected,
                "the table's answer for {k:?} at port {port}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (mut plane, reader) = pktdist_fuzz::control_bed();
    let static_count = plane.affinities().len();
    let mut input = Input(data);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !input.0.is_empty() {
        let kind = input.u8();
        let sender = SENDERS[usize::from(input.u8()) % SENDERS.len()];
        let admin = sender == "admin";
        let mut built = None;
        let (ty, body): (MsgType, &[u8]) = match kind % 8 {
            k @ 0..=2 => {
                let Some(op) = affinity_op(&mut input) else {
                    continue;
                };
                let req = match k {
                    0 => Request::AffinityCreate(op),
                    1 => Request::AffinityExtend(op),
                    _ => Request::AffinityCancel(AffinityOp {
                        duration_secs: 0,
                        ..op
                    }),
                };
                built = Some(req);
                let mut w = Writer::new(&mut buf);
                if req.encode_body(&mut w).is_err() {
                    // A client refuses to send it (a duration of 0).
                    continue;
                }
                let n = w.len();
                (req.msg_type(), &buf[..n])
            }
            3 => {
                plane.expire();
                check_table(&plane, &reader);
                continue;
            }
            _ => {
                let Some(ty) = MsgType::from_u8(input.u8()) else {
                    continue;
                };
                let n = usize::from(input.u8());
                (ty, input.bytes(n))
            }
        };
        let Ok(req) = Request::decode_body(ty, body) else {
            assert!(built.is_none(), "a request that encodes must decode");
            continue;
        };
        if let Some(built) = built {
            assert_eq!(req, built, "a request decodes to what was encoded");
        }
        plane.handle(sender, admin, &req);
        assert!(plane.affinities().len() <= plane.affinities().capacity());
        check_table(&plane, &reader);
    }
    // Past every duration (365 days at most), only the static affinity is
    // left, unless the admin removed its backend; and so it is in the table.
    plane.expire_at(plane.now_ms() + 400 * 86_400_000);
    let left = plane.affinities().len();
    assert!(
        left <= static_count,
        "requested affinities outlived their time"
    );
    assert!(plane.affinities().list().all(|(_, r)| r.expires.is_none()));
    check_table(&plane, &reader);
    let web = plane.dataplane().services[0].id;
    let client = u128::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)));
    assert_eq!(
        reader.lookup(web, Family::V4, client, 1000).is_some(),
        left == static_count,
        "the table disagrees with the records on the static affinity"
    );
    assert!(
        reader.lookup(web, Family::V4, client, 3000).is_none(),
        "an ended affinity is still in the table"
    );
    plane.take_notices();
});
