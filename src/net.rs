//! Addresses and networks as the configuration, the control protocol and the
//! affinity table all use them: IPv4 and IPv6 addresses as `u128` bits (IPv4
//! in the low 32), prefix masks, and the [`IpNet`] CIDR type.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::types::Family;

/// An IP address as the `u128` bits the data path uses (IPv4 in the low 32).
pub fn ip_bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address `bits` stand for in `family` (the inverse of [`ip_bits`]).
pub fn bits_ip(family: Family, bits: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(bits as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(bits)),
    }
}

/// True for the address of one host: not unspecified, multicast or (IPv4)
/// broadcast.
pub fn is_host_address(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(v) => !(v.is_unspecified() || v.is_multicast() || v.is_broadcast()),
        IpAddr::V6(v) => !(v.is_unspecified() || v.is_multicast()),
    }
}

/// True for a MAC address of one station: not all zeros, not a group
/// (multicast or broadcast) address.
pub fn is_unicast_mac(mac: [u8; 6]) -> bool {
    mac != [0; 6] && mac[0] & 1 == 0
}

/// The family of an address.
pub fn family(addr: IpAddr) -> Family {
    match addr {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

/// "IPv4" or "IPv6".
pub fn family_name(addr: &IpAddr) -> &'static str {
    match addr {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// The longest prefix a family allows: 32 or 128.
#[inline]
pub fn max_prefix(family: Family) -> u8 {
    match family {
        Family::V4 => 32,
        Family::V6 => 128,
    }
}

/// The mask of a `plen`-bit prefix over a family's [`ip_bits`]; prefixes
/// longer than the family keep every bit.
#[inline]
pub fn prefix_mask(family: Family, plen: u8) -> u128 {
    let width = u32::from(max_prefix(family));
    let plen = u32::from(plen).min(width);
    if plen == 0 {
        return 0;
    }
    let ones = u128::MAX << (128 - plen);
    ones >> (128 - width)
}

/// `addr` with the host bits beyond `prefix` cleared.
pub fn mask_addr(addr: IpAddr, prefix: u8) -> IpAddr {
    let f = family(addr);
    bits_ip(f, ip_bits(addr) & prefix_mask(f, prefix))
}

/// Why a network was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetParseError(pub String);

impl fmt::Display for NetParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NetParseError {}

/// An IPv4 or IPv6 network in CIDR form, host bits clear, so that two
/// spellings of one network compare equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    /// A network from an address and prefix length, host bits cleared;
    /// fails if the prefix is longer than the family allows.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<IpNet, NetParseError> {
        let max = max_prefix(family(addr));
        if prefix > max {
            return Err(NetParseError(format!(
                "prefix length /{prefix} is longer than /{max} for {addr}"
            )));
        }
        Ok(IpNet {
            addr: mask_addr(addr, prefix),
            prefix,
        })
    }

    fn split(s: &str) -> Result<(IpAddr, u8), NetParseError> {
        let s = s.trim();
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| NetParseError(format!("bad network {s:?}: {a:?} is not an IP address")))?;
        let max = max_prefix(family(addr));
        let prefix = match p {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => {
                    return Err(NetParseError(format!(
                        "bad network {s:?}: prefix length must be 0..={max} for {}",
                        family_name(&addr)
                    )))
                }
            },
        };
        Ok((addr, prefix))
    }

    /// Parses `ADDR/PREFIX` or a bare `ADDR` (a host network); host bits
    /// beyond the prefix are cleared (`198.51.100.77/24` is `198.51.100.0/24`).
    pub fn parse(s: &str) -> Result<IpNet, NetParseError> {
        let (addr, prefix) = Self::split(s)?;
        IpNet::new(addr, prefix)
    }

    /// Like [`parse`](Self::parse), but host bits beyond the prefix are an
    /// error (configuration files: a typo there should not widen a network).
    pub fn parse_exact(s: &str) -> Result<IpNet, NetParseError> {
        let (addr, prefix) = Self::split(s)?;
        let net = IpNet::new(addr, prefix)?;
        if net.addr != addr {
            return Err(NetParseError(format!(
                "bad network {:?}: bits are set after the /{prefix} prefix (did you mean \"{net}\"?)",
                s.trim()
            )));
        }
        Ok(net)
    }

    /// The network address (host bits clear).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// The network's mask over [`ip_bits`] of its family.
    pub fn mask_bits(&self) -> u128 {
        prefix_mask(family(self.addr), self.prefix)
    }

    /// Whether `ip` lies in this network. An IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`, as a dual-stack socket reports IPv4 peers) is
    /// matched as the IPv4 address it carries.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && ip_bits(ip) & self.mask_bits() == ip_bits(self.addr)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for IpNet {
    type Err = NetParseError;
    fn from_str(s: &str) -> Result<IpNet, NetParseError> {
        IpNet::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn masks() {
        assert_eq!(prefix_mask(Family::V4, 0), 0);
        assert_eq!(prefix_mask(Family::V4, 24), 0xffff_ff00);
        assert_eq!(prefix_mask(Family::V4, 32), 0xffff_ffff);
        assert_eq!(prefix_mask(Family::V4, 40), 0xffff_ffff);
        assert_eq!(prefix_mask(Family::V6, 128), u128::MAX);
        assert_eq!(prefix_mask(Family::V6, 1), 1 << 127);
        assert_eq!(mask_addr(ip("10.1.2.3"), 16), ip("10.1.0.0"));
        assert_eq!(
            bits_ip(Family::V4, ip_bits(ip("192.0.2.1"))),
            ip("192.0.2.1")
        );
    }

    #[test]
    fn parse_masks_and_parse_exact_refuses_host_bits() {
        let n = IpNet::parse("10.1.2.3/16").unwrap();
        assert_eq!((n.addr(), n.prefix_len()), (ip("10.1.0.0"), 16));
        assert_eq!(IpNet::parse("::1").unwrap().prefix_len(), 128);
        let e = IpNet::parse_exact("10.1.2.3/16").unwrap_err().0;
        assert!(e.contains("did you mean \"10.1.0.0/16\""), "{e}");
        assert!(IpNet::parse_exact("10.1.0.0/16").is_ok());
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0/8",
            "::/129",
            "x/3",
            "10.0.0.0/-1",
        ] {
            assert!(IpNet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn contains_matches_family_and_mapped_v4() {
        let n = IpNet::parse("192.0.2.0/24").unwrap();
        assert!(n.contains(ip("192.0.2.77")));
        assert!(!n.contains(ip("192.0.3.1")));
        assert!(n.contains(ip("::ffff:192.0.2.5")));
        assert!(!n.contains(ip("2001:db8::1")));
        assert!(IpNet::parse("::/0").unwrap().contains(ip("ff02::1")));
        assert!(IpNet::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
    }
}
