//! Masquerading (source NAT to a node address) of flows marked at DNAT
//! time, and its reversal for replies, in a map of its own (`NAT4_V1`, so
//! a storm of Service flows cannot evict the entries that hold ports).
//!
//! The entry that restores the client, keyed by the reply tuple, is what
//! holds a node port: both directions refresh it, and the port is free
//! again once that entry expired by its state (see `CtTimeouts`): both
//! sides closed, a reset, or idle. A new flow keeps the client's own port
//! when it is a masquerade port and free, as netfilter does; otherwise it
//! gets one by random probes over every masquerade port (`SnatPorts`).
//! Masquerade ports include the node's ephemeral ones, so a connection of
//! the node's own (or one netfilter masqueraded) may open on a port a
//! masqueraded flow holds to the same backend: that connection is moved to
//! another port, the same way.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_CURRENT_NETNS, BPF_NOEXIST, bpf_sock_tuple},
    helpers::{bpf_get_prandom_u32, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    programs::TcContext,
};
use forwarder_common::{
    CT_BACKEND_CLOSING, CT_CLIENT_CLOSING, CT_SNAT, CT_SNAT_REPLY, CtKey, CtValue,
    NODE_IP_MASQUERADE, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL, SNAT_ADDR_DEFAULT, SnatPorts, SvcKey,
    stat,
};

use crate::{
    conntrack::{expired, key_of, now_seconds, observed, restoring, touch},
    lb::{Decision, Nat},
    maps::{NAT, SERVICES, SNAT_ADDRS, node_ip_flags},
    parse::Flow,
};

/// Set at load time (`SnatPorts::DEFAULT` unless a test narrows it).
#[unsafe(no_mangle)]
static SNAT_PORTS: SnatPorts = SnatPorts::DEFAULT;

#[inline(always)]
fn ports() -> SnatPorts {
    // SAFETY: a volatile read of a load-time constant.
    unsafe { core::ptr::read_volatile(&SNAT_PORTS) }
}

/// Random probes a new flow gets after its own port: with a tenth of the
/// ports held, all 32 miss once in 10^32; with 60% held, once in 10^7.
const PROBES: u32 = 32;

/// Makes sure a masqueraded flow has its SNAT entry, also after LRU
/// eviction took it: the egress program fills in the address and port (it
/// knows the interface); an existing entry keeps its allocation.
#[inline(always)]
pub fn ensure_snat(forward: &CtKey, fwd: &CtValue, now: u32) {
    let snat = forward.snat_of(fwd);
    // SAFETY: presence check only.
    if unsafe { NAT.get(&snat) }.is_none() {
        let pending = CtValue { last_seen: now, ..CtValue::new(0, 0, fwd.backend_id) };
        let _ = NAT.insert(&snat, &pending, u64::from(BPF_NOEXIST));
    }
}

/// For a reply to a masqueraded flow (`backend -> node:port`): the client
/// to restore as the destination.
#[inline(always)]
pub fn reverse_snat(flow: &Flow) -> Decision {
    // Only masquerade addresses and ports can match: spare other packets
    // the lookup in a large map (replies to pods, to the node's own
    // connections on ports outside the range).
    if !ports().contains(u16::from_be(flow.dport))
        || node_ip_flags(flow.daddr) & NODE_IP_MASQUERADE == 0
    {
        return Ok(None);
    }
    let entry = restoring(&NAT, &key_of(flow, CT_SNAT_REPLY), flow, CT_BACKEND_CLOSING)?;
    Ok(entry.map(|entry| Nat::new(entry.nat_addr, entry.nat_port)))
}

/// Masquerading of a flow marked at DNAT time, on the interface it leaves
/// by: the first packet picks the interface's address and a free port.
#[inline(always)]
pub fn snat(ctx: &TcContext, flow: &Flow, ifindex: u32) -> Decision {
    let key = key_of(flow, CT_SNAT);
    let now = now_seconds();
    // SAFETY: copied out immediately.
    let (entry, moving) = match unsafe { NAT.get(&key) }.copied() {
        Some(entry) => (entry, false),
        // A connection from a node address whose tuple a masqueraded flow
        // holds (a node socket's port, picked by the kernel without
        // knowing, or netfilter's masquerading of a pod): it moves to a
        // free port instead, as netfilter moves it, keeping its address,
        // and the reply entry restores it (`reverse_snat`).
        None if clashes_with_masquerade(flow, now) => {
            let moving = CtValue { last_seen: now, ..CtValue::new(0, 0, 0) };
            let _ = NAT.insert(&key, &moving, u64::from(BPF_NOEXIST));
            (moving, true)
        }
        None => return Ok(None),
    };
    let restore = CtValue {
        flags: observed(flow, CT_CLIENT_CLOSING),
        last_seen: now,
        ..CtValue::new(flow.saddr, flow.sport, entry.backend_id)
    };
    if entry.nat_addr != 0 {
        // The port is ours as long as its reply entry restores this client;
        // LRU eviction may have taken it, and another flow the port.
        let reply = snat_reply_key(flow, entry.nat_addr, entry.nat_port);
        match NAT.get_ptr_mut(&reply) {
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
                let _ = touch(held, flow, CT_CLIENT_CLOSING, now);
                return Ok(Some(Nat::new(entry.nat_addr, entry.nat_port)));
            }
            Some(_) => {}
            None => {
                if NAT.insert(&reply, &restore, u64::from(BPF_NOEXIST)).is_ok() {
                    return Ok(Some(Nat::new(entry.nat_addr, entry.nat_port)));
                }
            }
        }
    }
    let addr = if moving {
        flow.saddr
    } else {
        // SAFETY: copied out immediately.
        unsafe { SNAT_ADDRS.get(&ifindex).or_else(|| SNAT_ADDRS.get(&SNAT_ADDR_DEFAULT)) }
            .copied()
            .ok_or(stat::DROP_SNAT)?
    };
    let ports = ports();
    let own = u16::from_be(flow.sport);
    let mut port = if ports.contains(own) && claim(ctx, flow, addr, flow.sport, &restore, now) {
        Some(flow.sport)
    } else {
        None
    };
    if port.is_none() && ports.count() != 0 {
        for _ in 0..PROBES {
            // Independent random draws. Probes a fixed stride apart from a
            // random start are one pattern shifted, so flows fill runs
            // along it (linear probing's clustering): a storm of 20,000
            // flows to one backend lost one flow in about 20 storms that
            // way (simulated 3 in 60; independent draws 0 in 60).
            // SAFETY: helper without arguments.
            let index = unsafe { bpf_get_prandom_u32() } % ports.count();
            let candidate = ports.port(index).to_be();
            if claim(ctx, flow, addr, candidate, &restore, now) {
                port = Some(candidate);
                break;
            }
        }
    }
    let port = port.ok_or(stat::DROP_SNAT)?;
    let mapped = CtValue { nat_addr: addr, nat_port: port, ..entry };
    NAT.insert(&key, &mapped, u64::from(BPF_ANY)).map_err(|_| stat::DROP_CT_INSERT)?;
    Ok(Some(Nat::new(addr, port)))
}

/// Whether `flow` opens a connection (or is a datagram) whose tuple is
/// the reply tuple of a live masqueraded flow: its replies would go to
/// that flow's client. Only a masquerade address can be the destination of
/// a reply entry, so the lookup itself tells a node address from others;
/// TCP is checked when it opens (a port a node socket holds is never
/// claimed, `node_socket`), UDP on every datagram that has no mapping.
#[inline(always)]
fn clashes_with_masquerade(flow: &Flow, now: u32) -> bool {
    if !(flow.opening || flow.proto == PROTO_UDP) || !ports().contains(u16::from_be(flow.sport)) {
        return false;
    }
    let reply = snat_reply_key(flow, flow.saddr, flow.sport);
    // SAFETY: compared in place.
    unsafe { NAT.get(&reply) }.is_some_and(|held| {
        (held.nat_addr != flow.saddr || held.nat_port != flow.sport)
            && !expired(held, flow.proto, now)
    })
}

/// Takes `addr:port` for this flow if nothing else has it: no live flow
/// masqueraded to the same backend (an expired holder gives it up), no
/// frontend on that port (its replies would be taken for new flows to it),
/// and no socket of the node that the replies would reach.
#[inline(always)]
fn claim(ctx: &TcContext, flow: &Flow, addr: u32, port: u16, restore: &CtValue, now: u32) -> bool {
    let frontend = |a| SvcKey::new(a, port, flow.proto, SCOPE_EXTERNAL, 0);
    // SAFETY: presence checks only.
    if unsafe { SERVICES.get(&frontend(addr)).is_some() || SERVICES.get(&frontend(0)).is_some() } {
        return false;
    }
    if node_socket(ctx, flow, addr, port) {
        return false;
    }
    let reply = snat_reply_key(flow, addr, port);
    // Looked up first: a full LRU makes room before it refuses a key that
    // exists, so a failed insert would evict a live flow. An expired
    // holder is removed and the port claimed like a free one, so of two
    // CPUs claiming it at once only one wins (a window remains between
    // the expiry check and the removal).
    // SAFETY: copied out immediately.
    match unsafe { NAT.get(&reply) }.copied() {
        Some(held) if !expired(&held, flow.proto, now) => return false,
        Some(_) => {
            let _ = NAT.remove(&reply);
        }
        None => {}
    }
    NAT.insert(&reply, restore, u64::from(BPF_NOEXIST)).is_ok()
}

/// Whether a socket of the node would receive the replies to `addr:port`
/// (a connection of its own, a listener, a bound UDP socket). SCTP has no
/// lookup helper: its ports are taken on the map's word alone.
#[inline(always)]
fn node_socket(ctx: &TcContext, flow: &Flow, addr: u32, port: u16) -> bool {
    // SAFETY: a zeroed tuple is valid; its IPv4 member is filled below.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = flow.daddr;
    tuple.__bindgen_anon_1.ipv4.daddr = addr;
    tuple.__bindgen_anon_1.ipv4.sport = flow.dport;
    tuple.__bindgen_anon_1.ipv4.dport = port;
    let size = core::mem::size_of::<u32>() as u32 * 3;
    let netns = BPF_F_CURRENT_NETNS as u64;
    let skb = ctx.skb.skb.cast();
    // SAFETY: helpers on our own context with a tuple on the stack; a
    // socket found is released at once.
    unsafe {
        let sock = match flow.proto {
            PROTO_TCP => bpf_sk_lookup_tcp(skb, &mut tuple, size, netns, 0),
            PROTO_UDP => bpf_sk_lookup_udp(skb, &mut tuple, size, netns, 0),
            _ => return false,
        };
        if sock.is_null() {
            return false;
        }
        bpf_sk_release(sock.cast());
    }
    true
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
