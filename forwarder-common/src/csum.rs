//! Incremental Internet checksum update (RFC 1624, eqn. 3): HC' = ~(~HC + ~m + m').
//!
//! All values are 16-bit words loaded in native order straight from packet
//! memory; the one's-complement sum does not depend on byte order as long as
//! every word is loaded the same way.

#[inline(always)]
const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Checksum after one 16-bit word of the covered data changed from `from` to `to`.
#[inline(always)]
pub const fn replace2(check: u16, from: u16, to: u16) -> u16 {
    !fold(!check as u32 + !from as u32 + to as u32)
}

/// Checksum after a 32-bit value of the covered data changed from `from` to `to`.
#[inline(always)]
pub const fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let sum = !check as u32
        + !(from as u16) as u32
        + !((from >> 16) as u16) as u32
        + (to as u16) as u32
        + ((to >> 16) as u16) as u32;
    !fold(sum)
}

/// Like the functions above, for a UDP checksum: 0 means "no checksum" and
/// stays 0; a computed 0 is sent as 0xffff (RFC 768).
#[inline(always)]
pub const fn udp_fixup(old: u16, new: u16) -> u16 {
    if old == 0 {
        0
    } else if new == 0 {
        0xffff
    } else {
        new
    }
}

/// From-scratch checksum of `data` (for tests and packet builders).
pub fn compute(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        sum += u16::from_be_bytes([*last, 0]) as u32;
    }
    // Values up to 64 KiB cannot overflow u32 before folding twice.
    !fold(fold(sum) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(b: [u8; 2]) -> u16 {
        u16::from_ne_bytes(b)
    }

    #[test]
    fn replace_matches_recompute() {
        // An IPv4 header with its checksum, then the destination changed.
        let mut hdr = [
            0x45, 0, 0, 0x3c, 0x1c, 0x46, 0x40, 0, 0x40, 0x06, 0, 0, 0xac, 0x10, 0x0a, 0x63, 0xac,
            0x10, 0x0a, 0x0c,
        ];
        let c = compute(&hdr, 0);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        let from = u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
        let to = u32::from_ne_bytes([10, 244, 1, 7]);
        let updated = replace4(word([hdr[10], hdr[11]]), from, to);
        hdr[16..20].copy_from_slice(&[10, 244, 1, 7]);
        hdr[10..12].copy_from_slice(&updated.to_ne_bytes());
        assert_eq!(compute(&hdr, 0), 0, "checksum over header incl. field must verify");

        let from = word([hdr[2], hdr[3]]);
        let to = word([0x01, 0x00]);
        let updated = replace2(word([hdr[10], hdr[11]]), from, to);
        hdr[2..4].copy_from_slice(&[0x01, 0x00]);
        hdr[10..12].copy_from_slice(&updated.to_ne_bytes());
        assert_eq!(compute(&hdr, 0), 0);
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_fixup(0, 0x1234), 0);
        assert_eq!(udp_fixup(0x10, 0), 0xffff);
        assert_eq!(udp_fixup(0x10, 0x20), 0x20);
    }
}
