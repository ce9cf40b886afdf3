//! SCTP's CRC32c (RFC 9260, appendix A) and its update after a port rewrite.
//!
//! The CRC covers the whole SCTP packet, so a NAT that changes a port would
//! have to read every byte again. It does not need to: over messages of one
//! length the CRC is affine, `crc(m ^ d) = crc(m) ^ raw(d)`, with `raw` the
//! CRC register run from zero. When only the 4 port bytes differ, `raw(d)`
//! is those bytes as a polynomial times `x^(8 * len)` modulo the CRC
//! polynomial: a few dozen shifts and xors, whatever the packet length.
//!
//! Values use the CRC's reflected bit order (bit 31 is the `x^0`
//! coefficient); the 4 bytes of the checksum field, read little-endian, are
//! the CRC value.

/// CRC32c (Castagnoli) polynomial, reflected.
const POLY: u32 = 0x82f6_3b78;
/// `x^0`, the multiplicative identity, in reflected order.
const ONE: u32 = 1 << 31;

/// `a * b` modulo the polynomial. Branch-free, so the verifier walks one path.
#[inline(always)]
pub const fn mul(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut i = 0;
    while i < 32 {
        product ^= b & 0u32.wrapping_sub((a >> (31 - i)) & 1);
        b = (b >> 1) ^ (POLY & 0u32.wrapping_sub(b & 1));
        i += 1;
    }
    product
}

/// `BYTE_SHIFTS[k]` = `x^(8 * 2^k)`: enough for any IPv4 packet length.
const BYTE_SHIFTS: [u32; 16] = {
    let mut table = [0; 16];
    table[0] = ONE >> 8;
    let mut k = 1;
    while k < 16 {
        table[k] = mul(table[k - 1], table[k - 1]);
        k += 1;
    }
    table
};

/// `x^(8 * bytes)` by square-and-multiply over the table.
#[inline(always)]
const fn byte_shift(bytes: u16) -> u32 {
    let mut power = ONE;
    let mut k = 0;
    while k < 16 {
        let taken = 0u32.wrapping_sub((bytes as u32 >> k) & 1);
        power = (mul(power, BYTE_SHIFTS[k]) & taken) | (power & !taken);
        k += 1;
    }
    power
}

/// The value to xor into the CRC of an SCTP packet of `len` bytes whose
/// first 4 bytes (source and destination port) change from `from` to `to`,
/// each as the packet's bytes.
#[inline(always)]
pub const fn port_change(from: [u8; 4], to: [u8; 4], len: u16) -> u32 {
    let diff = u32::from_le_bytes(from) ^ u32::from_le_bytes(to);
    if diff == 0 {
        return 0;
    }
    mul(diff, byte_shift(len))
}

/// From-scratch CRC32c of `data`, bit by bit (for tests and packet builders).
pub fn compute(data: &[u8]) -> u32 {
    compute_skipping(data, 0..0)
}

/// The CRC an SCTP packet should carry: computed with the field zeroed.
pub fn sctp(packet: &[u8]) -> u32 {
    compute_skipping(packet, 8..12)
}

/// CRC32c of `data` with the bytes in `zeroed` read as zero.
fn compute_skipping(data: &[u8], zeroed: core::ops::Range<usize>) -> u32 {
    let mut crc = !0u32;
    for (i, byte) in data.iter().enumerate() {
        crc ^= if zeroed.contains(&i) { 0 } else { u32::from(*byte) };
        for _ in 0..8 {
            crc = (crc >> 1) ^ (POLY & 0u32.wrapping_sub(crc & 1));
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_check_value() {
        assert_eq!(compute(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn port_change_matches_recompute_at_every_length() {
        let mut seed = 0x2545_f491_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as u8
        };
        for len in [12usize, 13, 16, 28, 100, 511, 1452, 9000, 65_515] {
            let mut packet: Vec<u8> = (0..len).map(|_| next()).collect();
            let crc = sctp(&packet);
            let from = [packet[0], packet[1], packet[2], packet[3]];
            let to = [next(), next(), next(), next()];
            packet[..4].copy_from_slice(&to);
            let updated = crc ^ port_change(from, to, len as u16);
            assert_eq!(updated, sctp(&packet), "length {len}");
        }
    }

    #[test]
    fn unchanged_ports_leave_the_crc_alone() {
        assert_eq!(port_change([1, 2, 3, 4], [1, 2, 3, 4], 1500), 0);
    }
}
