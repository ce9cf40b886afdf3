//! Service lookup and backend choice: the frontend a packet is addressed
//! to (in the scope its origin is served from), the backend a new flow
//! gets (hashed, or the one its client is bound to by session affinity),
//! and who may open flows at all (`loadBalancerSourceRanges`).
use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
};
use forwarder_common::{
    AffinityKey, AffinityValue, BACKEND_LOCAL, CtValue, NODE_IP_NODEPORT, SCOPE_EXTERNAL,
    SCOPE_INTERNAL, SOURCE_RANGE_FRONTEND_BITS, SVC_DROP_EMPTY, SVC_HAS_INTERNAL, SourceRangeKey,
    SvcKey, SvcValue, stat,
};

use crate::{
    lb::{Nat, Origin},
    maps::{AFFINITY, BACKENDS, CLUSTER_IPS, SERVICES, SOURCE_RANGES, node_ip_flags},
};

/// The slot-0 key of the frontend `daddr:dport` names, in the scope that
/// serves `origin`.
#[inline(always)]
pub fn frontend(daddr: u32, dport: u16, proto: u8, origin: Origin) -> Option<(SvcKey, SvcValue)> {
    let exact = SvcKey::new(daddr, dport, proto, SCOPE_EXTERNAL, 0);
    // SAFETY: copied out immediately.
    let (key, head) = match unsafe { SERVICES.get(&exact) }.copied() {
        Some(head) => (exact, head),
        None => {
            // NodePort: a wildcard entry, valid on the node's own addresses
            // only. The address first: most packets are to other hosts, and
            // the node's addresses are a small map, cached.
            if node_ip_flags(daddr) & NODE_IP_NODEPORT == 0 {
                return None;
            }
            let nodeport = SvcKey::new(0, dport, proto, SCOPE_EXTERNAL, 0);
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

/// Whether `daddr` is a ClusterIP: a port of it no Service declares is
/// rejected.
#[inline(always)]
pub fn is_cluster_ip(daddr: u32) -> bool {
    // SAFETY: presence check only.
    unsafe { CLUSTER_IPS.get(&daddr) }.is_some()
}

/// A backend picked for a new flow.
#[derive(Clone, Copy)]
pub struct Picked {
    pub ct: CtValue,
    /// The backend runs on this node.
    pub local: bool,
    pub slot: u16,
}

/// The backend in slot `1 + pick % count`, reading the count afresh. A
/// concurrent sync may shrink the Service between our reads of the count
/// and of a slot (or remove the slot's backend just after), so one miss is
/// retried from a new count.
#[inline(always)]
pub fn choose_backend(svc: SvcKey, pick: u32) -> Result<Picked, u32> {
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

/// Whether `client` is inside one of the frontend's source ranges.
#[inline(always)]
pub fn source_allowed(client: u32, svc: SvcKey) -> bool {
    let data = SourceRangeKey {
        addr: svc.addr,
        port: svc.port,
        proto: svc.proto,
        scope: svc.scope,
        src: client,
    };
    SOURCE_RANGES.get(Key::new(SOURCE_RANGE_FRONTEND_BITS + 32, data)).is_some()
}

#[inline(always)]
fn affinity_key(client: u32, svc: SvcKey) -> AffinityKey {
    AffinityKey { client, addr: svc.addr, port: svc.port, proto: svc.proto, scope: svc.scope }
}

/// The backend `client` is bound to, if the binding is younger than
/// `timeout` seconds and its backend still holds the same slot.
#[inline(always)]
pub fn affine_backend(client: u32, svc: SvcKey, timeout: u32) -> Option<Picked> {
    // SAFETY: copied out immediately.
    let bound = unsafe { AFFINITY.get(&affinity_key(client, svc)) }.copied()?;
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

/// Binds `client` to `picked` (anew: the binding's age restarts).
#[inline(always)]
pub fn bind_affinity(client: u32, svc: SvcKey, picked: &Picked) {
    let bound = AffinityValue {
        backend_id: picked.ct.backend_id,
        slot: picked.slot,
        _pad: 0,
        // SAFETY: helper without arguments.
        last_used_ns: unsafe { bpf_ktime_get_ns() },
    };
    // Best effort: without the binding the next flow is balanced anew.
    let _ = AFFINITY.insert(&affinity_key(client, svc), &bound, u64::from(BPF_ANY));
}

/// The backend for a socket of the node itself connecting to `daddr:dport`
/// (network order): node traffic uses the internal endpoint set, as pods do.
/// `Ok(None)`: not a frontend.
#[inline(always)]
pub fn socket_backend(daddr: u32, dport: u16, proto: u8) -> Result<Option<Nat>, u32> {
    let Some((svc, head)) = frontend(daddr, dport, proto, Origin::LocalPod) else {
        if is_cluster_ip(daddr) {
            return Err(stat::REJECT_UNKNOWN_PORT);
        }
        return Ok(None);
    };
    // SAFETY: helper without arguments.
    let pick = unsafe { bpf_get_prandom_u32() };
    match choose_backend(svc, pick) {
        Ok(picked) => Ok(Some(Nat::new(picked.ct.nat_addr, picked.ct.nat_port))),
        Err(stat::DROP_NO_ENDPOINTS) if head.flags & SVC_DROP_EMPTY == 0 => {
            Err(stat::REJECT_NO_ENDPOINTS)
        }
        Err(reason) => Err(reason),
    }
}
