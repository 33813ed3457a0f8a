//! What the control thread counts: the server's datagrams, refusals and
//! replies ([`ServerCounters`]), the plane's ended affinities and snapshots
//! ([`PlaneCounters`]), and the two together as the summary shows them
//! ([`control_summary`]).

use crate::protocol::message::ReturnCode;
use crate::protocol::rate_limit::RateLimiter;
use crate::report::summary::{ControlSummary, EndedSummary};

/// Why datagrams were refused, one counter per reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefusalCounters {
    /// Larger than the protocol's largest datagram. No reply.
    pub oversize: u64,
    /// Source outside the allowed networks. No reply.
    pub foreign_source: u64,
    /// Not a well-formed header (magic, flags, name, length). No reply.
    pub malformed: u64,
    /// Another protocol version. No reply.
    pub bad_version: u64,
    /// A REPLY or AFFINITY_ENDED sent to the server. No reply.
    pub unexpected_type: u64,
    /// Sender name without a key. No reply (it could not be signed).
    pub unknown_sender: u64,
    /// HMAC does not verify. No reply.
    pub bad_hmac: u64,
    /// Timestamp outside the allowed clock skew. No reply.
    pub stale_timestamp: u64,
    /// (sender, nonce) already seen. No reply.
    pub replay: u64,
    /// Stamped at or before its sender's floor (raised as the full replay
    /// memory forgot that sender's pairs). No reply.
    pub replay_forgotten: u64,
    /// Authentic, but the body does not decode. Reply INVALID.
    pub invalid_body: u64,
    /// Authentic, but a type this server does not know. Reply UNSUPPORTED.
    pub unsupported_type: u64,
    /// A backend naming another backend as owner. Reply NOT_AUTHORIZED.
    pub owner_mismatch: u64,
    /// Authentic, but beyond its sender's requests per second. Reply
    /// RATE_LIMITED.
    pub rate_limited: u64,
}

impl RefusalCounters {
    /// (name, count) for every reason, in a fixed order.
    pub fn as_array(&self) -> [(&'static str, u64); 14] {
        [
            ("oversize", self.oversize),
            ("foreign_source", self.foreign_source),
            ("malformed", self.malformed),
            ("bad_version", self.bad_version),
            ("unexpected_type", self.unexpected_type),
            ("unknown_sender", self.unknown_sender),
            ("bad_hmac", self.bad_hmac),
            ("stale_timestamp", self.stale_timestamp),
            ("replay", self.replay),
            ("replay_forgotten", self.replay_forgotten),
            ("invalid_body", self.invalid_body),
            ("unsupported_type", self.unsupported_type),
            ("owner_mismatch", self.owner_mismatch),
            ("rate_limited", self.rate_limited),
        ]
    }

    pub fn total(&self) -> u64 {
        self.as_array().iter().map(|(_, n)| n).sum()
    }
}

/// Everything the server counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerCounters {
    /// Datagrams received (accepted or not).
    pub received: u64,
    /// Requests passed to the handler.
    pub dispatched: u64,
    /// The handler's answers, by return code (indexed by the code).
    pub handler_codes: [u64; ReturnCode::ALL.len()],
    /// Stats chunks served from a snapshot without the handler.
    pub stats_chunks: u64,
    pub replies_sent: u64,
    pub notices_sent: u64,
    /// Replies or notices the socket refused (buffer full, unreachable...).
    pub send_errors: u64,
    pub recv_errors: u64,
    pub refused: RefusalCounters,
}

impl ServerCounters {
    /// Counts one of the handler's answers under its code; a code outside
    /// [`ReturnCode::ALL`] (`Unknown`, which the server never sends) is not
    /// counted.
    pub fn count_answer(&mut self, code: ReturnCode) {
        if let Some(n) = self.handler_codes.get_mut(code as usize) {
            *n += 1;
        }
    }
}

/// What the control plane did to affinities and snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlaneCounters {
    pub ended_expired: u64,
    pub ended_cancelled: u64,
    pub ended_backend_removed: u64,
    /// Requested affinities ended because their owner stayed down past
    /// its service's `affinity_grace`.
    pub ended_backend_down: u64,
    /// Dataplane snapshots published after the first.
    pub snapshots: u64,
    /// Backends' creates refused by their service's limits.
    pub limited: LimitCounters,
}

/// Backends' creates a service's limits refused, one counter per limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitCounters {
    /// A prefix shorter than `min_prefix`. Reply INVALID.
    pub min_prefix: u64,
    /// The owner at its `max_affinities_per_backend`. Reply QUOTA_EXCEEDED.
    pub quota: u64,
    /// Clients another backend's affinity covers. Reply CONFLICT.
    pub overlap: u64,
}

impl LimitCounters {
    /// (name, count) for every limit, in a fixed order.
    pub fn as_array(&self) -> [(&'static str, u64); 3] {
        [
            ("min_prefix", self.min_prefix),
            ("quota", self.quota),
            ("overlap", self.overlap),
        ]
    }
}

/// The control thread's part of the summary.
pub fn control_summary(
    server: &ServerCounters,
    rates: &RateLimiter,
    plane: &PlaneCounters,
) -> ControlSummary {
    ControlSummary {
        answered: server.replies_sent,
        by_code: ReturnCode::ALL
            .iter()
            .map(|rc| (rc.name().to_string(), server.handler_codes[*rc as usize]))
            .collect(),
        ended: EndedSummary {
            backend_down: plane.ended_backend_down,
            backend_removed: plane.ended_backend_removed,
            cancelled: plane.ended_cancelled,
            expired: plane.ended_expired,
        },
        handled: server.dispatched,
        notifications: server.notices_sent,
        received: server.received,
        refused: server
            .refused
            .as_array()
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        send_errors: server.send_errors,
        snapshots: plane.snapshots,
        limited: plane
            .limited
            .as_array()
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        rate_limited: rates
            .refused()
            .map(|(name, n)| (name.to_string(), n))
            .collect(),
        // The state file's writer fills these in when there is one.
        state_file_writes: 0,
        state_file_write_failures: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_counted_by_code_and_unknown_is_not() {
        let mut c = ServerCounters::default();
        c.count_answer(ReturnCode::Conflict);
        c.count_answer(ReturnCode::Unavailable);
        c.count_answer(ReturnCode::Unknown);
        assert_eq!(c.handler_codes[ReturnCode::Conflict as usize], 1);
        assert_eq!(c.handler_codes[ReturnCode::Unavailable as usize], 1);
        assert_eq!(c.handler_codes.iter().sum::<u64>(), 2);
    }
}
