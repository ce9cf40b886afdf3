//! ICMP port unreachable answers to rejected flows, built in place from the
//! offending packet: the client's kernel matches the quoted header to its
//! socket and reports "connection refused" at once.
//!
//! Layout of the answer: Ethernet (MACs swapped), IPv4 (from the address
//! the client targeted, to the client), ICMP type 3 code 3, then the quote:
//! the original IPv4 header and its TCP or UDP header (RFC 792 asks for at
//! least 8 bytes). For SCTP the quote runs on to the INIT chunk's initiate
//! tag, which Linux matches when the quoted verification tag is zero. Only
//! packets without IP options are answered, so every size is fixed.
use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action},
    helpers::{
        bpf_ktime_get_ns, bpf_redirect, bpf_skb_adjust_room, bpf_skb_change_tail,
        bpf_xdp_adjust_head, bpf_xdp_adjust_meta, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};
use forwarder_common::{DEFERRED_REJECT, DEFERRED_REJECT_MASK, PROTO_SCTP, PROTO_TCP, stat};

use crate::{
    maps::REJECT_BUCKETS,
    parse::{Flow, L3_OFF},
};

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const ICMP_LEN: usize = 8;
/// New IPv4 + ICMP headers, inserted before the quote.
const ROOM: usize = IP_LEN + ICMP_LEN;
const TCP_LEN: usize = 20;
const UDP_LEN: usize = 8;
/// SCTP common header, chunk header, initiate tag.
const SCTP_LEN: usize = 20;
/// Offsets of the quoted Internet checksum; SCTP has none.
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;
const NO_CHECK: usize = usize::MAX;

/// One's-complement checksum of `words` 16-bit words at `start` (always a
/// constant, so the loop unrolls).
#[inline(always)]
fn checksum(start: usize, words: usize) -> u16 {
    let mut sum = 0u32;
    for i in 0..words {
        // SAFETY: callers check `start + 2 * words` against the packet end.
        sum += u32::from(unsafe { ((start + 2 * i) as *const u16).read_unaligned() });
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Writes the answer's Ethernet, IPv4 and ICMP headers in front of a quote
/// of `L4` bytes of L4 header (`QUOTE_WORDS` = (ICMP header + quote) / 2,
/// `CHECK` the offset of its Internet checksum), the quote already sitting
/// at `ETH_LEN + ROOM`; `eth_at` is where the original Ethernet header is.
#[inline(always)]
fn write_headers<const L4: usize, const QUOTE_WORDS: usize, const CHECK: usize>(
    start: usize,
    end: usize,
    eth_at: usize,
    flow: &Flow,
) -> Option<()> {
    if start + ETH_LEN + ROOM + IP_LEN + L4 > end || start + eth_at + ETH_LEN > end {
        return None;
    }
    // SAFETY: every offset below was bounds checked just above.
    unsafe {
        let mut macs = [0u8; 12];
        core::ptr::copy_nonoverlapping((start + eth_at) as *const u8, macs.as_mut_ptr(), 12);
        let eth = start as *mut u8;
        core::ptr::copy_nonoverlapping(macs.as_ptr().add(6), eth, 6);
        core::ptr::copy_nonoverlapping(macs.as_ptr(), eth.add(6), 6);
        (eth.add(12) as *mut [u8; 2]).write_unaligned(0x0800u16.to_be_bytes());

        let ip = eth.add(ETH_LEN);
        let total = ((ROOM + IP_LEN + L4) as u16).to_be_bytes();
        let header: [u8; 12] = [0x45, 0, total[0], total[1], 0, 0, 0, 0, 64, 1, 0, 0];
        core::ptr::copy_nonoverlapping(header.as_ptr(), ip, 12);
        (ip.add(12) as *mut u32).write_unaligned(flow.daddr);
        (ip.add(16) as *mut u32).write_unaligned(flow.saddr);
        let ip_check = checksum(ip as usize, IP_LEN / 2);
        (ip.add(10) as *mut u16).write_unaligned(ip_check);

        // A CHECKSUM_PARTIAL skb keeps pointing its L4 checksum at the
        // quoted header, and anything on the way may complete it. Give the
        // field the value completion reproduces, so the ICMP checksum below
        // holds either way: F = -S / 2 (mod 0xffff), S the sum of the other
        // quoted words, solves F = ~(S + F).
        // (SCTP's CRC is not an Internet checksum and stays as it came.)
        if CHECK != NO_CHECK {
            let quoted_l4 = ip.add(IP_LEN + ICMP_LEN + IP_LEN);
            let field = quoted_l4.add(CHECK) as *mut u16;
            field.write_unaligned(0);
            let others = !checksum(quoted_l4 as usize, L4 / 2);
            let fixed = ((u32::from(!others) * 0x8000) % 0xffff) as u16;
            field.write_unaligned(fixed);
        }

        let icmp = ip.add(IP_LEN);
        let header: [u8; ICMP_LEN] = [3, 3, 0, 0, 0, 0, 0, 0];
        core::ptr::copy_nonoverlapping(header.as_ptr(), icmp, ICMP_LEN);
        let icmp_check = checksum(icmp as usize, QUOTE_WORDS);
        (icmp.add(2) as *mut u16).write_unaligned(icmp_check);
    }
    Some(())
}

#[inline(always)]
fn write_for(flow: &Flow, start: usize, end: usize, eth_at: usize) -> Option<()> {
    match flow.proto {
        PROTO_TCP => write_headers::<TCP_LEN, { (ICMP_LEN + IP_LEN + TCP_LEN) / 2 }, TCP_CHECK>(
            start, end, eth_at, flow,
        ),
        PROTO_SCTP => write_headers::<SCTP_LEN, { (ICMP_LEN + IP_LEN + SCTP_LEN) / 2 }, NO_CHECK>(
            start, end, eth_at, flow,
        ),
        _ => write_headers::<UDP_LEN, { (ICMP_LEN + IP_LEN + UDP_LEN) / 2 }, UDP_CHECK>(
            start, end, eth_at, flow,
        ),
    }
}

#[inline(always)]
fn answer_len(flow: &Flow) -> usize {
    let quoted = match flow.proto {
        PROTO_TCP => TCP_LEN,
        PROTO_SCTP => SCTP_LEN,
        _ => UDP_LEN,
    };
    ETH_LEN + ROOM + IP_LEN + quoted
}

/// Only packets without IP options are answered: every size is then fixed.
#[inline(always)]
fn quotable(flow: &Flow) -> Result<(), u32> {
    if flow.l4_off == L3_OFF + IP_LEN { Ok(()) } else { Err(stat::DROP_REJECT_FAILED) }
}

/// Hands a reject from XDP to TC ingress on the same interface, through the
/// packet's metadata; the caller then passes the packet. XDP_TX over veth
/// reaches the peer only when the peer runs XDP itself, which a container
/// used as a node does not; a TC redirect works on every interface. False
/// where the driver keeps no metadata: answer with `reject_xdp` then.
/// A packet no answer can quote (IP options) is an error here already.
#[inline(always)]
pub fn defer_reject(ctx: &XdpContext, flow: &Flow, reason: u32) -> Result<bool, u32> {
    quotable(flow)?;
    // SAFETY: the context pointer is the program's own.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -4) } != 0 {
        return Ok(false);
    }
    // SAFETY: as above; the verifier checks the range below.
    let meta = unsafe { (*ctx.ctx).data_meta } as usize;
    if meta + 4 > ctx.data() {
        return Ok(false);
    }
    // SAFETY: four bytes of metadata, checked just above.
    unsafe { (meta as *mut u32).write_unaligned(DEFERRED_REJECT | reason) };
    Ok(true)
}

/// The reason of a reject `defer_reject` handed over, if this packet
/// carries one.
#[inline(always)]
pub fn deferred_reject(ctx: &TcContext) -> Option<u32> {
    // SAFETY: the context's skb pointer is valid for the program's run.
    let meta = unsafe { (*ctx.skb.skb).data_meta } as usize;
    if meta + 4 > ctx.data() {
        return None;
    }
    // SAFETY: four bytes of metadata, checked just above.
    let word = unsafe { (meta as *const u32).read_unaligned() };
    let reason = word & !DEFERRED_REJECT_MASK;
    (word & DEFERRED_REJECT_MASK == DEFERRED_REJECT && stat::is_reject(reason)).then_some(reason)
}

/// Set at load time: rejects per second and CPU, 0 for no limit.
#[unsafe(no_mangle)]
static REJECT_RATE: u32 = forwarder_common::REJECT_RATE_DEFAULT;

/// Whether this CPU may send one more reject now (a token bucket per CPU,
/// refilled at the rate, holding a twentieth of a second's worth): a flood
/// to a Service without endpoints must not turn into a flood of answers.
#[inline(always)]
pub fn within_rate() -> bool {
    // SAFETY: a volatile read of a load-time constant.
    let rate = unsafe { core::ptr::read_volatile(&REJECT_RATE) };
    if rate == 0 {
        return true;
    }
    let Some(bucket) = REJECT_BUCKETS.get_ptr_mut(0) else {
        return true;
    };
    let burst = if rate / 20 > 1 { rate / 20 } else { 1 };
    // SAFETY: helper without arguments; the bucket is this CPU's own.
    unsafe {
        let now = bpf_ktime_get_ns();
        // A second refills the whole bucket: longer cannot overflow.
        let elapsed = now.saturating_sub((*bucket).refilled_ns);
        let elapsed = if elapsed > 1_000_000_000 { 1_000_000_000 } else { elapsed };
        let earned = elapsed * u64::from(rate) / 1_000_000_000;
        if earned > 0 {
            let tokens = u64::from((*bucket).tokens) + earned;
            (*bucket).tokens = if tokens > u64::from(burst) { burst } else { tokens as u32 };
            (*bucket).refilled_ns = now;
        }
        if (*bucket).tokens == 0 {
            return false;
        }
        (*bucket).tokens -= 1;
    }
    true
}

/// Answers from XDP: shrink to the quote, grow room in front, send back out
/// the interface the packet came in on.
#[inline(always)]
pub fn reject_xdp(ctx: &XdpContext, flow: &Flow) -> Result<u32, u32> {
    quotable(flow)?;
    let shrink = (answer_len(flow) - ROOM) as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: the context pointer is the program's own.
    if shrink < 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, shrink) } != 0 {
        return Err(stat::DROP_REJECT_FAILED);
    }
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(ROOM as i32)) } != 0 {
        return Err(stat::DROP_REJECT_FAILED);
    }
    write_for(flow, ctx.data(), ctx.data_end(), ROOM).ok_or(stat::DROP_REJECT_FAILED)?;
    Ok(xdp_action::XDP_TX)
}

/// Answers from TC ingress (pod-facing interfaces, and node interfaces for
/// rejects XDP handed over): insert room after the Ethernet header, trim to
/// the quote, redirect out the interface the packet came from.
///
/// The skb may stay CHECKSUM_PARTIAL (adjusting room does not reset it; the
/// whole L4 header is quoted so the field it points at stays in the
/// packet): `write_headers` makes the quote immune to its completion.
#[inline(always)]
pub fn reject_tc(ctx: &TcContext, flow: &Flow) -> Result<i32, u32> {
    // SAFETY: the context's skb pointer is valid for the program's run.
    let (ifindex, gso_segs) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).gso_segs) };
    quotable(flow)?;
    if gso_segs > 1 {
        return Err(stat::DROP_REJECT_FAILED);
    }
    let skb = ctx.skb.skb;
    let len = answer_len(flow) as u32;
    // SAFETY: helpers on the program's own skb.
    let resized = unsafe {
        bpf_skb_adjust_room(skb, ROOM as i32, BPF_ADJ_ROOM_MAC, 0) == 0
            && bpf_skb_change_tail(skb, len, 0) == 0
    };
    if !resized || ctx.pull_data(len).is_err() {
        return Err(stat::DROP_REJECT_FAILED);
    }
    write_for(flow, ctx.data(), ctx.data_end(), 0).ok_or(stat::DROP_REJECT_FAILED)?;
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(ifindex, 0) };
    Ok(TC_ACT_REDIRECT as i32)
}
