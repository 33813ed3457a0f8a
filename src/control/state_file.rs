//! The affinity state file (`[affinity] state_file`): the requested
//! affinities of a lone instance, kept across a restart.
//!
//! A versioned, self-identifying binary format, with services and backends
//! by name (ids change across restarts) and times as wall-clock Unix
//! milliseconds (the monotonic clock restarts with the process). All
//! integers big-endian:
//!
//! ```text
//!  0  16  magic "pktdist-affinity"
//! 16   2  format version (1)
//! 18   2  flags (0)
//! 20   8  saved at, Unix ms
//! 28   4  number of entries
//! 32   8  length of the entries in bytes (N)
//! 40   N  entries
//! 40+N 32 SHA-256 of bytes 0 .. 40+N
//! ```
//!
//! The header and the trailing checksum keep this layout in every version,
//! so a file cut short anywhere is recognised as truncated, a changed byte
//! as corrupt, another file as foreign, and a newer version as too new. One
//! entry:
//!
//! ```text
//! u16 length + service name (UTF-8)
//! service address: u8 protocol, u8 family (4 or 6), 16 address bytes, u16 port
//! u16 length + owner backend name (UTF-8)
//! client: 16 address bytes (the family is the service's), u8 prefix length
//! ports: u8 kind (0 any, 1 one, 2 range), u16 low, u16 high
//! u64 expiry, Unix ms
//! u64 creation, Unix ms
//! notify: u8 family (0 none, 4, 6), 16 address bytes, u16 port
//! ```
//!
//! [`encode`] and [`decode`] are pure; [`write_atomic`] replaces the file so
//! that a crash leaves the old file or the new one, never a mix, and
//! [`load`] reads it back with errors that name the file.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::protocol::message::{AffinityKey, EndedNotice, ServiceAddr};
use crate::types::{EndReason, PortMatch, PROTO_TCP, PROTO_UDP};

/// The first bytes of every state file.
pub const MAGIC: &[u8; 16] = b"pktdist-affinity";
/// The format version this build writes and the newest it reads.
pub const VERSION: u16 = 1;
/// Bytes before the entries.
const HEADER_LEN: usize = 40;
/// Bytes of the trailing checksum.
const SUM_LEN: usize = 32;

/// One requested affinity as the file keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedAffinity {
    /// The service's name.
    pub service: String,
    /// The service's address when saved, for the notice if it is gone.
    pub service_addr: ServiceAddr,
    /// The owning backend's name.
    pub owner: String,
    /// The client network's address (of the service's family).
    pub client: IpAddr,
    pub prefix_len: u8,
    pub ports: PortMatch,
    pub expires_unix_ms: u64,
    pub created_unix_ms: u64,
    pub notify: Option<SocketAddr>,
}

impl SavedAffinity {
    /// The AFFINITY_ENDED notice of this affinity ending for `reason`, from
    /// what was saved (its service or backend may be gone here).
    pub fn notice(&self, reason: EndReason) -> EndedNotice {
        EndedNotice {
            key: AffinityKey {
                service: self.service_addr,
                client: self.client,
                prefix_len: self.prefix_len,
                ports: self.ports,
            },
            owner: self.owner.clone(),
            reason,
        }
    }
}

/// The content of a state file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedState {
    /// When it was written, Unix ms.
    pub saved_unix_ms: u64,
    pub affinities: Vec<SavedAffinity>,
}

/// Why bytes are not a state file this build can use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateError {
    /// Not a pktdist affinity state file at all.
    Foreign,
    /// Shorter (or longer) than its header says: cut short by a crash, a
    /// full disk or a copy.
    Truncated { len: usize, expected: usize },
    /// The checksum does not match: some byte changed.
    Checksum,
    /// Written by a newer pktdist.
    TooNew { version: u16 },
    /// Checksum right but content wrong (a writer's bug).
    Malformed(String),
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Foreign => write!(
                f,
                "not a pktdist affinity state file (it does not start with {:?})",
                String::from_utf8_lossy(MAGIC)
            ),
            StateError::Truncated { len, expected } => write!(
                f,
                "truncated: {len} bytes where its header promises {expected}"
            ),
            StateError::Checksum => write!(f, "corrupt: its SHA-256 checksum does not match"),
            StateError::TooNew { version } => write!(
                f,
                "format version {version} is newer than this pktdist reads (up to {VERSION})"
            ),
            StateError::Malformed(m) => write!(f, "malformed: {m}"),
        }
    }
}

impl std::error::Error for StateError {}

/// A state file that could not be read or used, naming the file.
#[derive(Debug)]
pub struct LoadError {
    pub path: PathBuf,
    pub kind: LoadErrorKind,
}

#[derive(Debug)]
pub enum LoadErrorKind {
    Io(io::Error),
    Bad(StateError),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            LoadErrorKind::Io(e) => write!(f, "state file {}: {e}", self.path.display()),
            LoadErrorKind::Bad(e) => write!(f, "state file {}: {e}", self.path.display()),
        }
    }
}

impl std::error::Error for LoadError {}

/// The file's bytes for `state`.
pub fn encode(state: &SavedState) -> Vec<u8> {
    let mut body = Vec::with_capacity(state.affinities.len() * 96);
    for a in &state.affinities {
        put_str(&mut body, &a.service);
        body.push(a.service_addr.proto);
        put_ip(&mut body, a.service_addr.addr);
        body.extend_from_slice(&a.service_addr.port.to_be_bytes());
        put_str(&mut body, &a.owner);
        body.extend_from_slice(&ip_bytes(a.client));
        body.push(a.prefix_len);
        let (kind, lo, hi) = match a.ports {
            PortMatch::Any => (0u8, 0u16, 0u16),
            PortMatch::One(p) => (1, p, p),
            PortMatch::Range(lo, hi) => (2, lo, hi),
        };
        body.push(kind);
        body.extend_from_slice(&lo.to_be_bytes());
        body.extend_from_slice(&hi.to_be_bytes());
        body.extend_from_slice(&a.expires_unix_ms.to_be_bytes());
        body.extend_from_slice(&a.created_unix_ms.to_be_bytes());
        match a.notify {
            None => {
                body.push(0);
                body.extend_from_slice(&[0; 18]);
            }
            Some(n) => {
                put_ip(&mut body, n.ip());
                body.extend_from_slice(&n.port().to_be_bytes());
            }
        }
    }
    framed(state.saved_unix_ms, state.affinities.len() as u32, &body)
}

/// A file's bytes around `body`, its `entries` entries: the header and the
/// checksum. ([`encode`] writes the entries; the fuzz target `stored`
/// frames bytes of its own, so that they reach the entries' decoder.)
pub fn framed(saved_unix_ms: u64, entries: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + SUM_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&saved_unix_ms.to_be_bytes());
    out.extend_from_slice(&entries.to_be_bytes());
    out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    out.extend_from_slice(body);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

/// The state in `bytes`, or why they are not a usable state file.
pub fn decode(bytes: &[u8]) -> Result<SavedState, StateError> {
    if bytes.len() < MAGIC.len() {
        // A prefix of the magic is a file cut short; anything else is not ours.
        return if MAGIC.starts_with(bytes) {
            Err(StateError::Truncated {
                len: bytes.len(),
                expected: HEADER_LEN + SUM_LEN,
            })
        } else {
            Err(StateError::Foreign)
        };
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(StateError::Foreign);
    }
    if bytes.len() < HEADER_LEN {
        return Err(StateError::Truncated {
            len: bytes.len(),
            expected: HEADER_LEN + SUM_LEN,
        });
    }
    let body_len = u64::from_be_bytes(bytes[32..40].try_into().expect("8 bytes"));
    let expected = usize::try_from(body_len)
        .ok()
        .and_then(|n| n.checked_add(HEADER_LEN + SUM_LEN));
    if expected != Some(bytes.len()) {
        return Err(StateError::Truncated {
            len: bytes.len(),
            expected: expected.unwrap_or(usize::MAX),
        });
    }
    let (content, sum) = bytes.split_at(bytes.len() - SUM_LEN);
    if Sha256::digest(content).as_slice() != sum {
        return Err(StateError::Checksum);
    }
    let version = u16::from_be_bytes([bytes[16], bytes[17]]);
    if version > VERSION {
        return Err(StateError::TooNew { version });
    }
    if version == 0 {
        return Err(StateError::Malformed("format version 0".into()));
    }
    let flags = u16::from_be_bytes([bytes[18], bytes[19]]);
    if flags != 0 {
        return Err(StateError::Malformed(format!("unknown flags {flags:#06x}")));
    }
    let saved_unix_ms = u64::from_be_bytes(bytes[20..28].try_into().expect("8 bytes"));
    let count = u32::from_be_bytes(bytes[28..32].try_into().expect("4 bytes"));
    let mut r = Reader {
        b: &content[HEADER_LEN..],
        at: 0,
    };
    // Each entry takes at least 72 bytes: no count larger than that allows.
    let mut affinities = Vec::with_capacity((count as usize).min(r.b.len() / 72));
    for i in 0..count {
        let a = entry(&mut r).map_err(|m| StateError::Malformed(format!("entry {i}: {m}")))?;
        affinities.push(a);
    }
    if r.at != r.b.len() {
        return Err(StateError::Malformed(format!(
            "{} bytes after the last of {count} entries",
            r.b.len() - r.at
        )));
    }
    Ok(SavedState {
        saved_unix_ms,
        affinities,
    })
}

fn entry(r: &mut Reader<'_>) -> Result<SavedAffinity, String> {
    let service = r.str("service name")?;
    let proto = r.u8()?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(format!("protocol {proto}"));
    }
    let vip = r.ip()?.ok_or("no service address")?;
    let port = r.u16()?;
    let owner = r.str("owner name")?;
    let client = r.bytes16()?;
    let client = match vip {
        IpAddr::V4(_) => {
            if client[4..].iter().any(|&b| b != 0) {
                return Err("IPv4 client address with more than 4 bytes".into());
            }
            IpAddr::V4(Ipv4Addr::new(client[0], client[1], client[2], client[3]))
        }
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(client)),
    };
    let prefix_len = r.u8()?;
    let max = if client.is_ipv4() { 32 } else { 128 };
    if prefix_len > max {
        return Err(format!("prefix length {prefix_len}"));
    }
    let kind = r.u8()?;
    let (lo, hi) = (r.u16()?, r.u16()?);
    let ports = match kind {
        0 => PortMatch::Any,
        1 => PortMatch::One(lo),
        2 if lo <= hi => PortMatch::Range(lo, hi),
        _ => return Err(format!("client ports kind {kind} ({lo}-{hi})")),
    };
    let expires_unix_ms = r.u64()?;
    let created_unix_ms = r.u64()?;
    let notify = r.ip()?;
    let notify_port = r.u16()?;
    Ok(SavedAffinity {
        service,
        service_addr: ServiceAddr {
            addr: vip,
            port,
            proto,
        },
        owner,
        client,
        prefix_len,
        ports,
        expires_unix_ms,
        created_unix_ms,
        notify: notify.map(|ip| SocketAddr::new(ip, notify_port)),
    })
}

/// Replaces `path` with `bytes` so that a crash leaves the old content or
/// the new, whole: a temporary file in the same directory is written and
/// flushed to disk, renamed over `path`, and the directory flushed too.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

/// The state in the file at `path`; `Ok(None)` when there is no file yet.
pub fn load(path: &Path) -> Result<Option<SavedState>, LoadError> {
    let err = |kind| LoadError {
        path: path.to_path_buf(),
        kind,
    };
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(LoadErrorKind::Io(e))),
    };
    decode(&bytes)
        .map(Some)
        .map_err(|e| err(LoadErrorKind::Bad(e)))
}

/// Where a refused state file is moved when the operator says to start
/// without it: `<path>.bad`.
pub fn set_aside_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".bad");
    PathBuf::from(p)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Names are at most 64 bytes (config and protocol); cut defensively.
    let b = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&v.octets());
            b
        }
        IpAddr::V6(v) => v.octets(),
    }
}

fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    out.push(if ip.is_ipv4() { 4 } else { 6 });
    out.extend_from_slice(&ip_bytes(ip));
}

/// A cursor over the entries' bytes.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or("ends early")?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }

    fn bytes16(&mut self) -> Result<[u8; 16], String> {
        Ok(self.take(16)?.try_into().expect("16"))
    }

    fn str(&mut self, what: &str) -> Result<String, String> {
        let n = usize::from(self.u16()?);
        if n == 0 {
            return Err(format!("empty {what}"));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    /// A family byte and 16 address bytes; family 0 is no address.
    fn ip(&mut self) -> Result<Option<IpAddr>, String> {
        let family = self.u8()?;
        let b = self.bytes16()?;
        match family {
            0 if b == [0; 16] => Ok(None),
            4 if b[4..] == [0; 12] => Ok(Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))),
            6 => Ok(Some(IpAddr::V6(Ipv6Addr::from(b)))),
            _ => Err(format!("address family {family}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SavedState {
        SavedState {
            saved_unix_ms: 1_800_000_000_123,
            affinities: vec![
                SavedAffinity {
                    service: "web".into(),
                    service_addr: ServiceAddr::tcp("192.0.2.10:80".parse().unwrap()),
                    owner: "be1".into(),
                    client: "198.18.0.0".parse().unwrap(),
                    prefix_len: 24,
                    ports: PortMatch::Any,
                    expires_unix_ms: 1_800_000_060_000,
                    created_unix_ms: 1_800_000_000_000,
                    notify: Some("127.0.0.1:7500".parse().unwrap()),
                },
                SavedAffinity {
                    service: "v6-dns".into(),
                    service_addr: ServiceAddr {
                        addr: "2001:db8::53".parse().unwrap(),
                        port: 53,
                        proto: PROTO_UDP,
                    },
                    owner: "ns-ä".into(),
                    client: "2001:db8:1::".parse().unwrap(),
                    prefix_len: 48,
                    ports: PortMatch::Range(1000, 1999),
                    expires_unix_ms: u64::MAX,
                    created_unix_ms: 0,
                    notify: Some("[::1]:9".parse().unwrap()),
                },
                SavedAffinity {
                    service: "web".into(),
                    service_addr: ServiceAddr::tcp("192.0.2.10:80".parse().unwrap()),
                    owner: "be2".into(),
                    client: "203.0.113.7".parse().unwrap(),
                    prefix_len: 32,
                    ports: PortMatch::One(4242),
                    expires_unix_ms: 5,
                    created_unix_ms: 1,
                    notify: None,
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(decode(&encode(&s)), Ok(s));
        let empty = SavedState::default();
        assert_eq!(decode(&encode(&empty)), Ok(empty));
    }

    #[test]
    fn truncated_at_every_length_is_truncated() {
        let b = encode(&sample());
        for n in 0..b.len() {
            match decode(&b[..n]) {
                Err(StateError::Truncated { len, .. }) => assert_eq!(len, n),
                other => panic!("cut at {n}: {other:?}"),
            }
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(matches!(decode(&longer), Err(StateError::Truncated { .. })));
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let b = encode(&sample());
        for i in 0..b.len() {
            for bit in [0x01u8, 0x80] {
                let mut c = b.clone();
                c[i] ^= bit;
                let e = decode(&c).expect_err("a flipped byte was accepted");
                if i < MAGIC.len() {
                    assert_eq!(e, StateError::Foreign, "byte {i}");
                } else if (32..40).contains(&i) {
                    assert!(matches!(e, StateError::Truncated { .. }), "byte {i}: {e:?}");
                } else {
                    assert_eq!(e, StateError::Checksum, "byte {i}");
                }
            }
        }
    }

    #[test]
    fn foreign_files_are_named_foreign() {
        for foreign in [
            &b"[affinity]\nstate_file = \"x\"\n"[..],
            b"\x7fELF\x02\x01\x01",
            b"{}",
            b"pktdist-affinitz and more bytes than a header has, so long enough",
        ] {
            assert_eq!(decode(foreign), Err(StateError::Foreign), "{foreign:?}");
        }
        let msg = StateError::Foreign.to_string();
        assert!(msg.contains("not a pktdist affinity state file"), "{msg}");
    }

    /// A file of the same layout with its checksum recomputed.
    fn resum(mut b: Vec<u8>) -> Vec<u8> {
        let n = b.len() - SUM_LEN;
        let sum = Sha256::digest(&b[..n]);
        b[n..].copy_from_slice(&sum);
        b
    }

    #[test]
    fn a_newer_version_is_too_new() {
        let mut b = encode(&sample());
        b[16..18].copy_from_slice(&2u16.to_be_bytes());
        let e = decode(&resum(b)).unwrap_err();
        assert_eq!(e, StateError::TooNew { version: 2 });
        assert!(e.to_string().contains("newer"), "{e}");
    }

    #[test]
    fn checksummed_nonsense_is_malformed() {
        let good = encode(&sample());
        // The first entry's protocol byte (after the u16 length and "web").
        let mut b = good.clone();
        b[HEADER_LEN + 5] = 99;
        assert!(matches!(
            decode(&resum(b)),
            Err(StateError::Malformed(m)) if m.contains("entry 0") && m.contains("protocol 99")
        ));
        // One entry fewer than the bytes hold.
        let mut b = good.clone();
        b[28..32].copy_from_slice(&2u32.to_be_bytes());
        assert!(matches!(decode(&resum(b)), Err(StateError::Malformed(m)) if m.contains("after")));
        // A count far beyond the bytes.
        let mut b = good;
        b[28..32].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(
            matches!(decode(&resum(b)), Err(StateError::Malformed(m)) if m.contains("ends early"))
        );
    }

    #[test]
    fn written_atomically_and_loaded_with_the_files_name() {
        let dir = std::env::temp_dir().join(format!("pktdist-state-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("affinities.state");
        assert!(load(&path).unwrap().is_none(), "no file yet");
        write_atomic(&path, &encode(&sample())).unwrap();
        write_atomic(&path, &encode(&sample())).unwrap();
        assert_eq!(load(&path).unwrap(), Some(sample()));
        // Nothing left beside it.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        let b = fs::read(&path).unwrap();
        fs::write(&path, &b[..b.len() / 2]).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains(path.to_str().unwrap()) && e.contains("truncated"),
            "{e}"
        );
        assert_eq!(
            set_aside_path(&path),
            dir.join("affinities.state.bad"),
            "set aside beside it"
        );
        assert!(write_atomic(&dir.join("no-such-dir").join("f"), b"x").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
