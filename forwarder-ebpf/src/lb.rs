//! Service lookup, backend choice and connection tracking.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
};
use forwarder_common::{
    AffinityKey, AffinityValue, BACKEND_LOCAL, CT_FORWARD, CT_REPLY, CT_SNAT, CT_SNAT_REPLY, CtKey,
    CtValue, SCOPE_EXTERNAL, SCOPE_INTERNAL, SNAT_ADDR_DEFAULT, SNAT_PORT_COUNT, SNAT_PORT_MIN,
    SOURCE_RANGE_FRONTEND_BITS, SVC_DROP_EMPTY, SVC_HAS_INTERNAL, SVC_SOURCE_RANGES,
    SourceRangeKey, SvcKey, SvcValue, stat,
};

use crate::{
    maps::{
        AFFINITY, BACKENDS, CLUSTER_IPS, CONNTRACK, NODE_IPS, SERVICES, SNAT_ADDRS, SOURCE_RANGES,
    },
    parse::Flow,
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

/// New address and port for one side of the packet.
pub struct Nat {
    pub addr: u32,
    pub port: u16,
}

/// `Ok(None)`: not a Service packet. `Err(reason)`: drop, counted by reason.
pub type Decision = Result<Option<Nat>, u32>;

/// The slot-0 key of the frontend the packet is addressed to, in the scope
/// that serves its origin.
#[inline(always)]
fn frontend(flow: &Flow, origin: Origin) -> Option<(SvcKey, SvcValue)> {
    let exact = SvcKey::new(flow.daddr, flow.dport, flow.proto, SCOPE_EXTERNAL, 0);
    // SAFETY: copied out immediately.
    let (key, head) = match unsafe { SERVICES.get(&exact) }.copied() {
        Some(head) => (exact, head),
        None => {
            // NodePort: a wildcard entry, valid on the node's own addresses only.
            // SAFETY: presence check only.
            unsafe { NODE_IPS.get(&flow.daddr) }?;
            let nodeport = SvcKey::new(0, flow.dport, flow.proto, SCOPE_EXTERNAL, 0);
            // SAFETY: copied out immediately.
            (nodeport, unsafe { SERVICES.get(&nodeport) }.copied()?)
        }
    };
    if origin == Origin::LocalPod && head.flags & SVC_HAS_INTERNAL != 0 {
        let internal = SvcKey { scope: SCOPE_INTERNAL, ..key };
        // Absent while a sync is adding or removing it: the external set is
        // then still a valid answer.
        // SAFETY: copied out immediately.
        if let Some(internal_head) = unsafe { SERVICES.get(&internal) }.copied() {
            return Some((internal, internal_head));
        }
    }
    Some((key, head))
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

/// Picks a backend and records both directions of the flow, and whether
/// the client is to be masqueraded: traffic from outside to an endpoint on
/// another node (so the reply comes back through us), and a pod reaching
/// itself through a Service (hairpin; it would not answer its own address).
#[inline(always)]
fn new_flow(
    flow: &Flow,
    key: &CtKey,
    svc: SvcKey,
    head: &SvcValue,
    origin: Origin,
) -> Result<CtValue, u32> {
    if head.flags & SVC_SOURCE_RANGES != 0 && !source_allowed(flow, svc) {
        return Err(stat::DROP_SOURCE_RANGE);
    }
    // SAFETY: helper without arguments.
    let pick = unsafe { bpf_get_prandom_u32() };
    let affine = match head.affinity_timeout {
        0 => None,
        timeout => affine_backend(flow, svc, timeout),
    };
    let mut picked = match affine {
        Some(bound) => bound,
        None => choose_backend(svc, pick)?,
    };
    if collides(flow, &picked.ct) {
        picked = choose_backend(svc, pick.wrapping_add(1))?;
        if collides(flow, &picked.ct) {
            return Err(stat::DROP_CT_COLLISION);
        }
    }
    if head.affinity_timeout != 0 {
        let bound = AffinityValue {
            backend_id: picked.ct.backend_id,
            slot: picked.slot,
            _pad: 0,
            // SAFETY: helper without arguments.
            last_used_ns: unsafe { bpf_ktime_get_ns() },
        };
        // Best effort: without the binding the next flow is balanced anew.
        let _ = AFFINITY.insert(&affinity_key(flow, svc), &bound, u64::from(BPF_ANY));
    }
    let chosen = picked.ct;
    let masquerade = match origin {
        Origin::Outside => !picked.local,
        Origin::LocalPod => chosen.nat_addr == flow.saddr,
    };
    if CONNTRACK.insert(key, &chosen, u64::from(BPF_NOEXIST)).is_err() {
        // Another CPU created the flow first: follow its choice.
        // SAFETY: copied out immediately.
        let existing = unsafe { CONNTRACK.get(key) }.copied().ok_or(stat::DROP_CT_INSERT)?;
        ensure_reply(flow, &existing)?;
        return Ok(existing);
    }
    let (reply_key, reply) = reply_entry(flow, &chosen);
    CONNTRACK.insert(&reply_key, &reply, u64::from(BPF_ANY)).map_err(|_| stat::DROP_CT_INSERT)?;
    if masquerade {
        // The egress program fills in the address and port: it knows the
        // interface. An existing entry keeps its allocation.
        let snat = CtKey { daddr: chosen.nat_addr, dport: chosen.nat_port, dir: CT_SNAT, ..*key };
        let pending = CtValue { nat_addr: 0, nat_port: 0, _pad: 0, backend_id: chosen.backend_id };
        let _ = CONNTRACK.insert(&snat, &pending, u64::from(BPF_NOEXIST));
    }
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

/// A backend picked for a new flow.
#[derive(Clone, Copy)]
struct Picked {
    ct: CtValue,
    /// The backend runs on this node.
    local: bool,
    slot: u16,
}

/// The backend in slot `1 + pick % count`, reading the count afresh. A
/// concurrent sync may shrink the Service between our reads of the count
/// and of a slot (or remove the slot's backend just after), so one miss is
/// retried from a new count.
#[inline(always)]
fn choose_backend(svc: SvcKey, pick: u32) -> Result<Picked, u32> {
    // SAFETY: copied out immediately.
    let count = unsafe { SERVICES.get(&svc) }.map_or(0, |v| v.count);
    if count == 0 {
        return Err(stat::DROP_NO_ENDPOINTS);
    }
    match backend_in_slot(svc, (pick % u32::from(count)) as u16 + 1) {
        Some(picked) => Ok(picked),
        None => {
            // SAFETY: copied out immediately.
            let count = unsafe { SERVICES.get(&svc) }.map_or(0, |v| v.count);
            if count == 0 {
                return Err(stat::DROP_NO_ENDPOINTS);
            }
            backend_in_slot(svc, (pick % u32::from(count)) as u16 + 1).ok_or(stat::DROP_NO_BACKEND)
        }
    }
}

#[inline(always)]
fn backend_in_slot(svc: SvcKey, slot: u16) -> Option<Picked> {
    // SAFETY: copied out immediately.
    let id = unsafe { SERVICES.get(&SvcKey { slot, ..svc }) }?.backend_id;
    // SAFETY: copied out immediately.
    let backend = unsafe { BACKENDS.get(&id) }.copied()?;
    let ct = CtValue { nat_addr: backend.addr, nat_port: backend.port, _pad: 0, backend_id: id };
    Some(Picked { ct, local: backend.flags & BACKEND_LOCAL != 0, slot })
}

/// Whether the client is inside one of the frontend's source ranges.
#[inline(always)]
fn source_allowed(flow: &Flow, svc: SvcKey) -> bool {
    let data = SourceRangeKey {
        addr: svc.addr,
        port: svc.port,
        proto: svc.proto,
        scope: svc.scope,
        src: flow.saddr,
    };
    SOURCE_RANGES.get(Key::new(SOURCE_RANGE_FRONTEND_BITS + 32, data)).is_some()
}

#[inline(always)]
fn affinity_key(flow: &Flow, svc: SvcKey) -> AffinityKey {
    AffinityKey {
        client: flow.saddr,
        addr: svc.addr,
        port: svc.port,
        proto: svc.proto,
        scope: svc.scope,
    }
}

/// The backend this client is bound to, if the binding is younger than
/// `timeout` seconds and its backend still holds the same slot.
#[inline(always)]
fn affine_backend(flow: &Flow, svc: SvcKey, timeout: u32) -> Option<Picked> {
    // SAFETY: copied out immediately.
    let bound = unsafe { AFFINITY.get(&affinity_key(flow, svc)) }.copied()?;
    // SAFETY: helper without arguments.
    let age = unsafe { bpf_ktime_get_ns() }.saturating_sub(bound.last_used_ns);
    if age >= u64::from(timeout) * 1_000_000_000 {
        return None;
    }
    // SAFETY: copied out immediately.
    let count = unsafe { SERVICES.get(&svc) }?.count;
    if bound.slot == 0 || bound.slot > count {
        return None;
    }
    let picked = backend_in_slot(svc, bound.slot)?;
    (picked.ct.backend_id == bound.backend_id).then_some(picked)
}

/// Destination NAT for a packet addressed to a Service frontend.
#[inline(always)]
pub fn service_dnat(flow: &Flow, origin: Origin) -> Decision {
    let Some((svc, head)) = frontend(flow, origin) else {
        // SAFETY: presence check only.
        if unsafe { CLUSTER_IPS.get(&flow.daddr) }.is_some() {
            return Err(stat::REJECT_UNKNOWN_PORT);
        }
        return Ok(None);
    };
    if flow.first_fragment {
        return Err(stat::DROP_FRAGMENT);
    }
    let key = key_of(flow, CT_FORWARD);
    // SAFETY: copied out immediately.
    let fwd = match unsafe { CONNTRACK.get(&key) }.copied() {
        Some(existing) => {
            ensure_reply(flow, &existing)?;
            existing
        }
        None => match new_flow(flow, &key, svc, &head, origin) {
            Err(stat::DROP_NO_ENDPOINTS) if head.flags & SVC_DROP_EMPTY == 0 => {
                return Err(stat::REJECT_NO_ENDPOINTS);
            }
            result => result?,
        },
    };
    Ok(Some(Nat { addr: fwd.nat_addr, port: fwd.nat_port }))
}

/// Source NAT for a backend's reply: restores the frontend the client used.
#[inline(always)]
pub fn reverse_nat(flow: &Flow) -> Decision {
    let key = key_of(flow, CT_REPLY);
    // SAFETY: copied out immediately.
    let Some(entry) = (unsafe { CONNTRACK.get(&key) }).copied() else {
        return Ok(None);
    };
    if flow.first_fragment {
        return Err(stat::DROP_FRAGMENT);
    }
    Ok(Some(Nat { addr: entry.nat_addr, port: entry.nat_port }))
}

#[inline(always)]
fn key_of(flow: &Flow, dir: u8) -> CtKey {
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

/// For a reply to a masqueraded flow (`backend -> node:port`): the client
/// to restore as the destination.
#[inline(always)]
pub fn reverse_snat(flow: &Flow) -> Decision {
    // Only masquerade ports can match: spare other packets the lookup.
    if u16::from_be(flow.dport) < SNAT_PORT_MIN {
        return Ok(None);
    }
    // SAFETY: copied out immediately.
    let Some(entry) = (unsafe { CONNTRACK.get(&key_of(flow, CT_SNAT_REPLY)) }).copied() else {
        return Ok(None);
    };
    if flow.first_fragment {
        return Err(stat::DROP_FRAGMENT);
    }
    Ok(Some(Nat { addr: entry.nat_addr, port: entry.nat_port }))
}

/// Masquerading of a flow marked at DNAT time, on the interface it leaves
/// by: the first packet picks the interface's address and a free port.
#[inline(always)]
pub fn snat(flow: &Flow, ifindex: u32) -> Decision {
    let key = key_of(flow, CT_SNAT);
    // SAFETY: copied out immediately.
    let Some(entry) = (unsafe { CONNTRACK.get(&key) }).copied() else {
        return Ok(None);
    };
    if flow.first_fragment {
        return Err(stat::DROP_FRAGMENT);
    }
    if entry.nat_addr != 0 {
        return Ok(Some(Nat { addr: entry.nat_addr, port: entry.nat_port }));
    }
    // SAFETY: copied out immediately.
    let addr = unsafe { SNAT_ADDRS.get(&ifindex).or_else(|| SNAT_ADDRS.get(&SNAT_ADDR_DEFAULT)) }
        .copied()
        .ok_or(stat::DROP_SNAT)?;
    // SAFETY: helper without arguments.
    let start = unsafe { bpf_get_prandom_u32() };
    let restore = CtValue {
        nat_addr: flow.saddr,
        nat_port: flow.sport,
        _pad: 0,
        backend_id: entry.backend_id,
    };
    for attempt in 0..4u32 {
        let port =
            SNAT_PORT_MIN + (start.wrapping_add(attempt) % u32::from(SNAT_PORT_COUNT)) as u16;
        let port = port.to_be();
        let reply = CtKey {
            saddr: flow.daddr,
            daddr: addr,
            sport: flow.dport,
            dport: port,
            proto: flow.proto,
            dir: CT_SNAT_REPLY,
            _pad: [0; 2],
        };
        if CONNTRACK.insert(&reply, &restore, u64::from(BPF_NOEXIST)).is_ok() {
            let mapped = CtValue { nat_addr: addr, nat_port: port, ..entry };
            CONNTRACK
                .insert(&key, &mapped, u64::from(BPF_ANY))
                .map_err(|_| stat::DROP_CT_INSERT)?;
            return Ok(Some(Nat { addr, port }));
        }
    }
    Err(stat::DROP_SNAT)
}

/// The backend for a socket of the node itself connecting to `daddr:dport`
/// (network order): node traffic uses the internal endpoint set, as pods do.
/// `Ok(None)`: not a frontend.
#[inline(always)]
pub fn socket_backend(daddr: u32, dport: u16, proto: u8) -> Result<Option<Nat>, u32> {
    let flow = Flow { saddr: 0, daddr, sport: 0, dport, proto, first_fragment: false, l4_off: 0 };
    let Some((svc, head)) = frontend(&flow, Origin::LocalPod) else {
        // SAFETY: presence check only.
        if unsafe { CLUSTER_IPS.get(&daddr) }.is_some() {
            return Err(stat::REJECT_UNKNOWN_PORT);
        }
        return Ok(None);
    };
    // SAFETY: helper without arguments.
    let pick = unsafe { bpf_get_prandom_u32() };
    match choose_backend(svc, pick) {
        Ok(picked) => Ok(Some(Nat { addr: picked.ct.nat_addr, port: picked.ct.nat_port })),
        Err(stat::DROP_NO_ENDPOINTS) if head.flags & SVC_DROP_EMPTY == 0 => {
            Err(stat::REJECT_NO_ENDPOINTS)
        }
        Err(reason) => Err(reason),
    }
}
