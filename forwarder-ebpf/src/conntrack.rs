//! Connection tracking: an entry per flow and direction, each with the
//! time of its last packet and what the packets said of the connection
//! (handshake done, FIN from either side, reset), so that entries expire as
//! netfilter's and Cilium's do instead of living until the LRU evicts them.
//!
//! Each program refreshes only the entry of the direction it sees (ingress
//! the forward entry, egress the reply entry): no packet writes both. What
//! needs the whole flow — is a tuple still taken, may an entry go — reads
//! both entries.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_EXIST, BPF_NOEXIST},
    helpers::bpf_ktime_get_coarse_ns,
    maps::LruHashMap,
};
use forwarder_common::{
    CT_ESTABLISHED, CT_FORWARD, CT_RESET, CtKey, CtTimeouts, CtValue, PROTO_UDP, stat,
};

use crate::{
    maps::{BACKENDS, CONNTRACK, flow_hash},
    parse::Flow,
};

/// Set at load time from the agent's flags.
#[unsafe(no_mangle)]
static CT_TIMEOUTS: CtTimeouts = CtTimeouts::DEFAULT;

#[inline(always)]
pub fn timeouts() -> CtTimeouts {
    // SAFETY: a volatile read of a load-time constant.
    unsafe { core::ptr::read_volatile(&CT_TIMEOUTS) }
}

/// Coarse monotonic seconds, the clock of `CtValue::last_seen`.
#[inline(always)]
pub fn now_seconds() -> u32 {
    // SAFETY: helper without arguments.
    forwarder_common::coarse_seconds(unsafe { bpf_ktime_get_coarse_ns() })
}

#[inline(always)]
pub fn key_of(flow: &Flow, dir: u8) -> CtKey {
    CtKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        dir,
        _pad: [0; 2],
    }
}

/// The flags a packet adds to its direction's entry; `closing` is the
/// flag of a FIN from that direction's sender.
#[inline(always)]
pub fn observed(flow: &Flow, closing: u16) -> u16 {
    let mut flags = 0;
    if flow.proto != PROTO_UDP && !flow.handshake {
        flags |= CT_ESTABLISHED;
    }
    if flow.fin {
        flags |= closing;
    }
    if flow.reset {
        flags |= CT_RESET;
    }
    flags
}

/// Records a packet on an entry: its time and what it says of the state.
/// Writes only what changed (the time at most once a second), so a busy
/// flow does not bounce its entry's cache line between CPUs per packet.
/// True when the time moved: the flow's first packet in this second.
#[inline(always)]
pub fn touch(entry: *mut CtValue, flow: &Flow, closing: u16, now: u32) -> bool {
    let add = observed(flow, closing);
    // SAFETY: a live map value; racing writers only store a time or a flag.
    unsafe {
        if (*entry).flags & add != add {
            (*entry).flags |= add;
        }
        if (*entry).last_seen != now {
            (*entry).last_seen = now;
            return true;
        }
    }
    false
}

/// The entry at `key` that restores this packet's flow (a reply, seen in
/// the backend's direction), refreshed by it; `closing` is the flag its
/// FIN sets.
#[inline(always)]
pub fn restoring(
    map: &LruHashMap<CtKey, CtValue>,
    key: &CtKey,
    flow: &Flow,
    closing: u16,
) -> Result<Option<CtValue>, u32> {
    let Some(entry) = map.get_ptr_mut(key) else {
        return Ok(None);
    };
    let _ = touch(entry, flow, closing, now_seconds());
    // SAFETY: a live map value, copied out.
    Ok(Some(unsafe { *entry }))
}

/// Whether an entry outlived its state's timeout, judged by its own
/// direction.
#[inline(always)]
pub fn expired(entry: &CtValue, proto: u8, now: u32) -> bool {
    let idle = entry.idle(now);
    // Every timeout is at least a second: the common case, a packet within
    // a second of the last, needs no look at the state.
    idle > 1 && idle > timeouts().lifetime(proto, entry.flags)
}

/// Whether the backend a flow was sent to is still in the backends map.
#[inline(always)]
pub fn backend_present(fwd: &CtValue) -> bool {
    // SAFETY: compared in place.
    unsafe { BACKENDS.get(&fwd.backend_id) }
        .is_some_and(|b| b.addr == fwd.nat_addr && b.port == fwd.nat_port)
}

/// Whether the forward entry `fwd` no longer describes the connection this
/// packet belongs to: the flow expired (judged by its fresher direction: a
/// flow only its backend keeps sending on lives), or the packet opens a
/// new connection on a port whose previous one either side closed or
/// reset, or whose backend is gone (netfilter starts a new connection for
/// a SYN in TIME_WAIT too). Established packets keep their backend
/// whatever happens.
#[inline(always)]
pub fn stale(fwd: &CtValue, flow: &Flow, now: u32) -> bool {
    use forwarder_common::{CT_BACKEND_CLOSING, CT_CLIENT_CLOSING};
    // The flow's reply entry, if it still restores this flow.
    let reply = || {
        // SAFETY: copied out immediately.
        unsafe { CONNTRACK.get(&key_of(flow, CT_FORWARD).reply_of(fwd)) }.copied().filter(|r| {
            r.nat_addr == flow.daddr && r.nat_port == flow.dport && r.client_port == flow.sport
        })
    };
    if expired(fwd, flow.proto, now) {
        return reply().is_none_or(|r| expired(&r, flow.proto, now));
    }
    flow.opening
        && (fwd.flags & (CT_CLIENT_CLOSING | CT_RESET) != 0
            || !backend_present(fwd)
            || reply().is_some_and(|r| r.flags & (CT_BACKEND_CLOSING | CT_RESET) != 0))
}

/// The reply entry of a flow whose forward entry is `fwd`: keyed by the
/// tuple after DNAT, seen backwards; restores the frontend the client used
/// (not the wildcard of a NodePort entry) and the client's own port.
#[inline(always)]
pub fn reply_entry(flow: &Flow, fwd: &CtValue, now: u32) -> (CtKey, CtValue) {
    let key = key_of(flow, CT_FORWARD).reply_of(fwd);
    let value = CtValue {
        last_seen: now,
        client_port: flow.sport,
        ..CtValue::new(flow.daddr, flow.dport, fwd.backend_id)
    };
    (key, value)
}

/// Recreates a flow's reply entry if the LRU took it.
#[inline(always)]
pub fn ensure_reply(flow: &Flow, fwd: &CtValue, now: u32) -> Result<(), u32> {
    let key = key_of(flow, CT_FORWARD).reply_of(fwd);
    // SAFETY: presence check only.
    if unsafe { CONNTRACK.get(&key) }.is_some() {
        return Ok(());
    }
    let (key, value) = reply_entry(flow, fwd, now);
    CONNTRACK.insert(&key, &value, u64::from(BPF_ANY)).map_err(|_| stat::DROP_CT_INSERT)
}

/// Whether the reply tuple `key` belongs to a live flow other than this
/// packet's: after DNAT both would be the same connection, which neither
/// the backend nor the reply entry could tell apart. A flow whose entries
/// expired, or that closed on both sides (or reset) more than the close
/// timeout ago, no longer holds it.
#[inline(always)]
fn held_by_another(flow: &Flow, key: &CtKey, now: u32) -> bool {
    // SAFETY: copied out immediately.
    let Some(reply) = (unsafe { CONNTRACK.get(key) }).copied() else {
        return false;
    };
    let ours = reply.nat_addr == flow.daddr
        && reply.nat_port == flow.dport
        && reply.client_port == flow.sport;
    if ours {
        return false;
    }
    let forward = CtKey {
        saddr: key.daddr,
        daddr: reply.nat_addr,
        sport: reply.client_port,
        dport: reply.nat_port,
        proto: key.proto,
        dir: CT_FORWARD,
        _pad: [0; 2],
    };
    // SAFETY: copied out immediately.
    let Some(fwd) = (unsafe { CONNTRACK.get(&forward) }).copied() else {
        return false;
    };
    if fwd.nat_addr != key.saddr || fwd.nat_port != key.sport || fwd.client_port != key.dport {
        return false;
    }
    let idle = if fwd.idle(now) < reply.idle(now) { fwd.idle(now) } else { reply.idle(now) };
    idle <= timeouts().flow_lifetime(key.proto, fwd.flags, reply.flags)
}

/// Source ports a colliding flow may be moved to (netfilter's range for
/// ports above 1023), and how many hashed probes it gets.
const REMAP_PORT_MIN: u32 = 1024;
const REMAP_PORT_COUNT: u32 = 65_536 - REMAP_PORT_MIN;
const REMAP_PROBES: u32 = 16;

/// Claims the reply entry for a new flow to `fwd` (`fwd.client_port` is
/// the client's own port): the tuple after DNAT is the client's unless a
/// live flow to another frontend holds it, in which case the client's port
/// is rewritten to a free one, as netfilter resolves such a clash. Returns
/// the source port the flow has after DNAT.
#[inline(always)]
pub fn claim_reply(flow: &Flow, fwd: &CtValue, now: u32) -> Result<u16, u32> {
    let (key, value) = reply_entry(flow, fwd, now);
    if !held_by_another(flow, &key, now) {
        CONNTRACK.insert(&key, &value, u64::from(BPF_ANY)).map_err(|_| stat::DROP_CT_INSERT)?;
        return Ok(flow.sport);
    }
    let start = flow_hash(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    for probe in 0..REMAP_PROBES {
        // Hashed probes, scattered by a large odd stride.
        let offset = start.wrapping_add(probe.wrapping_mul(0x9e37_79b1)) % REMAP_PORT_COUNT;
        let port = ((REMAP_PORT_MIN + offset) as u16).to_be();
        let moved = CtKey { dport: port, ..key };
        // A port this flow's earlier incarnation was moved to is its own
        // again (a client reopening one port over and over would otherwise
        // use up every probe), and so is one whose flow is over: replaced
        // in place. A free one is claimed with NOEXIST, so of two CPUs
        // claiming it only one wins. Looked up first: a full LRU makes
        // room before it refuses a key that exists, so a failed insert
        // would evict a live flow.
        // SAFETY: presence check only.
        let flag = match unsafe { CONNTRACK.get(&moved) } {
            None => BPF_NOEXIST,
            Some(_) if !held_by_another(flow, &moved, now) => BPF_EXIST,
            Some(_) => continue,
        };
        if CONNTRACK.insert(&moved, &value, u64::from(flag)).is_ok() {
            return Ok(port);
        }
    }
    Err(stat::DROP_CT_COLLISION)
}
