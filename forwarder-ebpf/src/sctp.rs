//! SCTP's checksum after a port rewrite. SCTP has no Internet checksum: a
//! CRC32c covers its whole packet (and no pseudo-header, so addresses are
//! free to change). The CRC is updated for the port change alone, in time
//! independent of the packet's length.
use forwarder_common::crc32c;

/// The checksum field (little-endian bytes as a `u32`) after the first 4
/// bytes of an SCTP packet of `len` bytes change from `from` to `to`.
///
/// A zero field is a CRC not computed yet: the sender left it to the
/// device (CHECKSUM_PARTIAL), which computes it over the rewritten packet,
/// so it must stay zero. A computed CRC that happens to be zero (one packet
/// in 2^32) is left wrong; the receiver drops it and SCTP retransmits.
/// Not inlined: one copy of the arithmetic per program.
#[inline(never)]
pub fn crc_after_port_change(crc: u32, from: u32, to: u32, len: u32) -> u32 {
    if crc == 0 {
        return 0;
    }
    crc ^ crc32c::port_change(from.to_le_bytes(), to.to_le_bytes(), len as u16)
}

/// The 4 port bytes of a packet as `crc_after_port_change` takes them.
#[inline(always)]
pub fn ports(sport: u16, dport: u16) -> u32 {
    let (s, d) = (sport.to_ne_bytes(), dport.to_ne_bytes());
    u32::from_le_bytes([s[0], s[1], d[0], d[1]])
}
