//! IPv4 fragments. Only a datagram's first fragment carries its ports, so
//! the hook that translates it remembers what it did, keyed by the datagram
//! as it saw it (source, destination, protocol, IP id), and gives the later
//! fragments the same new address. Ports sit in the first fragment alone,
//! and the L4 checksum covers the whole datagram, so the first fragment's
//! incremental update holds for all of it.
//!
//! Every first fragment is remembered, translated or not: an untranslated
//! one replaces what an older datagram with the same IP id left, so its
//! later fragments are not taken for that one's. A later fragment without
//! an entry came before its first (reordered, or the first was lost):
//! dropped and counted when addressed to a ClusterIP, which only a
//! translation can deliver; passed otherwise (the node's own datagrams, or
//! a NodePort one that then never completes, as with a lost fragment; an
//! external or load balancer IP's is routed as the node routes that
//! address).
use aya_ebpf::bindings::BPF_ANY;
use forwarder_common::{FRAG_DESTINATION, FragKey, FragNat, PROTO_SCTP, stat};

use crate::{
    maps::FRAGMENTS,
    parse::{Flow, Fragment},
    service::is_cluster_ip,
};

/// Records what a hook does to a first fragment: `addr`, the new address
/// of `side`, and `counter`, the counter it counts; `addr` 0 for nothing.
#[inline(always)]
pub fn remember(flow: &Flow, side: u8, addr: u32, counter: u32) -> Result<(), u32> {
    // SCTP's CRC covers the whole datagram: no fragment of it can be fixed.
    if addr != 0 && flow.proto == PROTO_SCTP {
        return Err(stat::DROP_FRAGMENT);
    }
    let key =
        FragKey { saddr: flow.saddr, daddr: flow.daddr, id: flow.ip_id, proto: flow.proto, side };
    let inserted = FRAGMENTS.insert(&key, &FragNat { addr, counter }, u64::from(BPF_ANY));
    // A translated first fragment whose later ones could not follow would
    // leave the datagram half translated.
    if inserted.is_err() && addr != 0 {
        return Err(stat::DROP_FRAGMENT);
    }
    Ok(())
}

/// The translation of a later fragment: its first's (`None`: left alone).
#[inline(always)]
pub fn translation(frag: &Fragment, side: u8) -> Result<Option<FragNat>, u32> {
    let key =
        FragKey { saddr: frag.saddr, daddr: frag.daddr, id: frag.id, proto: frag.proto, side };
    // SAFETY: copied out immediately.
    match unsafe { FRAGMENTS.get(&key) }.copied() {
        Some(nat) if nat.addr != 0 => Ok(Some(nat)),
        Some(_) => Ok(None),
        None if side == FRAG_DESTINATION && is_cluster_ip(frag.daddr) => Err(stat::DROP_FRAGMENT),
        None => Ok(None),
    }
}
