//! What an instance reads back that another wrote, or that it wrote before
//! a crash: state files and etcd's keys and values. Any bytes are
//! decoded or refused without a panic; what decodes, encodes back to the
//! same decoding; and an affinity read is restored into a control plane
//! (as at a start from the state file, or a record from another instance)
//! without a panic or more entries than the table holds.
//!
//! The input's first byte picks the reader:
//! - 0: a state file whose body (the entries) is the rest of the input,
//!   framed with a good header and checksum (a file with a bad checksum is
//!   refused before its entries are read), its entry count from the
//!   input's second byte; and, when that byte is a multiple of four, the
//!   input after the first byte as a whole file.
//! - 1, 2, 3: an etcd affinity record, declaration or end mark: a valid
//!   key and value laid over (XOR) with the rest of the input, the key
//!   ending at the input's first 0 byte.

#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;

use pktdist::cluster::record::{encode_declaration, encode_mark, encode_value, KeySpace};
use pktdist::cluster::{DeclarationKey, StoreKey, StoredAffinity, StoredDeclaration};
use pktdist::control::state_file::{self, SavedAffinity};
use pktdist::protocol::message::ServiceAddr;
use pktdist::types::{Declared, PortMatch};

/// Unix ms the tests run at: affinities expire around it.
const WALL_MS: u64 = 1_800_000_000_000;

/// Restores `saved` into a fresh plane: no panic, no more than it holds.
fn restore(saved: &[SavedAffinity]) {
    let (mut p, _) = pktdist_fuzz::control_bed();
    let done = p.restore(saved, WALL_MS);
    assert_eq!(
        done.installed + done.expired + done.gone + done.refused,
        saved.len(),
        "every saved affinity is installed or ended"
    );
    assert!(p.affinities().len() <= p.affinities().capacity());
    assert_eq!(p.take_notices().len(), saved.len() - done.installed);
}

fn saved() -> SavedAffinity {
    SavedAffinity {
        service: "web".into(),
        service_addr: ServiceAddr::tcp("192.0.2.10:80".parse().unwrap()),
        owner: "a".into(),
        client: "198.18.0.0".parse().unwrap(),
        prefix_len: 24,
        ports: PortMatch::Range(1000, 2000),
        expires_unix_ms: WALL_MS + 60_000,
        created_unix_ms: WALL_MS - 60_000,
        notify: Some("127.0.0.1:9".parse::<SocketAddr>().unwrap()),
    }
}

fn read_state(bytes: &[u8]) {
    let Ok(state) = state_file::decode(bytes) else {
        return;
    };
    let again = state_file::decode(&state_file::encode(&state)).expect("what decoded encodes");
    assert_eq!(again, state, "a state file's entries survive a rewrite");
    restore(&state.affinities);
}

/// `template` with `over` laid over it (XOR), and `over`'s bytes past the
/// template's end appended.
fn overlay(template: &str, over: &[u8]) -> Vec<u8> {
    let mut t = template.as_bytes().to_vec();
    for (i, x) in over.iter().enumerate() {
        match t.get_mut(i) {
            Some(b) => *b ^= x,
            None => t.push(*x),
        }
    }
    t
}

fn split_key(rest: &[u8]) -> (&[u8], &[u8]) {
    match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[]),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let ks = KeySpace::new("/pktdist");
    match pick % 4 {
        0 => {
            let (&count, body) = rest.split_first().unwrap_or((&0, &[]));
            read_state(&state_file::framed(WALL_MS, u32::from(count % 8), body));
            if count % 4 == 0 {
                read_state(rest);
            }
        }
        1 => {
            let a = StoredAffinity {
                affinity: saved(),
                writer: "lb-1".into(),
                written_unix_ms: WALL_MS,
            };
            let (k, v) = split_key(rest);
            let key = overlay(&ks.key(&StoreKey::of(&a.affinity)), k);
            let value = overlay(&encode_value(&a), v);
            let Ok(got) = ks.decode(&key, &value) else {
                return;
            };
            let again = ks
                .decode(ks.key(&got.key()).as_bytes(), encode_value(&got).as_bytes())
                .expect("a record that decoded encodes");
            assert_eq!(again, got, "a record survives a rewrite");
            restore(std::slice::from_ref(&got.affinity));
        }
        2 => {
            let d = StoredDeclaration {
                key: DeclarationKey {
                    service: "web".into(),
                    backend: "a".into(),
                    by_admin: false,
                },
                state: Declared::Drain,
                writer: "lb-1".into(),
                written_unix_ms: WALL_MS,
            };
            let (k, v) = split_key(rest);
            let key = overlay(&ks.declaration_key(&d.key), k);
            let value = overlay(&encode_declaration(&d), v);
            let Ok(got) = ks.decode_declaration(&key, &value) else {
                return;
            };
            let again = ks
                .decode_declaration(
                    ks.declaration_key(&got.key).as_bytes(),
                    encode_declaration(&got).as_bytes(),
                )
                .expect("a declaration that decoded encodes");
            assert_eq!(again, got, "a declaration survives a rewrite");
        }
        _ => {
            let k0 = StoreKey::of(&saved());
            let (k, v) = split_key(rest);
            let key = overlay(&ks.mark_key(&k0, 7), k);
            let value = overlay(&encode_mark("lb-1", WALL_MS), v);
            let Ok(got) = ks.decode_mark(&key, &value) else {
                return;
            };
            let again = ks
                .decode_mark(
                    ks.mark_key(&got.key, got.expect).as_bytes(),
                    encode_mark(&got.instance, got.written_unix_ms).as_bytes(),
                )
                .expect("a mark that decoded encodes");
            assert_eq!(again, got, "a mark survives a rewrite");
        }
    }
});
