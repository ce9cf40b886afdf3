//! Map definitions. Names must match `forwarder_common::map_names`.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use forwarder_common::{
    AFFINITY_MAX, AffinityKey, AffinityValue, BACKENDS_MAX, Backend, CLUSTER_IPS_MAX,
    CONNTRACK_FLAGS, CONNTRACK_MAX, CtKey, CtValue, FRAGMENTS_MAX, FragKey, FragNat, NAT_MAX,
    NODE_IPS_MAX, RejectBucket, SERVICES_MAX, SNAT_ADDRS_MAX, SOCKET_NAT_MAX, SOURCE_RANGES_MAX,
    SockKey, SockNat, SourceRangeKey, SvcKey, SvcValue, stat,
};

#[map(name = "SVC4_V1")]
pub static SERVICES: HashMap<SvcKey, SvcValue> = HashMap::with_max_entries(SERVICES_MAX, 0);

#[map(name = "BACKEND4_V1")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::with_max_entries(BACKENDS_MAX, 0);

/// LRU so a full table evicts the coldest flow instead of refusing new ones.
/// A list per CPU: with the shared one, a CPU short of free entries takes
/// the freshest from the others' lists, and a connection storm past the
/// map's size lost live flows (0.5% of new connections in the benchmark).
#[map(name = "CT4_V2")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(CONNTRACK_MAX, CONNTRACK_FLAGS);

/// Masquerade state: `CT_SNAT` and `CT_SNAT_REPLY` entries. Apart from
/// conntrack, so Service flows cannot evict the entries holding ports;
/// one LRU list, as both directions of a flow touch its entries on
/// whichever CPUs they arrive.
#[map(name = "NAT4_V1")]
pub static NAT: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(NAT_MAX, 0);

/// Datagram (as a hook saw it) -> what that hook did to its first
/// fragment, for the later fragments (`frag`).
#[map(name = "FRAG4_V1")]
pub static FRAGMENTS: LruHashMap<FragKey, FragNat> = LruHashMap::with_max_entries(FRAGMENTS_MAX, 0);

/// Local node addresses -> what they are used for (`NODE_IP_*`). Small
/// and hot: one lookup tells a packet to another host, the common case,
/// from one that may be for a NodePort or a masqueraded flow.
#[map(name = "NODE_IP4_V2")]
pub static NODE_IPS: HashMap<u32, u32> = HashMap::with_max_entries(NODE_IPS_MAX, 0);

/// What `addr` is used for on this node (`NODE_IP_*`; 0: not a node
/// address).
#[inline(always)]
pub fn node_ip_flags(addr: u32) -> u32 {
    // SAFETY: copied out immediately.
    unsafe { NODE_IPS.get(&addr) }.copied().unwrap_or(0)
}

/// Masquerade address per egress ifindex; `SNAT_ADDR_DEFAULT` for the rest.
#[map(name = "SNAT_ADDR4_V1")]
pub static SNAT_ADDRS: HashMap<u32, u32> = HashMap::with_max_entries(SNAT_ADDRS_MAX, 0);

/// Client -> backend bindings of `sessionAffinity: ClientIP` Services; LRU
/// so that stale bindings make room by themselves.
#[map(name = "AFFINITY4_V1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(AFFINITY_MAX, 0);

/// Every ClusterIP: a packet to one on a port no frontend declares is
/// rejected, as kube-proxy's nftables mode does.
#[map(name = "CLUSTER_IP4_V1")]
pub static CLUSTER_IPS: HashMap<u32, u32> = HashMap::with_max_entries(CLUSTER_IPS_MAX, 0);

/// Allowed client prefixes per load balancer frontend.
#[map(name = "SRC_RANGE4_V1")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u32> =
    LpmTrie::with_max_entries(SOURCE_RANGES_MAX, 0);

/// (Socket cookie, backend) -> the frontend a node socket named and the
/// backend it was sent to, so replies and `getpeername` show the frontend.
#[map(name = "SOCK_NAT4_V2")]
pub static SOCKET_NAT: LruHashMap<SockKey, SockNat> =
    LruHashMap::with_max_entries(SOCKET_NAT_MAX, 0);

/// The node's seed of the flow hash (one `u32`, written once by the agent
/// and pinned, so a restart keeps every flow's pick).
#[map(name = "HASH_SEED_V1")]
pub static HASH_SEED: Array<u32> = Array::with_max_entries(1, 0);

/// The flow hash with this node's seed.
#[inline(always)]
pub fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let seed = HASH_SEED.get(0).copied().unwrap_or(0);
    forwarder_common::flow_hash::flow_hash(seed, saddr, daddr, sport, dport, proto)
}

/// Per-CPU token buckets of the ICMP reject rate limit.
#[map(name = "REJECT_RATE_V1")]
pub static REJECT_BUCKETS: PerCpuArray<RejectBucket> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "STATS_V3")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}
