//! The load balancer's decisions for a packet, on top of the service
//! lookup (`service`), connection tracking (`conntrack`) and masquerading
//! (`nat`): DNAT of a packet to a frontend, and its reversal for replies.
use aya_ebpf::bindings::BPF_NOEXIST;
use forwarder_common::{
    CT_BACKEND_CLOSING, CT_CLIENT_CLOSING, CT_FORWARD, CT_MASQUERADE, CT_REPLY, CtKey, CtValue,
    FRAG_DESTINATION, FRAG_SOURCE, SVC_DROP_EMPTY, SVC_SOURCE_RANGES, SvcKey, SvcValue, stat,
};

use crate::{
    conntrack::{
        claim_reply, ensure_reply, key_of, now_seconds, observed, reply_entry, restoring, stale,
        touch,
    },
    maps::{CONNTRACK, flow_hash},
    nat::ensure_snat,
    parse::Flow,
    service::{self, affine_backend, bind_affinity, choose_backend, source_allowed},
};

/// Where a packet comes from: it decides the endpoint set (traffic
/// policies) and whether the client is masqueraded.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From the wire (XDP on node interfaces).
    Outside,
    /// From a pod on this node (TC on pod-facing interfaces).
    LocalPod,
}

/// The address a program rewrites: destination (DNAT, the reversal of
/// masquerading: XDP and TC ingress) or source (reverse NAT, masquerading:
/// TC egress).
#[derive(Clone, Copy)]
pub enum Side {
    Source,
    Destination,
}

impl Side {
    /// The side's value in `FragKey`.
    pub const fn frag_side(self) -> u8 {
        match self {
            Side::Source => FRAG_SOURCE,
            Side::Destination => FRAG_DESTINATION,
        }
    }
}

/// New address and port for one side of the packet, and for the other
/// side's port when a clash moved the client's port (0: unchanged): the
/// new source port on the way in, the client's own on the way back.
pub struct Nat {
    pub addr: u32,
    pub port: u16,
    pub other_port: u16,
}

impl Nat {
    pub const fn new(addr: u32, port: u16) -> Self {
        Self { addr, port, other_port: 0 }
    }
}

/// `Ok(None)`: not a Service packet. `Err(reason)`: drop, counted by reason.
pub type Decision = Result<Option<Nat>, u32>;

/// Destination NAT for a packet addressed to a Service frontend.
#[inline(always)]
pub fn service_dnat(flow: &Flow, origin: Origin) -> Decision {
    let Some((svc, head)) = service::frontend(flow.daddr, flow.dport, flow.proto, origin) else {
        if service::is_cluster_ip(flow.daddr) {
            return Err(stat::REJECT_UNKNOWN_PORT);
        }
        return Ok(None);
    };
    let key = key_of(flow, CT_FORWARD);
    let now = now_seconds();
    let fwd = match CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: a live map value, read in place.
        Some(entry) if !stale(unsafe { &*entry }, flow, now) => {
            let refreshed = touch(entry, flow, CT_CLIENT_CLOSING, now);
            // SAFETY: as above, copied out.
            let existing = unsafe { *entry };
            // The reply entry, which the LRU may have taken, is looked at
            // once a second, not per packet (a lookup is most of an
            // established packet's cost): a reply is restored again within
            // a second. The masquerade entry is looked at on every packet:
            // without it the packet would leave with the client's address.
            if refreshed {
                ensure_reply(flow, &existing, now)?;
            }
            if existing.flags & CT_MASQUERADE != 0 {
                ensure_snat(&key, &existing, now);
            }
            existing
        }
        previous => match new_flow(flow, &key, svc, &head, origin, now, previous) {
            Err(stat::DROP_NO_ENDPOINTS) if head.flags & SVC_DROP_EMPTY == 0 => {
                return Err(stat::REJECT_NO_ENDPOINTS);
            }
            result => result?,
        },
    };
    let other_port = if fwd.client_port != flow.sport { fwd.client_port } else { 0 };
    Ok(Some(Nat { addr: fwd.nat_addr, port: fwd.nat_port, other_port }))
}

/// Picks a backend and records both directions of the flow, and whether
/// the client is to be masqueraded: traffic from outside to an endpoint on
/// another node (so the reply comes back through us), and a pod reaching
/// itself through a Service (hairpin; it would not answer its own address).
/// `previous`: the stale forward entry of an earlier flow on this tuple.
#[inline(always)]
fn new_flow(
    flow: &Flow,
    key: &CtKey,
    svc: SvcKey,
    head: &SvcValue,
    origin: Origin,
    now: u32,
    previous: Option<*mut CtValue>,
) -> Result<CtValue, u32> {
    if head.flags & SVC_SOURCE_RANGES != 0 && !source_allowed(flow.saddr, svc) {
        return Err(stat::DROP_SOURCE_RANGE);
    }
    let affine = match head.affinity_timeout {
        0 => None,
        timeout => affine_backend(flow.saddr, svc, timeout),
    };
    let picked = match affine {
        Some(bound) => bound,
        // Not random: the flow's packets pick alike if its entries get lost.
        None => choose_backend(
            svc,
            flow_hash(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto),
        )?,
    };
    if head.affinity_timeout != 0 {
        bind_affinity(flow.saddr, svc, &picked);
    }
    let masquerade = match origin {
        Origin::Outside => !picked.local,
        Origin::LocalPod => picked.ct.nat_addr == flow.saddr,
    };
    let flags = observed(flow, CT_CLIENT_CLOSING) | if masquerade { CT_MASQUERADE } else { 0 };
    if let Some(previous) = previous {
        if let Some(reopened) = reopen(flow, previous, &picked.ct, flags, now) {
            if masquerade {
                ensure_snat(key, &reopened, now);
            }
            return Ok(reopened);
        }
        let _ = CONNTRACK.remove(key);
    }
    let mut chosen = CtValue { flags, last_seen: now, client_port: flow.sport, ..picked.ct };
    chosen.client_port = claim_reply(flow, &chosen, now)?;
    if CONNTRACK.insert(key, &chosen, u64::from(BPF_NOEXIST)).is_err() {
        // Another CPU created the flow first: follow its choice, and give
        // back a reply tuple claimed under another port.
        if chosen.client_port != flow.sport {
            let _ = CONNTRACK.remove(&reply_entry(flow, &chosen, now).0);
        }
        // SAFETY: copied out immediately.
        let existing = unsafe { CONNTRACK.get(key) }.copied().ok_or(stat::DROP_CT_INSERT)?;
        ensure_reply(flow, &existing, now)?;
        return Ok(existing);
    }
    if masquerade {
        ensure_snat(key, &chosen, now);
    }
    Ok(chosen)
}

/// A new flow on the tuple of an earlier one that picked the same backend
/// (the pick is a hash of the tuple: a client reusing its port, as short
/// connections do within seconds, gets the same one unless the endpoints
/// changed) starts over in the earlier flow's entries: their state and
/// time are reset in place, where removing and inserting both entries
/// would cost most of a connection's time in the datapath. `None`: the
/// earlier flow had another backend, or lost its reply entry.
#[inline(always)]
fn reopen(
    flow: &Flow,
    previous: *mut CtValue,
    picked: &CtValue,
    flags: u16,
    now: u32,
) -> Option<CtValue> {
    // SAFETY: a live map value, copied out.
    let old = unsafe { *previous };
    if old.backend_id != picked.backend_id
        || old.nat_addr != picked.nat_addr
        || old.nat_port != picked.nat_port
    {
        return None;
    }
    let reply = CONNTRACK.get_ptr_mut(&key_of(flow, CT_FORWARD).reply_of(&old))?;
    // SAFETY: a live map value; racing writers store a time or flags, and
    // another CPU reopening the same flow stores the same ones.
    unsafe {
        if (*reply).nat_addr != flow.daddr
            || (*reply).nat_port != flow.dport
            || (*reply).client_port != flow.sport
        {
            return None;
        }
        (*reply).flags = 0;
        (*reply).last_seen = now;
        (*previous).flags = flags;
        (*previous).last_seen = now;
    }
    Some(CtValue { flags, last_seen: now, ..old })
}

/// Source NAT for a backend's reply: restores the frontend the client used,
/// and the client's own port if a clash moved it.
#[inline(always)]
pub fn reverse_nat(flow: &Flow) -> Decision {
    let key = key_of(flow, CT_REPLY);
    let Some(entry) = restoring(&CONNTRACK, &key, flow, CT_BACKEND_CLOSING)? else {
        return Ok(None);
    };
    let moved = entry.client_port != 0 && entry.client_port != flow.dport;
    let other_port = if moved { entry.client_port } else { 0 };
    Ok(Some(Nat { addr: entry.nat_addr, port: entry.nat_port, other_port }))
}
