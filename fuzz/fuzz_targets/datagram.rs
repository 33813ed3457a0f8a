//! Datagrams on the control port and on a client's socket: any bytes are
//! opened, checked and decoded or refused without a panic, and a body that
//! decodes encodes back to itself (a reply, an ended notice, a request).
//!
//! The input's first byte picks the datagram: odd, the rest of the input
//! as it is; even, a datagram signed with the test key whose header is
//! good and whose body is the rest of the input (so that every run reaches
//! the body's decoders). The body is then decoded as every message type.

#![no_main]

use libfuzzer_sys::fuzz_target;

use pktdist::protocol::auth::Key;
use pktdist::protocol::message::{
    encode_message, EndedNotice, Envelope, Header, MsgType, Reply, Request, Writer, MAX_DATAGRAM,
};

fn decode_every_type(body: &[u8], buf: &mut [u8]) {
    for ty in 0..=u8::MAX {
        let Some(ty) = MsgType::from_u8(ty) else {
            continue;
        };
        match ty {
            MsgType::Reply => {
                let Ok(reply) = Reply::decode_body(body) else {
                    continue;
                };
                let mut w = Writer::new(buf);
                reply
                    .encode_body(&mut w)
                    .expect("a reply that decoded encodes");
                let n = w.len();
                let again = Reply::decode_body(&buf[..n]).expect("and decodes again");
                assert_eq!(again, reply, "a reply survives a rewrite");
            }
            MsgType::AffinityEnded => {
                let Ok(notice) = EndedNotice::decode_body(body) else {
                    continue;
                };
                let mut w = Writer::new(buf);
                notice
                    .encode_body(&mut w)
                    .expect("a notice that decoded encodes");
                let n = w.len();
                let again = EndedNotice::decode_body(&buf[..n]).expect("and decodes again");
                assert_eq!(again, notice, "a notice survives a rewrite");
            }
            _ => {
                let Ok(req) = Request::decode_body(ty, body) else {
                    continue;
                };
                let mut w = Writer::new(buf);
                req.encode_body(&mut w)
                    .expect("a request that decoded encodes");
                let n = w.len();
                let again = Request::decode_body(ty, &buf[..n]).expect("and decodes again");
                assert_eq!(again, req, "a request survives a rewrite");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let key = Key::new(&[7; 32]).expect("a 32-byte key");
    let mut datagram = vec![0u8; MAX_DATAGRAM];
    let datagram = if pick & 1 == 1 {
        rest
    } else {
        let header = Header {
            msg_type: MsgType::Reply as u8,
            request_id: 1,
            timestamp_ms: 2,
            nonce: 3,
            name: "web1",
        };
        let Ok(n) = encode_message(&mut datagram, MsgType::Reply, &header, &key, |w| {
            w.bytes(rest)
        }) else {
            return;
        };
        &datagram[..n]
    };
    let Ok(env) = Envelope::open(datagram) else {
        assert!(pick & 1 == 1, "a datagram written by encode_message opens");
        return;
    };
    if pick & 1 == 0 {
        assert!(env.verify(&key), "its tag verifies");
        assert_eq!(env.body, rest);
    }
    let mut buf = vec![0u8; MAX_DATAGRAM];
    decode_every_type(env.body, &mut buf);
});
