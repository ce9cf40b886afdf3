//! Incremental, make-before-break sync of the desired state into the maps.
//!
//! Invariant at every single map write, so no packet ever sees a
//! half-written Service: every slot `1..=count` of a frontend holds a backend
//! id that is present in the backends map. Hence the order: backends, then
//! slots, then the frontend's count; on the way out the count first, then
//! slots, then backends.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use forwarder_common::{Backend, SvcKey, SvcValue};

use crate::model::{DesiredState, Endpoint, Frontend, Proto};

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
    fn put_node_ip(&mut self, addr: Ipv4Addr) -> Result<(), MapWriteError>;
    fn remove_node_ip(&mut self, addr: Ipv4Addr) -> Result<(), MapWriteError>;
}

/// The outcome of one sync: how many writes it took, and what failed.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub writes: usize,
    pub errors: Vec<String>,
}

/// What a frontend currently holds in the map, exactly.
#[derive(Clone, Debug, Default)]
struct Applied {
    /// Slot 0's count; `None` while slot 0 is absent.
    count: Option<u16>,
    /// Backend id in slot `i + 1`.
    slots: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct BackendKey {
    endpoint: Endpoint,
    proto: Proto,
}

/// Remembers what it wrote, so each sync writes only the difference.
/// Backends live as long as some slot references them.
#[derive(Debug, Default)]
pub struct Syncer {
    applied: BTreeMap<Frontend, Applied>,
    /// Backend id of every backend in the map.
    backends: HashMap<BackendKey, u32>,
    free_ids: Vec<u32>,
    next_id: u32,
    node_ips: BTreeSet<Ipv4Addr>,
}

pub fn svc_key(frontend: &Frontend, slot: u16) -> SvcKey {
    let addr = frontend.addr.map_or(0, |a| u32::from_ne_bytes(a.octets()));
    SvcKey::new(addr, frontend.port.to_be(), frontend.proto.number(), slot)
}

pub fn backend_value(endpoint: &Endpoint, proto: Proto) -> Backend {
    Backend {
        addr: u32::from_ne_bytes(endpoint.addr.octets()),
        port: endpoint.port.to_be(),
        proto: proto.number(),
        _pad: 0,
    }
}

/// Slots are u16 and slot 0 is the frontend itself.
const MAX_SLOTS: usize = u16::MAX as usize - 1;

impl Syncer {
    pub fn new() -> Self {
        Self { next_id: 1, ..Self::default() }
    }

    /// Brings the maps to `desired`, writing only what changed.
    pub fn apply(&mut self, desired: &DesiredState, dp: &mut impl Datapath) -> SyncReport {
        let mut report = SyncReport::default();
        for (frontend, endpoints) in &desired.services {
            if let Err(err) = self.apply_frontend(frontend, endpoints, dp, &mut report) {
                report.errors.push(format!("{frontend}: {err}"));
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
        report
    }

    /// Makes the map's local node addresses equal `desired`.
    pub fn apply_node_ips(
        &mut self,
        desired: &BTreeSet<Ipv4Addr>,
        dp: &mut impl Datapath,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        for addr in desired.difference(&self.node_ips.clone()) {
            match dp.put_node_ip(*addr) {
                Ok(()) => {
                    report.writes += 1;
                    self.node_ips.insert(*addr);
                }
                Err(err) => report.errors.push(err.to_string()),
            }
        }
        for addr in self.node_ips.clone().difference(desired) {
            match dp.remove_node_ip(*addr) {
                Ok(()) => {
                    report.writes += 1;
                    self.node_ips.remove(addr);
                }
                Err(err) => report.errors.push(err.to_string()),
            }
        }
        report
    }

    fn apply_frontend(
        &mut self,
        frontend: &Frontend,
        endpoints: &[Endpoint],
        dp: &mut impl Datapath,
        report: &mut SyncReport,
    ) -> Result<(), MapWriteError> {
        let endpoints = &endpoints[..endpoints.len().min(MAX_SLOTS)];
        let ids = endpoints
            .iter()
            .map(|e| {
                self.backend_id(BackendKey { endpoint: *e, proto: frontend.proto }, dp, report)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let applied = self.applied.entry(*frontend).or_default();
        let new_count = ids.len() as u16;
        // Shrinking: lower the count before the slots disappear.
        if applied.count.is_some_and(|c| c > new_count) {
            dp.put_service(svc_key(frontend, 0), SvcValue::frontend(new_count))?;
            report.writes += 1;
            applied.count = Some(new_count);
        }
        for (i, id) in ids.iter().enumerate() {
            if applied.slots.get(i) == Some(id) {
                continue;
            }
            dp.put_service(svc_key(frontend, i as u16 + 1), SvcValue::slot(*id))?;
            report.writes += 1;
            match applied.slots.get_mut(i) {
                Some(slot) => *slot = *id,
                None => applied.slots.push(*id),
            }
        }
        if applied.count != Some(new_count) {
            dp.put_service(svc_key(frontend, 0), SvcValue::frontend(new_count))?;
            report.writes += 1;
            applied.count = Some(new_count);
        }
        while applied.slots.len() > ids.len() {
            dp.remove_service(svc_key(frontend, applied.slots.len() as u16))?;
            report.writes += 1;
            applied.slots.pop();
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
        let applied = self.applied.entry(*frontend).or_default();
        if applied.count.is_some() {
            dp.remove_service(svc_key(frontend, 0))?;
            report.writes += 1;
            applied.count = None;
        }
        while !applied.slots.is_empty() {
            dp.remove_service(svc_key(frontend, applied.slots.len() as u16))?;
            report.writes += 1;
            applied.slots.pop();
        }
        self.applied.remove(frontend);
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
        let id = self.free_ids.pop().unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id - 1
        });
        if let Err(err) = dp.put_backend(id, backend_value(&key.endpoint, key.proto)) {
            self.free_ids.push(id);
            return Err(err);
        }
        report.writes += 1;
        self.backends.insert(key, id);
        Ok(id)
    }

    /// Removes backends that no slot references any more.
    fn collect_backends(&mut self, dp: &mut impl Datapath, report: &mut SyncReport) {
        let referenced: BTreeSet<u32> =
            self.applied.values().flat_map(|a| a.slots.iter().copied()).collect();
        let unused: Vec<BackendKey> = self
            .backends
            .iter()
            .filter(|(_, id)| !referenced.contains(id))
            .map(|(k, _)| *k)
            .collect();
        for key in unused {
            let id = self.backends[&key];
            if let Err(err) = dp.remove_backend(id) {
                report.errors.push(err.to_string());
                continue;
            }
            report.writes += 1;
            self.backends.remove(&key);
            self.free_ids.push(id);
        }
    }
}

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;
