//! The loaded programs, their attachments, and the maps behind `Datapath`.
use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType, Xdp,
        XdpMode, cgroup_sock_addr::CgroupSockAddrLinkId, tc::SchedClassifierLinkId, xdp::XdpLinkId,
    },
    util::KernelVersion,
};
use forwarder_common::{
    Backend, CT_FORWARD, CT_REPLY, CT_SNAT, CT_SNAT_REPLY, CtKey, CtValue, PROTO_UDP,
    SOURCE_RANGE_FRONTEND_BITS, SourceRangeKey, SvcKey, SvcValue, map_names, program_names, stat,
};

use crate::{
    cidr::Cidr,
    model::{Endpoint, Frontend},
    sync::{Datapath, MapWriteError, svc_key},
};

/// The eBPF object built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder"));
/// Do-nothing programs the benchmark measures against (never attached).
pub static CALIBRATION_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/calibrate"));

/// Map sizes chosen at load time.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    /// Service map entries: one per frontend plus one per backend slot.
    pub services: u32,
    pub backends: u32,
    pub conntrack: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            services: forwarder_common::SERVICES_MAX,
            backends: forwarder_common::BACKENDS_MAX,
            conntrack: forwarder_common::CONNTRACK_MAX,
        }
    }
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
}

/// Typed handles to every map the programs use.
pub struct Maps {
    services: HashMap<MapData, SvcKey, SvcValue>,
    backends: HashMap<MapData, u32, Backend>,
    node_ips: HashMap<MapData, u32, u32>,
    snat_addrs: HashMap<MapData, u32, u32>,
    cluster_ips: HashMap<MapData, u32, u32>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u32>,
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
            source_ranges: take(ebpf, map_names::SOURCE_RANGES)?,
            stats: take(ebpf, map_names::STATS)?,
        })
    }

    /// The conntrack map, for inspection.
    pub fn conntrack(&mut self) -> &mut HashMap<MapData, CtKey, CtValue> {
        &mut self.conntrack
    }

    /// Removes every conntrack entry of the UDP flows from a frontend to an
    /// endpoint in `pairs`; returns how many flows went.
    pub fn purge_udp_flows(&mut self, pairs: &[(Frontend, Endpoint)]) -> Result<usize, MapError> {
        if pairs.is_empty() {
            return Ok(0);
        }
        let wanted: Vec<(Option<u32>, u16, u32, u16)> = pairs
            .iter()
            .map(|(f, e)| {
                let addr = f.addr.map(|a| u32::from_ne_bytes(a.octets()));
                (addr, f.port.to_be(), u32::from_ne_bytes(e.addr.octets()), e.port.to_be())
            })
            .collect();
        let mut doomed = Vec::new();
        for entry in self.conntrack.iter() {
            let (key, value) = entry?;
            if key.dir != CT_FORWARD || key.proto != PROTO_UDP {
                continue;
            }
            // A NodePort frontend (no address) matches on any node address.
            let stale = wanted.iter().any(|(addr, port, backend, backend_port)| {
                addr.is_none_or(|a| a == key.daddr)
                    && *port == key.dport
                    && *backend == value.nat_addr
                    && *backend_port == value.nat_port
            });
            if stale {
                doomed.push((key, value));
            }
        }
        for (key, value) in &doomed {
            let reply = CtKey {
                saddr: value.nat_addr,
                daddr: key.saddr,
                sport: value.nat_port,
                dport: key.sport,
                dir: CT_REPLY,
                ..*key
            };
            let snat = CtKey { daddr: value.nat_addr, dport: value.nat_port, dir: CT_SNAT, ..*key };
            if let Ok(masquerade) = self.conntrack.get(&snat, 0) {
                let snat_reply = CtKey {
                    saddr: value.nat_addr,
                    daddr: masquerade.nat_addr,
                    sport: value.nat_port,
                    dport: masquerade.nat_port,
                    dir: CT_SNAT_REPLY,
                    ..*key
                };
                let _ = self.conntrack.remove(&snat_reply);
                let _ = self.conntrack.remove(&snat);
            }
            // Already gone (evicted) is fine.
            let _ = self.conntrack.remove(&reply);
            let _ = self.conntrack.remove(key);
        }
        Ok(doomed.len())
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

    fn put_node_ip(&mut self, addr: Ipv4Addr) -> Result<(), MapWriteError> {
        let key = u32::from_ne_bytes(addr.octets());
        self.node_ips.insert(key, 0, 0).map_err(write_err(map_names::NODE_IPS, "insert"))
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

/// Loads the object and returns it with the programs loaded (not attached).
/// The socket-level programs act on sockets of the network namespace with
/// cookie `node_netns` only (0: none).
pub fn load_object(capacity: Capacity, node_netns: u64) -> Result<Ebpf, DataplaneError> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(map_names::SERVICES, capacity.services)
        .map_max_entries(map_names::BACKENDS, capacity.backends)
        .map_max_entries(map_names::CONNTRACK, capacity.conntrack)
        .override_global(forwarder_common::NODE_NETNS_COOKIE, &node_netns, true)
        .load(OBJECT)?;
    for name in [
        program_names::XDP_NODE,
        program_names::TC_POD,
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

/// How an XDP program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachMode {
    Driver,
    Generic,
}

/// The cookie of the calling thread's network namespace.
fn current_netns_cookie() -> std::io::Result<u64> {
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

/// One TC attachment: which program, and its link.
struct TcLink {
    program: &'static str,
    link: SchedClassifierLinkId,
}

/// Programs, maps and attachments of a running forwarder.
pub struct Dataplane {
    ebpf: Ebpf,
    pub maps: Maps,
    node_xdp: Vec<(String, XdpLinkId)>,
    node_tc: Vec<(String, TcLink)>,
    /// Pod-facing attachments by ifindex (names can be reused).
    pod_tc: BTreeMap<u32, (String, Vec<TcLink>)>,
    sock_links: Vec<(&'static str, CgroupSockAddrLinkId)>,
}

impl Dataplane {
    /// Loads for the node whose network namespace is the current one.
    pub fn load(capacity: Capacity) -> Result<Self, DataplaneError> {
        let node_netns = current_netns_cookie().map_err(DataplaneError::NetnsCookie)?;
        let mut ebpf = load_object(capacity, node_netns)?;
        let maps = Maps::take(&mut ebpf)?;
        Ok(Self {
            ebpf,
            maps,
            node_xdp: Vec::new(),
            node_tc: Vec::new(),
            pod_tc: BTreeMap::new(),
            sock_links: Vec::new(),
        })
    }

    /// Attaches the socket-level programs to the cgroup v2 at `cgroup`
    /// (the root one covers every process); they act on this node's
    /// network namespace only, so several nodes can share the hierarchy.
    pub fn attach_sockets(&mut self, cgroup: &std::path::Path) -> Result<(), DataplaneError> {
        let attach_err =
            |source| DataplaneError::Attach { iface: cgroup.display().to_string(), source };
        let dir = std::fs::File::open(cgroup).map_err(|e| attach_err(ProgramError::IOError(e)))?;
        for name in [
            program_names::SOCK_CONNECT,
            program_names::SOCK_SENDMSG,
            program_names::SOCK_RECVMSG,
            program_names::SOCK_PEERNAME,
        ] {
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .expect("loaded in load()")
                .try_into()
                .expect("socket program");
            // With BPF links (5.7+) several programs share a cgroup whatever the
            // mode; the kernel rejects any other mode flag on a link.
            let link = program.attach(&dir, CgroupAttachMode::Single).map_err(attach_err)?;
            self.sock_links.push((name, link));
        }
        Ok(())
    }

    fn xdp(&mut self) -> &mut Xdp {
        let program = self.ebpf.program_mut(program_names::XDP_NODE).expect("loaded in load()");
        program.try_into().expect("XDP program")
    }

    fn tc(&mut self, name: &'static str) -> &mut SchedClassifier {
        let program = self.ebpf.program_mut(name).expect("loaded in load()");
        program.try_into().expect("TC program")
    }

    fn attach_tc(
        &mut self,
        iface: &str,
        program: &'static str,
        hook: TcAttachType,
    ) -> Result<TcLink, DataplaneError> {
        if KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(6, 6, 0)) {
            // Before TCX, classifiers hang off a clsact qdisc; it may exist already.
            let _ = aya::programs::tc::qdisc_add_clsact(iface);
        }
        let link = self
            .tc(program)
            .attach(iface, hook)
            .map_err(|source| DataplaneError::Attach { iface: iface.to_owned(), source })?;
        Ok(TcLink { program, link })
    }

    fn detach_tc(&mut self, iface: &str, links: Vec<TcLink>) {
        for TcLink { program, link } in links {
            if let Err(error) = self.tc(program).detach(link) {
                tracing::debug!(%iface, %error, "TC detach (interface may be gone)");
            }
        }
    }

    /// XDP (driver mode, falling back to generic) for DNAT of arriving
    /// packets, TC egress for reverse NAT of replies leaving the node.
    pub fn attach_node_iface(&mut self, iface: &str) -> Result<XdpAttachMode, DataplaneError> {
        let (link, mode) = match self.xdp().attach(iface, XdpMode::Driver) {
            Ok(link) => (link, XdpAttachMode::Driver),
            Err(driver_err) => {
                tracing::warn!(%iface, error = %driver_err, "native XDP unavailable, using generic mode");
                let link = self
                    .xdp()
                    .attach(iface, XdpMode::Skb)
                    .map_err(|source| DataplaneError::Attach { iface: iface.to_owned(), source })?;
                (link, XdpAttachMode::Generic)
            }
        };
        self.node_xdp.push((iface.to_owned(), link));
        if !std::path::Path::new(&format!("/sys/class/net/{iface}/device")).exists() {
            // Local senders over veth/tap hand over CHECKSUM_PARTIAL packets,
            // which XDP cannot tell apart from complete ones.
            tracing::warn!(
                %iface,
                "virtual interface: XDP rewrites assume complete L4 checksums, as NICs deliver; \
                 disable TX checksum offload on its peer"
            );
        }
        let rnat = self.attach_tc(iface, program_names::TC_REVERSE_NAT, TcAttachType::Egress)?;
        self.node_tc.push((iface.to_owned(), rnat));
        Ok(mode)
    }

    pub fn pod_ifaces(&self) -> impl Iterator<Item = (u32, &str)> {
        self.pod_tc.iter().map(|(index, (name, _))| (*index, name.as_str()))
    }

    /// TC ingress (DNAT of pod clients) and egress (reverse NAT of replies
    /// to pods) on a pod-facing interface.
    pub fn attach_pod_iface(&mut self, index: u32, name: &str) -> Result<(), DataplaneError> {
        let ingress = self.attach_tc(name, program_names::TC_POD, TcAttachType::Ingress)?;
        let egress = match self.attach_tc(name, program_names::TC_REVERSE_NAT, TcAttachType::Egress)
        {
            Ok(link) => link,
            Err(err) => {
                self.detach_tc(name, vec![ingress]);
                return Err(err);
            }
        };
        self.pod_tc.insert(index, (name.to_owned(), vec![ingress, egress]));
        Ok(())
    }

    /// Detaches from a pod-facing interface, which may already be gone.
    pub fn detach_pod_iface(&mut self, index: u32) {
        if let Some((name, links)) = self.pod_tc.remove(&index) {
            self.detach_tc(&name, links);
        }
    }

    /// Detaches every program; run on shutdown.
    pub fn detach_all(&mut self) {
        for (name, link) in std::mem::take(&mut self.sock_links) {
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .expect("loaded in load()")
                .try_into()
                .expect("socket program");
            if let Err(error) = program.detach(link) {
                tracing::warn!(program = name, %error, "socket program detach failed");
            }
        }
        for index in self.pod_tc.keys().copied().collect::<Vec<_>>() {
            self.detach_pod_iface(index);
        }
        for (iface, link) in std::mem::take(&mut self.node_tc) {
            self.detach_tc(&iface, vec![link]);
        }
        for (iface, link) in std::mem::take(&mut self.node_xdp) {
            if let Err(error) = self.xdp().detach(link) {
                tracing::warn!(%iface, %error, "XDP detach failed");
            }
        }
    }
}
