//! Value types of the configuration, each with a deserializer from the text
//! an operator writes: durations like "30s", MAC addresses, CIDR networks,
//! client-port matches and hex keys.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::net::IpNet;

/// A duration written with units: "250ms", "30s", "5m", "1h", "2d", or a
/// sum such as "1h30m". Units: ns, us, ms, s, m, h, d.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DurationStr(pub Duration);

impl DurationStr {
    pub fn secs(s: u64) -> DurationStr {
        DurationStr(Duration::from_secs(s))
    }
}

impl FromStr for DurationStr {
    type Err = String;

    fn from_str(s: &str) -> Result<DurationStr, String> {
        let bad = || {
            format!(
                "bad duration {s:?}: expected a number with a unit (ns, us, ms, s, m, h, d), like \"30s\" or \"1h30m\""
            )
        };
        let too_large = || format!("bad duration {s:?}: too large to represent");
        let t = s.trim();
        if t.is_empty() {
            return Err(bad());
        }
        let mut total: u128 = 0;
        let mut rest = t;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
            if digits == 0 {
                return Err(bad());
            }
            // All digits: parsing fails only when the number overflows.
            let n: u128 = rest[..digits].parse().map_err(|_| too_large())?;
            rest = &rest[digits..];
            let ulen = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
            let unit_ns: u128 = match &rest[..ulen] {
                "ns" => 1,
                "us" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                "d" => 86_400_000_000_000,
                _ => return Err(bad()),
            };
            rest = &rest[ulen..];
            total = n
                .checked_mul(unit_ns)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(too_large)?;
        }
        let secs = u64::try_from(total / 1_000_000_000).map_err(|_| too_large())?;
        Ok(DurationStr(Duration::new(
            secs,
            (total % 1_000_000_000) as u32,
        )))
    }
}

impl fmt::Display for DurationStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.0.as_nanos();
        for (unit, div) in [
            ("d", 86_400_000_000_000u128),
            ("h", 3_600_000_000_000),
            ("m", 60_000_000_000),
            ("s", 1_000_000_000),
            ("ms", 1_000_000),
            ("us", 1_000),
        ] {
            if ns >= div && ns % div == 0 {
                return write!(f, "{}{unit}", ns / div);
            }
        }
        write!(f, "{ns}ns")
    }
}

/// Deserializes any `FromStr<Err = String>` type from a TOML string.
struct StrVisitor<T>(&'static str, std::marker::PhantomData<T>);

impl<T: FromStr<Err = String>> Visitor<'_> for StrVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
}

macro_rules! deserialize_from_str {
    ($t:ty, $what:expr) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                d.deserialize_str(StrVisitor::<$t>($what, std::marker::PhantomData))
            }
        }
    };
}

deserialize_from_str!(DurationStr, "a duration string like \"30s\"");

/// A MAC address, written "02:00:00:00:00:01".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<MacAddr, String> {
        let bad =
            || format!("bad MAC address {s:?}: expected six hex bytes like \"02:00:00:00:00:01\"");
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

deserialize_from_str!(MacAddr, "a MAC address like \"02:00:00:00:00:01\"");

/// Networks in a configuration are CIDR, "192.0.2.0/24" or "2001:db8::/32"
/// (a bare address is a /32 or /128), with no bits set after the prefix.
impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
        let s = String::deserialize(d)?;
        IpNet::parse_exact(&s).map_err(|e| de::Error::custom(e.0))
    }
}

use crate::types::PortMatch;

/// Client ports: "any", one port (1234 or "1234"), or a range "1000-2000".
impl<'de> Deserialize<'de> for PortMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PortMatch, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortMatch;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"any\", a port number, or a range like \"1000-2000\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortMatch, E> {
                u16::try_from(v)
                    .map(PortMatch::One)
                    .map_err(|_| E::custom(format!("client port {v} is out of range 0..=65535")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortMatch, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortMatch, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A secret key written in hex (at least 16 bytes). Its Debug output does
/// not show the key.
#[derive(Clone, PartialEq, Eq)]
pub struct HexKey(pub Vec<u8>);

/// Shortest HMAC key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = crate::protocol::auth::MIN_KEY_LEN;

impl FromStr for HexKey {
    type Err = String;
    fn from_str(s: &str) -> Result<HexKey, String> {
        crate::protocol::auth::parse_hex_key(s)
            .map(HexKey)
            .map_err(|e| format!("bad key: {e}"))
    }
}

impl fmt::Debug for HexKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HexKey(<{} bytes>)", self.0.len())
    }
}

deserialize_from_str!(HexKey, "a hex key string");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let d = |s: &str| s.parse::<DurationStr>().map(|d| d.0);
        assert_eq!(d("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(d("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(d("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(d("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(d("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("2d"), Ok(Duration::from_secs(172_800)));
        for bad in [
            "",
            "30",
            "s",
            "5x",
            "1.5s",
            "-3s",
            "99999999999999999999999d",
        ] {
            assert!(d(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(DurationStr::secs(300).to_string(), "5m");
        assert_eq!(
            DurationStr(Duration::from_millis(1500)).to_string(),
            "1500ms"
        );
    }

    #[test]
    fn macs() {
        assert_eq!(
            "02:00:00:00:00:0a".parse::<MacAddr>(),
            Ok(MacAddr([2, 0, 0, 0, 0, 10]))
        );
        assert_eq!(
            MacAddr([2, 0, 0, 0, 0, 10]).to_string(),
            "02:00:00:00:00:0a"
        );
        for bad in [
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "zz:00:00:00:00:00",
            "2:0:0:0:0:0",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn networks_in_a_file_must_have_no_host_bits() {
        #[derive(Deserialize)]
        struct W {
            n: IpNet,
        }
        let n = toml::from_str::<W>("n = \"192.0.2.0/24\"").unwrap().n;
        assert!(n.contains("192.0.2.77".parse().unwrap()));
        let e = toml::from_str::<W>("n = \"192.0.2.1/24\"")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("192.0.2.0/24"), "{e}");
        assert!(toml::from_str::<W>("n = \"2001:db8::/129\"").is_err());
    }

    #[test]
    fn port_matches() {
        assert_eq!("any".parse(), Ok(PortMatch::Any));
        assert_eq!("1234".parse(), Ok(PortMatch::One(1234)));
        assert_eq!("1000-2000".parse(), Ok(PortMatch::Range(1000, 2000)));
        assert!("2000-1000".parse::<PortMatch>().is_err());
        assert!("70000".parse::<PortMatch>().is_err());
    }

    #[test]
    fn keys() {
        assert!("00112233445566778899aabbccddeeff".parse::<HexKey>().is_ok());
        assert!("0011"
            .parse::<HexKey>()
            .unwrap_err()
            .contains("at least 16 bytes"));
        assert!("xyz".parse::<HexKey>().is_err());
        let k: HexKey = "00112233445566778899aabbccddeeff".parse().unwrap();
        assert!(!format!("{k:?}").contains("0011"));
    }
}
