//! Incremental, make-before-break sync of the desired state into the maps.
//!
//! Invariant at every single map write, so no packet ever sees a
//! half-written Service: every slot `1..=count` of a frontend holds a backend
//! id that is present in the backends map. Hence the order: backends, then
//! slots, then the frontend's count; on the way out the count first, then
//! slots, then backends.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::Ipv4Addr,
};

use forwarder_common::{
    BACKEND_LOCAL, Backend, NODE_IP_MASQUERADE, NODE_IP_NODEPORT, SCOPE_EXTERNAL, SCOPE_INTERNAL,
    SVC_DROP_EMPTY, SVC_HAS_INTERNAL, SVC_SOURCE_RANGES, SvcKey, SvcValue,
};

use crate::{
    cidr::Cidr,
    model::{DesiredState, Endpoint, Frontend, Proto, Scope},
};

/// A failed map write.
#[derive(Debug, thiserror::Error)]
#[error("{op} in {map} failed: {reason}")]
pub struct MapWriteError {
    pub map: &'static str,
    pub op: &'static str,
    pub reason: String,
}

/// The map writes sync needs; implemented by the real aya maps and by an
/// in-memory fake for tests.
pub trait Datapath {
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapWriteError>;
    fn remove_backend(&mut self, id: u32) -> Result<(), MapWriteError>;
    fn put_service(&mut self, key: SvcKey, value: SvcValue) -> Result<(), MapWriteError>;
    fn remove_service(&mut self, key: SvcKey) -> Result<(), MapWriteError>;
    /// A node address and what it is used for (`NODE_IP_*` flags).
    fn put_node_ip(&mut self, addr: Ipv4Addr, flags: u32) -> Result<(), MapWriteError>;
    fn remove_node_ip(&mut self, addr: Ipv4Addr) -> Result<(), MapWriteError>;
    fn put_cluster_ip(&mut self, addr: Ipv4Addr) -> Result<(), MapWriteError>;
    fn remove_cluster_ip(&mut self, addr: Ipv4Addr) -> Result<(), MapWriteError>;
    fn put_source_range(&mut self, frontend: &Frontend, range: Cidr) -> Result<(), MapWriteError>;
    fn remove_source_range(
        &mut self,
        frontend: &Frontend,
        range: Cidr,
    ) -> Result<(), MapWriteError>;
    /// The masquerade address for an egress ifindex (`SNAT_ADDR_DEFAULT`: any other).
    fn put_snat_addr(&mut self, ifindex: u32, addr: Ipv4Addr) -> Result<(), MapWriteError>;
    fn remove_snat_addr(&mut self, ifindex: u32) -> Result<(), MapWriteError>;
}

/// The outcome of one sync: how many writes it took, what failed, and
/// what was programmed only in part on purpose.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub writes: usize,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

impl SyncReport {
    /// Adds another report's writes, errors and warnings to this one.
    pub fn merge(&mut self, other: SyncReport) {
        self.writes += other.writes;
        self.errors.extend(other.errors);
        self.warnings.extend(other.warnings);
    }
}

/// What a frontend currently holds in the map, exactly.
#[derive(Clone, Debug, Default)]
struct Applied {
    /// Slot 0; `None` while it is absent.
    head: Option<SvcValue>,
    /// Backend id in slot `i + 1`.
    slots: Vec<u32>,
}

/// A backend is an endpoint for one protocol, on this node or not (a pod
/// address reused on another node is another backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct BackendKey {
    endpoint: Endpoint,
    proto: Proto,
    local: bool,
}

/// Remembers what it wrote, so each sync writes only the difference.
/// Backends live as long as some slot references them.
#[derive(Debug)]
pub struct Syncer {
    applied: BTreeMap<Frontend, Applied>,
    /// Backend id of every backend in the map.
    backends: HashMap<BackendKey, u32>,
    /// Freed ids, reused oldest first.
    free_ids: VecDeque<u32>,
    next_id: u32,
    /// Node addresses and their `NODE_IP_*` flags, as written.
    node_ips: BTreeMap<Ipv4Addr, u32>,
    cluster_ips: BTreeSet<Ipv4Addr>,
    source_ranges: BTreeSet<(Frontend, Cidr)>,
    snat_addrs: BTreeMap<u32, Ipv4Addr>,
    /// Entries in the services map, and the maps' capacities: a frontend
    /// that would not fit is refused before anything of it is written.
    service_entries: usize,
    services_capacity: usize,
    backends_capacity: usize,
    /// A slot changed or went since the last collection: some backend may
    /// have lost its last reference (collecting walks every slot).
    unreferenced: bool,
}

pub fn svc_key(frontend: &Frontend, slot: u16) -> SvcKey {
    let addr = frontend.addr.map_or(0, |a| u32::from_ne_bytes(a.octets()));
    let scope = match frontend.scope {
        Scope::External => SCOPE_EXTERNAL,
        Scope::Internal => SCOPE_INTERNAL,
    };
    SvcKey::new(addr, frontend.port.to_be(), frontend.proto.number(), scope, slot)
}

pub fn backend_value(endpoint: &Endpoint, proto: Proto, local: bool) -> Backend {
    Backend {
        addr: u32::from_ne_bytes(endpoint.addr.octets()),
        port: endpoint.port.to_be(),
        proto: proto.number(),
        flags: if local { BACKEND_LOCAL } else { 0 },
    }
}

/// Slots are u16 and slot 0 is the frontend itself.
const MAX_SLOTS: usize = u16::MAX as usize;

impl Syncer {
    /// A syncer for maps of the given capacities (entries).
    pub fn new(services_capacity: usize, backends_capacity: usize) -> Self {
        Self {
            applied: BTreeMap::new(),
            backends: HashMap::new(),
            free_ids: VecDeque::new(),
            next_id: 1,
            node_ips: BTreeMap::new(),
            cluster_ips: BTreeSet::new(),
            source_ranges: BTreeSet::new(),
            snat_addrs: BTreeMap::new(),
            service_entries: 0,
            services_capacity,
            backends_capacity,
            unreferenced: false,
        }
    }

    /// The node addresses in the map that serve NodePorts.
    pub fn node_ips(&self) -> BTreeSet<Ipv4Addr> {
        self.node_ips.iter().filter(|(_, f)| *f & NODE_IP_NODEPORT != 0).map(|(a, _)| *a).collect()
    }

    /// Entries the syncer keeps in each map it writes.
    pub fn entries(&self) -> [(&'static str, usize); 6] {
        use forwarder_common::map_names;
        [
            (map_names::SERVICES, self.service_entries),
            (map_names::BACKENDS, self.backends.len()),
            (map_names::NODE_IPS, self.node_ips.len()),
            (map_names::SNAT_ADDRS, self.snat_addrs.len()),
            (map_names::CLUSTER_IPS, self.cluster_ips.len()),
            (map_names::SOURCE_RANGES, self.source_ranges.len()),
        ]
    }

    /// Brings the maps to `desired`, writing only what changed. Removals go
    /// first so their entries are free for what is added.
    pub fn apply<D: Datapath>(&mut self, desired: &DesiredState, dp: &mut D) -> SyncReport {
        let mut report = SyncReport::default();
        // Allowed ranges go in before the flags that enforce them, and out
        // after (the transient state allows the union, never less).
        let ranges: BTreeSet<(Frontend, Cidr)> = desired
            .source_ranges
            .iter()
            .flat_map(|(f, cidrs)| cidrs.iter().map(move |c| (*f, *c)))
            .collect();
        for (frontend, range) in ranges.difference(&self.source_ranges.clone()) {
            match dp.put_source_range(frontend, *range) {
                Ok(()) => {
                    report.writes += 1;
                    self.source_ranges.insert((*frontend, *range));
                }
                Err(err) => report.errors.push(format!("{frontend}: {err}")),
            }
        }
        let gone: Vec<Frontend> =
            self.applied.keys().filter(|f| !desired.services.contains_key(f)).copied().collect();
        for frontend in gone {
            if let Err(err) = self.remove_frontend(&frontend, dp, &mut report) {
                report.errors.push(format!("{frontend}: {err}"));
            }
        }
        self.collect_backends(dp, &mut report);
        // Internal-scope entries first: the external entry's flag pointing at
        // one must never come before it.
        let ordered = desired
            .services
            .iter()
            .filter(|(f, _)| f.scope == Scope::Internal)
            .chain(desired.services.iter().filter(|(f, _)| f.scope == Scope::External));
        for (frontend, endpoints) in ordered {
            let endpoints = if endpoints.len() > MAX_SLOTS {
                report.warnings.push(format!(
                    "{frontend}: {} endpoints, only the first {MAX_SLOTS} are used",
                    endpoints.len()
                ));
                &endpoints[..MAX_SLOTS]
            } else {
                endpoints
            };
            let keys: Vec<BackendKey> = endpoints
                .iter()
                .map(|e| BackendKey {
                    endpoint: *e,
                    proto: frontend.proto,
                    local: desired.local_endpoints.contains(&e.addr),
                })
                .collect();
            let internal = Frontend { scope: Scope::Internal, ..*frontend };
            let has_internal =
                frontend.scope == Scope::External && desired.services.contains_key(&internal);
            let mut flags = if has_internal { SVC_HAS_INTERNAL } else { 0 };
            if desired.drop_when_empty.contains(frontend) {
                flags |= SVC_DROP_EMPTY;
            }
            // Enforced only once every range is in the map.
            let ranges = desired.source_ranges.get(frontend);
            if ranges
                .is_some_and(|r| r.iter().all(|c| self.source_ranges.contains(&(*frontend, *c))))
            {
                flags |= SVC_SOURCE_RANGES;
            }
            let head = SvcValue::frontend(
                keys.len() as u16,
                flags,
                desired.affinity.get(frontend).copied().unwrap_or(0),
            );
            if let Err(err) = self.apply_frontend(frontend, &keys, head, dp, &mut report) {
                report.errors.push(format!("{frontend}: {err}"));
            }
        }
        self.collect_backends(dp, &mut report);
        for (frontend, range) in self.source_ranges.clone().difference(&ranges) {
            match dp.remove_source_range(frontend, *range) {
                Ok(()) => {
                    report.writes += 1;
                    self.source_ranges.remove(&(*frontend, *range));
                }
                Err(err) => report.errors.push(format!("{frontend}: {err}")),
            }
        }
        let cluster_ips = sync_set(
            &mut self.cluster_ips,
            &desired.cluster_ips,
            dp,
            D::put_cluster_ip,
            D::remove_cluster_ip,
        );
        report.writes += cluster_ips.writes;
        report.errors.extend(cluster_ips.errors);
        report
    }

    /// Refuses a frontend whose new entries would not fit in the maps.
    fn check_capacity(
        &self,
        frontend: &Frontend,
        backends: &[BackendKey],
    ) -> Result<(), MapWriteError> {
        let new_backends: BTreeSet<&BackendKey> =
            backends.iter().filter(|k| !self.backends.contains_key(k)).collect();
        if self.backends.len() + new_backends.len() > self.backends_capacity {
            return Err(full(forwarder_common::map_names::BACKENDS, self.backends_capacity));
        }
        let applied = self.applied.get(frontend);
        let held = applied.map_or(0, |a| usize::from(a.head.is_some()) + a.slots.len());
        let needed = 1 + backends.len();
        if self.service_entries + needed.saturating_sub(held) > self.services_capacity {
            return Err(full(forwarder_common::map_names::SERVICES, self.services_capacity));
        }
        Ok(())
    }

    /// Makes the node addresses that serve NodePorts equal `desired`.
    pub fn apply_node_ips(
        &mut self,
        desired: &BTreeSet<Ipv4Addr>,
        dp: &mut impl Datapath,
    ) -> SyncReport {
        let masquerading: BTreeSet<Ipv4Addr> = self.snat_addrs.values().copied().collect();
        self.sync_node_flags(desired, &masquerading, dp)
    }

    /// Makes the masquerade addresses equal `desired` (ifindex -> address),
    /// and marks them in the node addresses: a new address is marked before
    /// any flow can be masqueraded to it, an old one unmarked after.
    pub fn apply_snat_addrs(
        &mut self,
        desired: &BTreeMap<u32, Ipv4Addr>,
        dp: &mut impl Datapath,
    ) -> SyncReport {
        let nodeports = self.node_ips();
        let both = self.snat_addrs.values().chain(desired.values()).copied().collect();
        let mut report = self.sync_node_flags(&nodeports, &both, dp);
        report.merge(sync_map(
            &mut self.snat_addrs,
            desired,
            dp,
            |dp, ifindex, addr| dp.put_snat_addr(ifindex, addr),
            |dp, ifindex| dp.remove_snat_addr(ifindex),
        ));
        let masquerading = self.snat_addrs.values().copied().collect();
        report.merge(self.sync_node_flags(&nodeports, &masquerading, dp));
        report
    }

    /// Writes each node address with its flags: NodePort service for the
    /// addresses in `nodeports`, masquerading for those in `masquerading`.
    fn sync_node_flags(
        &mut self,
        nodeports: &BTreeSet<Ipv4Addr>,
        masquerading: &BTreeSet<Ipv4Addr>,
        dp: &mut impl Datapath,
    ) -> SyncReport {
        let mut desired: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
        for addr in nodeports {
            *desired.entry(*addr).or_default() |= NODE_IP_NODEPORT;
        }
        for addr in masquerading {
            *desired.entry(*addr).or_default() |= NODE_IP_MASQUERADE;
        }
        sync_map(
            &mut self.node_ips,
            &desired,
            dp,
            |dp, addr, flags| dp.put_node_ip(addr, flags),
            |dp, addr| dp.remove_node_ip(addr),
        )
    }

    fn apply_frontend(
        &mut self,
        frontend: &Frontend,
        backends: &[BackendKey],
        head: SvcValue,
        dp: &mut impl Datapath,
        report: &mut SyncReport,
    ) -> Result<(), MapWriteError> {
        self.check_capacity(frontend, backends)?;
        let wanted = backends
            .iter()
            .map(|key| self.backend_id(*key, dp, report))
            .collect::<Result<Vec<_>, _>>()?;
        let entries = &mut self.service_entries;
        let applied = self.applied.entry(*frontend).or_default();
        let ids = stable_order(&applied.slots, &wanted);
        // Shrinking: lower the count before the slots disappear.
        if applied.head.is_some_and(|h| h.count > head.count) {
            dp.put_service(svc_key(frontend, 0), head)?;
            report.writes += 1;
            applied.head = Some(head);
        }
        for (i, id) in ids.iter().enumerate() {
            if applied.slots.get(i) == Some(id) {
                continue;
            }
            dp.put_service(svc_key(frontend, i as u16 + 1), SvcValue::slot(*id))?;
            report.writes += 1;
            self.unreferenced = true;
            match applied.slots.get_mut(i) {
                Some(slot) => *slot = *id,
                None => {
                    applied.slots.push(*id);
                    *entries += 1;
                }
            }
        }
        if applied.head != Some(head) {
            dp.put_service(svc_key(frontend, 0), head)?;
            report.writes += 1;
            if applied.head.is_none() {
                *entries += 1;
            }
            applied.head = Some(head);
        }
        while applied.slots.len() > ids.len() {
            dp.remove_service(svc_key(frontend, applied.slots.len() as u16))?;
            report.writes += 1;
            applied.slots.pop();
            *entries -= 1;
            self.unreferenced = true;
        }
        Ok(())
    }

    /// Removes slot 0 first, so the frontend disappears as a whole.
    fn remove_frontend(
        &mut self,
        frontend: &Frontend,
        dp: &mut impl Datapath,
        report: &mut SyncReport,
    ) -> Result<(), MapWriteError> {
        let Some(applied) = self.applied.get_mut(frontend) else {
            return Ok(());
        };
        if applied.head.is_some() {
            dp.remove_service(svc_key(frontend, 0))?;
            report.writes += 1;
            applied.head = None;
            self.service_entries -= 1;
        }
        while !applied.slots.is_empty() {
            dp.remove_service(svc_key(frontend, applied.slots.len() as u16))?;
            report.writes += 1;
            applied.slots.pop();
            self.service_entries -= 1;
            self.unreferenced = true;
        }
        self.applied.remove(frontend);
        self.unreferenced = true;
        Ok(())
    }

    /// The backend id for `key`, writing the backend first if it is new.
    fn backend_id(
        &mut self,
        key: BackendKey,
        dp: &mut impl Datapath,
        report: &mut SyncReport,
    ) -> Result<u32, MapWriteError> {
        if let Some(id) = self.backends.get(&key) {
            return Ok(*id);
        }
        let id = self.free_ids.pop_front().unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id - 1
        });
        if let Err(err) = dp.put_backend(id, backend_value(&key.endpoint, key.proto, key.local)) {
            self.free_ids.push_front(id);
            return Err(err);
        }
        report.writes += 1;
        self.backends.insert(key, id);
        // Referenced once its slot is written; if that fails, collected.
        self.unreferenced = true;
        Ok(id)
    }

    /// Removes backends that no slot references any more.
    fn collect_backends(&mut self, dp: &mut impl Datapath, report: &mut SyncReport) {
        if !std::mem::take(&mut self.unreferenced) {
            return;
        }
        let referenced: BTreeSet<u32> =
            self.applied.values().flat_map(|a| a.slots.iter().copied()).collect();
        let mut unused: Vec<(u32, BackendKey)> = self
            .backends
            .iter()
            .filter(|(_, id)| !referenced.contains(id))
            .map(|(k, id)| (*id, *k))
            .collect();
        unused.sort_by_key(|(id, _)| *id);
        for (id, key) in unused {
            if let Err(err) = dp.remove_backend(id) {
                report.errors.push(err.to_string());
                self.unreferenced = true;
                continue;
            }
            report.writes += 1;
            self.backends.remove(&key);
            self.free_ids.push_back(id);
        }
    }
}

/// The slot order for `wanted` backend ids that moves as few of the
/// `current` ones as possible: a backend that stays keeps its slot (session
/// affinity bindings name slots), one from a slot past the new count moves
/// into a freed slot, then new backends fill the rest.
fn stable_order(current: &[u32], wanted: &[u32]) -> Vec<u32> {
    let n = wanted.len();
    let mut order: Vec<Option<u32>> =
        (0..n).map(|i| current.get(i).copied().filter(|id| wanted.contains(id))).collect();
    let placed: BTreeSet<u32> = order.iter().flatten().copied().collect();
    let mut movers = current
        .iter()
        .skip(n)
        .chain(wanted)
        .filter(|id| wanted.contains(id) && !placed.contains(id))
        .copied()
        .collect::<Vec<_>>()
        .into_iter();
    let mut seen = BTreeSet::new();
    for slot in order.iter_mut().filter(|s| s.is_none()) {
        *slot = movers.by_ref().find(|id| seen.insert(*id));
    }
    order.into_iter().flatten().collect()
}

/// Brings `current` (what the map holds) to `desired` with one write per
/// difference; failed writes are reported and retried by the next call.
/// Makes `current` (what a map holds, as written) equal `desired`, one
/// write per difference; a failed write leaves its entry as it was, for
/// the next sync to retry.
fn sync_map<K: Ord + Copy, V: PartialEq + Copy, Dp>(
    current: &mut BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    dp: &mut Dp,
    put: impl Fn(&mut Dp, K, V) -> Result<(), MapWriteError>,
    remove: impl Fn(&mut Dp, K) -> Result<(), MapWriteError>,
) -> SyncReport {
    let mut report = SyncReport::default();
    for (key, value) in desired {
        if current.get(key) == Some(value) {
            continue;
        }
        match put(dp, *key, *value) {
            Ok(()) => {
                report.writes += 1;
                current.insert(*key, *value);
            }
            Err(err) => report.errors.push(err.to_string()),
        }
    }
    let gone: Vec<K> = current.keys().filter(|k| !desired.contains_key(k)).copied().collect();
    for key in gone {
        match remove(dp, key) {
            Ok(()) => {
                report.writes += 1;
                current.remove(&key);
            }
            Err(err) => report.errors.push(err.to_string()),
        }
    }
    report
}

fn sync_set<Dp: Datapath>(
    current: &mut BTreeSet<Ipv4Addr>,
    desired: &BTreeSet<Ipv4Addr>,
    dp: &mut Dp,
    put: fn(&mut Dp, Ipv4Addr) -> Result<(), MapWriteError>,
    remove: fn(&mut Dp, Ipv4Addr) -> Result<(), MapWriteError>,
) -> SyncReport {
    let mut report = SyncReport::default();
    let added: Vec<Ipv4Addr> = desired.difference(current).copied().collect();
    let gone: Vec<Ipv4Addr> = current.difference(desired).copied().collect();
    for addr in added {
        match put(dp, addr) {
            Ok(()) => {
                report.writes += 1;
                current.insert(addr);
            }
            Err(err) => report.errors.push(err.to_string()),
        }
    }
    for addr in gone {
        match remove(dp, addr) {
            Ok(()) => {
                report.writes += 1;
                current.remove(&addr);
            }
            Err(err) => report.errors.push(err.to_string()),
        }
    }
    report
}

fn full(map: &'static str, capacity: usize) -> MapWriteError {
    MapWriteError {
        map,
        op: "insert",
        reason: format!("map full ({capacity} entries); the previous entries stay in force"),
    }
}

mod restore;
pub use restore::{MapContents, frontend_of};

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;
