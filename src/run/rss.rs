//! Receive-side scaling in software, as a NIC does it: the Toeplitz hash of
//! a packet's addresses and ports under Microsoft's 40-byte key (ixgbe's
//! and igb's default; i40e, mlx5 and ice load others), and a 128-entry
//! redirection table that spreads the hash's low
//! bits over the queues round robin (DPDK's default table). The built-in
//! traffic source uses it to put each flow on the receive queue a NIC
//! would, so every packet of a flow reaches the same worker.

use crate::types::{Family, FlowKey};

/// The default RSS key of Microsoft's RSS specification, which ixgbe's and
/// igb's drivers load when the application gives none.
pub const DEFAULT_KEY: [u8; 40] = [
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
    0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
    0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
];

/// Entries of the redirection table.
pub const RETA_SIZE: usize = 128;

/// The Toeplitz hash of `input` under `key`: for every set bit of the
/// input, the 32 key bits starting at that bit's position are XORed into
/// the result. Inputs up to 36 bytes (an IPv6 address pair and two ports)
/// fit a 40-byte key.
pub fn toeplitz(key: &[u8; 40], input: &[u8]) -> u32 {
    let mut result = 0u32;
    let mut window = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
    let mut next = 32; // index of the key bit that enters the window next
    for &byte in input {
        for bit in (0..8).rev() {
            if (byte >> bit) & 1 == 1 {
                result ^= window;
            }
            let incoming = key.get(next / 8).map_or(0, |k| (k >> (7 - next % 8)) & 1);
            window = window << 1 | u32::from(incoming);
            next += 1;
        }
    }
    result
}

/// The RSS hash of a TCP or UDP flow as a NIC computes it: source address,
/// destination address, source port, destination port, in network order.
pub fn flow_rss_hash(key: &FlowKey) -> u32 {
    let mut input = [0u8; 36];
    let n = match key.family {
        Family::V4 => {
            input[0..4].copy_from_slice(&(key.src as u32).to_be_bytes());
            input[4..8].copy_from_slice(&(key.dst as u32).to_be_bytes());
            8
        }
        Family::V6 => {
            input[0..16].copy_from_slice(&key.src.to_be_bytes());
            input[16..32].copy_from_slice(&key.dst.to_be_bytes());
            32
        }
    };
    input[n..n + 2].copy_from_slice(&key.sport.to_be_bytes());
    input[n + 2..n + 4].copy_from_slice(&key.dport.to_be_bytes());
    toeplitz(&DEFAULT_KEY, &input[..n + 4])
}

/// The receive queue, of `queues`, that a NIC with the default key and
/// redirection table gives `key`'s flow.
pub fn queue_of(key: &FlowKey, queues: usize) -> usize {
    if queues <= 1 {
        return 0;
    }
    (flow_rss_hash(key) as usize % RETA_SIZE) % queues
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::PROTO_TCP;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(src: &str, sport: u16, dst: &str, dport: u16) -> FlowKey {
        FlowKey {
            src: u32::from(src.parse::<Ipv4Addr>().unwrap()).into(),
            dst: u32::from(dst.parse::<Ipv4Addr>().unwrap()).into(),
            sport,
            dport,
            proto: PROTO_TCP,
            family: Family::V4,
        }
    }

    fn v6(src: &str, sport: u16, dst: &str, dport: u16) -> FlowKey {
        FlowKey {
            src: u128::from(src.parse::<Ipv6Addr>().unwrap()),
            dst: u128::from(dst.parse::<Ipv6Addr>().unwrap()),
            sport,
            dport,
            proto: PROTO_TCP,
            family: Family::V6,
        }
    }

    /// The verification suite of Microsoft's RSS specification (IPv4 and
    /// IPv6 with TCP ports).
    #[test]
    fn matches_the_specification() {
        for (key, want) in [
            (
                v4("66.9.149.187", 2794, "161.142.100.80", 1766),
                0x51cc_c178,
            ),
            (v4("199.92.111.2", 14230, "65.69.140.83", 4739), 0xc626_b0ea),
            (
                v4("24.19.198.95", 12898, "12.22.207.184", 38024),
                0x5c2b_394a,
            ),
            (
                v4("38.27.205.30", 48228, "209.142.163.6", 2217),
                0xafc7_327f,
            ),
            (
                v4("153.39.163.191", 44251, "202.188.127.2", 1303),
                0x10e8_28a2,
            ),
            (
                v6("3ffe:2501:200:1fff::7", 2794, "3ffe:2501:200:3::1", 1766),
                0x4020_7d3d,
            ),
            (
                v6("3ffe:501:8::260:97ff:fe40:efab", 14230, "ff02::1", 4739),
                0xdde5_1bbf,
            ),
            (
                v6(
                    "3ffe:1900:4545:3:200:f8ff:fe21:67cf",
                    44251,
                    "fe80::200:f8ff:fe21:67cf",
                    38024,
                ),
                0x02d1_feef,
            ),
        ] {
            assert_eq!(flow_rss_hash(&key), want, "{key:?}");
        }
    }

    #[test]
    fn queues_are_stable_and_all_used() {
        for queues in [1, 2, 3, 4] {
            let mut used = vec![0u32; queues];
            for port in 1024..5024u16 {
                let k = v4("198.18.0.7", port, "192.0.2.10", 80);
                let q = queue_of(&k, queues);
                assert_eq!(q, queue_of(&k, queues));
                used[q] += 1;
            }
            // 4000 flows: each queue gets a fair share (loose bounds).
            for n in &used {
                assert!(*n as usize > 4000 / queues / 2, "{queues} queues: {used:?}");
            }
        }
    }
}
