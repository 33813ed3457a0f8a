//! Who may talk to the control thread: source networks, per-sender HMAC keys
//! and replay protection.
//!
//! Every check here runs before a request can reach the handler, so all of
//! it is bounded: the key lookup is one hash probe, the HMAC is computed from
//! a pre-keyed state, and the replay memory has a fixed capacity: when full
//! it forgets its oldest pairs and raises their senders' floors (older
//! timestamps refused from then on) rather than growing.

use crate::net::{IpNet, NetParseError};
use crate::types::MAX_NAME_LEN;
use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hashbrown::{HashMap, HashSet};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Length of an HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;
/// Shortest key accepted: 128 bits.
pub const MIN_KEY_LEN: usize = 16;
/// Longest key accepted (longer keys are hashed by HMAC anyway).
pub const MAX_KEY_LEN: usize = 128;

type HmacSha256 = Hmac<Sha256>;

// ---------------------------------------------------------------------------
// Networks

/// The source networks allowed to send requests. Empty = nobody.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowlist {
    nets: Vec<IpNet>,
}

impl Allowlist {
    pub fn new(nets: Vec<IpNet>) -> Allowlist {
        Allowlist { nets }
    }

    /// Loopback only (127.0.0.0/8 and ::1): a safe default.
    pub fn loopback() -> Allowlist {
        Allowlist {
            nets: vec![
                IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8).expect("valid"),
                IpNet::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 128).expect("valid"),
            ],
        }
    }

    /// Parses a list of CIDR strings.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Allowlist, NetParseError> {
        let nets = items
            .iter()
            .map(|s| IpNet::parse(s.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Allowlist { nets })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(ip))
    }

    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }
}

// ---------------------------------------------------------------------------
// Keys

/// Why a key was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyError(pub String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

/// Parses a hex key (whitespace around it ignored, an optional `0x` prefix
/// allowed) of [`MIN_KEY_LEN`]..=[`MAX_KEY_LEN`] bytes.
pub fn parse_hex_key(s: &str) -> Result<Vec<u8>, KeyError> {
    let s = s.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if s.is_empty() {
        return Err(KeyError("the key is empty".into()));
    }
    if s.len() % 2 != 0 {
        return Err(KeyError(format!(
            "the key has an odd number of hex digits ({})",
            s.len()
        )));
    }
    let mut out = Vec::with_capacity(s.len() / 2);
    let bytes = s.as_bytes();
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = hex_digit(pair[0]);
        let lo = hex_digit(pair[1]);
        match (hi, lo) {
            (Some(h), Some(l)) => out.push(h << 4 | l),
            _ => {
                let at = if hi.is_none() { 2 * i } else { 2 * i + 1 };
                let c = s[at..].chars().next().unwrap_or('?');
                return Err(KeyError(format!(
                    "the key has a non-hex character `{c}` at position {}",
                    at + 1
                )));
            }
        }
    }
    check_key_len(&out)?;
    Ok(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn check_key_len(key: &[u8]) -> Result<(), KeyError> {
    if key.len() < MIN_KEY_LEN {
        return Err(KeyError(format!(
            "the key is {} bytes; at least {MIN_KEY_LEN} bytes ({} hex digits) are required",
            key.len(),
            2 * MIN_KEY_LEN
        )));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError(format!(
            "the key is {} bytes; at most {MAX_KEY_LEN} are allowed",
            key.len()
        )));
    }
    Ok(())
}

/// One HMAC-SHA256 key, kept as the keyed state so that signing or verifying
/// a message costs only the message's own compression rounds.
#[derive(Clone)]
pub struct Key {
    mac: HmacSha256,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A key from raw bytes ([`MIN_KEY_LEN`]..=[`MAX_KEY_LEN`] of them).
    pub fn new(bytes: &[u8]) -> Result<Key, KeyError> {
        check_key_len(bytes)?;
        let mac = <HmacSha256 as Mac>::new_from_slice(bytes)
            .map_err(|_| KeyError("the key cannot be used for HMAC".into()))?;
        Ok(Key { mac })
    }

    /// A key from hex.
    pub fn from_hex(s: &str) -> Result<Key, KeyError> {
        Key::new(&parse_hex_key(s)?)
    }

    /// The HMAC-SHA256 tag of `data`.
    pub fn sign(&self, data: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = self.mac.clone();
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// Whether `tag` is the tag of `data`, compared in constant time.
    pub fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.mac.clone();
        mac.update(data);
        mac.verify_slice(tag).is_ok()
    }
}

/// Sender name -> key.
#[derive(Clone, Debug, Default)]
pub struct Keyring {
    keys: HashMap<String, Key>,
}

impl Keyring {
    pub fn new() -> Keyring {
        Keyring::default()
    }

    /// Adds or replaces the key of `name`.
    pub fn insert(&mut self, name: &str, key: Key) -> Result<(), KeyError> {
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(KeyError(format!(
                "key name `{name}` must be 1 to {} bytes long",
                MAX_NAME_LEN
            )));
        }
        self.keys.insert(name.to_string(), key);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Key> {
        self.keys.get(name)
    }

    pub fn remove(&mut self, name: &str) -> bool {
        self.keys.remove(name).is_some()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Every sender name with a key, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

// ---------------------------------------------------------------------------
// Replay protection

/// Why a fresh-looking request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayError {
    /// The timestamp is further than the allowed skew from our clock.
    Stale,
    /// This (sender, nonce) was already accepted within the window.
    Replay,
    /// Older than what a sender's full replay memory still holds: the
    /// memory forgot the oldest pairs to take new ones, so anything at or
    /// before the newest forgotten timestamp is refused (fresh requests never
    /// are).
    Forgotten,
}

/// Milliseconds since the UNIX epoch (0 before it): the clock of request
/// timestamps.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Unique, unpredictable-looking 64-bit nonces for the messages one end
/// sends: a SplitMix64 sequence from a random start (std's per-process random
/// hash keys), so two processes practically never collide and one process
/// never repeats.
pub(crate) struct NonceSource {
    state: u64,
}

impl NonceSource {
    pub(crate) fn new() -> NonceSource {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        NonceSource { state: h.finish() }
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Passes the 64-bit value written by [`ReplayGuard`] through: the value is
/// already a keyed SipHash, so hashing it again would only cost time.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Remembers the (sender, nonce) pairs accepted within the clock-skew window.
///
/// A request is accepted only if its timestamp is within `max_skew` of our
/// clock, so a pair accepted at timestamp `t` can only be replayed until
/// `t + max_skew`; it is remembered until then and forgotten after. Pairs are
/// stored as a keyed 64-bit hash (a secret SipHash key per process, so a
/// sender cannot aim for collisions), in a set bounded by `capacity`.
///
/// A forgotten pair raises its sender's *floor* to its timestamp: that
/// sender's requests stamped at or before the floor are refused from then
/// on, should the clock step back. When the set is full, the oldest pair
/// is forgotten early, and its floor rises the same way. Memory stays bounded, a replay
/// is never accepted, and a sender sending fresh requests is never refused,
/// however busy the others are.
pub struct ReplayGuard {
    max_skew_ms: u64,
    capacity: usize,
    hasher: RandomState,
    seen: HashSet<u64, BuildHasherDefault<PassThrough>>,
    /// (forget-after ms, fingerprint, timestamp ms, sender) in insertion order.
    order: VecDeque<(u64, u64, u64, u32)>,
    /// Sender names seen (authenticated, so bounded by the keyring) and each
    /// one's floor.
    senders: HashMap<String, u32>,
    floors: Vec<u64>,
}

impl ReplayGuard {
    pub fn new(max_skew: Duration, capacity: usize) -> ReplayGuard {
        ReplayGuard {
            max_skew_ms: u64::try_from(max_skew.as_millis()).unwrap_or(u64::MAX),
            capacity: capacity.max(1),
            hasher: RandomState::new(),
            seen: HashSet::default(),
            order: VecDeque::new(),
            senders: HashMap::new(),
            floors: Vec::new(),
        }
    }

    pub fn max_skew(&self) -> Duration {
        Duration::from_millis(self.max_skew_ms)
    }

    /// Pairs currently remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Checks and, if accepted, records one request. Call only after the
    /// request's HMAC verified, so that forgeries cannot fill the memory.
    pub fn check(
        &mut self,
        sender: &str,
        nonce: u64,
        timestamp_ms: u64,
        now_ms: u64,
    ) -> Result<(), ReplayError> {
        if timestamp_ms.abs_diff(now_ms) > self.max_skew_ms {
            return Err(ReplayError::Stale);
        }
        self.expire(now_ms);
        let idx = match self.senders.get(sender) {
            Some(&i) => i,
            None => {
                let i = self.floors.len() as u32;
                self.senders.insert(sender.to_string(), i);
                self.floors.push(0);
                i
            }
        };
        if timestamp_ms <= self.floors[idx as usize] {
            return Err(ReplayError::Forgotten);
        }
        let mut h = self.hasher.build_hasher();
        h.write(sender.as_bytes());
        h.write_u8(0xff);
        h.write_u64(nonce);
        let fp = h.finish();
        if self.seen.contains(&fp) {
            return Err(ReplayError::Replay);
        }
        while self.seen.len() >= self.capacity {
            let Some((_, old_fp, old_ts, old_sender)) = self.order.pop_front() else {
                break;
            };
            self.seen.remove(&old_fp);
            let floor = &mut self.floors[old_sender as usize];
            *floor = (*floor).max(old_ts);
        }
        if timestamp_ms <= self.floors[idx as usize] {
            // Making room raised this very sender's floor past the request.
            return Err(ReplayError::Forgotten);
        }
        self.seen.insert(fp);
        self.order.push_back((
            timestamp_ms.saturating_add(self.max_skew_ms),
            fp,
            timestamp_ms,
            idx,
        ));
        Ok(())
    }

    /// Forgets pairs whose timestamp has left the window, raising their
    /// senders' floors as making room does: should the clock step back
    /// into the window again, a forgotten pair is refused, not taken as
    /// new. (A floor only refuses what the window refused when it rose, so
    /// it costs a sender with a right clock nothing.) Entries are forgotten
    /// in insertion order; one with a later deadline at the front holds
    /// back the ones behind it for at most twice the skew, which only
    /// remembers them longer (safe).
    pub fn expire(&mut self, now_ms: u64) {
        while let Some(&(until, fp, ts, sender)) = self.order.front() {
            if until >= now_ms {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&fp);
            let floor = &mut self.floors[sender as usize];
            *floor = (*floor).max(ts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn allowlist_matches_any_network() {
        let a = Allowlist::parse(&["10.0.0.0/8", "2001:db8::/32"]).unwrap();
        assert!(a.contains(ip("10.9.9.9")));
        assert!(a.contains(ip("2001:db8::5")));
        assert!(!a.contains(ip("127.0.0.1")));
        assert!(!Allowlist::default().contains(ip("127.0.0.1")));
        assert!(Allowlist::loopback().contains(ip("127.0.0.1")));
        assert!(Allowlist::loopback().contains(ip("::1")));
        assert!(Allowlist::parse(&["10.0.0.0/8", "nope"]).is_err());
    }

    #[test]
    fn hex_keys_parse_with_clear_errors() {
        let k = parse_hex_key(" 0x00112233445566778899AABBCCDDEEFF\n").unwrap();
        assert_eq!(k.len(), 16);
        assert_eq!(k[15], 0xff);
        let e = parse_hex_key("0011").unwrap_err().to_string();
        assert!(e.contains("at least 16 bytes"), "{e}");
        let e = parse_hex_key("001").unwrap_err().to_string();
        assert!(e.contains("odd"), "{e}");
        let e = parse_hex_key("00112233445566778899aabbccddeeZf")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`Z`") && e.contains("position 31"), "{e}");
        assert!(parse_hex_key("").is_err());
        assert!(parse_hex_key(&"ab".repeat(MAX_KEY_LEN + 1)).is_err());
    }

    #[test]
    fn hmac_signs_and_verifies() {
        let k = Key::new(&[7u8; 32]).unwrap();
        let other = Key::new(&[8u8; 32]).unwrap();
        let tag = k.sign(b"hello");
        assert!(k.verify(b"hello", &tag));
        assert!(!k.verify(b"hellp", &tag));
        assert!(!other.verify(b"hello", &tag));
        assert!(!k.verify(b"hello", &tag[..31]));
        // RFC 4231 test case 2 uses a short key; check against case 1's
        // construction with a 20-byte key instead.
        let k1 = Key::new(&[0x0b; 20]).unwrap();
        let t = k1.sign(b"Hi There");
        assert_eq!(
            t[..8],
            [0xb0, 0x34, 0x4c, 0x61, 0xd8, 0xdb, 0x38, 0x53],
            "RFC 4231 test case 1"
        );
    }

    #[test]
    fn replay_guard_refuses_stale_and_repeated() {
        let mut g = ReplayGuard::new(Duration::from_secs(10), 100);
        let now = 1_000_000;
        assert_eq!(g.check("a", 1, now, now), Ok(()));
        assert_eq!(g.check("a", 1, now, now + 5), Err(ReplayError::Replay));
        // Same nonce from another sender is a different pair.
        assert_eq!(g.check("b", 1, now, now), Ok(()));
        assert_eq!(g.check("a", 2, now - 10_001, now), Err(ReplayError::Stale));
        assert_eq!(g.check("a", 3, now + 10_001, now), Err(ReplayError::Stale));
        assert_eq!(g.check("a", 4, now - 10_000, now), Ok(()));
        // Once the original's timestamp is out of the window, the pair is
        // forgotten, and a replay is refused as stale instead.
        assert_eq!(g.check("a", 1, now, now + 10_001), Err(ReplayError::Stale));
        g.expire(now + 10_001);
        assert!(g.len() < 3);
    }

    /// A pair forgotten once its window passed stays refused should the
    /// clock step back into that window; fresh requests are still taken.
    #[test]
    fn a_clock_stepped_back_does_not_reopen_the_window() {
        let mut g = ReplayGuard::new(Duration::from_secs(10), 100);
        let now = 100_000;
        assert_eq!(g.check("a", 1, now, now), Ok(()));
        assert_eq!(g.check("b", 2, now - 5_000, now), Ok(()));
        g.expire(now + 10_001);
        assert_eq!(g.len(), 0);
        // The clock steps back: the forgotten pairs are in the window again.
        assert_eq!(g.check("a", 1, now, now), Err(ReplayError::Forgotten));
        assert_eq!(
            g.check("b", 2, now - 5_000, now),
            Err(ReplayError::Forgotten)
        );
        assert_eq!(g.check("a", 3, now + 1, now), Ok(()));
        assert_eq!(g.check("b", 4, now - 4_999, now), Ok(()));
    }

    #[test]
    fn replay_guard_is_bounded_and_forgets_the_oldest() {
        let mut g = ReplayGuard::new(Duration::from_secs(10), 3);
        let now = 50_000;
        for n in 0..3 {
            assert_eq!(g.check("a", n, now + n, now), Ok(()));
        }
        // Full: a fresh request is taken, the oldest pair is forgotten and
        // a's floor rises to its timestamp.
        assert_eq!(g.check("b", 7, now + 5, now), Ok(()));
        assert_eq!(g.len(), 3);
        // The forgotten request cannot be replayed: it is below the floor.
        assert_eq!(g.check("a", 0, now, now), Err(ReplayError::Forgotten));
        // Remembered ones are still replays; b's floor did not move.
        assert_eq!(g.check("a", 2, now + 2, now), Err(ReplayError::Replay));
        assert_eq!(g.check("b", 8, now + 1, now), Ok(()));
        // After the window passes, everything is forgotten normally.
        assert_eq!(g.check("a", 99, now + 20_000, now + 20_000), Ok(()));
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn a_busy_sender_never_locks_out_the_others() {
        let mut g = ReplayGuard::new(Duration::from_secs(30), 1000);
        let now = 1_000_000;
        for n in 0..100_000u64 {
            assert_eq!(g.check("busy", n, now + n / 100, now + n / 100), Ok(()));
        }
        assert_eq!(g.len(), 1000);
        assert_eq!(g.check("quiet", 1, now + 1000, now + 1000), Ok(()));
        assert_eq!(
            g.check("busy", 5, now, now + 1000),
            Err(ReplayError::Forgotten)
        );
    }
}
