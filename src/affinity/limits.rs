//! What one backend may pin on a service: the limits that keep a half
//! trusted application from taking more than its share of the affinity
//! table or of the service's clients.
//!
//! [`AffinityLimits`] is a service's setting (from its `[[services]]`
//! table): the shortest prefix a backend may pin, how many requested
//! affinities one backend may hold, and whether a backend may pin clients
//! another backend's affinity already covers. The operator (`admin`) and
//! the configuration's static affinities are not held to them.

use serde::Deserialize;

use crate::types::Family;

/// Shortest IPv4 prefix a backend may pin when the service says nothing:
/// a /16 is 65,536 clients.
pub const DEFAULT_MIN_PREFIX_V4: u8 = 16;
/// Shortest IPv6 prefix by default: a /48, one site.
pub const DEFAULT_MIN_PREFIX_V6: u8 = 48;

/// The shortest prefix a backend may pin, per address family
/// (`min_prefix = { ipv4 = 16, ipv6 = 48 }`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MinPrefix {
    pub ipv4: u8,
    pub ipv6: u8,
}

impl Default for MinPrefix {
    fn default() -> MinPrefix {
        MinPrefix {
            ipv4: DEFAULT_MIN_PREFIX_V4,
            ipv6: DEFAULT_MIN_PREFIX_V6,
        }
    }
}

impl MinPrefix {
    /// The limit for `family`.
    pub fn of(&self, family: Family) -> u8 {
        match family {
            Family::V4 => self.ipv4,
            Family::V6 => self.ipv6,
        }
    }
}

/// Whether a backend may pin clients that another backend's affinity
/// covers (`affinity_overlap`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverlapPolicy {
    /// Refused with CONFLICT naming the other backend (the default).
    #[default]
    Refuse,
    /// Allowed: the most specific affinity wins on each SYN.
    Allow,
}

impl OverlapPolicy {
    pub fn name(self) -> &'static str {
        match self {
            OverlapPolicy::Refuse => "refuse",
            OverlapPolicy::Allow => "allow",
        }
    }
}

/// A service's limits on what one backend may pin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityLimits {
    pub min_prefix: MinPrefix,
    /// Requested affinities one backend may hold; `None` = the default
    /// share ([`AffinityLimits::quota`]).
    pub max_per_backend: Option<u32>,
    pub overlap: OverlapPolicy,
}

impl AffinityLimits {
    /// The requested affinities one backend may hold on a service of
    /// `backends` backends, with a table of `capacity` entries: the
    /// configured quota, or else twice an even share of the table
    /// (`2 × ⌈capacity / backends⌉`). The default follows the service's
    /// backend count as it is now, so it moves when backends are added or
    /// removed; affinities beyond a quota that shrank stay until they end.
    pub fn quota(&self, capacity: usize, backends: usize) -> usize {
        match self.max_per_backend {
            Some(q) => q as usize,
            None => capacity.div_ceil(backends.max(1)).saturating_mul(2).max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_quota_is_twice_an_even_share() {
        let l = AffinityLimits::default();
        assert_eq!(l.quota(1 << 20, 8), 262_144);
        assert_eq!(l.quota(10, 3), 8, "rounded up before doubling");
        assert_eq!(l.quota(100, 0), 200, "no backends: one share");
        let fixed = AffinityLimits {
            max_per_backend: Some(5),
            ..l
        };
        assert_eq!(fixed.quota(1 << 20, 8), 5);
        assert_eq!(l.min_prefix.of(Family::V4), 16);
        assert_eq!(l.min_prefix.of(Family::V6), 48);
        assert_eq!(l.overlap, OverlapPolicy::Refuse);
    }
}
