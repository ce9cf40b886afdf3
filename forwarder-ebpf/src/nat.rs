//! Masquerading (source NAT to a node address) of flows marked at DNAT
//! time, and its reversal for replies. The entry that restores the client,
//! keyed by the reply tuple, is what holds a node port: it is touched by
//! both directions, and the port is free again once that entry expired by
//! its state (see `CtTimeouts`): both sides closed, a reset, or idle.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
};
use forwarder_common::{
    CT_BACKEND_CLOSING, CT_CLIENT_CLOSING, CT_SNAT, CT_SNAT_REPLY, CtKey, CtValue,
    SNAT_ADDR_DEFAULT, SNAT_PORT_COUNT, SNAT_PORT_MIN, stat,
};

use crate::{
    conntrack::{expired, key_of, now_seconds, observed, touch},
    lb::{Decision, Nat},
    maps::{CONNTRACK, SNAT_ADDRS},
    parse::Flow,
};

/// Makes sure a masqueraded flow has its SNAT entry, also after LRU
/// eviction took it: the egress program fills in the address and port (it
/// knows the interface); an existing entry keeps its allocation.
#[inline(always)]
pub fn ensure_snat(forward: &CtKey, fwd: &CtValue, now: u32) {
    let snat = CtKey {
        daddr: fwd.nat_addr,
        dport: fwd.nat_port,
        sport: fwd.client_port,
        dir: CT_SNAT,
        ..*forward
    };
    // SAFETY: presence check only.
    if unsafe { CONNTRACK.get(&snat) }.is_none() {
        let pending = CtValue { last_seen: now, ..CtValue::new(0, 0, fwd.backend_id) };
        let _ = CONNTRACK.insert(&snat, &pending, u64::from(BPF_NOEXIST));
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
    touch(entry, flow, CT_BACKEND_CLOSING, now_seconds());
    // SAFETY: a live map value, copied out.
    let entry = unsafe { *entry };
    Ok(Some(Nat::new(entry.nat_addr, entry.nat_port)))
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
    let now = now_seconds();
    let restore = CtValue {
        flags: observed(flow, CT_CLIENT_CLOSING),
        last_seen: now,
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
                // The same client port opening anew (netfilter reopens a
                // connection in TIME_WAIT): the old one's state goes.
                if flow.opening {
                    // SAFETY: as above.
                    unsafe { (*held).flags = 0 };
                }
                touch(held, flow, CT_CLIENT_CLOSING, now);
                return Ok(Some(Nat::new(entry.nat_addr, entry.nat_port)));
            }
            Some(_) => {}
            None => {
                if CONNTRACK.insert(&reply, &restore, u64::from(BPF_NOEXIST)).is_ok() {
                    return Ok(Some(Nat::new(entry.nat_addr, entry.nat_port)));
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
            || (unsafe { CONNTRACK.get(&reply) }.is_some_and(|held| expired(held, flow.proto, now))
                && CONNTRACK.insert(&reply, &restore, u64::from(BPF_ANY)).is_ok());
        if free {
            let mapped = CtValue { nat_addr: addr, nat_port: port, ..entry };
            CONNTRACK
                .insert(&key, &mapped, u64::from(BPF_ANY))
                .map_err(|_| stat::DROP_CT_INSERT)?;
            return Ok(Some(Nat::new(addr, port)));
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
