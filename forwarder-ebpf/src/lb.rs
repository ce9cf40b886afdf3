//! Service lookup, backend choice and connection tracking.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
};
use forwarder_common::{
    AffinityKey, AffinityValue, BACKEND_LOCAL, CT_CLOSING, CT_FORWARD, CT_MASQUERADE, CT_REPLY,
    CT_SNAT, CT_SNAT_REPLY, CtKey, CtValue, PROTO_UDP, SCOPE_EXTERNAL, SCOPE_INTERNAL,
    SNAT_ADDR_DEFAULT, SNAT_CLOSED_TIMEOUT, SNAT_PORT_COUNT, SNAT_PORT_MIN, SNAT_TCP_IDLE_TIMEOUT,
    SNAT_UDP_IDLE_TIMEOUT, SOURCE_RANGE_FRONTEND_BITS, SVC_DROP_EMPTY, SVC_HAS_INTERNAL,
    SVC_SOURCE_RANGES, SourceRangeKey, SvcKey, SvcValue, flow_hash::flow_hash, stat,
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
    let value = CtValue::new(flow.daddr, flow.dport, fwd.backend_id);
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
    // Not random: the flow's packets pick alike if its entries get lost.
    let pick = flow_hash(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
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
    let masquerade = match origin {
        Origin::Outside => !picked.local,
        Origin::LocalPod => picked.ct.nat_addr == flow.saddr,
    };
    let chosen = CtValue { flags: if masquerade { CT_MASQUERADE } else { 0 }, ..picked.ct };
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
        ensure_snat(key, &chosen);
    }
    Ok(chosen)
}

/// Whether the backend a flow was sent to is still in the backends map.
#[inline(always)]
fn backend_present(fwd: &CtValue) -> bool {
    // SAFETY: compared in place.
    unsafe { BACKENDS.get(&fwd.backend_id) }
        .is_some_and(|b| b.addr == fwd.nat_addr && b.port == fwd.nat_port)
}

/// Makes sure a masqueraded flow has its SNAT entry, also after LRU
/// eviction took it: the egress program fills in the address and port (it
/// knows the interface); an existing entry keeps its allocation.
#[inline(always)]
fn ensure_snat(forward: &CtKey, fwd: &CtValue) {
    let snat = CtKey { daddr: fwd.nat_addr, dport: fwd.nat_port, dir: CT_SNAT, ..*forward };
    // SAFETY: presence check only.
    if unsafe { CONNTRACK.get(&snat) }.is_none() {
        let pending = CtValue::new(0, 0, fwd.backend_id);
        let _ = CONNTRACK.insert(&snat, &pending, u64::from(BPF_NOEXIST));
    }
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
    let ct = CtValue::new(backend.addr, backend.port, id);
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
    let mut existing = unsafe { CONNTRACK.get(&key) }.copied();
    // A new connection reusing the client port of a finished one whose
    // backend is gone starts afresh, as netfilter does for a SYN in
    // TIME_WAIT; established flows keep their backend whatever happens.
    if flow.opening && existing.is_some_and(|e| !backend_present(&e)) {
        let _ = CONNTRACK.remove(&key);
        existing = None;
    }
    let fwd = match existing {
        Some(existing) => {
            ensure_reply(flow, &existing)?;
            if existing.flags & CT_MASQUERADE != 0 {
                ensure_snat(&key, &existing);
            }
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
    let Some(entry) = CONNTRACK.get_ptr_mut(&key_of(flow, CT_SNAT_REPLY)) else {
        return Ok(None);
    };
    if flow.first_fragment {
        return Err(stat::DROP_FRAGMENT);
    }
    // SAFETY: a live map value; racing writers only store a time or a flag.
    let entry = unsafe {
        touch(&mut *entry, flow.closing);
        *entry
    };
    Ok(Some(Nat { addr: entry.nat_addr, port: entry.nat_port }))
}

#[inline(always)]
fn now_seconds() -> u32 {
    // SAFETY: helper without arguments.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// Records a packet of a masqueraded flow on its port's entry: its age and
/// whether it is closing decide when the port may be reused.
#[inline(always)]
fn touch(entry: &mut CtValue, closing: bool) {
    entry.last_seen = now_seconds();
    if closing {
        entry.flags |= CT_CLOSING;
    }
}

/// Whether a masquerade port's entry belongs to a finished flow.
#[inline(always)]
fn reclaimable(entry: &CtValue, proto: u8) -> bool {
    let age = now_seconds().saturating_sub(entry.last_seen);
    // SCTP associations are long-lived connections, like TCP's.
    let idle = if proto == PROTO_UDP { SNAT_UDP_IDLE_TIMEOUT } else { SNAT_TCP_IDLE_TIMEOUT };
    age > idle || (entry.flags & CT_CLOSING != 0 && age > SNAT_CLOSED_TIMEOUT)
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
    let restore = CtValue {
        flags: if flow.closing { CT_CLOSING } else { 0 },
        last_seen: now_seconds(),
        ..CtValue::new(flow.saddr, flow.sport, entry.backend_id)
    };
    if entry.nat_addr != 0 {
        // The port is ours as long as its reply entry restores this client;
        // LRU eviction may have taken it, and another flow the port.
        let reply = snat_reply_key(flow, entry.nat_addr, entry.nat_port);
        match CONNTRACK.get_ptr_mut(&reply) {
            // SAFETY: a live map value; racing writers only store a time or a flag.
            Some(held)
                if unsafe { (*held).nat_addr == flow.saddr && (*held).nat_port == flow.sport } =>
            {
                unsafe { touch(&mut *held, flow.closing) };
                return Ok(Some(Nat { addr: entry.nat_addr, port: entry.nat_port }));
            }
            Some(_) => {}
            None => {
                if CONNTRACK.insert(&reply, &restore, u64::from(BPF_NOEXIST)).is_ok() {
                    return Ok(Some(Nat { addr: entry.nat_addr, port: entry.nat_port }));
                }
            }
        }
    }
    // SAFETY: copied out immediately.
    let addr = unsafe { SNAT_ADDRS.get(&ifindex).or_else(|| SNAT_ADDRS.get(&SNAT_ADDR_DEFAULT)) }
        .copied()
        .ok_or(stat::DROP_SNAT)?;
    // SAFETY: helper without arguments.
    let start = unsafe { bpf_get_prandom_u32() };
    for attempt in 0..8u32 {
        let port =
            SNAT_PORT_MIN + (start.wrapping_add(attempt) % u32::from(SNAT_PORT_COUNT)) as u16;
        let port = port.to_be();
        let reply = snat_reply_key(flow, addr, port);
        let free = CONNTRACK.insert(&reply, &restore, u64::from(BPF_NOEXIST)).is_ok()
            // SAFETY: copied out immediately.
            || (unsafe { CONNTRACK.get(&reply) }.is_some_and(|held| reclaimable(held, flow.proto))
                && CONNTRACK.insert(&reply, &restore, u64::from(BPF_ANY)).is_ok());
        if free {
            let mapped = CtValue { nat_addr: addr, nat_port: port, ..entry };
            CONNTRACK
                .insert(&key, &mapped, u64::from(BPF_ANY))
                .map_err(|_| stat::DROP_CT_INSERT)?;
            return Ok(Some(Nat { addr, port }));
        }
    }
    Err(stat::DROP_SNAT)
}

/// Key of the entry that restores a masqueraded flow's client: the reply
/// from the backend to the node address and port.
#[inline(always)]
fn snat_reply_key(flow: &Flow, addr: u32, port: u16) -> CtKey {
    CtKey {
        saddr: flow.daddr,
        daddr: addr,
        sport: flow.dport,
        dport: port,
        proto: flow.proto,
        dir: CT_SNAT_REPLY,
        _pad: [0; 2],
    }
}

/// The backend for a socket of the node itself connecting to `daddr:dport`
/// (network order): node traffic uses the internal endpoint set, as pods do.
/// `Ok(None)`: not a frontend.
#[inline(always)]
pub fn socket_backend(daddr: u32, dport: u16, proto: u8) -> Result<Option<Nat>, u32> {
    let flow = Flow {
        saddr: 0,
        daddr,
        sport: 0,
        dport,
        proto,
        first_fragment: false,
        closing: false,
        opening: false,
        l4_off: 0,
        l4_len: 0,
    };
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
