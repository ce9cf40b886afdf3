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

#[inline(always)]
fn frontend(flow: &Flow) -> Option<(SvcKey, u16)> {
    let exact = SvcKey::new(flow.daddr, flow.dport, flow.proto, 0);
    // SAFETY: the value is copied out before any map update.
    if let Some(svc) = unsafe { SERVICES.get(&exact) } {
        return Some((exact, svc.count));
    }
    // NodePort: a wildcard entry, valid on the node's own addresses only.
    // SAFETY: presence check only.
    unsafe { NODE_IPS.get(&flow.daddr) }?;
    let nodeport = SvcKey::new(0, flow.dport, flow.proto, 0);
    // SAFETY: copied out as above.
    unsafe { SERVICES.get(&nodeport) }.map(|svc| (nodeport, svc.count))
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
fn new_flow(flow: &Flow, key: &CtKey, svc: SvcKey, count: u16) -> Result<CtValue, u32> {
    let chosen = choose_backend(svc, count)?;
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

#[inline(always)]
fn choose_backend(svc: SvcKey, count: u16) -> Result<CtValue, u32> {
    if count == 0 {
        return Err(stat::DROP_NO_ENDPOINTS);
    }
    // SAFETY: helper without arguments.
    let pick = unsafe { bpf_get_prandom_u32() } % u32::from(count);
    let slot = SvcKey { slot: pick as u16 + 1, ..svc };
    // SAFETY: copied out immediately.
    let id = unsafe { SERVICES.get(&slot) }.ok_or(stat::DROP_NO_BACKEND)?.backend_id;
    // SAFETY: copied out immediately.
    let backend = unsafe { BACKENDS.get(&id) }.ok_or(stat::DROP_NO_BACKEND)?;
    Ok(CtValue { nat_addr: backend.addr, nat_port: backend.port, _pad: 0, backend_id: id })
}

/// Destination NAT for a packet addressed to a Service frontend.
#[inline(always)]
pub fn service_dnat(flow: &Flow) -> Decision {
    let Some((svc, count)) = frontend(flow) else {
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
        None => new_flow(flow, &key, svc, count)?,
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
