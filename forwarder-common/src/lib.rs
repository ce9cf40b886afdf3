//! Map keys and values shared by the eBPF programs and userspace.
//!
//! Every type is `#[repr(C)]` with explicit padding so its bytes are fully
//! defined on both sides. Addresses and ports are kept in network byte order
//! (`u32::from_ne_bytes(octets)`, `u16::from_ne_bytes(bytes)`), exactly as
//! they sit in the packet, so the datapath never swaps bytes.
#![cfg_attr(not(test), no_std)]

use core::mem::size_of;

pub mod crc32c;
pub mod csum;
pub mod flow_hash;

/// Map names. A layout change bumps the suffix so an old pinned map is never
/// reused with a new layout.
pub mod map_names {
    pub const SERVICES: &str = "SVC4_V1";
    pub const BACKENDS: &str = "BACKEND4_V1";
    pub const CONNTRACK: &str = "CT4_V2";
    pub const NAT: &str = "NAT4_V1";
    pub const FRAGMENTS: &str = "FRAG4_V1";
    pub const HASH_SEED: &str = "HASH_SEED_V1";
    pub const NODE_IPS: &str = "NODE_IP4_V2";
    pub const SNAT_ADDRS: &str = "SNAT_ADDR4_V1";
    pub const AFFINITY: &str = "AFFINITY4_V1";
    pub const CLUSTER_IPS: &str = "CLUSTER_IP4_V1";
    pub const SOURCE_RANGES: &str = "SRC_RANGE4_V1";
    pub const SOCKET_NAT: &str = "SOCK_NAT4_V2";
    pub const STATS: &str = "STATS_V3";
    pub const REJECT_BUCKETS: &str = "REJECT_RATE_V1";
}

/// Program names, as seen by `bpftool prog` and `Ebpf::program_mut`.
pub mod program_names {
    pub const XDP_NODE: &str = "fwd_xdp_node";
    pub const SOCK_CONNECT: &str = "fwd_sock_connect4";
    pub const SOCK_SENDMSG: &str = "fwd_sock_sendmsg4";
    pub const SOCK_RECVMSG: &str = "fwd_sock_recvmsg4";
    pub const SOCK_PEERNAME: &str = "fwd_sock_peername4";
    pub const TC_POD: &str = "fwd_tc_pod";
    pub const TC_NODE: &str = "fwd_tc_node";
    pub const TC_REVERSE_NAT: &str = "fwd_tc_rnat";
}

/// Default capacities; userspace may override them at load time.
pub const SERVICES_MAX: u32 = 65_536;
pub const BACKENDS_MAX: u32 = 65_536;
pub const CONNTRACK_MAX: u32 = 262_144;
pub const NAT_MAX: u32 = 262_144;
pub const NODE_IPS_MAX: u32 = 256;

/// `NODE_IP4_V2` values: what a node address is used for. It serves
/// NodePorts (within `--nodeport-addresses`)...
pub const NODE_IP_NODEPORT: u32 = 1;
/// ...and masquerades flows (a `SNAT_ADDR4_V1` value): replies to
/// masqueraded flows arrive for it, so only packets to such an address are
/// looked up in the masquerade map.
pub const NODE_IP_MASQUERADE: u32 = 2;
pub const SNAT_ADDRS_MAX: u32 = 4096;
pub const AFFINITY_MAX: u32 = 65_536;
pub const CLUSTER_IPS_MAX: u32 = 65_536;
pub const SOURCE_RANGES_MAX: u32 = 65_536;
pub const SOCKET_NAT_MAX: u32 = 65_536;
/// Datagrams in flight in fragments (LRU): an entry is needed only until
/// its datagram's last fragment passed.
pub const FRAGMENTS_MAX: u32 = 16_384;

/// The conntrack map's flags: `BPF_F_NO_COMMON_LRU`, an LRU list per CPU.
pub const CONNTRACK_FLAGS: u32 = 2;

/// Global set at load time: the network namespace (cookie) whose sockets
/// the socket-level programs translate, the node's own.
pub const NODE_NETNS_COOKIE: &str = "NODE_NETNS_COOKIE";

/// Kubernetes' default NodePort range: never a masquerade port, or the
/// reply to one would be taken for a new NodePort flow. (Ports of other
/// frontends are checked when a port is picked.)
pub const NODE_PORT_MIN: u16 = 30_000;
pub const NODE_PORT_MAX: u16 = 32_767;
/// Below this, ports are privileged; masquerading leaves them alone, as
/// netfilter does for a source port above 1023.
pub const SNAT_PORT_FLOOR: u16 = 1_024;

/// The source ports masquerading picks from, as two intervals (around the
/// NodePort range). Ports a node socket holds are checked when picked. A
/// load-time global of the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatPorts {
    pub low_min: u16,
    pub low_count: u16,
    pub high_min: u16,
    pub high_count: u16,
}

impl Default for SnatPorts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Global holding the `SnatPorts` the programs use.
pub const SNAT_PORTS: &str = "SNAT_PORTS";

impl SnatPorts {
    /// Every port above 1023 but Kubernetes' NodePort range: 1024-29999
    /// and 32768-65535. The node's ephemeral ports are included, as in
    /// netfilter's masquerading: a node connection that gets a port a
    /// masqueraded flow holds is moved to another one by the datapath.
    pub const DEFAULT: Self = Self {
        low_min: SNAT_PORT_FLOOR,
        low_count: NODE_PORT_MIN - SNAT_PORT_FLOOR,
        high_min: NODE_PORT_MAX + 1,
        high_count: (65_536 - (NODE_PORT_MAX as u32 + 1)) as u16,
    };

    pub const fn count(&self) -> u32 {
        self.low_count as u32 + self.high_count as u32
    }

    /// The `index`-th port (`index < count()`), host order.
    pub const fn port(&self, index: u32) -> u16 {
        if index < self.low_count as u32 {
            self.low_min + index as u16
        } else {
            self.high_min + (index - self.low_count as u32) as u16
        }
    }

    /// Whether `port` (host order) is one of them.
    pub const fn contains(&self, port: u16) -> bool {
        (port >= self.low_min && ((port - self.low_min) as u32) < self.low_count as u32)
            || (port >= self.high_min && ((port - self.high_min) as u32) < self.high_count as u32)
    }
}

/// `SNAT_ADDR4_V1` key of the address used when the egress interface has
/// none of its own (ifindexes start at 1).
pub const SNAT_ADDR_DEFAULT: u32 = 0;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// `SvcKey::scope`: the entry for every client...
pub const SCOPE_EXTERNAL: u8 = 0;
/// ...and, where it differs, the entry for pods on this node (an external
/// frontend with `externalTrafficPolicy: Local`).
pub const SCOPE_INTERNAL: u8 = 1;

/// Key of the services map.
///
/// Slot 0 is the frontend itself and holds the backend count; slots
/// `1..=count` each hold one backend id (Cilium's layout). A NodePort frontend
/// has `addr == 0` and matches any address `NODE_IP4_V2` marks
/// `NODE_IP_NODEPORT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    /// Frontend address, network order; 0 for a NodePort.
    pub addr: u32,
    /// Frontend port, network order.
    pub port: u16,
    pub slot: u16,
    pub proto: u8,
    /// `SCOPE_EXTERNAL` or `SCOPE_INTERNAL`.
    pub scope: u8,
    pub _pad: [u8; 2],
}

impl SvcKey {
    pub const fn new(addr: u32, port: u16, proto: u8, scope: u8, slot: u16) -> Self {
        Self { addr, port, slot, proto, scope, _pad: [0; 2] }
    }
}

/// `SvcValue::flags`: a `SCOPE_INTERNAL` entry exists for pods on this node.
pub const SVC_HAS_INTERNAL: u16 = 1;
/// `SvcValue::flags`: only sources in `SRC_RANGE4_V1` for this frontend may
/// open flows (`loadBalancerSourceRanges`).
pub const SVC_SOURCE_RANGES: u16 = 4;
/// `SvcValue::flags`: without endpoints, drop new flows instead of
/// rejecting them (a `Local` policy whose node has none, while other nodes
/// do).
pub const SVC_DROP_EMPTY: u16 = 2;

/// Value of the services map: slot 0 uses `count`, `flags` and
/// `affinity_timeout`, other slots `backend_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SvcValue {
    pub backend_id: u32,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 without affinity.
    pub affinity_timeout: u32,
    /// Number of backend slots.
    pub count: u16,
    /// `SVC_*` flags.
    pub flags: u16,
}

impl SvcValue {
    pub const fn frontend(count: u16, flags: u16, affinity_timeout: u32) -> Self {
        Self { backend_id: 0, affinity_timeout, count, flags }
    }

    pub const fn slot(backend_id: u32) -> Self {
        Self { backend_id, affinity_timeout: 0, count: 0, flags: 0 }
    }
}

/// Data of the source ranges LPM trie key: the frontend (slot-0 key fields)
/// then the client address, so the prefix length is 64 + the CIDR's bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
    pub src: u32,
}

/// Key of the socket reverse map: a node socket (by cookie) and a backend
/// it was sent to. Per backend, not per socket: an unconnected UDP socket
/// may send to one frontend twice and reach two backends (musl's resolver
/// sends A and AAAA queries so), and each reply must show the frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub cookie: u64,
    pub backend_addr: u32,
    pub backend_port: u16,
    pub _pad: [u8; 2],
}

/// What a node socket (by cookie) was sent to instead of the frontend the
/// application named: replies and `getpeername` are shown from the frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockNat {
    pub frontend_addr: u32,
    pub backend_addr: u32,
    pub frontend_port: u16,
    pub backend_port: u16,
}

/// Bits of `SourceRangeKey` before `src`.
pub const SOURCE_RANGE_FRONTEND_BITS: u32 = 64;

/// Key of the session affinity map: a client address and the frontend
/// (slot-0 key fields) it reached.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: u32,
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// The backend a client is bound to, in which slot, and since when the
/// client last opened a flow (`bpf_ktime_get_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub slot: u16,
    pub _pad: u16,
    pub last_used_ns: u64,
}

/// `Backend::flags`: the endpoint runs on this node.
pub const BACKEND_LOCAL: u8 = 1;

/// Value of the backends map, keyed by a `u32` backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Pod address, network order.
    pub addr: u32,
    /// Target port, network order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_LOCAL`.
    pub flags: u8,
}

/// Kinds of conntrack entries, each keyed by the packet as the program that
/// looks it up sees it:
/// - `CT_FORWARD` (`client -> frontend`, at ingress): the backend to DNAT to;
/// - `CT_REPLY` (`backend -> client`, at egress): the frontend to restore as
///   the source;
/// - `CT_SNAT` (`client -> backend`, at egress, when masquerading): the node
///   address and port to use as the source; 0 until the first packet leaves;
/// - `CT_SNAT_REPLY` (`backend -> node address:port`, at ingress): the
///   client to restore as the destination.
pub const CT_FORWARD: u8 = 0;
pub const CT_REPLY: u8 = 1;
pub const CT_SNAT: u8 = 2;
pub const CT_SNAT_REPLY: u8 = 3;

/// Key of the conntrack map: the flow as it is seen in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `CT_FORWARD` or `CT_REPLY`.
    pub dir: u8,
    pub _pad: [u8; 2],
}

impl CtKey {
    /// For a forward entry (`self` and its value `fwd`): the key of the
    /// flow's reply entry, the tuple after DNAT seen backwards.
    pub const fn reply_of(&self, fwd: &CtValue) -> Self {
        Self {
            saddr: fwd.nat_addr,
            daddr: self.saddr,
            sport: fwd.nat_port,
            dport: fwd.client_port,
            proto: self.proto,
            dir: CT_REPLY,
            _pad: [0; 2],
        }
    }

    /// For a masqueraded flow's forward entry: the key of its masquerade
    /// entry, the tuple after DNAT as egress sees it.
    pub const fn snat_of(&self, fwd: &CtValue) -> Self {
        Self {
            daddr: fwd.nat_addr,
            dport: fwd.nat_port,
            sport: fwd.client_port,
            dir: CT_SNAT,
            ..*self
        }
    }
}

/// `FragKey::side`: the address a hook rewrites, destination (DNAT and the
/// reversal of masquerading) or source (reverse NAT and masquerading).
pub const FRAG_DESTINATION: u8 = 0;
pub const FRAG_SOURCE: u8 = 1;

/// Key of the fragment map: one datagram as a hook saw it before
/// rewriting (RFC 791 identifies a datagram by these four fields).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    /// The IPv4 identification field, in network order.
    pub id: u16,
    pub proto: u8,
    /// `FRAG_DESTINATION` or `FRAG_SOURCE`: two hooks may see one datagram.
    pub side: u8,
}

/// What a hook did to a datagram's first fragment, for the later ones
/// (which carry no ports): the new address of its side, 0 if it left the
/// datagram alone, and the counter it counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragNat {
    pub addr: u32,
    pub counter: u32,
}

/// `CtValue::flags`: the flow is masqueraded (forward entries).
pub const CT_MASQUERADE: u16 = 1;
/// `CtValue::flags`: a FIN from the client's side was seen (forward and
/// masquerade entries).
pub const CT_CLIENT_CLOSING: u16 = 2;
/// `CtValue::flags`: a FIN from the backend's side was seen (reply and
/// masquerade reply entries).
pub const CT_BACKEND_CLOSING: u16 = 4;
/// `CtValue::flags`: an RST (SCTP: ABORT, SHUTDOWN COMPLETE) was seen: the
/// connection is gone.
pub const CT_RESET: u16 = 8;
/// `CtValue::flags`: a packet past the handshake was seen in the entry's
/// direction (TCP without SYN, SCTP without INIT): established.
pub const CT_ESTABLISHED: u16 = 16;

/// How long an entry lives after its last packet, by state, in seconds
/// (a load-time global of the programs; the agent's flags set it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    /// TCP before the handshake completed (SCTP alike).
    pub tcp_syn: u32,
    pub tcp_established: u32,
    /// One side sent its FIN, the other may still send.
    pub tcp_close_wait: u32,
    /// Both sides closed, or a reset.
    pub tcp_close: u32,
    pub udp: u32,
}

impl CtTimeouts {
    /// kube-proxy's conntrack settings where it has them (established 24 h,
    /// close-wait 1 h), netfilter's and Cilium's otherwise.
    pub const DEFAULT: Self = Self {
        tcp_syn: 60,
        tcp_established: 86_400,
        tcp_close_wait: 3_600,
        tcp_close: 10,
        udp: 60,
    };

    /// Seconds an entry with `flags` lives after its last packet, judged by
    /// its own direction alone.
    pub const fn lifetime(&self, proto: u8, flags: u16) -> u32 {
        let both_closed = CT_CLIENT_CLOSING | CT_BACKEND_CLOSING;
        if proto == PROTO_UDP {
            self.udp
        } else if flags & CT_RESET != 0 || flags & both_closed == both_closed {
            self.tcp_close
        } else if flags & (CT_CLIENT_CLOSING | CT_BACKEND_CLOSING) != 0 {
            self.tcp_close_wait
        } else if flags & CT_ESTABLISHED == 0 {
            self.tcp_syn
        } else {
            self.tcp_established
        }
    }

    /// Seconds a flow whose forward and reply entries carry these flags
    /// lives after its last packet: both sides' FINs (or a reset on either)
    /// end it sooner than either entry knows alone.
    pub const fn flow_lifetime(&self, proto: u8, forward: u16, reply: u16) -> u32 {
        self.lifetime(proto, forward | reply)
    }
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Global holding the `CtTimeouts` the programs use.
pub const CT_TIMEOUTS: &str = "CT_TIMEOUTS";

/// Value of the conntrack map: what to write into the packet, and the
/// flow's state.
///
/// Keeping the backend's address in the forward entry, not only its id,
/// keeps an established flow on its backend when the service's backends
/// change.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtValue {
    pub nat_addr: u32,
    pub nat_port: u16,
    /// `CT_*` flags.
    pub flags: u16,
    pub backend_id: u32,
    /// Seconds (`bpf_ktime_get_coarse_ns`, CLOCK_MONOTONIC_COARSE) of the
    /// last packet in the entry's direction.
    pub last_seen: u32,
    /// Forward entries: the source port the flow has after DNAT, the
    /// client's own unless its tuple was taken by another flow to the same
    /// backend (netfilter's clash resolution). Reply entries: the client's
    /// own port, restored as the destination.
    pub client_port: u16,
    pub _pad: [u8; 6],
}

/// The conntrack clock, in (very nearly) seconds, from monotonic
/// nanoseconds: `ns / 10^9` by a multiplication and shifts, as a 64-bit
/// division costs the datapath more than the rest of an established
/// packet's bookkeeping. 2^41 / 2199 ns is a second less 0.001%; the
/// datapath and the agent's collector use this same function, so they
/// agree on every entry's age.
pub const fn coarse_seconds(ns: u64) -> u32 {
    (((ns >> 9) * 2199) >> 32) as u32
}

impl CtValue {
    /// Seconds since the entry's last packet at `now`. The clock is read
    /// on every CPU and may lag by a tick where another wrote: a time a
    /// little ahead is no age. Wrapping, so ages are right across the
    /// clock's start (test clocks set entries back before it).
    pub const fn idle(&self, now: u32) -> u32 {
        let age = now.wrapping_sub(self.last_seen) as i32;
        if age < 0 { 0 } else { age as u32 }
    }

    pub const fn new(nat_addr: u32, nat_port: u16, backend_id: u32) -> Self {
        Self {
            nat_addr,
            nat_port,
            flags: 0,
            backend_id,
            last_seen: 0,
            client_port: 0,
            _pad: [0; 6],
        }
    }
}

/// XDP metadata by which `fwd_xdp_node` asks `fwd_tc_node` to answer a
/// packet with a reject: this marker in the high half, the `stat` counter
/// of the reason in the low one.
pub const DEFERRED_REJECT: u32 = 0x4657_0000;
pub const DEFERRED_REJECT_MASK: u32 = 0xffff_0000;

/// Global set at load time: ICMP rejects each CPU may send per second
/// (0: no limit), in bursts of a twentieth of that (Linux's own ICMP limit
/// is 1,000 a second in bursts of 50).
pub const REJECT_RATE: &str = "REJECT_RATE";
pub const REJECT_RATE_DEFAULT: u32 = 1_000;

/// A CPU's token bucket for ICMP rejects (`REJECT_RATE_V1`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RejectBucket {
    /// `bpf_ktime_get_ns` of the last refill.
    pub refilled_ns: u64,
    pub tokens: u32,
    pub _pad: u32,
}

/// Per-CPU counters (`STATS_V3` index). Drops are counted by reason; a few
/// non-drop events are counted too, so tests and metrics can tell the
/// datapath did the work.
pub mod stat {
    /// A fragment that cannot be translated: a later fragment to a
    /// ClusterIP before its first (reordered, or the first was lost), a
    /// first fragment too short for its L4 header (RFC 1858), or a
    /// fragmented SCTP packet (its CRC covers the whole datagram).
    pub const DROP_FRAGMENT: u32 = 0;
    /// A service slot points at a backend id that is not in the backends map.
    pub const DROP_NO_BACKEND: u32 = 1;
    /// The Service has no ready endpoints.
    pub const DROP_NO_ENDPOINTS: u32 = 2;
    /// The conntrack entry could not be created.
    pub const DROP_CT_INSERT: u32 = 3;
    /// The packet could not be rewritten (a helper failed, or the headers
    /// moved out of reach).
    pub const DROP_REWRITE: u32 = 4;
    /// A new flow would become, after DNAT, the same tuple as a live flow
    /// from the same client address and port to another frontend, and no
    /// other source port was free for it.
    pub const DROP_CT_COLLISION: u32 = 5;
    /// No free source port to masquerade with (the client's own was taken
    /// and every hashed probe hit a port held by a live flow), or no
    /// address to use.
    pub const DROP_SNAT: u32 = 6;
    /// A reject could not be answered (IP options, a GSO packet, a helper
    /// failure): dropped instead.
    pub const DROP_REJECT_FAILED: u32 = 7;
    /// A client outside the load balancer's `loadBalancerSourceRanges`.
    pub const DROP_SOURCE_RANGE: u32 = 8;
    /// Malformed IPv4 header (IHL < 5, total length shorter than the
    /// headers): passed to the kernel stack, which discards it; never rewritten.
    pub const MALFORMED_PASSED: u32 = 9;
    /// Frontend -> backend translations.
    pub const DNAT: u32 = 10;
    /// Backend -> client reverse translations.
    pub const REVERSE_NAT: u32 = 11;
    /// Client -> node address masquerades, and their reversals.
    pub const SNAT: u32 = 12;
    pub const REVERSE_SNAT: u32 = 13;
    /// New flows answered with ICMP port unreachable: the Service has no
    /// endpoints, or the ClusterIP does not declare the port.
    pub const REJECT_NO_ENDPOINTS: u32 = 14;
    pub const REJECT_UNKNOWN_PORT: u32 = 15;
    /// Sockets of the node itself connected straight to a backend.
    pub const SOCKET_CONNECT: u32 = 16;
    /// A reject over `--icmp-reject-rate`: dropped without an answer.
    pub const DROP_REJECT_RATE: u32 = 17;
    /// ICMP errors about a translated flow, translated (outer and quote).
    pub const ICMP_ERROR_NAT: u32 = 18;
    pub const COUNT: u32 = 19;

    /// Whether `reason` asks for an ICMP answer rather than a silent drop.
    pub const fn is_reject(reason: u32) -> bool {
        matches!(reason, REJECT_NO_ENDPOINTS | REJECT_UNKNOWN_PORT)
    }

    /// Metric label of each counter, indexed by its value.
    pub const NAMES: [&str; COUNT as usize] = [
        "drop_fragment",
        "drop_no_backend",
        "drop_no_endpoints",
        "drop_ct_insert",
        "drop_rewrite",
        "drop_ct_collision",
        "drop_snat",
        "drop_reject_failed",
        "drop_source_range",
        "malformed_passed",
        "dnat",
        "reverse_nat",
        "snat",
        "reverse_snat",
        "reject_no_endpoints",
        "reject_unknown_port",
        "socket_connect",
        "drop_reject_rate",
        "icmp_error_nat",
    ];
}

const _: () = assert!(size_of::<SvcKey>() == 12);
const _: () = assert!(size_of::<SvcValue>() == 12);
const _: () = assert!(size_of::<AffinityKey>() == 12);
const _: () = assert!(size_of::<SourceRangeKey>() == 12);
const _: () = assert!(size_of::<SockNat>() == 12);
const _: () = assert!(size_of::<SockKey>() == 16);
const _: () = assert!(size_of::<AffinityValue>() == 16);
const _: () = assert!(size_of::<Backend>() == 8);
const _: () = assert!(size_of::<CtKey>() == 16);
const _: () = assert!(size_of::<FragKey>() == 12);
const _: () = assert!(size_of::<FragNat>() == 8);
const _: () = assert!(size_of::<CtValue>() == 24);
const _: () = assert!(size_of::<CtTimeouts>() == 20);
const _: () = assert!(size_of::<SnatPorts>() == 8);
const _: () = assert!(size_of::<RejectBucket>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are repr(C), Copy, and have no implicit padding.
    unsafe impl aya::Pod for super::SvcKey {}
    unsafe impl aya::Pod for super::SvcValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragNat {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::CtTimeouts {}
    unsafe impl aya::Pod for super::SnatPorts {}
    unsafe impl aya::Pod for super::RejectBucket {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::SourceRangeKey {}
    unsafe impl aya::Pod for super::SockNat {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
}

#[cfg(test)]
mod snat_ports_tests {
    use super::SnatPorts;

    fn ports(p: &SnatPorts) -> Vec<u16> {
        (0..p.count()).map(|i| p.port(i)).collect()
    }

    #[test]
    fn the_default_skips_privileged_and_node_ports_only() {
        let p = SnatPorts::DEFAULT;
        assert_eq!(
            (p.low_min, p.low_count, p.high_min, p.high_count),
            (1024, 28_976, 32_768, 32_768)
        );
        let all = ports(&p);
        assert_eq!(all.len(), 61_744);
        assert_eq!((all[0], all[28_975], all[28_976], all[61_743]), (1024, 29_999, 32_768, 65_535));
        for port in [0, 1023, 30_000, 32_767] {
            assert!(!p.contains(port), "{port}");
        }
        for port in [1024, 29_999, 32_768, 45_000, 60_999, 65_535] {
            assert!(p.contains(port), "{port}");
        }
        assert!(all.iter().all(|&port| p.contains(port)));
    }
}

#[cfg(test)]
mod clock_tests {
    use super::coarse_seconds;

    #[test]
    fn coarse_seconds_are_seconds_for_a_century_of_uptime() {
        for secs in [0u64, 1, 59, 60, 86_400, 10_000_000, 3_155_760_000] {
            for extra in [0u64, 1, 999_999_999] {
                let got = u64::from(coarse_seconds(secs * 1_000_000_000 + extra));
                // Slow by 0.001%: a second a day.
                assert!(got <= secs && secs - got <= secs / 80_000 + 1, "{secs} s: {got}");
            }
        }
    }
}
