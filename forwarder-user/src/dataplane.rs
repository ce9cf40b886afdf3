//! The loaded programs, their attachments, and the maps behind `Datapath`.
use std::net::Ipv4Addr;

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie},
    programs::ProgramError,
};
use forwarder_common::{
    Backend, CT_FORWARD, CT_SNAT_REPLY, CtKey, CtTimeouts, CtValue, PROTO_UDP,
    SOURCE_RANGE_FRONTEND_BITS, SnatPorts, SourceRangeKey, SvcKey, SvcValue, map_names,
    program_names, stat,
};

pub use crate::attach::{Dataplane, XdpAttachMode};
use crate::{
    cidr::Cidr,
    model::{DesiredState, Endpoint, Frontend, Proto},
    pins::PinDir,
    sync::{Datapath, MapContents, MapWriteError, frontend_of, svc_key},
};

/// The eBPF object built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder"));
/// Do-nothing programs the benchmark measures against (never attached).
pub static CALIBRATION_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/calibrate"));

/// Behaviour chosen at load time, as the programs' global constants.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    pub timeouts: CtTimeouts,
    pub snat_ports: SnatPorts,
    /// ICMP rejects per second and CPU; 0: no limit.
    pub reject_rate: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            timeouts: CtTimeouts::DEFAULT,
            snat_ports: SnatPorts::DEFAULT,
            reject_rate: forwarder_common::REJECT_RATE_DEFAULT,
        }
    }
}

/// Map sizes chosen at load time.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    /// Service map entries: one per frontend plus one per backend slot.
    pub services: u32,
    pub backends: u32,
    pub conntrack: u32,
    /// Masquerade entries: two per masqueraded flow.
    pub nat: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            services: forwarder_common::SERVICES_MAX,
            backends: forwarder_common::BACKENDS_MAX,
            conntrack: forwarder_common::CONNTRACK_MAX,
            nat: forwarder_common::NAT_MAX,
        }
    }
}

impl Capacity {
    /// The sizes to create the maps with on this machine (see
    /// `conntrack_entries`).
    pub fn as_created(self) -> Self {
        let possible = aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u32;
        let online = aya::util::online_cpus().map_or(possible, |cpus| cpus.len() as u32);
        let conntrack = conntrack_entries(self.conntrack, possible, online);
        if conntrack < self.conntrack.div_ceil(online.max(1)).saturating_mul(possible) {
            tracing::warn!(
                wanted = self.conntrack,
                entries = conntrack,
                possible,
                online,
                "most possible CPUs are offline: conntrack holds less than --bpf-ct-map-max"
            );
        }
        Self { conntrack, ..self }
    }
}

/// A conntrack list per CPU holds no less than this many flows.
pub const CONNTRACK_PER_CPU_MIN: u32 = 4_096;
/// Created entries (memory allocated up front, about 100 bytes each) at
/// most this many times the entries asked for.
const CONNTRACK_SPARE_LISTS_MAX: u32 = 4;

/// Entries to create the conntrack map with, for `wanted` flows: the
/// kernel gives each *possible* CPU an LRU list of an equal share, but
/// only the online CPUs' lists ever fill, so the share is what each online
/// CPU needs (at least `CONNTRACK_PER_CPU_MIN`) times the possible CPUs,
/// and a multiple of them, as the kernel rounds. Where far more CPUs are
/// possible than online (hypervisors that allow hot-plugging), memory caps
/// it at `CONNTRACK_SPARE_LISTS_MAX` times `wanted`.
pub fn conntrack_entries(wanted: u32, possible: u32, online: u32) -> u32 {
    let possible = possible.max(1);
    let online = online.clamp(1, possible);
    let per_cpu = wanted.div_ceil(online).max(CONNTRACK_PER_CPU_MIN);
    let cap = wanted
        .saturating_mul(CONNTRACK_SPARE_LISTS_MAX)
        .max(CONNTRACK_PER_CPU_MIN.saturating_mul(possible));
    let per_cpu = per_cpu.min(cap / possible).max(1);
    per_cpu.saturating_mul(possible) / possible * possible
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object failed")]
    Load(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: ProgramError },
    #[error("map {name} is missing from the object")]
    MissingMap { name: &'static str },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("reading this network namespace's cookie: {0}")]
    NetnsCookie(std::io::Error),
    #[error("attaching to {iface}: {source}")]
    Attach { iface: String, source: ProgramError },
    #[error("pinning under {path}: {source}")]
    Pin { path: String, source: std::io::Error },
    #[error(
        "pinned map {name} has key/value sizes {found:?}, this build {wanted:?}: run `forwarder cleanup` first"
    )]
    PinnedLayout { name: &'static str, found: (usize, usize), wanted: (usize, usize) },
}

/// Typed handles to every map the programs use.
pub struct Maps {
    services: HashMap<MapData, SvcKey, SvcValue>,
    backends: HashMap<MapData, u32, Backend>,
    node_ips: HashMap<MapData, u32, u32>,
    snat_addrs: HashMap<MapData, u32, u32>,
    cluster_ips: HashMap<MapData, u32, u32>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    nat: HashMap<MapData, CtKey, CtValue>,
    hash_seed: Array<MapData, u32>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u32>,
    socket_nat: HashMap<MapData, forwarder_common::SockKey, forwarder_common::SockNat>,
    stats: PerCpuArray<MapData, u64>,
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DataplaneError> {
    let map = ebpf.take_map(name).ok_or(DataplaneError::MissingMap { name })?;
    T::try_from(map).map_err(|source| DataplaneError::Map { name, source })
}

impl Maps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(Self {
            services: take(ebpf, map_names::SERVICES)?,
            backends: take(ebpf, map_names::BACKENDS)?,
            node_ips: take(ebpf, map_names::NODE_IPS)?,
            snat_addrs: take(ebpf, map_names::SNAT_ADDRS)?,
            cluster_ips: take(ebpf, map_names::CLUSTER_IPS)?,
            conntrack: take(ebpf, map_names::CONNTRACK)?,
            nat: take(ebpf, map_names::NAT)?,
            hash_seed: take(ebpf, map_names::HASH_SEED)?,
            source_ranges: take(ebpf, map_names::SOURCE_RANGES)?,
            socket_nat: take(ebpf, map_names::SOCKET_NAT)?,
            stats: take(ebpf, map_names::STATS)?,
        })
    }

    /// The frontend through which the socket programs connected node
    /// socket `cookie` to `backend`, if they did.
    pub fn socket_frontend(
        &self,
        cookie: u64,
        backend: std::net::SocketAddrV4,
    ) -> Option<std::net::SocketAddrV4> {
        let key = forwarder_common::SockKey {
            cookie,
            backend_addr: u32::from_ne_bytes(backend.ip().octets()),
            backend_port: backend.port().to_be(),
            _pad: [0; 2],
        };
        let nat = self.socket_nat.get(&key, 0).ok()?;
        let addr = std::net::Ipv4Addr::from(nat.frontend_addr.to_ne_bytes());
        Some(std::net::SocketAddrV4::new(addr, u16::from_be(nat.frontend_port)))
    }

    /// The conntrack map, for inspection.
    pub fn conntrack(&mut self) -> &mut HashMap<MapData, CtKey, CtValue> {
        &mut self.conntrack
    }

    /// The node's flow-hash seed: the pinned one, or a new random one the
    /// first time (0 is never a seed, so it marks a map not yet seeded).
    pub fn ensure_hash_seed(&mut self) -> Result<u32, MapError> {
        match self.hash_seed.get(&0, 0)? {
            0 => {
                let mut seed = 0u32;
                while seed == 0 {
                    let mut bytes = [0u8; 4];
                    // SAFETY: a valid buffer of the length given.
                    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), 4, 0) };
                    if n != 4 {
                        let io_error = std::io::Error::last_os_error();
                        return Err(MapError::SyscallError(aya::sys::SyscallError {
                            call: "getrandom",
                            io_error,
                        }));
                    }
                    seed = u32::from_ne_bytes(bytes);
                }
                self.hash_seed.set(0, seed, 0)?;
                Ok(seed)
            }
            seed => Ok(seed),
        }
    }

    /// The masquerade map, for inspection.
    pub fn nat(&mut self) -> &mut HashMap<MapData, CtKey, CtValue> {
        &mut self.nat
    }

    /// Removes every conntrack entry of the UDP flows from a frontend to an
    /// endpoint in `pairs`; returns how many flows went.
    pub fn purge_udp_flows(&mut self, pairs: &[(Frontend, Endpoint)]) -> Result<usize, MapError> {
        if pairs.is_empty() {
            return Ok(0);
        }
        let wanted: Vec<(Option<u32>, u16, u32, u16)> = pairs.iter().map(flow_pair).collect();
        self.purge_udp_flows_where(|key, value| {
            wanted.iter().any(|pair| pair_matches(pair, key, value))
        })
    }

    /// Removes the UDP flows whose backend is not an endpoint of their
    /// frontend in `state`: after a restart, the endpoints that left while
    /// no agent ran (the running agent purges by difference).
    pub fn purge_udp_flows_outside(&mut self, state: &DesiredState) -> Result<usize, MapError> {
        let kept: Vec<(Option<u32>, u16, u32, u16)> = state
            .services
            .iter()
            .filter(|(f, _)| f.proto == Proto::Udp)
            .flat_map(|(f, endpoints)| endpoints.iter().map(move |e| flow_pair(&(*f, *e))))
            .collect();
        self.purge_udp_flows_where(|key, value| {
            !kept.iter().any(|pair| pair_matches(pair, key, value))
        })
    }

    /// Removes the entries of every UDP flow whose forward entry `doomed`
    /// picks; returns how many flows went.
    fn purge_udp_flows_where(
        &mut self,
        doomed: impl Fn(&CtKey, &CtValue) -> bool,
    ) -> Result<usize, MapError> {
        let mut flows = Vec::new();
        for entry in self.conntrack.iter() {
            let (key, value) = match entry {
                Ok(entry) => entry,
                // Evicted while we walked.
                Err(MapError::KeyNotFound) => continue,
                Err(error) => return Err(error),
            };
            if key.dir == CT_FORWARD && key.proto == PROTO_UDP && doomed(&key, &value) {
                flows.push((key, value));
            }
        }
        let doomed = flows;
        for (key, value) in &doomed {
            let reply = key.reply_of(value);
            let snat = key.snat_of(value);
            if let Ok(masquerade) = self.nat.get(&snat, 0) {
                let snat_reply = CtKey {
                    saddr: value.nat_addr,
                    daddr: masquerade.nat_addr,
                    sport: value.nat_port,
                    dport: masquerade.nat_port,
                    dir: CT_SNAT_REPLY,
                    ..*key
                };
                let _ = self.nat.remove(&snat_reply);
                let _ = self.nat.remove(&snat);
            }
            // Already gone (evicted) is fine.
            let _ = self.conntrack.remove(&reply);
            let _ = self.conntrack.remove(key);
        }
        Ok(doomed.len())
    }

    /// Everything the agent writes, read back (a previous agent's state).
    pub fn contents(&self) -> Result<MapContents, MapError> {
        let addr = |a: u32| Ipv4Addr::from(a.to_ne_bytes());
        let mut contents = MapContents {
            services: self.services.iter().collect::<Result<_, _>>()?,
            backends: self.backends.iter().collect::<Result<_, _>>()?,
            node_ips: self
                .node_ips
                .iter()
                .map(|e| e.map(|(a, flags)| (addr(a), flags)))
                .collect::<Result<_, _>>()?,
            cluster_ips: self.cluster_ips.keys().map(|k| k.map(addr)).collect::<Result<_, _>>()?,
            snat_addrs: self
                .snat_addrs
                .iter()
                .map(|e| e.map(|(i, a)| (i, addr(a))))
                .collect::<Result<_, _>>()?,
            source_ranges: Vec::new(),
        };
        for key in self.source_ranges.keys() {
            let key = key?;
            let data = key.data();
            let svc = SvcKey::new(data.addr, data.port, data.proto, data.scope, 0);
            let prefix = key.prefix_len().saturating_sub(SOURCE_RANGE_FRONTEND_BITS) as u8;
            if let (Some(frontend), Some(cidr)) =
                (frontend_of(&svc), Cidr::new(addr(data.src), prefix))
            {
                contents.source_ranges.push((frontend, cidr));
            }
        }
        Ok(contents)
    }

    /// Counters summed over CPUs, with their names.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, MapError> {
        (0..stat::COUNT)
            .map(|i| {
                let per_cpu = self.stats.get(&i, 0)?;
                Ok((stat::NAMES[i as usize], per_cpu.iter().sum()))
            })
            .collect()
    }
}

/// A (frontend, endpoint) pair as conntrack holds it: frontend address
/// (none for a NodePort) and port, backend address and port.
fn flow_pair((frontend, endpoint): &(Frontend, Endpoint)) -> (Option<u32>, u16, u32, u16) {
    let addr = frontend.addr.map(|a| u32::from_ne_bytes(a.octets()));
    (addr, frontend.port.to_be(), u32::from_ne_bytes(endpoint.addr.octets()), endpoint.port.to_be())
}

/// Whether a flow's forward entry goes from the pair's frontend (a NodePort
/// on any node address) to its endpoint.
fn pair_matches(
    (addr, port, backend, backend_port): &(Option<u32>, u16, u32, u16),
    key: &CtKey,
    value: &CtValue,
) -> bool {
    addr.is_none_or(|a| a == key.daddr)
        && *port == key.dport
        && *backend == value.nat_addr
        && *backend_port == value.nat_port
}

fn source_range_key(frontend: &Frontend, range: Cidr) -> lpm_trie::Key<SourceRangeKey> {
    let svc = svc_key(frontend, 0);
    let data = SourceRangeKey {
        addr: svc.addr,
        port: svc.port,
        proto: svc.proto,
        scope: svc.scope,
        src: u32::from_ne_bytes(range.network().octets()),
    };
    lpm_trie::Key::new(SOURCE_RANGE_FRONTEND_BITS + u32::from(range.prefix()), data)
}

fn write_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> MapWriteError {
    move |err| MapWriteError { map, op, reason: err.to_string() }
}

impl Datapath for Maps {
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapWriteError> {
        self.backends.insert(id, backend, 0).map_err(write_err(map_names::BACKENDS, "insert"))
    }

    fn remove_backend(&mut self, id: u32) -> Result<(), MapWriteError> {
        self.backends.remove(&id).map_err(write_err(map_names::BACKENDS, "remove"))
    }

    fn put_service(&mut self, key: SvcKey, value: SvcValue) -> Result<(), MapWriteError> {
        self.services.insert(key, value, 0).map_err(write_err(map_names::SERVICES, "insert"))
    }

    fn remove_service(&mut self, key: SvcKey) -> Result<(), MapWriteError> {
        self.services.remove(&key).map_err(write_err(map_names::SERVICES, "remove"))
    }

    fn put_node_ip(&mut self, addr: Ipv4Addr, flags: u32) -> Result<(), MapWriteError> {
        let key = u32::from_ne_bytes(addr.octets());
        self.node_ips.insert(key, flags, 0).map_err(write_err(map_names::NODE_IPS, "insert"))
    }

    fn remove_node_ip(&mut self, addr: Ipv4Addr) -> Result<(), MapWriteError> {
        let key = u32::from_ne_bytes(addr.octets());
        self.node_ips.remove(&key).map_err(write_err(map_names::NODE_IPS, "remove"))
    }

    fn put_cluster_ip(&mut self, addr: Ipv4Addr) -> Result<(), MapWriteError> {
        let key = u32::from_ne_bytes(addr.octets());
        self.cluster_ips.insert(key, 0, 0).map_err(write_err(map_names::CLUSTER_IPS, "insert"))
    }

    fn remove_cluster_ip(&mut self, addr: Ipv4Addr) -> Result<(), MapWriteError> {
        let key = u32::from_ne_bytes(addr.octets());
        self.cluster_ips.remove(&key).map_err(write_err(map_names::CLUSTER_IPS, "remove"))
    }

    fn put_source_range(&mut self, frontend: &Frontend, range: Cidr) -> Result<(), MapWriteError> {
        let key = source_range_key(frontend, range);
        self.source_ranges.insert(&key, 0, 0).map_err(write_err(map_names::SOURCE_RANGES, "insert"))
    }

    fn remove_source_range(
        &mut self,
        frontend: &Frontend,
        range: Cidr,
    ) -> Result<(), MapWriteError> {
        let key = source_range_key(frontend, range);
        self.source_ranges.remove(&key).map_err(write_err(map_names::SOURCE_RANGES, "remove"))
    }

    fn put_snat_addr(&mut self, ifindex: u32, addr: Ipv4Addr) -> Result<(), MapWriteError> {
        let value = u32::from_ne_bytes(addr.octets());
        self.snat_addrs
            .insert(ifindex, value, 0)
            .map_err(write_err(map_names::SNAT_ADDRS, "insert"))
    }

    fn remove_snat_addr(&mut self, ifindex: u32) -> Result<(), MapWriteError> {
        self.snat_addrs.remove(&ifindex).map_err(write_err(map_names::SNAT_ADDRS, "remove"))
    }
}

/// Key and value sizes of every map: a pinned map with others is from an
/// incompatible build and must not be reused.
fn layout(name: &str) -> (usize, usize) {
    use forwarder_common::{AffinityKey, AffinityValue, SockKey, SockNat};
    use std::mem::size_of;
    match name {
        map_names::SERVICES => (size_of::<SvcKey>(), size_of::<SvcValue>()),
        map_names::BACKENDS => (4, size_of::<Backend>()),
        map_names::CONNTRACK | map_names::NAT => (size_of::<CtKey>(), size_of::<CtValue>()),
        map_names::FRAGMENTS => {
            (size_of::<forwarder_common::FragKey>(), size_of::<forwarder_common::FragNat>())
        }
        map_names::AFFINITY => (size_of::<AffinityKey>(), size_of::<AffinityValue>()),
        map_names::SOURCE_RANGES => (4 + size_of::<SourceRangeKey>(), 4),
        map_names::SOCKET_NAT => (size_of::<SockKey>(), size_of::<SockNat>()),
        map_names::STATS => (4, 8),
        map_names::REJECT_BUCKETS => (4, size_of::<forwarder_common::RejectBucket>()),
        _ => (4, 4),
    }
}

/// Checks the maps pinned in `pins` (if any) against this build's layouts,
/// and returns the capacity they really have: a pinned map keeps its size.
pub fn pinned_capacity(pins: &PinDir, wanted: Capacity) -> Result<Capacity, DataplaneError> {
    let mut capacity = wanted;
    for name in MAPS {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path)
            .map_err(|source| DataplaneError::Map { name, source })?;
        let found = (info.key_size() as usize, info.value_size() as usize);
        if found != layout(name) {
            return Err(DataplaneError::PinnedLayout { name, found, wanted: layout(name) });
        }
        let ct_flags = forwarder_common::CONNTRACK_FLAGS;
        if name == map_names::CONNTRACK && info.map_flags() & ct_flags != ct_flags {
            // Reused all the same: its flows outlive the upgrade.
            tracing::warn!(
                map = name,
                "conntrack map pinned by an earlier build shares one LRU list between CPUs, \
                 which can evict live flows under load; `forwarder cleanup` recreates it"
            );
        }
        match name {
            map_names::SERVICES => capacity.services = info.max_entries(),
            map_names::BACKENDS => capacity.backends = info.max_entries(),
            map_names::CONNTRACK => capacity.conntrack = info.max_entries(),
            map_names::NAT => capacity.nat = info.max_entries(),
            _ => {}
        }
    }
    Ok(capacity)
}

/// Every map, pinned by the agent so its state outlives the process.
pub const MAPS: [&str; 14] = [
    map_names::SERVICES,
    map_names::BACKENDS,
    map_names::CONNTRACK,
    map_names::NAT,
    map_names::FRAGMENTS,
    map_names::HASH_SEED,
    map_names::REJECT_BUCKETS,
    map_names::NODE_IPS,
    map_names::SNAT_ADDRS,
    map_names::AFFINITY,
    map_names::CLUSTER_IPS,
    map_names::SOURCE_RANGES,
    map_names::SOCKET_NAT,
    map_names::STATS,
];

/// Loads the object and returns it with the programs loaded (not attached).
/// The socket-level programs act on sockets of the network namespace with
/// cookie `node_netns` only (0: none). With `pins`, every map is opened
/// from its pin when one exists, and pinned there when not.
pub fn load_object(
    capacity: Capacity,
    tuning: Tuning,
    node_netns: u64,
    pins: Option<&PinDir>,
) -> Result<Ebpf, DataplaneError> {
    let paths: Vec<(&str, std::path::PathBuf)> =
        pins.map(|p| MAPS.iter().map(|name| (*name, p.map(name))).collect()).unwrap_or_default();
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(map_names::SERVICES, capacity.services)
        .map_max_entries(map_names::BACKENDS, capacity.backends)
        .map_max_entries(map_names::CONNTRACK, capacity.conntrack)
        .map_max_entries(map_names::NAT, capacity.nat)
        .override_global(forwarder_common::NODE_NETNS_COOKIE, &node_netns, true)
        .override_global(forwarder_common::CT_TIMEOUTS, &tuning.timeouts, true)
        .override_global(forwarder_common::SNAT_PORTS, &tuning.snat_ports, true)
        .override_global(forwarder_common::REJECT_RATE, &tuning.reject_rate, true);
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(OBJECT)?;
    for name in [
        program_names::XDP_NODE,
        program_names::TC_POD,
        program_names::TC_NODE,
        program_names::TC_REVERSE_NAT,
        program_names::SOCK_CONNECT,
        program_names::SOCK_SENDMSG,
        program_names::SOCK_RECVMSG,
        program_names::SOCK_PEERNAME,
    ] {
        let program = ebpf.program_mut(name).ok_or(DataplaneError::Program {
            name,
            source: ProgramError::InvalidName { name: name.to_owned() },
        })?;
        let loaded = match program {
            aya::programs::Program::Xdp(p) => p.load(),
            aya::programs::Program::SchedClassifier(p) => p.load(),
            aya::programs::Program::CgroupSockAddr(p) => p.load(),
            _ => unreachable!("the object defines only XDP, TC and socket programs"),
        };
        loaded.map_err(|source| DataplaneError::Program { name, source })?;
    }
    Ok(ebpf)
}

/// The cookie of the calling thread's network namespace.
pub(crate) fn current_netns_cookie() -> std::io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and an output buffer of the right size.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod capacity_tests {
    use super::conntrack_entries;

    #[test]
    fn conntrack_is_sized_for_the_online_cpus() {
        // Every possible CPU online: the entries asked for, to a multiple.
        assert_eq!(conntrack_entries(262_144, 2, 2), 262_144);
        assert_eq!(conntrack_entries(262_145, 2, 2), 262_146);
        // Two of eight online: each online CPU's list holds half, so the
        // lists of the six offline ones are allocated too.
        assert_eq!(conntrack_entries(262_144, 8, 2), 131_072 * 8);
        // A small map still gives each CPU its floor.
        assert_eq!(conntrack_entries(1_000, 4, 4), 4_096 * 4);
        // 4 of 128 online: capped at four times the entries asked for.
        let capped = conntrack_entries(262_144, 128, 4);
        assert_eq!(capped, 262_144 * 4);
        assert_eq!(capped % 128, 0);
    }
}
