//! Fixtures for the tests of both ends of the protocol: the sender keys the
//! tests sign with, a keyring holding them, a fixed clock and an affinity key.

use std::net::IpAddr;

use crate::protocol::auth::{Key, Keyring};
use crate::protocol::message::{AffinityKey, ServiceAddr};

/// The tests' clock: Unix milliseconds.
pub const NOW: u64 = 1_700_000_000_000;
pub const WEB1_KEY: &[u8] = b"web1-key-0123456789abcdef";
pub const WEB2_KEY: &[u8] = b"web2-key-0123456789abcdef";
pub const ADMIN_KEY: &[u8] = b"admin-key-0123456789abcdef";

/// Keys for the senders `web1`, `web2` and `admin`.
pub fn keyring() -> Keyring {
    let mut k = Keyring::new();
    k.insert("web1", Key::new(WEB1_KEY).unwrap()).unwrap();
    k.insert("web2", Key::new(WEB2_KEY).unwrap()).unwrap();
    k.insert("admin", Key::new(ADMIN_KEY).unwrap()).unwrap();
    k
}

/// 198.51.100.0/24 on tcp 192.0.2.10:80.
pub fn akey() -> AffinityKey {
    AffinityKey::new(
        ServiceAddr::tcp("192.0.2.10:80".parse().unwrap()),
        "198.51.100.0".parse::<IpAddr>().unwrap(),
        24,
    )
    .unwrap()
}
