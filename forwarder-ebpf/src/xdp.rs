//! XDP on node interfaces: Service DNAT, and the reversal of masquerading
//! for replies, with direct packet writes.
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use forwarder_common::{FRAG_DESTINATION, PROTO_SCTP, PROTO_UDP, csum, stat};

use crate::{
    frag, icmp, icmp_error,
    lb::{self, Nat, Origin, Side},
    maps::count,
    nat,
    parse::{self, Flow, Fragment, Parsed},
    sctp,
};

#[xdp]
pub fn fwd_xdp_node(ctx: XdpContext) -> u32 {
    match try_xdp_node(&ctx) {
        Ok(action) => action,
        // A Service packet we could not translate must not reach the stack
        // with its frontend address: drop it, counted by reason.
        Err(reason) => {
            count(reason);
            xdp_action::XDP_DROP
        }
    }
}

fn try_xdp_node(ctx: &XdpContext) -> Result<u32, u32> {
    let flow = match parse::parse(ctx.data(), ctx.data_end()) {
        Parsed::Flow(flow) => flow,
        Parsed::Fragment(fragment) => return later_fragment(ctx, &fragment),
        Parsed::TinyFragment => return Err(stat::DROP_FRAGMENT),
        Parsed::IcmpError(error) => {
            if let Some(nat) = icmp_error::related(&error, Side::Destination) {
                icmp_error::rewrite(ctx.data(), ctx.data_end(), &error, &nat, Side::Destination)
                    .ok_or(stat::DROP_REWRITE)?;
                count(stat::ICMP_ERROR_NAT);
            }
            return Ok(xdp_action::XDP_PASS);
        }
        Parsed::Malformed => {
            count(stat::MALFORMED_PASSED);
            return Ok(xdp_action::XDP_PASS);
        }
        Parsed::Other | Parsed::Truncated => return Ok(xdp_action::XDP_PASS),
    };
    let dnat = match lb::service_dnat(&flow, Origin::Outside) {
        Err(reason) if stat::is_reject(reason) => {
            if !icmp::within_rate() {
                return Err(stat::DROP_REJECT_RATE);
            }
            if icmp::defer_reject(ctx, &flow, reason)? {
                return Ok(xdp_action::XDP_PASS);
            }
            let action = icmp::reject_xdp(ctx, &flow)?;
            count(reason);
            return Ok(action);
        }
        dnat => dnat?,
    };
    let translated = match dnat {
        Some(nat) => Some((nat, stat::DNAT)),
        None => nat::reverse_snat(&flow)?.map(|nat| (nat, stat::REVERSE_SNAT)),
    };
    // As in TC: one `remember` per branch.
    match translated {
        Some((nat, counter)) => {
            if flow.first_fragment {
                frag::remember(&flow, FRAG_DESTINATION, nat.addr, counter)?;
            }
            rewrite_destination(ctx, &flow, &nat).ok_or(stat::DROP_REWRITE)?;
            count(counter);
        }
        None if flow.first_fragment => frag::remember(&flow, FRAG_DESTINATION, 0, 0)?,
        None => {}
    }
    Ok(xdp_action::XDP_PASS)
}

/// A later fragment gets its first fragment's new destination address.
#[inline(always)]
fn later_fragment(ctx: &XdpContext, fragment: &Fragment) -> Result<u32, u32> {
    if let Some(nat) = frag::translation(fragment, FRAG_DESTINATION)? {
        let (start, end) = (ctx.data(), ctx.data_end());
        let ip_check = parse::ptr_at::<u16>(start, end, parse::IP_CHECK_OFF);
        let daddr = parse::ptr_at::<u32>(start, end, parse::IP_DADDR_OFF);
        let (Some(ip_check), Some(daddr)) = (ip_check, daddr) else {
            return Err(stat::DROP_REWRITE);
        };
        // SAFETY: both pointers were bounds checked; fields may be unaligned.
        unsafe {
            let old = ip_check.read_unaligned();
            ip_check.write_unaligned(csum::replace4(old, fragment.daddr, nat.addr));
            daddr.write_unaligned(nat.addr);
        }
        count(nat.counter);
    }
    Ok(xdp_action::XDP_PASS)
}

/// Rewrites destination address and port (and the source port, when a
/// clash moved the client's), updating the checksums incrementally. XDP
/// sees frames as they came off the wire, so the L4 checksum is complete
/// (not a CHECKSUM_PARTIAL pseudo-header sum).
#[inline(always)]
fn rewrite_destination(ctx: &XdpContext, flow: &Flow, nat: &Nat) -> Option<()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip_check = parse::ptr_at::<u16>(start, end, parse::IP_CHECK_OFF)?;
    let daddr = parse::ptr_at::<u32>(start, end, parse::IP_DADDR_OFF)?;
    let sport = parse::ptr_at::<u16>(start, end, flow.l4_off)?;
    let dport = parse::ptr_at::<u16>(start, end, flow.l4_off + 2)?;
    let new_sport = if nat.other_port != 0 { nat.other_port } else { flow.sport };
    // SAFETY: every pointer was bounds checked; packet fields may be unaligned.
    unsafe {
        let old = ip_check.read_unaligned();
        ip_check.write_unaligned(csum::replace4(old, flow.daddr, nat.addr));
        if flow.proto == PROTO_SCTP {
            let crc = parse::ptr_at::<[u8; 4]>(start, end, flow.l4_off + parse::SCTP_CHECK_OFF)?;
            let updated = sctp::crc_after_port_change(
                u32::from_le_bytes(crc.read_unaligned()),
                sctp::ports(flow.sport, flow.dport),
                sctp::ports(new_sport, nat.port),
                u32::from(flow.l4_len),
            );
            crc.write_unaligned(updated.to_le_bytes());
        } else {
            let l4_check =
                parse::ptr_at::<u16>(start, end, flow.l4_off + parse::l4_check_off(flow.proto))?;
            let old = l4_check.read_unaligned();
            let new =
                csum::replace2(csum::replace4(old, flow.daddr, nat.addr), flow.dport, nat.port);
            let new =
                if nat.other_port != 0 { csum::replace2(new, flow.sport, new_sport) } else { new };
            let new = if flow.proto == PROTO_UDP { csum::udp_fixup(old, new) } else { new };
            l4_check.write_unaligned(new);
        }
        daddr.write_unaligned(nat.addr);
        dport.write_unaligned(nat.port);
        if nat.other_port != 0 {
            sport.write_unaligned(new_sport);
        }
    }
    Some(())
}
