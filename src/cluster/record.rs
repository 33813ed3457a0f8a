//! How affinities and declared backend states are written in etcd: their
//! keys and their values.
//!
//! Affinity key: `<prefix>/a/<service>/<client>/<plen>/<ports>`, e.g.
//! `/pktdist/a/web/192.0.2.0/24/any`; names are percent-encoded (`%`, `/`,
//! spaces and control bytes), the client in its canonical text form (IPv6
//! too), ports `any`, `1234` or `1000-2000`. Declaration key:
//! `<prefix>/d/<service>/<backend>/<app|admin>`, e.g.
//! `/pktdist/d/web/be2/app`. End mark key: the affinity key's path under
//! `<prefix>/e/`, then the revision ended, e.g.
//! `/pktdist/e/web/192.0.2.0/24/any/1042`. Values: one line
//! of JSON with a `format` version, so `etcdctl get --prefix /pktdist/` is
//! readable as it is. Anything else under `a/` or `d/` decodes to an error
//! (the store thread reports it as `StoreEvent::Unreadable`), never a
//! panic; an unreadable mark is left alone, as are other keys under the
//! prefix, which are not pktdist's.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::{DeclarationKey, Revision, StoreKey, StoredAffinity, StoredDeclaration};
use crate::control::state_file::SavedAffinity;
use crate::protocol::message::ServiceAddr;
use crate::types::{Declared, PortMatch, MAX_NAME_LEN, PROTO_TCP, PROTO_UDP};

/// The value format this build writes and reads.
pub const FORMAT: u32 = 1;

/// The keys of one cluster (one `[cluster] prefix`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySpace {
    /// `<prefix>/`: the range loaded and watched.
    root: String,
    /// `<prefix>/a/`: every affinity key starts with it.
    table: String,
    /// `<prefix>/d/`: every declaration key starts with it.
    declared: String,
    /// `<prefix>/e/`: every end mark's key starts with it.
    ended: String,
}

/// A value under the prefix, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Affinity(StoredAffinity),
    Declaration(StoredDeclaration),
}

/// What a key under the prefix holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Affinity,
    Declaration,
    /// An end's mark ([`EndMark`]).
    Mark,
    /// Not pktdist's: left alone.
    Other,
}

/// Who ended an affinity: the mark an end's delete leaves in the same
/// commit, at the affinity key's path and the revision it ended under
/// `<prefix>/e/` (one key per end), until the instance that wrote it takes
/// it away (docs/cluster.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndMark {
    /// The affinity ended.
    pub key: StoreKey,
    /// The instance whose delete committed.
    pub instance: String,
    /// The affinity key's mod revision that the delete found (which
    /// version of the key it ended).
    pub expect: Revision,
    /// The instance's clock when it sent the delete (Unix ms).
    pub written_unix_ms: u64,
}

impl KeySpace {
    /// The key space under `prefix` (a trailing `/` is ignored, so
    /// `/pktdist` and `/pktdist/` are the same cluster).
    pub fn new(prefix: &str) -> KeySpace {
        let root = format!("{}/", prefix.trim_end_matches('/'));
        KeySpace {
            table: format!("{root}a/"),
            declared: format!("{root}d/"),
            ended: format!("{root}e/"),
            root,
        }
    }

    /// `<prefix>/`, the range an instance loads and watches.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// `<prefix>/a/`, the range that holds the table.
    pub fn table_prefix(&self) -> &str {
        &self.table
    }

    /// Which of the prefix's ranges `key` is in.
    pub fn kind(&self, key: &[u8]) -> KeyKind {
        if key.starts_with(self.table.as_bytes()) {
            KeyKind::Affinity
        } else if key.starts_with(self.declared.as_bytes()) {
            KeyKind::Declaration
        } else if key.starts_with(self.ended.as_bytes()) {
            KeyKind::Mark
        } else {
            KeyKind::Other
        }
    }

    /// The affinity or declaration stored as `value` at `key`; None for a
    /// key that holds neither (an end's mark, or not pktdist's).
    pub fn decode_entry(&self, key: &[u8], value: &[u8]) -> Option<Result<Entry, String>> {
        match self.kind(key) {
            KeyKind::Affinity => Some(self.decode(key, value).map(Entry::Affinity)),
            KeyKind::Declaration => {
                Some(self.decode_declaration(key, value).map(Entry::Declaration))
            }
            KeyKind::Mark | KeyKind::Other => None,
        }
    }

    /// The etcd key of the mark of the end of `k` at revision `expect`:
    /// the affinity key's path under `<prefix>/e/`, then the revision.
    pub fn mark_key(&self, k: &StoreKey, expect: Revision) -> String {
        let key = self.key(k);
        format!("{}{}/{expect}", self.ended, &key[self.table.len()..])
    }

    /// The end mark stored as `value` at `key`.
    pub fn decode_mark(&self, key: &[u8], value: &[u8]) -> Result<EndMark, String> {
        let text = std::str::from_utf8(key).map_err(|_| "the key is not UTF-8".to_string())?;
        let rest = text
            .strip_prefix(self.ended.as_str())
            .ok_or_else(|| format!("the key is not under {}", self.ended))?;
        let (path, expect) = rest
            .rsplit_once('/')
            .ok_or_else(|| "the key has no revision".to_string())?;
        let expect: Revision = expect
            .parse()
            .ok()
            .filter(|&r| r > 0)
            .ok_or_else(|| format!("bad revision {expect:?} in the key"))?;
        let k = self.parse_key(format!("{}{path}", self.table).as_bytes())?;
        if self.mark_key(&k, expect) != text {
            return Err("the key is not in its canonical form".to_string());
        }
        let v: MarkValue = serde_json::from_value(versioned(value)?)
            .map_err(|e| format!("bad value (format {FORMAT}): {e}"))?;
        check_name("instance", &v.instance)?;
        Ok(EndMark {
            key: k,
            instance: v.instance,
            expect,
            written_unix_ms: v.written_unix_ms,
        })
    }

    /// The etcd key of the declaration `k`.
    pub fn declaration_key(&self, k: &DeclarationKey) -> String {
        format!(
            "{}{}/{}/{}",
            self.declared,
            escape(&k.service),
            escape(&k.backend),
            if k.by_admin { "admin" } else { "app" }
        )
    }

    /// The declaration key `key` names, in the exact text
    /// [`KeySpace::declaration_key`] writes.
    pub fn parse_declaration_key(&self, key: &[u8]) -> Result<DeclarationKey, String> {
        let text = std::str::from_utf8(key).map_err(|_| "the key is not UTF-8".to_string())?;
        let rest = text
            .strip_prefix(self.declared.as_str())
            .ok_or_else(|| format!("the key is not under {}", self.declared))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [service, backend, who] = parts[..] else {
            return Err(format!(
                "the key has {} parts after {} where service/backend/declarer are 3",
                parts.len(),
                self.declared
            ));
        };
        let service = unescape(service)?;
        check_name("service", &service)?;
        let backend = unescape(backend)?;
        check_name("backend", &backend)?;
        let by_admin = match who {
            "app" => false,
            "admin" => true,
            _ => return Err(format!("bad declarer {who:?}: expected app or admin")),
        };
        let k = DeclarationKey {
            service,
            backend,
            by_admin,
        };
        if self.declaration_key(&k).as_bytes() != key {
            return Err("the key is not in its canonical form".to_string());
        }
        Ok(k)
    }

    /// The declaration stored as `value` at `key`.
    pub fn decode_declaration(
        &self,
        key: &[u8],
        value: &[u8],
    ) -> Result<StoredDeclaration, String> {
        let k = self.parse_declaration_key(key)?;
        let v: DeclarationValue = serde_json::from_value(versioned(value)?)
            .map_err(|e| format!("bad value (format {FORMAT}): {e}"))?;
        let state = match v.state.as_str() {
            "up" => Declared::Up,
            "drain" => Declared::Drain,
            "down" => Declared::Down,
            s => {
                return Err(format!(
                    "bad state {s:?}: expected \"up\", \"drain\" or \"down\""
                ))
            }
        };
        check_name("writer", &v.writer)?;
        Ok(StoredDeclaration {
            key: k,
            state,
            writer: v.writer,
            written_unix_ms: v.written_unix_ms,
        })
    }

    /// The etcd key of `k`.
    pub fn key(&self, k: &StoreKey) -> String {
        format!(
            "{}{}/{}/{}/{}",
            self.table,
            escape(&k.service),
            k.client,
            k.prefix_len,
            k.ports
        )
    }

    /// The affinity key `key` names. Only the exact text [`KeySpace::key`]
    /// writes is accepted, so one affinity has one key.
    pub fn parse_key(&self, key: &[u8]) -> Result<StoreKey, String> {
        let text = std::str::from_utf8(key).map_err(|_| "the key is not UTF-8".to_string())?;
        let rest = text
            .strip_prefix(self.table.as_str())
            .ok_or_else(|| format!("the key is not under {}", self.table))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [service, client, plen, ports] = parts[..] else {
            return Err(format!(
                "the key has {} parts after {} where service/client/prefix-length/ports are 4",
                parts.len(),
                self.table
            ));
        };
        let service = unescape(service)?;
        check_name("service", &service)?;
        let client: IpAddr = client
            .parse()
            .map_err(|_| format!("bad client address {client:?} in the key"))?;
        let prefix_len: u8 = plen
            .parse()
            .map_err(|_| format!("bad prefix length {plen:?} in the key"))?;
        let max = if client.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(format!(
                "prefix length {prefix_len} is longer than an address of {client}"
            ));
        }
        let ports: PortMatch = ports.parse()?;
        // The form an affinity's key is written in: its prefix masked, a
        // one-port range as the port, the whole range as any. Other
        // spellings of the same affinity would stand for it, and a delete
        // of one would take the affinity away under the other.
        if crate::net::mask_addr(client, prefix_len) != client {
            return Err(format!(
                "the client {client} has bits beyond its prefix length {prefix_len}"
            ));
        }
        if ports.normalized() != ports {
            return Err(format!(
                "the ports {ports} are not written as pktdist writes them ({})",
                ports.normalized()
            ));
        }
        let k = StoreKey {
            service,
            client,
            prefix_len,
            ports,
        };
        if self.key(&k).as_bytes() != key {
            return Err("the key is not in its canonical form".to_string());
        }
        Ok(k)
    }

    /// The affinity stored as `value` at `key`.
    pub fn decode(&self, key: &[u8], value: &[u8]) -> Result<StoredAffinity, String> {
        let k = self.parse_key(key)?;
        decode_value(k, value)
    }
}

/// The value's JSON: what the key does not say.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Value {
    format: u32,
    /// The owning backend's name.
    owner: String,
    /// The service's address when written ("10.0.0.1:80", "[2001:db8::1]:443").
    service_addr: SocketAddr,
    /// "tcp" or "udp".
    proto: String,
    expires_unix_ms: u64,
    created_unix_ms: u64,
    /// Where the owner's AFFINITY_ENDED goes, if anywhere.
    notify: Option<SocketAddr>,
    /// The instance that wrote this version, and its clock then.
    writer: String,
    written_unix_ms: u64,
}

/// A declaration's JSON: what the key does not say.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeclarationValue {
    format: u32,
    /// "drain" or "down" (an UP deletes the key; "up" is read too).
    state: String,
    writer: String,
    written_unix_ms: u64,
}

/// An end mark's JSON: what the key does not say.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MarkValue {
    format: u32,
    instance: String,
    written_unix_ms: u64,
}

/// The value of the mark `instance` leaves with an end's delete.
pub fn encode_mark(instance: &str, written_unix_ms: u64) -> String {
    let v = MarkValue {
        format: FORMAT,
        instance: instance.to_string(),
        written_unix_ms,
    };
    serde_json::to_string(&v).unwrap_or_default()
}

/// The value written for the declaration `d`.
pub fn encode_declaration(d: &StoredDeclaration) -> String {
    let v = DeclarationValue {
        format: FORMAT,
        state: d.state.name().to_ascii_lowercase(),
        writer: d.writer.clone(),
        written_unix_ms: d.written_unix_ms,
    };
    serde_json::to_string(&v).unwrap_or_default()
}

/// The value written for `a`.
pub fn encode_value(a: &StoredAffinity) -> String {
    let s = &a.affinity;
    let v = Value {
        format: FORMAT,
        owner: s.owner.clone(),
        service_addr: SocketAddr::new(s.service_addr.addr, s.service_addr.port),
        proto: if s.service_addr.proto == PROTO_UDP {
            "udp"
        } else {
            "tcp"
        }
        .to_string(),
        expires_unix_ms: s.expires_unix_ms,
        created_unix_ms: s.created_unix_ms,
        notify: s.notify,
        writer: a.writer.clone(),
        written_unix_ms: a.written_unix_ms,
    };
    // A struct of strings, numbers and addresses always serializes.
    serde_json::to_string(&v).unwrap_or_default()
}

/// The JSON of `value`, once its format is known to be this build's. The
/// version is read first, so a newer writer's value is named as such rather
/// than as a field this build does not know.
fn versioned(value: &[u8]) -> Result<serde_json::Value, String> {
    let raw: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| format!("the value is not JSON: {e}"))?;
    match raw.get("format").and_then(serde_json::Value::as_u64) {
        Some(f) if f == u64::from(FORMAT) => Ok(raw),
        Some(f) => Err(format!(
            "value format {f}; this build reads format {FORMAT}"
        )),
        None => Err("the value has no numeric \"format\" field".to_string()),
    }
}

fn decode_value(k: StoreKey, value: &[u8]) -> Result<StoredAffinity, String> {
    let v: Value = serde_json::from_value(versioned(value)?)
        .map_err(|e| format!("bad value (format {FORMAT}): {e}"))?;
    let proto = match v.proto.as_str() {
        "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        p => return Err(format!("bad protocol {p:?}: expected \"tcp\" or \"udp\"")),
    };
    if v.service_addr.is_ipv4() != k.client.is_ipv4() {
        return Err(format!(
            "client {} and service address {} are of different families",
            k.client, v.service_addr
        ));
    }
    check_name("owner", &v.owner)?;
    check_name("writer", &v.writer)?;
    Ok(StoredAffinity {
        affinity: SavedAffinity {
            service: k.service,
            service_addr: ServiceAddr {
                addr: v.service_addr.ip(),
                port: v.service_addr.port(),
                proto,
            },
            owner: v.owner,
            client: k.client,
            prefix_len: k.prefix_len,
            ports: k.ports,
            expires_unix_ms: v.expires_unix_ms,
            created_unix_ms: v.created_unix_ms,
            notify: v.notify,
        },
        writer: v.writer,
        written_unix_ms: v.written_unix_ms,
    })
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("empty {what} name"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{what} name of {} bytes (at most {MAX_NAME_LEN})",
            name.len()
        ));
    }
    Ok(())
}

/// Whether `b` is written as `%XX` in a key: the separator, the escape
/// itself, and what would make `etcdctl get` output ambiguous.
fn needs_escape(b: u8) -> bool {
    b == b'/' || b == b'%' || b <= b' ' || b == 0x7f
}

fn escape(name: &str) -> String {
    let mut out = Vec::with_capacity(name.len());
    for &b in name.as_bytes() {
        if needs_escape(b) {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        } else {
            out.push(b);
        }
    }
    // Only ASCII bytes were replaced (by ASCII), so the bytes of multi-byte
    // characters are intact and `out` is UTF-8 as `name` was.
    String::from_utf8(out).unwrap_or_default()
}

fn unescape(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once unescaped"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn affinity(service: &str, client: IpAddr, plen: u8, ports: PortMatch) -> StoredAffinity {
        let vip: IpAddr = if client.is_ipv4() {
            Ipv4Addr::new(10, 0, 0, 1).into()
        } else {
            "2001:db8::1".parse().unwrap()
        };
        StoredAffinity {
            affinity: SavedAffinity {
                service: service.to_string(),
                service_addr: ServiceAddr {
                    addr: vip,
                    port: 443,
                    proto: PROTO_TCP,
                },
                owner: "b1".to_string(),
                client,
                prefix_len: plen,
                ports,
                expires_unix_ms: 1_800_000_000_123,
                created_unix_ms: 1_700_000_000_456,
                notify: Some("10.0.0.5:9000".parse().unwrap()),
            },
            writer: "lb-a".to_string(),
            written_unix_ms: 1_750_000_000_789,
        }
    }

    fn round_trip(ks: &KeySpace, a: &StoredAffinity) {
        let key = ks.key(&a.key());
        let value = encode_value(a);
        assert_eq!(ks.decode(key.as_bytes(), value.as_bytes()), Ok(a.clone()));
    }

    #[test]
    fn keys_read_as_documented() {
        let ks = KeySpace::new("/pktdist/");
        let a = affinity(
            "web",
            Ipv4Addr::new(192, 0, 2, 0).into(),
            24,
            PortMatch::Any,
        );
        assert_eq!(ks.key(&a.key()), "/pktdist/a/web/192.0.2.0/24/any");
        let b = affinity(
            "a/b%c d",
            "2001:db8::".parse().unwrap(),
            48,
            PortMatch::Range(1000, 2000),
        );
        assert_eq!(
            ks.key(&b.key()),
            "/pktdist/a/a%2Fb%25c%20d/2001:db8::/48/1000-2000"
        );
        assert_eq!(ks.table_prefix(), "/pktdist/a/");
        assert_eq!(KeySpace::new("/pktdist"), ks);
    }

    #[test]
    fn an_end_mark_sits_at_its_affinity_key_s_path_and_names_its_instance() {
        let ks = KeySpace::new("/pktdist");
        let a = affinity(
            "a/b%c d",
            "2001:db8::".parse().unwrap(),
            48,
            PortMatch::Range(1000, 2000),
        );
        let key = ks.mark_key(&a.key(), 42);
        assert_eq!(key, "/pktdist/e/a%2Fb%25c%20d/2001:db8::/48/1000-2000/42");
        assert_eq!(ks.kind(key.as_bytes()), KeyKind::Mark);
        // Neither an affinity nor a declaration: the watch and the load
        // leave it to the marks' own reading (and older builds ignore it).
        let value = encode_mark("lb-a", 1_750_000_000_000);
        assert_eq!(ks.decode_entry(key.as_bytes(), value.as_bytes()), None);
        assert_eq!(
            ks.decode_mark(key.as_bytes(), value.as_bytes()),
            Ok(EndMark {
                key: a.key(),
                instance: "lb-a".to_string(),
                expect: 42,
                written_unix_ms: 1_750_000_000_000,
            })
        );
        let v: serde_json::Value = serde_json::from_str(&value).unwrap();
        assert_eq!(v["format"], 1);
        // Bad marks are errors, not panics.
        for (k, v) in [
            (key.as_str(), "{}"),
            (key.as_str(), "not json"),
            (
                key.as_str(),
                r#"{"format":2,"instance":"x","written_unix_ms":0}"#,
            ),
            (
                key.as_str(),
                r#"{"format":1,"instance":"","written_unix_ms":0}"#,
            ),
            (
                key.as_str(),
                r#"{"format":1,"instance":"x","written_unix_ms":0,"expect":1}"#,
            ),
            ("/pktdist/e/web/192.0.2.1/24/any/7", value.as_str()),
            ("/pktdist/e/web/192.0.2.0/24/any", value.as_str()),
            ("/pktdist/e/web/192.0.2.0/24/any/0", value.as_str()),
            ("/pktdist/e/web/192.0.2.0/24/any/07", value.as_str()),
            ("/pktdist/e/web/192.0.2.0/24/any/x", value.as_str()),
            ("/pktdist/a/web/192.0.2.0/24/any/7", value.as_str()),
        ] {
            assert!(
                ks.decode_mark(k.as_bytes(), v.as_bytes()).is_err(),
                "{k} {v}"
            );
        }
    }

    #[test]
    fn values_are_json_with_a_format() {
        let a = affinity(
            "web",
            Ipv4Addr::new(192, 0, 2, 7).into(),
            32,
            PortMatch::One(1234),
        );
        let v: serde_json::Value = serde_json::from_str(&encode_value(&a)).unwrap();
        assert_eq!(v["format"], 1);
        assert_eq!(v["owner"], "b1");
        assert_eq!(v["service_addr"], "10.0.0.1:443");
        assert_eq!(v["proto"], "tcp");
        assert_eq!(v["notify"], "10.0.0.5:9000");
        assert_eq!(v["writer"], "lb-a");
    }

    #[test]
    fn round_trips() {
        let ks = KeySpace::new("/p");
        let v4: IpAddr = Ipv4Addr::new(198, 51, 100, 0).into();
        let v6: IpAddr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x42).into();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        for ports in [
            PortMatch::Any,
            PortMatch::One(0),
            PortMatch::One(65535),
            PortMatch::Range(1, 65535),
        ] {
            round_trip(&ks, &affinity("web", v4, 24, ports));
            round_trip(
                &ks,
                &affinity("web", Ipv4Addr::UNSPECIFIED.into(), 0, ports),
            );
            round_trip(&ks, &affinity("web", v6, 128, ports));
            round_trip(&ks, &affinity("web", mapped, 128, ports));
        }
        for name in [
            "a/b",
            "%",
            "%25",
            "/",
            "x y",
            "tab\there",
            "ünï/cödé",
            "日本",
            "a\u{7f}b",
            "-",
        ] {
            round_trip(&ks, &affinity(name, v4, 32, PortMatch::Any));
        }
        let net: IpAddr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0).into();
        let mut udp = affinity("dns", net, 64, PortMatch::Any);
        udp.affinity.service_addr.proto = PROTO_UDP;
        udp.affinity.notify = None;
        round_trip(&ks, &udp);
    }

    #[test]
    fn a_prefix_with_slashes_is_not_escaped() {
        let ks = KeySpace::new("/site/eu-1/prod");
        let a = affinity(
            "web",
            Ipv4Addr::new(192, 0, 2, 0).into(),
            24,
            PortMatch::Any,
        );
        assert!(ks.key(&a.key()).starts_with("/site/eu-1/prod/a/web/"));
        round_trip(&ks, &a);
        // Another cluster's keys are not this one's.
        let other = KeySpace::new("/site/eu-1");
        assert!(other.parse_key(ks.key(&a.key()).as_bytes()).is_err());
    }

    #[test]
    fn hostile_keys_are_errors() {
        let ks = KeySpace::new("/p");
        for key in [
            &b"/p/a/"[..],
            b"/p/a/web",
            b"/p/a/web/192.0.2.0/24",
            b"/p/a/web/192.0.2.0/24/any/extra",
            b"/p/a//192.0.2.0/24/any",
            b"/p/a/web/192.0.2.0/33/any",
            b"/p/a/web/2001:db8::/129/any",
            b"/p/a/web/192.0.2.0/-1/any",
            b"/p/a/web/192.0.2.0/024/any",
            b"/p/a/web/192.0.2.0/24/ANY",
            b"/p/a/web/192.0.2.0/24/2000-1000",
            b"/p/a/web/192.0.2.0/24/70000",
            b"/p/a/web/192.0.2.0/24/ 80",
            b"/p/a/web/192.000.2.0/24/any",
            b"/p/a/web/2001:DB8::/32/any",
            b"/p/a/web/not-an-ip/24/any",
            // Another spelling of /p/a/web/192.0.2.0/24/any, /5, /any.
            b"/p/a/web/192.0.2.5/24/any",
            b"/p/a/web/2001:db8::1/64/any",
            b"/p/a/web/192.0.2.0/24/5-5",
            b"/p/a/web/192.0.2.0/24/0-65535",
            b"/p/a/w%2/192.0.2.0/24/any",
            b"/p/a/w%zz/192.0.2.0/24/any",
            b"/p/a/w%2f/192.0.2.0/24/any",
            b"/p/a/w%FF/192.0.2.0/24/any",
            b"/p/a/w\xff/192.0.2.0/24/any",
            b"/p/a/w%41/192.0.2.0/24/any",
            b"/q/a/web/192.0.2.0/24/any",
            b"",
            b"\0\0\0",
        ] {
            assert!(
                ks.parse_key(key).is_err(),
                "{:?}",
                String::from_utf8_lossy(key)
            );
        }
        let long = format!("/p/a/{}/192.0.2.0/24/any", "x".repeat(MAX_NAME_LEN + 1));
        assert!(ks.parse_key(long.as_bytes()).is_err());
        // The canonical spellings are read.
        for key in [
            &b"/p/a/web/192.0.2.0/24/any"[..],
            b"/p/a/web/2001:db8::/64/any",
            b"/p/a/web/192.0.2.0/24/5",
            b"/p/a/web/192.0.2.0/24/5-6",
            b"/p/a/web/192.0.2.5/32/0-65534",
        ] {
            let k = ks.parse_key(key).unwrap();
            assert_eq!(ks.key(&k).as_bytes(), key);
        }
    }

    #[test]
    fn hostile_values_are_errors() {
        let ks = KeySpace::new("/p");
        let a = affinity(
            "web",
            Ipv4Addr::new(192, 0, 2, 0).into(),
            24,
            PortMatch::Any,
        );
        let key = ks.key(&a.key());
        let good: serde_json::Value = serde_json::from_str(&encode_value(&a)).unwrap();
        let with = |field: &str, v: serde_json::Value| {
            let mut j = good.clone();
            j[field] = v;
            j.to_string()
        };
        let without = |field: &str| {
            let mut j = good.clone();
            j.as_object_mut().unwrap().remove(field);
            j.to_string()
        };
        let cases: Vec<String> = vec![
            String::new(),
            "garbage".into(),
            "null".into(),
            "[]".into(),
            "{}".into(),
            "{\"format\":1}".into(),
            with("format", 2.into()),
            with("format", "1".into()),
            with("format", (-1).into()),
            without("format"),
            without("owner"),
            with("owner", "".into()),
            with("owner", "o".repeat(MAX_NAME_LEN + 1).into()),
            with("writer", 7.into()),
            with("proto", "sctp".into()),
            with("service_addr", "2001:db8::1:80".into()),
            with("service_addr", "[2001:db8::1]:80".into()),
            with("expires_unix_ms", (-5).into()),
            with("expires_unix_ms", 1.5.into()),
            with("notify", "somewhere".into()),
            with("extra", true.into()),
        ];
        for v in cases {
            assert!(ks.decode(key.as_bytes(), v.as_bytes()).is_err(), "{v}");
        }
        for bytes in [&b"\xff\xfe"[..], b"{\"format\":1,", b"\0"] {
            assert!(ks.decode(key.as_bytes(), bytes).is_err());
        }
        let newer = with("format", 2.into());
        let err = ks.decode(key.as_bytes(), newer.as_bytes()).unwrap_err();
        assert!(err.contains("format 2"), "{err}");
    }

    fn declaration(
        service: &str,
        backend: &str,
        by_admin: bool,
        state: Declared,
    ) -> StoredDeclaration {
        StoredDeclaration {
            key: DeclarationKey {
                service: service.to_string(),
                backend: backend.to_string(),
                by_admin,
            },
            state,
            writer: "lb-a".to_string(),
            written_unix_ms: 1_750_000_000_789,
        }
    }

    #[test]
    fn declarations_read_as_documented_and_round_trip() {
        let ks = KeySpace::new("/pktdist");
        let d = declaration("web", "be2", false, Declared::Drain);
        let key = ks.declaration_key(&d.key);
        assert_eq!(key, "/pktdist/d/web/be2/app");
        assert_eq!(ks.kind(key.as_bytes()), KeyKind::Declaration);
        let value = encode_declaration(&d);
        let v: serde_json::Value = serde_json::from_str(&value).unwrap();
        assert_eq!(
            (v["format"].as_u64(), v["state"].as_str()),
            (Some(1), Some("drain"))
        );
        assert_eq!(
            ks.decode_declaration(key.as_bytes(), value.as_bytes()),
            Ok(d)
        );
        for (service, backend, by_admin, state) in [
            ("a/b%c d", "x/y", true, Declared::Down),
            ("日本", "-", false, Declared::Up),
        ] {
            let d = declaration(service, backend, by_admin, state);
            let key = ks.declaration_key(&d.key);
            assert!(
                key.ends_with(if by_admin { "/admin" } else { "/app" }),
                "{key}"
            );
            let value = encode_declaration(&d);
            assert_eq!(
                ks.decode_declaration(key.as_bytes(), value.as_bytes()),
                Ok(d)
            );
        }
        assert_eq!(ks.root(), "/pktdist/");
        assert_eq!(
            ks.kind(b"/pktdist/a/web/192.0.2.0/24/any"),
            KeyKind::Affinity
        );
        assert_eq!(ks.kind(b"/pktdist/x/other"), KeyKind::Other);
        assert_eq!(ks.kind(b"/pktdist-b/d/web/be2/app"), KeyKind::Other);
    }

    #[test]
    fn hostile_declarations_are_errors() {
        let ks = KeySpace::new("/p");
        let good = encode_declaration(&declaration("web", "be2", false, Declared::Down));
        for key in [
            &b"/p/d/"[..],
            b"/p/d/web",
            b"/p/d/web/be2",
            b"/p/d/web/be2/root",
            b"/p/d/web/be2/app/x",
            b"/p/d//be2/app",
            b"/p/d/web//admin",
            b"/p/d/web/b%2/app",
            b"/p/d/web/b%41/app",
            b"/p/d/web/\xff/app",
            b"/p/a/web/be2/app",
        ] {
            assert!(
                ks.decode_declaration(key, good.as_bytes()).is_err(),
                "{:?}",
                String::from_utf8_lossy(key)
            );
        }
        let key = ks.declaration_key(&declaration("web", "be2", false, Declared::Down).key);
        for value in [
            "",
            "{}",
            "{\"format\":2,\"state\":\"down\",\"writer\":\"a\",\"written_unix_ms\":1}",
            "{\"format\":1,\"state\":\"off\",\"writer\":\"a\",\"written_unix_ms\":1}",
            "{\"format\":1,\"state\":\"DOWN\",\"writer\":\"a\",\"written_unix_ms\":1}",
            "{\"format\":1,\"state\":\"down\",\"writer\":\"\",\"written_unix_ms\":1}",
            "{\"format\":1,\"state\":\"down\",\"writer\":\"a\"}",
            "{\"format\":1,\"state\":\"down\",\"writer\":\"a\",\"written_unix_ms\":1,\"x\":1}",
        ] {
            assert!(
                ks.decode_declaration(key.as_bytes(), value.as_bytes())
                    .is_err(),
                "{value}"
            );
        }
    }
}
