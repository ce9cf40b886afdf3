//! In-memory `Datapath` that checks the sync invariant after every write.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use forwarder_common::{Backend, SvcKey, SvcValue};

use super::{Datapath, MapWriteError};
use crate::{cidr::Cidr, model::Frontend};

#[derive(Debug, Default)]
pub struct FakeDatapath {
    pub services: BTreeMap<SvcKey, SvcValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub node_ips: BTreeMap<Ipv4Addr, u32>,
    pub cluster_ips: BTreeSet<Ipv4Addr>,
    pub source_ranges: BTreeSet<(Frontend, Cidr)>,
    pub snat_addrs: BTreeMap<u32, Ipv4Addr>,
    /// Every write, in order, e.g. `put svc 10.96.0.10:80/6#0`, `put node
    /// 192.168.0.1 3`, `remove snat 2`.
    pub log: Vec<String>,
    pub backends_capacity: Option<usize>,
}

fn describe(key: &SvcKey) -> String {
    let addr = Ipv4Addr::from(key.addr.to_ne_bytes());
    format!("{addr}:{}/{}#{}", u16::from_be(key.port), key.proto, key.slot)
}

impl FakeDatapath {
    /// Panics unless every slot `1..=count` of every frontend names a
    /// backend that exists: what a packet could see between two writes.
    fn check_invariant(&self) {
        for (key, value) in self.services.iter().filter(|(k, _)| k.slot == 0) {
            for slot in 1..=value.count {
                let slot_key = SvcKey { slot, ..*key };
                let id = self
                    .services
                    .get(&slot_key)
                    .unwrap_or_else(|| {
                        panic!("{} lacks slot {slot}; log: {:#?}", describe(key), self.log)
                    })
                    .backend_id;
                assert!(
                    self.backends.contains_key(&id),
                    "{} slot {slot} -> missing backend {id}; log: {:#?}",
                    describe(key),
                    self.log
                );
            }
        }
    }

    /// `frontend -> [podIP:port, ...]` as a packet would resolve it.
    pub fn resolve(&self) -> BTreeMap<String, Vec<String>> {
        self.services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(key, value)| {
                let backends = (1..=value.count)
                    .map(|slot| {
                        let id = self.services[&SvcKey { slot, ..*key }].backend_id;
                        let b = self.backends[&id];
                        format!("{}:{}", Ipv4Addr::from(b.addr.to_ne_bytes()), u16::from_be(b.port))
                    })
                    .collect();
                let name = describe(key);
                (name[..name.rfind('#').unwrap()].to_owned(), backends)
            })
            .collect()
    }
}

impl FakeDatapath {
    /// What a restarted agent reads back.
    pub fn contents(&self) -> super::MapContents {
        super::MapContents {
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            node_ips: self.node_ips.iter().map(|(k, v)| (*k, *v)).collect(),
            cluster_ips: self.cluster_ips.iter().copied().collect(),
            source_ranges: self.source_ranges.iter().copied().collect(),
            snat_addrs: self.snat_addrs.iter().map(|(k, v)| (*k, *v)).collect(),
        }
    }
}

impl Datapath for FakeDatapath {
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapWriteError> {
        if self.backends_capacity.is_some_and(|cap| self.backends.len() >= cap)
            && !self.backends.contains_key(&id)
        {
            return Err(MapWriteError {
                map: "BACKEND4_V1",
                op: "insert",
                reason: "map full".into(),
            });
        }
        self.log.push(format!("put backend {id}"));
        self.backends.insert(id, backend);
        self.check_invariant();
        Ok(())
    }

    fn remove_backend(&mut self, id: u32) -> Result<(), MapWriteError> {
        self.log.push(format!("remove backend {id}"));
        self.backends.remove(&id);
        self.check_invariant();
        Ok(())
    }

    fn put_service(&mut self, key: SvcKey, value: SvcValue) -> Result<(), MapWriteError> {
        self.log.push(format!("put svc {}", describe(&key)));
        self.services.insert(key, value);
        self.check_invariant();
        Ok(())
    }

    fn remove_service(&mut self, key: SvcKey) -> Result<(), MapWriteError> {
        self.log.push(format!("remove svc {}", describe(&key)));
        self.services.remove(&key);
        self.check_invariant();
        Ok(())
    }

    fn put_node_ip(&mut self, addr: Ipv4Addr, flags: u32) -> Result<(), MapWriteError> {
        self.log.push(format!("put node {addr} {flags}"));
        self.node_ips.insert(addr, flags);
        Ok(())
    }

    fn remove_node_ip(&mut self, addr: Ipv4Addr) -> Result<(), MapWriteError> {
        self.log.push(format!("remove node {addr}"));
        self.node_ips.remove(&addr);
        Ok(())
    }

    fn put_cluster_ip(&mut self, addr: Ipv4Addr) -> Result<(), MapWriteError> {
        self.cluster_ips.insert(addr);
        Ok(())
    }

    fn remove_cluster_ip(&mut self, addr: Ipv4Addr) -> Result<(), MapWriteError> {
        self.cluster_ips.remove(&addr);
        Ok(())
    }

    fn put_source_range(&mut self, frontend: &Frontend, range: Cidr) -> Result<(), MapWriteError> {
        self.source_ranges.insert((*frontend, range));
        Ok(())
    }

    fn remove_source_range(
        &mut self,
        frontend: &Frontend,
        range: Cidr,
    ) -> Result<(), MapWriteError> {
        self.source_ranges.remove(&(*frontend, range));
        Ok(())
    }

    fn put_snat_addr(&mut self, ifindex: u32, addr: Ipv4Addr) -> Result<(), MapWriteError> {
        self.log.push(format!("put snat {ifindex} {addr}"));
        self.snat_addrs.insert(ifindex, addr);
        Ok(())
    }

    fn remove_snat_addr(&mut self, ifindex: u32) -> Result<(), MapWriteError> {
        self.log.push(format!("remove snat {ifindex}"));
        self.snat_addrs.remove(&ifindex);
        Ok(())
    }
}
