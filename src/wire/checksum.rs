//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! Sums are kept unfolded in a `u64` so that several pieces (pseudo header,
//! header, payload) can be added before one final fold.

/// Adds `data` to a running one's-complement sum. Words are big-endian; an odd
/// trailing byte is padded with zero, as RFC 1071 specifies. Only the last
/// piece of a checksummed sequence may have odd length.
#[inline]
pub fn sum(mut acc: u64, data: &[u8]) -> u64 {
    // Summing 32-bit words into a 64-bit accumulator and folding later gives
    // the same one's-complement result as 16-bit words, with half the adds.
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as u64;
    }
    let rest = chunks.remainder();
    let mut i = 0;
    if rest.len() >= 2 {
        acc += u16::from_be_bytes([rest[0], rest[1]]) as u64;
        i = 2;
    }
    if i < rest.len() {
        acc += (rest[i] as u64) << 8;
    }
    acc
}

/// Folds a running sum to 16 bits (end-around carry), not complemented.
#[inline]
pub fn fold(mut acc: u64) -> u16 {
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc as u16
}

/// The checksum to store for `data`: the complement of its folded sum.
/// Verifying a header that includes its checksum field yields 0.
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(0, data))
}

/// The unfolded sum of the IPv4 pseudo header for an upper-layer packet of
/// `len` bytes with protocol `proto`.
#[inline]
pub fn pseudo_v4(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u64 {
    u32::from_be_bytes(src) as u64 + u32::from_be_bytes(dst) as u64 + proto as u64 + len as u64
}

/// The unfolded sum of the IPv6 pseudo header (RFC 8200 section 8.1).
#[inline]
pub fn pseudo_v6(src: &[u8; 16], dst: &[u8; 16], next_header: u8, len: u32) -> u64 {
    let acc = sum(sum(0, src), dst);
    acc + (len >> 16) as u64 + (len & 0xffff) as u64 + next_header as u64
}

/// Updates a stored checksum `hc` after a 16-bit field changed from `old` to
/// `new` (RFC 1624, equation 3: `HC' = ~(~HC + ~m + m')`).
#[inline]
pub fn update16(hc: u16, old: u16, new: u16) -> u16 {
    let acc = (!hc) as u64 + (!old) as u64 + new as u64;
    !fold(acc)
}

/// Updates a stored checksum after a 32-bit field (an IPv4 address, a TCP
/// sequence number) changed from `old` to `new`.
#[inline]
pub fn update32(hc: u16, old: u32, new: u32) -> u16 {
    let acc = (!hc) as u64
        + (!(old >> 16) & 0xffff) as u64
        + (!old & 0xffff) as u64
        + (new >> 16) as u64
        + (new & 0xffff) as u64;
    !fold(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The textbook 16-bit-at-a-time algorithm, to check the wide one against.
    fn reference(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                (c[0] as u16) << 8
            };
            s += w as u32;
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(0, &data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn known_ipv4_header() {
        // A classic example header (Wikipedia "IPv4 header checksum").
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
        h[10] = 0xb8;
        h[11] = 0x61;
        assert_eq!(checksum(&h), 0);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(
            checksum(&[0x12, 0x34, 0x56]),
            reference(&[0x12, 0x34, 0x56])
        );
        assert_eq!(checksum(&[0x12, 0x34, 0x56]), !(0x1234u16 + 0x5600));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn wide_sum_matches_reference(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            prop_assert_eq!(checksum(&data), reference(&data));
        }

        #[test]
        fn incremental_matches_recompute(
            mut data in proptest::collection::vec(any::<u8>(), 8..64),
            at in 0usize..3,
            new16 in any::<u16>(),
            new32 in any::<u32>(),
        ) {
            let at = at * 2;
            let hc = checksum(&data);
            let old16 = u16::from_be_bytes([data[at], data[at + 1]]);
            data[at..at + 2].copy_from_slice(&new16.to_be_bytes());
            let hc16 = update16(hc, old16, new16);
            // Incremental and full results may differ only in the sign of
            // zero (0x0000 vs 0xffff), which both verify.
            prop_assert_eq!(fold(sum(hc16 as u64, &data)), 0xffff);

            let old32 = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
            data[4..8].copy_from_slice(&new32.to_be_bytes());
            let hc32 = update32(hc16, old32, new32);
            prop_assert_eq!(fold(sum(hc32 as u64, &data)), 0xffff);
        }
    }
}
