//! TC programs:
//! - `fwd_tc_pod`, ingress of pod-facing interfaces: DNAT for pod clients,
//!   and the reversal of masquerading (hairpin replies).
//! - `fwd_tc_node`, ingress of node interfaces: sends the rejects that
//!   `fwd_xdp_node` handed over (XDP cannot send them over every kind of
//!   interface); every other packet passes at once.
//! - `fwd_tc_rnat`, egress of node and pod-facing interfaces: reverse NAT of
//!   backend replies, and masquerading. Like netfilter's postrouting it runs
//!   after routing: a packet whose new source is a node address would
//!   otherwise be dropped as martian on input, and a ClusterIP source would
//!   fail strict reverse-path filtering.
//!
//! Pods hand the stack CHECKSUM_PARTIAL packets, so checksums are updated
//! with the kernel helpers, which know the skb's checksum state.
use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK, TC_ACT_SHOT,
    },
    macros::classifier,
    programs::TcContext,
};
use forwarder_common::{PROTO_SCTP, PROTO_UDP, stat};

use crate::{
    frag, icmp, icmp_error,
    lb::{self, Nat, Origin, Side},
    maps::count,
    nat,
    parse::{self, Flow, Fragment, IcmpError, Parsed},
    sctp,
};

#[classifier]
pub fn fwd_tc_pod(ctx: TcContext) -> i32 {
    match try_tc_pod(&ctx) {
        Ok(action) => action,
        // As in XDP: an untranslatable Service packet is dropped and counted.
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT as i32
        }
    }
}

fn try_tc_pod(ctx: &TcContext) -> Result<i32, u32> {
    let flow = match parse_linear(ctx) {
        Parsed::Flow(flow) => flow,
        Parsed::Fragment(fragment) => return later_fragment(ctx, &fragment, Side::Destination),
        Parsed::TinyFragment => return Err(stat::DROP_FRAGMENT),
        Parsed::IcmpError(error) => return related_error(ctx, &error, Side::Destination),
        _ => return Ok(TC_ACT_OK as i32),
    };
    let dnat = match lb::service_dnat(&flow, Origin::LocalPod) {
        Err(reason) if stat::is_reject(reason) => {
            if !icmp::within_rate() {
                return Err(stat::DROP_REJECT_RATE);
            }
            let action = icmp::reject_tc(ctx, &flow)?;
            count(reason);
            return Ok(action);
        }
        dnat => dnat?,
    };
    let translated = match dnat {
        Some(nat) => Some((nat, stat::DNAT)),
        None => nat::reverse_snat(&flow)?.map(|nat| (nat, stat::REVERSE_SNAT)),
    };
    apply(ctx, &flow, translated, Side::Destination)
}

#[classifier]
pub fn fwd_tc_node(ctx: TcContext) -> i32 {
    let Some(reason) = icmp::deferred_reject(&ctx) else {
        return TC_ACT_OK as i32;
    };
    // XDP parsed it a moment ago; a packet that no longer parses is still
    // addressed to a frontend, so it must not pass.
    let sent = match parse_linear(&ctx) {
        Parsed::Flow(flow) => icmp::reject_tc(&ctx, &flow),
        _ => Err(stat::DROP_REJECT_FAILED),
    };
    match sent {
        Ok(action) => {
            count(reason);
            action
        }
        Err(failed) => {
            count(failed);
            TC_ACT_SHOT as i32
        }
    }
}

#[classifier]
pub fn fwd_tc_rnat(ctx: TcContext) -> i32 {
    match try_tc_rnat(&ctx) {
        Ok(action) => action,
        // A reply we could not translate would reach the client from the
        // backend's address, which it does not know: drop and count.
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT as i32
        }
    }
}

fn try_tc_rnat(ctx: &TcContext) -> Result<i32, u32> {
    let flow = match parse_linear(ctx) {
        Parsed::Flow(flow) => flow,
        Parsed::Fragment(fragment) => return later_fragment(ctx, &fragment, Side::Source),
        Parsed::TinyFragment => return Err(stat::DROP_FRAGMENT),
        Parsed::IcmpError(error) => return related_error(ctx, &error, Side::Source),
        _ => return Ok(TC_ACT_OK as i32),
    };
    let translated = match lb::reverse_nat(&flow)? {
        Some(nat) => Some((nat, stat::REVERSE_NAT)),
        None => {
            // SAFETY: the context's skb pointer is valid for the program's run.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            nat::snat(ctx, &flow, ifindex)?.map(|nat| (nat, stat::SNAT))
        }
    };
    apply(ctx, &flow, translated, Side::Source)
}

/// Rewrites `side` of the packet as decided, counted by the decision's
/// counter; a first fragment's decision is kept for the later ones.
#[inline(always)]
fn apply(
    ctx: &TcContext,
    flow: &Flow,
    translated: Option<(Nat, u32)>,
    side: Side,
) -> Result<i32, u32> {
    // One `remember` per branch: folded into one call, the None case's
    // undefined payload reaches the verifier as an unread register.
    match translated {
        Some((nat, counter)) => {
            if flow.first_fragment {
                frag::remember(flow, side.frag_side(), nat.addr, counter)?;
            }
            rewrite(ctx, flow, &nat, side)?;
            count(counter);
        }
        None if flow.first_fragment => frag::remember(flow, side.frag_side(), 0, 0)?,
        None => {}
    }
    Ok(TC_ACT_OK as i32)
}

/// A later fragment gets its first fragment's new address on `side`.
#[inline(always)]
fn later_fragment(ctx: &TcContext, fragment: &Fragment, side: Side) -> Result<i32, u32> {
    if let Some(nat) = frag::translation(fragment, side.frag_side())? {
        let (addr_off, old) = match side {
            Side::Source => (parse::IP_SADDR_OFF, fragment.saddr),
            Side::Destination => (parse::IP_DADDR_OFF, fragment.daddr),
        };
        let err = |_| stat::DROP_REWRITE;
        ctx.l3_csum_replace(parse::IP_CHECK_OFF, old.into(), nat.addr.into(), 4).map_err(err)?;
        ctx.store(addr_off, &nat.addr, 0).map_err(err)?;
        count(nat.counter);
    }
    Ok(TC_ACT_OK as i32)
}

/// An ICMP error about a translated flow, translated back (`icmp_error`).
#[inline(always)]
fn related_error(ctx: &TcContext, error: &IcmpError, side: Side) -> Result<i32, u32> {
    if let Some(nat) = icmp_error::related(error, side) {
        icmp_error::rewrite(ctx.data(), ctx.data_end(), error, &nat, side)
            .ok_or(stat::DROP_REWRITE)?;
        count(stat::ICMP_ERROR_NAT);
    }
    Ok(TC_ACT_OK as i32)
}

/// Parses the headers, pulling them into the linear area first when the
/// skb is non-linear. Malformed packets are counted, and pass as `Other`.
#[inline(always)]
fn parse_linear(ctx: &TcContext) -> Parsed {
    let parsed = match parse::parse(ctx.data(), ctx.data_end()) {
        Parsed::Truncated if ctx.len() as usize > ctx.data_end() - ctx.data() => {
            let want = (ctx.len() as usize).min(parse::MAX_HDR_LEN);
            if ctx.pull_data(want as u32).is_err() {
                return Parsed::Truncated;
            }
            parse::parse(ctx.data(), ctx.data_end())
        }
        parsed => parsed,
    };
    match parsed {
        Parsed::Malformed => {
            count(stat::MALFORMED_PASSED);
            Parsed::Other
        }
        parsed => parsed,
    }
}

#[inline(always)]
fn rewrite(ctx: &TcContext, flow: &Flow, nat: &Nat, side: Side) -> Result<(), u32> {
    // The side rewritten, and the other side's port (moved by a clash).
    let (addr_off, port_off, old_addr, old_port, other_off, old_other) = match side {
        Side::Source => {
            (parse::IP_SADDR_OFF, flow.l4_off, flow.saddr, flow.sport, flow.l4_off + 2, flow.dport)
        }
        Side::Destination => {
            (parse::IP_DADDR_OFF, flow.l4_off + 2, flow.daddr, flow.dport, flow.l4_off, flow.sport)
        }
    };
    let new_other = if nat.other_port != 0 { nat.other_port } else { old_other };
    let err = |_| stat::DROP_REWRITE;
    // SCTP's bytes change without a compensating Internet checksum, so a
    // CHECKSUM_COMPLETE skb's sum must follow its writes.
    let mut port_flags = 0;
    if flow.proto == PROTO_SCTP {
        let (sport, dport) = match side {
            Side::Source => (nat.port, new_other),
            Side::Destination => (new_other, nat.port),
        };
        let crc_off = flow.l4_off + parse::SCTP_CHECK_OFF;
        let crc = sctp::crc_after_port_change(
            u32::from_le_bytes(ctx.load::<[u8; 4]>(crc_off).map_err(err)?),
            sctp::ports(flow.sport, flow.dport),
            sctp::ports(sport, dport),
            u32::from(flow.l4_len),
        );
        let recompute = u64::from(BPF_F_RECOMPUTE_CSUM);
        ctx.store(crc_off, &crc.to_le_bytes(), recompute).map_err(err)?;
        port_flags = recompute;
    } else {
        let check_off = flow.l4_off + parse::l4_check_off(flow.proto);
        let udp_zero = if flow.proto == PROTO_UDP { u64::from(BPF_F_MARK_MANGLED_0) } else { 0 };
        let pseudo = u64::from(BPF_F_PSEUDO_HDR);
        ctx.l4_csum_replace(check_off, old_addr.into(), nat.addr.into(), pseudo | udp_zero | 4)
            .map_err(err)?;
        ctx.l4_csum_replace(check_off, old_port.into(), nat.port.into(), udp_zero | 2)
            .map_err(err)?;
        if new_other != old_other {
            ctx.l4_csum_replace(check_off, old_other.into(), new_other.into(), udp_zero | 2)
                .map_err(err)?;
        }
    }
    ctx.l3_csum_replace(parse::IP_CHECK_OFF, old_addr.into(), nat.addr.into(), 4).map_err(err)?;
    ctx.store(addr_off, &nat.addr, 0).map_err(err)?;
    ctx.store(port_off, &nat.port, port_flags).map_err(err)?;
    if new_other != old_other {
        ctx.store(other_off, &new_other, port_flags).map_err(err)?;
    }
    Ok(())
}
