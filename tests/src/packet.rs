//! Builds Ethernet/IPv4/TCP|UDP|SCTP frames with correct checksums, and
//! checks the checksums of frames from scratch.
use std::net::Ipv4Addr;

use forwarder_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP, crc32c, csum};

#[derive(Clone, Debug)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub payload: Vec<u8>,
    /// Raw IPv4 options, a multiple of 4 bytes.
    pub ip_options: Vec<u8>,
    /// The IPv4 flags+fragment-offset field.
    pub frag: u16,
    /// The IPv4 identification field.
    pub ip_id: u16,
    /// Send UDP without a checksum (0).
    pub no_udp_checksum: bool,
    /// TCP flags; PSH|ACK unless set.
    pub tcp_flags: u8,
    /// The SCTP chunk carrying the payload; DATA unless set.
    pub sctp_chunk: u8,
    /// Leave the SCTP CRC to the device: the field stays 0.
    pub no_sctp_crc: bool,
}

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

pub const SCTP_INIT: u8 = 1;
pub const SCTP_ABORT: u8 = 6;

pub const MF: u16 = 0x2000;

impl Packet {
    fn new(proto: u8, src: &str, dst: &str) -> Self {
        let (src, sport) = split(src);
        let (dst, dport) = split(dst);
        Self {
            src,
            dst,
            sport,
            dport,
            proto,
            payload: b"hello".to_vec(),
            ip_options: Vec::new(),
            frag: 0,
            ip_id: 0x1234,
            no_udp_checksum: false,
            tcp_flags: 0x18,
            sctp_chunk: 0,
            no_sctp_crc: false,
        }
    }

    /// `Packet::tcp("192.168.1.2:40000", "10.96.0.10:80")`
    pub fn tcp(src: &str, dst: &str) -> Self {
        Self::new(PROTO_TCP, src, dst)
    }

    pub fn udp(src: &str, dst: &str) -> Self {
        Self::new(PROTO_UDP, src, dst)
    }

    pub fn sctp(src: &str, dst: &str) -> Self {
        Self::new(PROTO_SCTP, src, dst)
    }

    /// The same packet with other endpoints, e.g. the expected rewrite.
    pub fn with_dst(&self, dst: &str) -> Self {
        let (dst, dport) = split(dst);
        Self { dst, dport, ..self.clone() }
    }

    pub fn with_src(&self, src: &str) -> Self {
        let (src, sport) = split(src);
        Self { src, sport, ..self.clone() }
    }

    /// A reply: addresses and ports swapped.
    pub fn reversed(&self) -> Self {
        Self { src: self.dst, dst: self.src, sport: self.dport, dport: self.sport, ..self.clone() }
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.frame(&self.l4_bytes())
    }

    /// The datagram cut into fragments of `size` bytes of L4 data (a
    /// multiple of 8), as a sender's IP layer cuts it: the L4 header and
    /// its checksum over the whole datagram in the first.
    pub fn fragments(&self, size: usize) -> Vec<Vec<u8>> {
        assert!(size.is_multiple_of(8) && size >= 8, "fragment data is counted in 8-byte units");
        let l4 = self.l4_bytes();
        let pieces: Vec<&[u8]> = l4.chunks(size).collect();
        let last = pieces.len() - 1;
        pieces
            .iter()
            .enumerate()
            .map(|(i, piece)| {
                let more = if i < last { MF } else { 0 };
                let fragment = Self { frag: more | ((i * size / 8) as u16), ..self.clone() };
                fragment.frame(piece)
            })
            .collect()
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        match self.proto {
            PROTO_SCTP => self.sctp_body(&mut l4),
            PROTO_TCP => {
                l4.extend_from_slice(&1u32.to_be_bytes()); // seq
                l4.extend_from_slice(&0u32.to_be_bytes()); // ack
                l4.extend_from_slice(&[0x50, self.tcp_flags, 0xff, 0xff, 0, 0, 0, 0]); // doff=5
                self.internet_checksum(&mut l4);
            }
            _ => {
                l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
                self.internet_checksum(&mut l4);
            }
        }
        l4
    }

    /// Verification tag, CRC, then one chunk around the payload (an INIT's
    /// payload starts with its initiate tag).
    fn sctp_body(&self, l4: &mut Vec<u8>) {
        let vtag: u32 = if self.sctp_chunk == SCTP_INIT { 0 } else { 0x0102_0304 };
        l4.extend_from_slice(&vtag.to_be_bytes());
        l4.extend_from_slice(&[0; 4]);
        l4.extend_from_slice(&[self.sctp_chunk, 0]);
        l4.extend_from_slice(&((4 + self.payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&self.payload);
        l4.resize(l4.len().next_multiple_of(4), 0);
        if !self.no_sctp_crc {
            let crc = crc32c::sctp(l4);
            l4[8..12].copy_from_slice(&crc.to_le_bytes());
        }
    }

    /// Appends the payload and fills in the TCP/UDP checksum.
    fn internet_checksum(&self, l4: &mut Vec<u8>) {
        l4.extend_from_slice(&self.payload);
        let check_at = if self.proto == PROTO_TCP { 16 } else { 6 };
        if !(self.proto == PROTO_UDP && self.no_udp_checksum) {
            let mut c = csum::compute(l4, pseudo_sum(self.src, self.dst, self.proto, l4.len()));
            if c == 0 && self.proto == PROTO_UDP {
                c = 0xffff;
            }
            l4[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
        }
    }

    fn frame(&self, l4: &[u8]) -> Vec<u8> {
        let ihl = 20 + self.ip_options.len();
        let mut ip = vec![0x40 | (ihl / 4) as u8, 0];
        ip.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&self.ip_id.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.extend_from_slice(&[64, self.proto, 0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.ip_options);
        let c = csum::compute(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());

        let mut frame = ethernet(0x0800);
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(l4);
        frame
    }
}

fn split(s: &str) -> (Ipv4Addr, u16) {
    let (addr, port) = s.split_once(':').expect("address:port");
    (addr.parse().expect("IPv4 address"), port.parse().expect("port"))
}

/// Ethernet header with fixed MACs and the given EtherType.
pub fn ethernet(ether_type: u16) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame
}

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let words = |a: Ipv4Addr| {
        let o = a.octets();
        u32::from(u16::from_be_bytes([o[0], o[1]])) + u32::from(u16::from_be_bytes([o[2], o[3]]))
    };
    words(src) + words(dst) + u32::from(proto) + len as u32
}

/// Verifies the IPv4 header checksum and the TCP/UDP/ICMP checksum or SCTP
/// CRC of `frame` from scratch (a UDP checksum of 0 means none, an SCTP CRC
/// of 0 one left to the device).
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if csum::compute(&ip[..ihl], 0) != 0 {
        return Err("IPv4 header checksum is wrong".into());
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let (proto, l4) = (ip[9], &ip[ihl..total]);
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    if proto == PROTO_UDP && l4[6..8] == [0, 0] {
        return Ok(());
    }
    if proto == PROTO_SCTP {
        let field = u32::from_le_bytes([l4[8], l4[9], l4[10], l4[11]]);
        return match field == 0 || field == crc32c::sctp(l4) {
            true => Ok(()),
            false => Err("SCTP CRC32c is wrong".into()),
        };
    }
    if proto == 1 {
        // ICMP: no pseudo-header.
        return match csum::compute(l4, 0) {
            0 => Ok(()),
            _ => Err("ICMP checksum is wrong".into()),
        };
    }
    if csum::compute(l4, pseudo_sum(src, dst, proto, l4.len())) != 0 {
        return Err(format!("L4 checksum (proto {proto}) is wrong"));
    }
    Ok(())
}

/// The ICMP port unreachable answer to `frame` (an Ethernet/IPv4 frame
/// without IP options), as forwarder builds it: MACs swapped, from the
/// address the client targeted, quoting the IPv4 and TCP/UDP headers (SCTP:
/// up to the INIT chunk's initiate tag).
pub fn port_unreachable(frame: &[u8]) -> Vec<u8> {
    let ip = &frame[14..];
    let quoted_l4 = match ip[9] {
        PROTO_TCP => 20,
        PROTO_SCTP => 20,
        _ => 8,
    };
    let mut quote = ip[..20 + quoted_l4].to_vec();
    if ip[9] != PROTO_SCTP {
        // The quoted L4 checksum field holds F with F = ~(S + F): completing
        // a partial checksum over the quote leaves it unchanged.
        let field = 20 + if ip[9] == PROTO_TCP { 16 } else { 6 };
        quote[field..field + 2].copy_from_slice(&[0, 0]);
        let others = !csum::compute(&quote[20..], 0);
        let fixed = ((u32::from(!others) * 0x8000) % 0xffff) as u16;
        quote[field..field + 2].copy_from_slice(&fixed.to_be_bytes());
        let completed = csum::compute(&quote[20..], 0);
        assert_eq!(completed, fixed, "completion would rewrite the quoted field");
    }
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quote);
    let c = csum::compute(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut header = vec![0x45, 0];
    header.extend_from_slice(&total.to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    header.extend_from_slice(&ip[16..20]);
    header.extend_from_slice(&ip[12..16]);
    let c = csum::compute(&header, 0);
    header[10..12].copy_from_slice(&c.to_be_bytes());
    let mut out = frame[6..12].to_vec();
    out.extend_from_slice(&frame[0..6]);
    out.extend_from_slice(&[0x08, 0x00]);
    out.extend_from_slice(&header);
    out.extend_from_slice(&icmp);
    out
}

/// An ICMP error (`kind`, `code`, the 4 bytes after the checksum) from
/// `from` to `to` about `about` (an Ethernet/IPv4 frame), quoting its IPv4
/// header and at most `quoted_l4` bytes after it (RFC 792 asks for 8;
/// Linux quotes as much as fits in 576 bytes). Every checksum from scratch.
pub fn icmp_error(
    (kind, code, rest): (u8, u8, [u8; 4]),
    from: &str,
    to: &str,
    about: &[u8],
    quoted_l4: usize,
) -> Vec<u8> {
    let ip = &about[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(&ip[..total.min(ihl + quoted_l4)]);
    let c = csum::compute(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let (from, to): (Ipv4Addr, Ipv4Addr) = (from.parse().unwrap(), to.parse().unwrap());
    let mut header = vec![0x45, 0];
    header.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    header.extend_from_slice(&from.octets());
    header.extend_from_slice(&to.octets());
    let c = csum::compute(&header, 0);
    header[10..12].copy_from_slice(&c.to_be_bytes());
    let mut frame = ethernet(0x0800);
    frame.extend_from_slice(&header);
    frame.extend_from_slice(&icmp);
    frame
}

/// From-scratch check of an ICMP error's quoted IPv4 header checksum.
pub fn verify_quoted_ip_checksum(frame: &[u8]) -> Result<(), String> {
    let quote = &frame[14 + 20 + 8..];
    let ihl = usize::from(quote[0] & 0x0f) * 4;
    match csum::compute(&quote[..ihl], 0) {
        0 => Ok(()),
        _ => Err("quoted IPv4 header checksum is wrong".into()),
    }
}
