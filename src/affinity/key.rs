//! The affinity key: which clients of which service an affinity covers.

use core::fmt;

use crate::types::{Family, PortMatch, ServiceId};

use super::AffinityError;

use crate::net::{max_prefix, prefix_mask};

/// Service, client prefix and client ports of one affinity.
///
/// Built only through [`TableKey::new`], so a key is always valid and its
/// address always masked to its prefix: two requests naming the same clients
/// produce equal keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TableKey {
    addr: u128,
    service: ServiceId,
    family: Family,
    prefix_len: u8,
    ports: PortMatch,
}

impl TableKey {
    /// Validates and normalizes a key. `addr` holds IPv4 in its low 32 bits;
    /// host bits beyond the prefix are cleared. `Range(p, p)` becomes `One(p)`
    /// and `Range(0, 65535)` becomes `Any`, so equal coverage is an equal key.
    pub fn new(
        service: ServiceId,
        family: Family,
        addr: u128,
        prefix_len: u8,
        ports: PortMatch,
    ) -> Result<TableKey, AffinityError> {
        if prefix_len > max_prefix(family) {
            return Err(AffinityError::Invalid("prefix length too long for family"));
        }
        if family == Family::V4 && addr > u128::from(u32::MAX) {
            return Err(AffinityError::Invalid("IPv4 address wider than 32 bits"));
        }
        if let PortMatch::Range(lo, hi) = ports {
            if lo > hi {
                return Err(AffinityError::Invalid("port range low above high"));
            }
        }
        let ports = ports.normalized();
        Ok(TableKey {
            addr: addr & prefix_mask(family, prefix_len),
            service,
            family,
            prefix_len,
            ports,
        })
    }

    #[inline]
    pub fn service(&self) -> ServiceId {
        self.service
    }
    #[inline]
    pub fn family(&self) -> Family {
        self.family
    }
    /// The masked prefix address (IPv4 in the low 32 bits).
    #[inline]
    pub fn addr(&self) -> u128 {
        self.addr
    }
    #[inline]
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }
    #[inline]
    pub fn ports(&self) -> PortMatch {
        self.ports
    }

    /// Whether a connection from `client:port` to `service` is covered.
    pub fn matches(&self, service: ServiceId, family: Family, client: u128, port: u16) -> bool {
        self.service == service
            && self.family == family
            && client & prefix_mask(family, self.prefix_len) == self.addr
            && self.ports.contains(port)
    }

    /// Orders keys covering the same connection: greater is more specific.
    /// Longest prefix first; then one port, then ranges (narrower first, lower
    /// start on a tie), then any port. This is the order lookups follow.
    pub fn specificity(&self) -> (u8, u8, u32, u32) {
        match self.ports {
            PortMatch::One(_) => (self.prefix_len, 2, 0, 0),
            PortMatch::Range(lo, hi) => (
                self.prefix_len,
                1,
                u32::from(u16::MAX) - u32::from(hi - lo),
                u32::from(u16::MAX) - u32::from(lo),
            ),
            PortMatch::Any => (self.prefix_len, 0, 0, 0),
        }
    }
}

impl fmt::Debug for TableKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TableKey(svc {} ", self.service)?;
        match self.family {
            Family::V4 => write!(f, "{}", std::net::Ipv4Addr::from(self.addr as u32))?,
            Family::V6 => write!(f, "{}", std::net::Ipv6Addr::from(self.addr))?,
        }
        write!(f, "/{} ", self.prefix_len)?;
        match self.ports {
            PortMatch::Any => write!(f, "any)"),
            PortMatch::One(p) => write!(f, "port {p})"),
            PortMatch::Range(lo, hi) => write!(f, "ports {lo}-{hi})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_masks_and_normalizes() {
        let k = TableKey::new(3, Family::V4, 0x0a01_02ff, 24, PortMatch::Any).unwrap();
        assert_eq!(k.addr(), 0x0a01_0200);
        assert_eq!(k.service(), 3);
        let k6 = TableKey::new(1, Family::V6, u128::MAX, 64, PortMatch::Any).unwrap();
        assert_eq!(k6.addr(), u128::MAX << 64);
        let zero = TableKey::new(1, Family::V6, u128::MAX, 0, PortMatch::Any).unwrap();
        assert_eq!(zero.addr(), 0);
        let one = TableKey::new(1, Family::V4, 1, 32, PortMatch::Range(80, 80)).unwrap();
        assert_eq!(one.ports(), PortMatch::One(80));
        let all = TableKey::new(1, Family::V4, 1, 32, PortMatch::Range(0, 65535)).unwrap();
        assert_eq!(all.ports(), PortMatch::Any);
        assert_eq!(
            TableKey::new(1, Family::V4, 0x0a000001, 8, PortMatch::Any),
            TableKey::new(1, Family::V4, 0x0affffff, 8, PortMatch::Any)
        );
    }

    #[test]
    fn new_rejects_invalid() {
        assert!(matches!(
            TableKey::new(0, Family::V4, 0, 33, PortMatch::Any),
            Err(AffinityError::Invalid(_))
        ));
        assert!(matches!(
            TableKey::new(0, Family::V6, 0, 129, PortMatch::Any),
            Err(AffinityError::Invalid(_))
        ));
        assert!(matches!(
            TableKey::new(0, Family::V4, 1 << 32, 32, PortMatch::Any),
            Err(AffinityError::Invalid(_))
        ));
        assert!(matches!(
            TableKey::new(0, Family::V4, 0, 32, PortMatch::Range(10, 9)),
            Err(AffinityError::Invalid(_))
        ));
        assert!(TableKey::new(0, Family::V6, 0, 128, PortMatch::Range(9, 10)).is_ok());
    }

    #[test]
    fn matches_and_specificity() {
        let k =
            TableKey::new(2, Family::V4, 0xc0a8_0100, 24, PortMatch::Range(1000, 2000)).unwrap();
        assert!(k.matches(2, Family::V4, 0xc0a8_0163, 1500));
        assert!(!k.matches(2, Family::V4, 0xc0a8_0263, 1500));
        assert!(!k.matches(2, Family::V4, 0xc0a8_0163, 2001));
        assert!(!k.matches(3, Family::V4, 0xc0a8_0163, 1500));
        assert!(!k.matches(2, Family::V6, 0xc0a8_0163, 1500));
        let one = TableKey::new(2, Family::V4, 0xc0a8_0100, 24, PortMatch::One(1500)).unwrap();
        let any = TableKey::new(2, Family::V4, 0xc0a8_0100, 24, PortMatch::Any).unwrap();
        let narrow =
            TableKey::new(2, Family::V4, 0xc0a8_0100, 24, PortMatch::Range(1400, 1600)).unwrap();
        let longer = TableKey::new(2, Family::V4, 0xc0a8_0163, 32, PortMatch::Any).unwrap();
        assert!(one.specificity() > narrow.specificity());
        assert!(narrow.specificity() > k.specificity());
        assert!(k.specificity() > any.specificity());
        assert!(longer.specificity() > one.specificity());
    }

    #[test]
    fn prefix_masks() {
        assert_eq!(prefix_mask(Family::V4, 0), 0);
        assert_eq!(prefix_mask(Family::V4, 32), 0xffff_ffff);
        assert_eq!(prefix_mask(Family::V4, 1), 0x8000_0000);
        assert_eq!(prefix_mask(Family::V6, 128), u128::MAX);
        assert_eq!(prefix_mask(Family::V6, 1), 1 << 127);
    }
}
