//! Adopting what a previous agent left in the pinned maps, so that a new
//! agent's first sync writes only the differences and removes what the
//! source no longer has (restore, sync, sweep), and backends keep their ids
//! (conntrack entries name them).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use forwarder_common::{BACKEND_LOCAL, Backend, SCOPE_INTERNAL, SvcKey, SvcValue};

use super::{Applied, BackendKey, Datapath, SyncReport, Syncer};
use crate::{
    cidr::Cidr,
    model::{Endpoint, Frontend, Proto, Scope},
};

/// The maps' contents, read back.
#[derive(Clone, Debug, Default)]
pub struct MapContents {
    pub services: Vec<(SvcKey, SvcValue)>,
    pub backends: Vec<(u32, Backend)>,
    /// Node addresses and their `NODE_IP_*` flags.
    pub node_ips: Vec<(Ipv4Addr, u32)>,
    pub cluster_ips: Vec<Ipv4Addr>,
    pub source_ranges: Vec<(Frontend, Cidr)>,
    pub snat_addrs: Vec<(u32, Ipv4Addr)>,
}

/// The frontend a services-map key belongs to; `None` for a protocol this
/// build does not know.
pub fn frontend_of(key: &SvcKey) -> Option<Frontend> {
    let proto = Proto::from_number(key.proto)?;
    let addr = (key.addr != 0).then(|| Ipv4Addr::from(key.addr.to_ne_bytes()));
    let scope = if key.scope == SCOPE_INTERNAL { Scope::Internal } else { Scope::External };
    Some(Frontend { scope, ..Frontend::new(addr, u16::from_be(key.port), proto) })
}

impl Syncer {
    /// Takes `contents` as what the maps hold. Slots past a gap, and keys
    /// this build cannot read, serve no packet (the datapath reads slots
    /// `1..=count`, and a frontend with a gap below its count cannot have
    /// been written: counts rise after their slots) and are removed now.
    pub fn restore(&mut self, contents: MapContents, dp: &mut impl Datapath) -> SyncReport {
        let mut report = SyncReport::default();
        let mut frontends: BTreeMap<Frontend, (Option<SvcValue>, BTreeMap<u16, u32>)> =
            BTreeMap::new();
        let mut unreadable = Vec::new();
        for (key, value) in &contents.services {
            let Some(frontend) = frontend_of(key) else {
                unreadable.push(*key);
                continue;
            };
            let (head, slots) = frontends.entry(frontend).or_default();
            match key.slot {
                0 => *head = Some(*value),
                slot => {
                    slots.insert(slot, value.backend_id);
                }
            }
        }
        for (frontend, (head, slots)) in frontends {
            let dense: Vec<u32> = (1..).map_while(|slot| slots.get(&slot).copied()).collect();
            for slot in slots.keys().filter(|s| usize::from(**s) > dense.len()) {
                unreadable.push(super::svc_key(&frontend, *slot));
            }
            self.service_entries += usize::from(head.is_some()) + dense.len();
            self.applied.insert(frontend, Applied { head, slots: dense });
        }
        for key in unreadable {
            match dp.remove_service(key) {
                Ok(()) => report.writes += 1,
                Err(err) => report.errors.push(err.to_string()),
            }
        }
        let mut used = BTreeSet::new();
        for (id, backend) in &contents.backends {
            let key = Proto::from_number(backend.proto).map(|proto| BackendKey {
                endpoint: Endpoint {
                    addr: Ipv4Addr::from(backend.addr.to_ne_bytes()),
                    port: u16::from_be(backend.port),
                },
                proto,
                local: backend.flags & BACKEND_LOCAL != 0,
            });
            // Two ids for one backend cannot come from a sync, nor a protocol
            // this build does not know: keep the first id, remove the rest
            // (slots naming them are rewritten by the sync that follows).
            match key {
                Some(key) if !self.backends.contains_key(&key) => {
                    self.backends.insert(key, *id);
                    used.insert(*id);
                }
                _ => {
                    let still_named = self.applied.values().any(|a| a.slots.contains(id));
                    if still_named {
                        // Kept until its slot is rewritten; then collected.
                        used.insert(*id);
                        continue;
                    }
                    match dp.remove_backend(*id) {
                        Ok(()) => report.writes += 1,
                        Err(err) => report.errors.push(err.to_string()),
                    }
                }
            }
        }
        self.next_id = used.last().map_or(1, |max| max + 1);
        self.free_ids = (1..self.next_id).filter(|id| !used.contains(id)).collect();
        self.node_ips = contents.node_ips.into_iter().collect();
        self.cluster_ips = contents.cluster_ips.into_iter().collect();
        self.source_ranges = contents.source_ranges.into_iter().collect();
        self.snat_addrs = contents.snat_addrs.into_iter().collect();
        // Backends a crash left without a slot go with the first sync.
        self.unreferenced = true;
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{model::desired, sync::fake::FakeDatapath};

    fn fe(addr: &str, port: u16) -> Frontend {
        Frontend::new(Some(addr.parse().unwrap()), port, Proto::Tcp)
    }

    /// Two frontends, a source range, node and cluster addresses, written
    /// by a first agent.
    fn first_agent() -> (FakeDatapath, crate::model::DesiredState) {
        let mut state = desired(&[
            (fe("10.96.0.10", 80), &["10.244.1.2:8080", "10.244.1.3:8080"]),
            (Frontend::new(None, 30080, Proto::Udp), &["10.244.1.2:5353"]),
        ]);
        state
            .source_ranges
            .insert(fe("10.96.0.10", 80), ["192.168.0.0/16".parse().unwrap()].into());
        state.cluster_ips.insert("10.96.0.10".parse().unwrap());
        let mut dp = FakeDatapath::default();
        let mut syncer = Syncer::new(usize::MAX, usize::MAX);
        assert!(syncer.apply(&state, &mut dp).errors.is_empty());
        syncer.apply_node_ips(&["192.168.10.1".parse().unwrap()].into(), &mut dp);
        (dp, state)
    }

    #[test]
    fn a_new_agent_adopts_the_maps_and_writes_nothing_for_the_same_state() {
        let (mut dp, state) = first_agent();
        let ids = dp.backends.clone();
        let mut syncer = Syncer::new(usize::MAX, usize::MAX);
        let restored = syncer.restore(dp.contents(), &mut dp);
        assert_eq!(restored.writes, 0);
        let report = syncer.apply(&state, &mut dp);
        assert_eq!((report.writes, report.errors.len()), (0, 0), "{:?}", dp.log);
        let nodes = syncer.apply_node_ips(&["192.168.10.1".parse().unwrap()].into(), &mut dp);
        assert_eq!(nodes.writes, 0);
        assert_eq!(dp.backends, ids, "backends keep their ids");
    }

    #[test]
    fn what_the_source_dropped_meanwhile_is_swept_make_before_break() {
        let (mut dp, _) = first_agent();
        let mut syncer = Syncer::new(usize::MAX, usize::MAX);
        syncer.restore(dp.contents(), &mut dp);
        // The NodePort Service was deleted and an endpoint replaced while
        // no agent ran; the fake checks every write leaves whole Services.
        let now = desired(&[(fe("10.96.0.10", 80), &["10.244.1.3:8080", "10.244.1.4:8080"])]);
        let report = syncer.apply(&now, &mut dp);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        // 10.244.1.3 keeps its slot (2); the new endpoint takes the freed one.
        let resolved = dp.resolve();
        assert_eq!(resolved["10.96.0.10:80/6"], ["10.244.1.4:8080", "10.244.1.3:8080"]);
        assert_eq!(resolved.len(), 1, "the NodePort is gone: {resolved:?}");
        assert_eq!(dp.backends.len(), 2, "the departed backends are gone");
        assert!(dp.source_ranges.is_empty() && dp.cluster_ips.is_empty());
    }

    #[test]
    fn slots_past_a_gap_are_removed() {
        let (mut dp, state) = first_agent();
        let head = svc_key_of(&dp, "10.96.0.10", 0);
        let stray = SvcKey { slot: 4, ..head };
        dp.services.insert(stray, SvcValue::slot(*dp.backends.keys().next().unwrap()));
        let mut syncer = Syncer::new(usize::MAX, usize::MAX);
        let restored = syncer.restore(dp.contents(), &mut dp);
        assert_eq!(restored.writes, 1);
        assert!(!dp.services.contains_key(&stray));
        assert_eq!(syncer.apply(&state, &mut dp).writes, 0);
    }

    fn svc_key_of(dp: &FakeDatapath, addr: &str, slot: u16) -> SvcKey {
        let addr = u32::from_ne_bytes(addr.parse::<Ipv4Addr>().unwrap().octets());
        *dp.services.keys().find(|k| k.addr == addr && k.slot == slot).expect("frontend present")
    }
}
