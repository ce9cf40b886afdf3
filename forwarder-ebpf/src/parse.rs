//! Header parsing shared by XDP and TC: bounds-checked, IHL-aware.
use core::mem::size_of;

use forwarder_common::{PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    sctp::SctpHdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

/// The fields of a TCP/UDP/SCTP over IPv4 packet that NAT reads, in network order.
pub struct Flow {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// First fragment of a fragmented datagram (MF set, offset 0).
    pub first_fragment: bool,
    /// The IPv4 identification field (names the datagram of a fragment).
    pub ip_id: u16,
    /// TCP SYN without ACK, SCTP INIT: a client opening a connection.
    pub opening: bool,
    /// A handshake packet: TCP SYN (with or without ACK), SCTP INIT or
    /// INIT ACK. Anything else of TCP or SCTP means the flow is established.
    pub handshake: bool,
    /// TCP FIN: this side is done sending.
    pub fin: bool,
    /// TCP RST, SCTP ABORT or SHUTDOWN COMPLETE: the connection is gone.
    pub reset: bool,
    /// Offset of the L4 header (from IHL, so IP options are skipped).
    pub l4_off: usize,
    /// Length of the L4 packet (IP total length less the IP header).
    pub l4_len: u16,
}

/// What a TCP or SCTP packet says of its connection's state.
struct State {
    opening: bool,
    handshake: bool,
    fin: bool,
    reset: bool,
}

impl State {
    const NONE: Self = Self { opening: false, handshake: false, fin: false, reset: false };
}

/// A later fragment of a TCP/UDP/SCTP datagram: no ports, only the fields
/// that name its datagram.
pub struct Fragment {
    pub saddr: u32,
    pub daddr: u32,
    pub id: u16,
    pub proto: u8,
}

/// The ports and addresses of a packet quoted in an ICMP error.
pub struct Quote {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// An ICMP error (destination unreachable, time exceeded, parameter
/// problem) quoting a TCP/UDP/SCTP packet.
pub struct IcmpError {
    pub icmp_off: usize,
    /// Offset of the quoted IPv4 header, and of its L4 header.
    pub quote_off: usize,
    pub quote_l4_off: usize,
    pub quote: Quote,
    /// The quote reaches the TCP/UDP checksum field (RFC 792 guarantees
    /// only 8 bytes of L4 header: TCP's checksum may be cut off).
    pub quoted_check: bool,
}

pub enum Parsed {
    Flow(Flow),
    IcmpError(IcmpError),
    /// A fragment after the first (`frag` maps it to its first's translation).
    Fragment(Fragment),
    /// A first fragment too short for its L4 header (RFC 1858's tiny
    /// fragment): no ports to translate it by. Dropped and counted.
    TinyFragment,
    /// Not TCP/UDP/SCTP over IPv4.
    Other,
    /// The headers do not fit in the readable data.
    Truncated,
    /// IPv4 header that the kernel stack will reject anyway.
    Malformed,
}

pub const L3_OFF: usize = EthHdr::LEN;
pub const IP_CHECK_OFF: usize = L3_OFF + 10;
pub const IP_SADDR_OFF: usize = L3_OFF + 12;
pub const IP_DADDR_OFF: usize = L3_OFF + 16;
pub const TCP_CHECK_OFF: usize = 16;
pub const UDP_CHECK_OFF: usize = 6;
pub const SCTP_CHECK_OFF: usize = 8;
/// Chunk types that open and end an SCTP association (RFC 9260, 3.2).
const SCTP_INIT: u8 = 1;
const SCTP_INIT_ACK: u8 = 2;
const SCTP_ABORT: u8 = 6;
const SCTP_SHUTDOWN_COMPLETE: u8 = 14;
/// Largest header span parsing needs: Ethernet, IPv4 with options, then
/// TCP, or ICMP quoting IPv4 with options and TCP.
pub const MAX_HDR_LEN: usize = EthHdr::LEN + 60 + ICMP_HDR_LEN + 60 + TcpHdr::LEN;
const ICMP_HDR_LEN: usize = 8;
/// ICMP types that quote the packet they are about (RFC 792).
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

/// Checked pointer to a `T` at `off` within `[start, end)`.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, off: usize) -> Option<*mut T> {
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Offset of the Internet checksum in a TCP or UDP header.
#[inline(always)]
pub fn l4_check_off(proto: u8) -> usize {
    if proto == PROTO_TCP { TCP_CHECK_OFF } else { UDP_CHECK_OFF }
}

#[inline(always)]
pub fn parse(start: usize, end: usize) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(start, end, 0) else {
        return Parsed::Truncated;
    };
    // SAFETY: bounds checked above; unaligned read of a packet field.
    let ether_type = unsafe { core::ptr::addr_of!((*eth).ether_type).read_unaligned() };
    if ether_type != EtherType::Ipv4 as u16 {
        return Parsed::Other;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(start, end, L3_OFF) else {
        return Parsed::Truncated;
    };
    // SAFETY: bounds checked above; Ipv4Hdr is all byte arrays (align 1).
    let ip = unsafe { &*ip };
    let ihl = usize::from(ip.vihl & 0x0f) << 2;
    let tot_len = usize::from(u16::from_be_bytes(ip.tot_len));
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || tot_len < ihl {
        return Parsed::Malformed;
    }
    let frags = u16::from_be_bytes(ip.frags);
    let proto = ip.proto;
    if proto == PROTO_ICMP {
        // A fragmented error is not worth reassembling: it passes as is.
        if frags & (IP_MF | IP_OFFSET_MASK) != 0 {
            return Parsed::Other;
        }
        return parse_icmp_error(start, end, L3_OFF + ihl, L3_OFF + tot_len);
    }
    if frags & IP_OFFSET_MASK != 0 {
        if !matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
            return Parsed::Other;
        }
        return Parsed::Fragment(Fragment {
            saddr: u32::from_ne_bytes(ip.src_addr),
            daddr: u32::from_ne_bytes(ip.dst_addr),
            id: u16::from_ne_bytes(ip.id),
            proto,
        });
    }
    let l4_off = L3_OFF + ihl;
    let l4_len = match proto {
        PROTO_TCP => TcpHdr::LEN,
        PROTO_UDP => UdpHdr::LEN,
        PROTO_SCTP => SctpHdr::LEN,
        _ => return Parsed::Other,
    };
    // Bytes past the IP total length are link padding, not a header.
    if tot_len < ihl + l4_len {
        // A first fragment cut inside its L4 header is legal IP, and the
        // kernel would reassemble it: it must not pass untranslated.
        if frags & IP_MF != 0 {
            return Parsed::TinyFragment;
        }
        return Parsed::Malformed;
    }
    let (sport, dport, state) = match proto {
        PROTO_TCP => {
            let Some(tcp) = ptr_at::<TcpHdr>(start, end, l4_off) else {
                return Parsed::Truncated;
            };
            // SAFETY: bounds checked above.
            let tcp = unsafe { &*tcp };
            let state = State {
                opening: tcp.syn() != 0 && tcp.ack() == 0,
                handshake: tcp.syn() != 0,
                fin: tcp.fin() != 0,
                reset: tcp.rst() != 0,
            };
            (u16::from_ne_bytes(tcp.source), u16::from_ne_bytes(tcp.dest), state)
        }
        PROTO_UDP => {
            let Some(udp) = ptr_at::<UdpHdr>(start, end, l4_off) else {
                return Parsed::Truncated;
            };
            // SAFETY: bounds checked above.
            let udp = unsafe { &*udp };
            (u16::from_ne_bytes(udp.src), u16::from_ne_bytes(udp.dst), State::NONE)
        }
        PROTO_SCTP => {
            let Some(sctp) = ptr_at::<SctpHdr>(start, end, l4_off) else {
                return Parsed::Truncated;
            };
            // SAFETY: bounds checked above.
            let sctp = unsafe { &*sctp };
            // The first chunk tells the association's state; a packet
            // without one carries nothing to act on.
            let chunk = if tot_len > ihl + SctpHdr::LEN {
                // SAFETY: bounds checked by `ptr_at`.
                ptr_at::<u8>(start, end, l4_off + SctpHdr::LEN).map(|c| unsafe { *c })
            } else {
                None
            };
            let state = State {
                opening: chunk == Some(SCTP_INIT),
                handshake: matches!(chunk, Some(SCTP_INIT | SCTP_INIT_ACK)),
                fin: false,
                reset: matches!(chunk, Some(SCTP_ABORT | SCTP_SHUTDOWN_COMPLETE)),
            };
            (u16::from_ne_bytes(sctp.src), u16::from_ne_bytes(sctp.dst), state)
        }
        _ => return Parsed::Other,
    };
    Parsed::Flow(Flow {
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport,
        dport,
        proto,
        first_fragment: frags & IP_MF != 0,
        ip_id: u16::from_ne_bytes(ip.id),
        opening: state.opening,
        handshake: state.handshake,
        fin: state.fin,
        reset: state.reset,
        l4_off,
        l4_len: (tot_len - ihl) as u16,
    })
}

/// An ICMP error at `icmp_off` of a packet whose IP datagram ends at
/// `ip_end`; anything else of ICMP is `Other`. Only what the quote holds is
/// trusted: an error quoting a later fragment (no ports) is `Other` too.
#[inline(always)]
fn parse_icmp_error(start: usize, end: usize, icmp_off: usize, ip_end: usize) -> Parsed {
    // Type and code: a one-byte check would compile to `ptr >= end`,
    // which the verifier does not take as a bound.
    let Some(kind) = ptr_at::<[u8; 2]>(start, end, icmp_off) else {
        return Parsed::Truncated;
    };
    // SAFETY: bounds checked above.
    let [kind, _code] = unsafe { kind.read_unaligned() };
    if !matches!(kind, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM) {
        return Parsed::Other;
    }
    let quote_off = icmp_off + ICMP_HDR_LEN;
    let Some(inner) = ptr_at::<Ipv4Hdr>(start, end, quote_off) else {
        return Parsed::Truncated;
    };
    // SAFETY: bounds checked above; Ipv4Hdr is all byte arrays (align 1).
    let inner = unsafe { &*inner };
    let ihl = usize::from(inner.vihl & 0x0f) << 2;
    let frags = u16::from_be_bytes(inner.frags);
    if inner.vihl >> 4 != 4
        || ihl < Ipv4Hdr::LEN
        || frags & IP_OFFSET_MASK != 0
        || !matches!(inner.proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP)
    {
        return Parsed::Other;
    }
    let quote_l4_off = quote_off + ihl;
    // Ports, and UDP's checksum, sit in the 8 bytes every quote has.
    if quote_l4_off + 8 > ip_end {
        return Parsed::Other;
    }
    let Some(ports) = ptr_at::<[u16; 2]>(start, end, quote_l4_off) else {
        return Parsed::Truncated;
    };
    // SAFETY: bounds checked above.
    let [sport, dport] = unsafe { ports.read_unaligned() };
    let quoted_check = match inner.proto {
        PROTO_UDP => true,
        PROTO_TCP => quote_l4_off + TCP_CHECK_OFF + 2 <= ip_end,
        _ => false,
    };
    // Quoted but not in the readable data (a non-linear skb): TC pulls it.
    if quoted_check && ptr_at::<u16>(start, end, quote_l4_off + l4_check_off(inner.proto)).is_none()
    {
        return Parsed::Truncated;
    }
    Parsed::IcmpError(IcmpError {
        icmp_off,
        quote_off,
        quote_l4_off,
        quote: Quote {
            saddr: u32::from_ne_bytes(inner.src_addr),
            daddr: u32::from_ne_bytes(inner.dst_addr),
            sport,
            dport,
            proto: inner.proto,
        },
        quoted_check,
    })
}
