//! Service lookup, backend choice and connection tracking.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
};
use forwarder_common::{CT_FORWARD, CT_REPLY, CtKey, CtValue, SvcKey, stat};

use crate::{
    maps::{BACKENDS, CONNTRACK, NODE_IPS, SERVICES},
    parse::Flow,
};

/// New address and port for one side of the packet.
pub struct Nat {
    pub addr: u32,
    pub port: u16,
}

/// `Ok(None)`: not a Service packet. `Err(reason)`: drop, counted by reason.
pub type Decision = Result<Option<Nat>, u32>;

/// The frontend's slot-0 key, if the packet is addressed to one.
#[inline(always)]
fn frontend(flow: &Flow) -> Option<SvcKey> {
    let exact = SvcKey::new(flow.daddr, flow.dport, flow.proto, 0);
    // SAFETY: presence check only.
    if unsafe { SERVICES.get(&exact) }.is_some() {
        return Some(exact);
    }
    // NodePort: a wildcard entry, valid on the node's own addresses only.
    // SAFETY: presence check only.
    unsafe { NODE_IPS.get(&flow.daddr) }?;
    let nodeport = SvcKey::new(0, flow.dport, flow.proto, 0);
    // SAFETY: presence check only.
    unsafe { SERVICES.get(&nodeport) }.map(|_| nodeport)
}

#[inline(always)]
fn forward_key(flow: &Flow) -> CtKey {
    CtKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        dir: CT_FORWARD,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn reply_entry(flow: &Flow, fwd: &CtValue) -> (CtKey, CtValue) {
    let key = CtKey {
        saddr: fwd.nat_addr,
        daddr: flow.saddr,
        sport: fwd.nat_port,
        dport: flow.sport,
        proto: flow.proto,
        dir: CT_REPLY,
        _pad: [0; 2],
    };
    // The address the client used, not the wildcard of a NodePort entry.
    let value =
        CtValue { nat_addr: flow.daddr, nat_port: flow.dport, _pad: 0, backend_id: fwd.backend_id };
    (key, value)
}

#[inline(always)]
fn ensure_reply(flow: &Flow, fwd: &CtValue) -> Result<(), u32> {
    let (key, value) = reply_entry(flow, fwd);
    // The lookup also refreshes the reply entry in the LRU for one-way flows.
    // SAFETY: presence check only.
    if unsafe { CONNTRACK.get(&key) }.is_some() {
        return Ok(());
    }
    CONNTRACK.insert(&key, &value, u64::from(BPF_ANY)).map_err(|_| stat::DROP_CT_INSERT)
}

/// Picks a backend and records both directions of the flow.
#[inline(always)]
fn new_flow(flow: &Flow, key: &CtKey, svc: SvcKey) -> Result<CtValue, u32> {
    // SAFETY: helper without arguments.
    let pick = unsafe { bpf_get_prandom_u32() };
    let mut chosen = choose_backend(svc, pick)?;
    if collides(flow, &chosen) {
        chosen = choose_backend(svc, pick.wrapping_add(1))?;
        if collides(flow, &chosen) {
            return Err(stat::DROP_CT_COLLISION);
        }
    }
    if CONNTRACK.insert(key, &chosen, u64::from(BPF_NOEXIST)).is_err() {
        // Another CPU created the flow first: follow its choice.
        // SAFETY: copied out immediately.
        let existing = unsafe { CONNTRACK.get(key) }.copied().ok_or(stat::DROP_CT_INSERT)?;
        ensure_reply(flow, &existing)?;
        return Ok(existing);
    }
    let (reply_key, reply) = reply_entry(flow, &chosen);
    CONNTRACK.insert(&reply_key, &reply, u64::from(BPF_ANY)).map_err(|_| stat::DROP_CT_INSERT)?;
    Ok(chosen)
}

/// Whether a live flow from the same client address and port to another
/// frontend already reaches `chosen`: after DNAT both would be the same
/// tuple, which neither the backend nor the reply entry can tell apart.
#[inline(always)]
fn collides(flow: &Flow, chosen: &CtValue) -> bool {
    let (reply_key, _) = reply_entry(flow, chosen);
    // SAFETY: copied out immediately.
    let Some(other) = (unsafe { CONNTRACK.get(&reply_key) }).copied() else {
        return false;
    };
    if other.nat_addr == flow.daddr && other.nat_port == flow.dport {
        return false;
    }
    let other_forward = CtKey {
        saddr: flow.saddr,
        daddr: other.nat_addr,
        sport: flow.sport,
        dport: other.nat_port,
        proto: flow.proto,
        dir: CT_FORWARD,
        _pad: [0; 2],
    };
    // An entry left by a finished flow does not count.
    // SAFETY: copied out immediately.
    unsafe { CONNTRACK.get(&other_forward) }
        .is_some_and(|v| v.nat_addr == chosen.nat_addr && v.nat_port == chosen.nat_port)
}

/// The backend in slot `1 + pick % count`, reading the count afresh. A
/// concurrent sync may shrink the Service between our reads of the count
/// and of a slot (or remove the slot's backend just after), so one miss is
/// retried from a new count.
#[inline(always)]
fn choose_backend(svc: SvcKey, pick: u32) -> Result<CtValue, u32> {
    match backend_in_slot(svc, pick) {
        Err(stat::DROP_NO_BACKEND) => backend_in_slot(svc, pick),
        result => result,
    }
}

#[inline(always)]
fn backend_in_slot(svc: SvcKey, pick: u32) -> Result<CtValue, u32> {
    // SAFETY: copied out immediately.
    let count = unsafe { SERVICES.get(&svc) }.map_or(0, |v| v.count);
    if count == 0 {
        return Err(stat::DROP_NO_ENDPOINTS);
    }
    let slot = SvcKey { slot: (pick % u32::from(count)) as u16 + 1, ..svc };
    // SAFETY: copied out immediately.
    let id = unsafe { SERVICES.get(&slot) }.ok_or(stat::DROP_NO_BACKEND)?.backend_id;
    // SAFETY: copied out immediately.
    let backend = unsafe { BACKENDS.get(&id) }.ok_or(stat::DROP_NO_BACKEND)?;
    Ok(CtValue { nat_addr: backend.addr, nat_port: backend.port, _pad: 0, backend_id: id })
}

/// Destination NAT for a packet addressed to a Service frontend.
#[inline(always)]
pub fn service_dnat(flow: &Flow) -> Decision {
    let Some(svc) = frontend(flow) else {
        return Ok(None);
    };
    if flow.first_fragment {
        return Err(stat::DROP_FRAGMENT);
    }
    let key = forward_key(flow);
    // SAFETY: copied out immediately.
    let fwd = match unsafe { CONNTRACK.get(&key) }.copied() {
        Some(existing) => {
            ensure_reply(flow, &existing)?;
            existing
        }
        None => new_flow(flow, &key, svc)?,
    };
    Ok(Some(Nat { addr: fwd.nat_addr, port: fwd.nat_port }))
}

/// Source NAT for a backend's reply: restores the frontend the client used.
#[inline(always)]
pub fn reverse_nat(flow: &Flow) -> Decision {
    let key = CtKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        dir: CT_REPLY,
        _pad: [0; 2],
    };
    // SAFETY: copied out immediately.
    let Some(entry) = (unsafe { CONNTRACK.get(&key) }).copied() else {
        return Ok(None);
    };
    if flow.first_fragment {
        return Err(stat::DROP_FRAGMENT);
    }
    Ok(Some(Nat { addr: entry.nat_addr, port: entry.nat_port }))
}
