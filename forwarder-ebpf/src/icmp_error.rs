//! ICMP errors about translated flows (destination unreachable with
//! "fragmentation needed", time exceeded, parameter problem): the quoted
//! packet is one a program translated on its way, so the error must be
//! translated back for its receiver to match it to a socket, as netfilter
//! does for RELATED packets. Without it, path MTU discovery through a
//! Service black-holes.
//!
//! The quoted packet went the other way than the error: its reverse is a
//! packet the hook would have translated. A hook that rewrites destinations
//! (DNAT, the reversal of masquerading) looks up that reverse packet's
//! translation and writes it to the quote's *source*; a hook that rewrites
//! sources (reverse NAT, masquerading) writes it to the quote's
//! *destination*. The outer address on the hook's own side follows when it
//! is the quoted one (the error came from the endpoint itself, not from a
//! router on the way). Lookups only: an error never opens or refreshes a
//! flow.
use forwarder_common::{CT_FORWARD, CT_REPLY, CT_SNAT, CT_SNAT_REPLY, CtKey, PROTO_UDP, csum};

use crate::{
    lb::{Nat, Side},
    maps::{CONNTRACK, NAT},
    parse::{IP_CHECK_OFF, IP_SADDR_OFF, IcmpError, TCP_CHECK_OFF, UDP_CHECK_OFF, ptr_at},
};

/// The translation the hook on `side` gives the reverse of the quoted
/// packet, if it belongs to a translated flow.
#[inline(always)]
pub fn related(error: &IcmpError, side: Side) -> Option<Nat> {
    let quote = &error.quote;
    let reverse = |dir| CtKey {
        saddr: quote.daddr,
        daddr: quote.saddr,
        sport: quote.dport,
        dport: quote.sport,
        proto: quote.proto,
        dir,
        _pad: [0; 2],
    };
    match side {
        Side::Destination => {
            let key = reverse(CT_FORWARD);
            // SAFETY: copied out immediately.
            if let Some(fwd) = unsafe { CONNTRACK.get(&key) }.copied() {
                let moved = fwd.client_port != key.sport;
                let other_port = if moved { fwd.client_port } else { 0 };
                return Some(Nat { addr: fwd.nat_addr, port: fwd.nat_port, other_port });
            }
            // SAFETY: as above.
            let client = unsafe { NAT.get(&reverse(CT_SNAT_REPLY)) }.copied()?;
            Some(Nat::new(client.nat_addr, client.nat_port))
        }
        Side::Source => {
            let key = reverse(CT_REPLY);
            // SAFETY: copied out immediately.
            if let Some(entry) = unsafe { CONNTRACK.get(&key) }.copied() {
                let moved = entry.client_port != 0 && entry.client_port != key.dport;
                let other_port = if moved { entry.client_port } else { 0 };
                return Some(Nat { addr: entry.nat_addr, port: entry.nat_port, other_port });
            }
            // SAFETY: as above.
            let masquerade = unsafe { NAT.get(&reverse(CT_SNAT)) }.copied()?;
            // Not yet given an address: nothing went out masqueraded.
            (masquerade.nat_addr != 0).then(|| Nat::new(masquerade.nat_addr, masquerade.nat_port))
        }
    }
}

/// Rewrites the quote (address, port, the other port a clash moved, the
/// quoted IP and L4 checksums) and the outer address on the hook's side,
/// with every checksum updated incrementally: the quoted IP header's, the
/// quoted L4 one when quoted, the ICMP one over all of it, the outer IP
/// one. Direct writes on the linear data (XDP, and TC after a pull): the
/// packet's whole one's-complement sum does not change, so a
/// CHECKSUM_COMPLETE skb stays valid.
#[inline(always)]
pub fn rewrite(start: usize, end: usize, error: &IcmpError, nat: &Nat, side: Side) -> Option<()> {
    let quote = &error.quote;
    // Addresses and ports are read and written as pairs, the side picking
    // an index: offsets picked per side end up recomputed from unchecked
    // values, which the verifier rejects. Constant offsets come first: a
    // check after the variable ones would be optimized away as implied.
    let outer_check = ptr_at::<u16>(start, end, IP_CHECK_OFF)?;
    let outer_addrs = ptr_at::<[u32; 2]>(start, end, IP_SADDR_OFF)?;
    let icmp_check = ptr_at::<u16>(start, end, error.icmp_off + 2)?;
    let quote_check = ptr_at::<u16>(start, end, error.quote_off + 10)?;
    let quote_addrs = ptr_at::<[u32; 2]>(start, end, error.quote_off + 12)?;
    let quote_ports = ptr_at::<[u16; 2]>(start, end, error.quote_l4_off)?;
    // The quote's end this hook restores, and the other end's port.
    let (this, other, outer_this) = match side {
        Side::Destination => (0, 1, 1),
        Side::Source => (1, 0, 0),
    };
    let old_addrs = [quote.saddr, quote.daddr];
    let old_ports = [quote.sport, quote.dport];
    let mut addrs = old_addrs;
    let mut ports = old_ports;
    addrs[this] = nat.addr;
    ports[this] = nat.port;
    if nat.other_port != 0 {
        ports[other] = nat.other_port;
    }
    // SAFETY: every pointer was bounds checked; fields may be unaligned.
    unsafe {
        let mut icmp = icmp_check.read_unaligned();
        let old_check = quote_check.read_unaligned();
        let new_check = csum::replace4(old_check, old_addrs[this], addrs[this]);
        icmp = csum::replace4(icmp, old_addrs[this], addrs[this]);
        icmp = csum::replace2(icmp, old_check, new_check);
        icmp = csum::replace2(icmp, old_ports[0], ports[0]);
        icmp = csum::replace2(icmp, old_ports[1], ports[1]);
        if error.quoted_check {
            let check_off = if quote.proto == PROTO_UDP { UDP_CHECK_OFF } else { TCP_CHECK_OFF };
            let l4_check = ptr_at::<u16>(start, end, error.quote_l4_off + check_off)?;
            let old = l4_check.read_unaligned();
            let new = csum::replace4(old, old_addrs[this], addrs[this]);
            let new = csum::replace2(new, old_ports[0], ports[0]);
            let new = csum::replace2(new, old_ports[1], ports[1]);
            let new = if quote.proto == PROTO_UDP { csum::udp_fixup(old, new) } else { new };
            icmp = csum::replace2(icmp, old, new);
            l4_check.write_unaligned(new);
        }
        quote_check.write_unaligned(new_check);
        quote_addrs.write_unaligned(addrs);
        quote_ports.write_unaligned(ports);
        icmp_check.write_unaligned(icmp);
        let mut outer = outer_addrs.read_unaligned();
        if outer[outer_this] == old_addrs[this] {
            let check = outer_check.read_unaligned();
            outer_check.write_unaligned(csum::replace4(check, old_addrs[this], addrs[this]));
            outer[outer_this] = addrs[this];
            outer_addrs.write_unaligned(outer);
        }
    }
    Some(())
}
