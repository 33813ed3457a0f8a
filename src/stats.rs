//! Counters: why packets were dropped, and what each worker did.

/// Why a packet was dropped. Every drop on the data path is one of these.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum DropReason {
    /// Truncated or inconsistent headers.
    Malformed = 0,
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    NotIp,
    /// An IP fragment: L4 ports are not available.
    Fragment,
    /// IP but neither TCP nor UDP.
    UnsupportedL4,
    /// Not addressed to a configured service.
    NoService,
    /// The service has no backend that can take the packet.
    NoBackend,
    /// No headroom (or room) to build the output packet.
    NoRoom,
    /// The transmit queue was full.
    TxFull,
}

impl DropReason {
    pub const COUNT: usize = 8;
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::Malformed,
        DropReason::NotIp,
        DropReason::Fragment,
        DropReason::UnsupportedL4,
        DropReason::NoService,
        DropReason::NoBackend,
        DropReason::NoRoom,
        DropReason::TxFull,
    ];

    /// The label used in summaries and metrics.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NotIp => "not_ip",
            DropReason::Fragment => "fragment",
            DropReason::UnsupportedL4 => "unsupported_l4",
            DropReason::NoService => "no_service",
            DropReason::NoBackend => "no_backend",
            DropReason::NoRoom => "no_room",
            DropReason::TxFull => "tx_full",
        }
    }
}
