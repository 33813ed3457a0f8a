//! Errors of the DPDK layer.

use std::fmt;

/// Why a DPDK operation failed. Cheap to build (no allocation) for the
/// failures that can happen per packet: [`DpdkError::PoolEmpty`] and
/// [`DpdkError::FrameTooLong`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DpdkError {
    /// A DPDK call failed; `errno` is the positive error number
    /// (`rte_errno` or the negated return value).
    Call { op: &'static str, errno: i32 },
    /// EAL is not initialised, or was cleaned up.
    NotInitialized,
    /// `Eal::init` was called again with other arguments, or after cleanup.
    AlreadyInitialized,
    /// `Eal::cleanup` refused: this many mempools, ports or registered
    /// threads still use EAL memory.
    Busy { live: usize },
    /// No DPDK port answers to this device name.
    NoSuchDevice(String),
    /// The queue of this port is already owned by a worker.
    QueueInUse { port: u16, queue: u16 },
    /// The mempool has no free mbuf.
    PoolEmpty,
    /// A frame does not fit into one mbuf.
    FrameTooLong { len: usize, room: usize },
    /// An argument was rejected before calling DPDK.
    InvalidArgument(String),
}

impl DpdkError {
    /// A failed call, reading `rte_errno` of this thread.
    #[cfg(feature = "dpdk")]
    pub(crate) fn last(op: &'static str) -> DpdkError {
        DpdkError::Call {
            op,
            errno: super::sys::errno(),
        }
    }

    /// A failed call that returned `-errno`.
    #[cfg_attr(not(feature = "dpdk"), allow(dead_code))]
    pub(crate) fn ret(op: &'static str, ret: i32) -> DpdkError {
        DpdkError::Call {
            op,
            errno: ret.saturating_neg(),
        }
    }
}

impl fmt::Display for DpdkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DpdkError::Call { op, errno } => {
                write!(f, "{op} failed: {} (errno {errno})", errno_text(*errno))
            }
            DpdkError::NotInitialized => write!(f, "DPDK EAL is not initialised"),
            DpdkError::AlreadyInitialized => write!(
                f,
                "DPDK EAL can be initialised only once per process (with one argument list)"
            ),
            DpdkError::Busy { live } => write!(
                f,
                "EAL cleanup refused: {live} mempools, ports or worker threads still use it"
            ),
            DpdkError::NoSuchDevice(d) => write!(f, "no DPDK port for device {d:?}"),
            DpdkError::QueueInUse { port, queue } => {
                write!(f, "queue {queue} of port {port} is already in use")
            }
            DpdkError::PoolEmpty => write!(f, "mempool has no free mbuf"),
            DpdkError::FrameTooLong { len, room } => {
                write!(
                    f,
                    "frame of {len} bytes does not fit in {room} bytes of mbuf"
                )
            }
            DpdkError::InvalidArgument(s) => write!(f, "invalid argument: {s}"),
        }
    }
}

impl std::error::Error for DpdkError {}

/// The text of an error number: DPDK's own codes through `rte_strerror`,
/// the rest as the OS describes them.
fn errno_text(errno: i32) -> String {
    #[cfg(feature = "dpdk")]
    {
        super::sys::strerror(errno)
    }
    #[cfg(not(feature = "dpdk"))]
    {
        std::io::Error::from_raw_os_error(errno).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_error_names_op_and_errno() {
        let e = DpdkError::ret("rte_eth_dev_configure", -22);
        assert_eq!(
            e,
            DpdkError::Call {
                op: "rte_eth_dev_configure",
                errno: 22
            }
        );
        let s = e.to_string();
        assert!(s.contains("rte_eth_dev_configure"), "{s}");
        assert!(s.contains("errno 22"), "{s}");
        assert!(s.to_lowercase().contains("invalid"), "{s}");
    }

    #[test]
    fn ret_of_min_int_does_not_overflow() {
        assert_eq!(
            DpdkError::ret("x", i32::MIN),
            DpdkError::Call {
                op: "x",
                errno: i32::MAX
            }
        );
    }
}
