//! The harness: a freshly loaded object, its maps seeded through the real
//! sync, and programs run through BPF_PROG_TEST_RUN.
pub(crate) use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

pub(crate) use aya::{
    Ebpf,
    maps::HashMap,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
pub(crate) use forwarder_common::{
    AffinityKey, AffinityValue, CtKey, CtTimeouts, CtValue, SnatPorts, map_names, program_names,
    stat,
};
pub(crate) use forwarder_tests::packet::{
    ACK, FIN, Packet, RST, SYN, ethernet, port_unreachable, verify_checksums,
};
pub(crate) use forwarder_user::{
    dataplane::{Capacity, Maps, Tuning, load_object},
    model::{DesiredState, Endpoint, Frontend, Proto, Scope},
    sync::Syncer,
};

pub(crate) const XDP_DROP: u32 = 1;

pub(crate) const XDP_PASS: u32 = 2;

pub(crate) const TC_ACT_OK: u32 = 0;

pub(crate) const TC_ACT_SHOT: u32 = 2;

pub(crate) const TC_ACT_REDIRECT: u32 = 7;

pub(crate) const NODE_IP: &str = "192.168.10.1";

pub(crate) const CLUSTER_IP: &str = "10.96.0.10";

#[derive(Clone, Copy, Debug)]
pub(crate) enum Prog {
    Xdp,
    /// Ingress of a pod-facing interface.
    Tc,
    /// Ingress of a node interface.
    TcNode,
    /// Egress of any interface.
    TcEgress,
}

pub(crate) struct Harness {
    pub(crate) ebpf: Ebpf,
    pub(crate) maps: Maps,
    pub(crate) syncer: Syncer,
}

pub(crate) fn frontend(addr: Option<&str>, port: u16, proto: Proto) -> Frontend {
    Frontend::new(addr.map(|a| a.parse().unwrap()), port, proto)
}

pub(crate) fn endpoint(s: &str) -> Endpoint {
    let (a, p) = s.split_once(':').unwrap();
    Endpoint { addr: a.parse().unwrap(), port: p.parse().unwrap() }
}

/// The Services every fixture starts with: NodePort 30080 and ClusterIP
/// 10.96.0.10:80 for TCP and UDP, each with one backend so the expected
/// bytes are exact.
pub(crate) fn default_services() -> Vec<(Frontend, Vec<&'static str>)> {
    vec![
        (frontend(None, 30080, Proto::Tcp), vec!["10.244.1.2:8080"]),
        (frontend(None, 30080, Proto::Udp), vec!["10.244.1.2:5353"]),
        (frontend(Some(CLUSTER_IP), 80, Proto::Tcp), vec!["10.244.1.2:8080"]),
        (frontend(Some(CLUSTER_IP), 53, Proto::Udp), vec!["10.244.1.2:5353"]),
        (frontend(Some("10.96.0.99"), 80, Proto::Tcp), vec![]),
    ]
}

impl Harness {
    pub(crate) fn new() -> Self {
        Self::with_tuning(Tuning::default())
    }

    /// With other load-time settings (a smaller masquerade range, say).
    pub(crate) fn with_tuning(tuning: Tuning) -> Self {
        let mut ebpf = load_object(Capacity::default(), tuning, 0, None)
            .expect("eBPF object loads (are you root?)");
        let maps = Maps::take(&mut ebpf).expect("maps present");
        let mut harness = Self { ebpf, maps, syncer: Syncer::new(usize::MAX, usize::MAX) };
        let report =
            harness.syncer.apply_node_ips(&[NODE_IP.parse().unwrap()].into(), &mut harness.maps);
        assert!(report.errors.is_empty(), "{report:?}");
        harness.set_services(&default_services());
        harness
    }

    /// Every endpoint on this node.
    pub(crate) fn set_services(&mut self, services: &[(Frontend, Vec<&str>)]) {
        self.set_services_remote(services, &[]);
    }

    /// Endpoints on this node except those at the `remote` addresses.
    pub(crate) fn set_services_remote(
        &mut self,
        services: &[(Frontend, Vec<&str>)],
        remote: &[&str],
    ) {
        self.set_services_with(services, remote, &[]);
    }

    /// As `set_services_remote`; `drop_when_empty` frontends drop instead of
    /// rejecting when empty.
    pub(crate) fn set_services_dropping(
        &mut self,
        services: &[(Frontend, Vec<&str>)],
        remote: &[&str],
        drop_when_empty: &[Frontend],
    ) {
        self.apply(services, remote, &[], drop_when_empty);
    }

    pub(crate) fn set_services_with(
        &mut self,
        services: &[(Frontend, Vec<&str>)],
        remote: &[&str],
        affinity: &[(Frontend, u32)],
    ) {
        self.apply(services, remote, affinity, &[]);
    }

    pub(crate) fn apply(
        &mut self,
        services: &[(Frontend, Vec<&str>)],
        remote: &[&str],
        affinity: &[(Frontend, u32)],
        drop_when_empty: &[Frontend],
    ) {
        self.apply_ranges(services, remote, affinity, drop_when_empty, &[]);
    }

    pub(crate) fn apply_ranges(
        &mut self,
        services: &[(Frontend, Vec<&str>)],
        remote: &[&str],
        affinity: &[(Frontend, u32)],
        drop_when_empty: &[Frontend],
        source_ranges: &[(Frontend, &str)],
    ) {
        let services: BTreeMap<Frontend, Vec<Endpoint>> = services
            .iter()
            .map(|(f, eps)| (*f, eps.iter().map(|e| endpoint(e)).collect()))
            .collect();
        let local_endpoints = services
            .values()
            .flatten()
            .map(|e| e.addr)
            .filter(|a| !remote.iter().any(|r| r.parse::<Ipv4Addr>().unwrap() == *a))
            .collect();
        // The ClusterIPs: frontends in 10.96.0.0/16.
        let cluster_ips = services
            .keys()
            .filter_map(|f| f.addr)
            .filter(|a| a.octets()[..2] == [10, 96])
            .collect();
        let desired = DesiredState {
            services,
            local_endpoints,
            affinity: affinity.iter().copied().collect(),
            drop_when_empty: drop_when_empty.iter().copied().collect(),
            cluster_ips,
            source_ranges: source_ranges.iter().fold(BTreeMap::new(), |mut map, (f, range)| {
                map.entry(*f).or_insert_with(BTreeSet::new).insert(range.parse().unwrap());
                map
            }),
        };
        let report = self.syncer.apply(&desired, &mut self.maps);
        assert!(report.errors.is_empty(), "{report:?}");
        let report = self.syncer.apply_snat_addrs(
            &[(forwarder_common::SNAT_ADDR_DEFAULT, NODE_IP.parse().unwrap())].into(),
            &mut self.maps,
        );
        assert!(report.errors.is_empty(), "{report:?}");
    }

    pub(crate) fn run(&self, prog: Prog, input: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; input.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let result = match prog {
            Prog::Xdp => {
                let p: &Xdp =
                    self.ebpf.program(program_names::XDP_NODE).unwrap().try_into().unwrap();
                p.test_run(opts)
            }
            Prog::Tc | Prog::TcNode | Prog::TcEgress => {
                let name = match prog {
                    Prog::Tc => program_names::TC_POD,
                    Prog::TcNode => program_names::TC_NODE,
                    _ => program_names::TC_REVERSE_NAT,
                };
                let p: &SchedClassifier = self.ebpf.program(name).unwrap().try_into().unwrap();
                p.test_run(opts)
            }
        }
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN {prog:?} on {input:02x?}: {e}"));
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    pub(crate) fn stats(&self) -> Vec<(&'static str, u64)> {
        self.maps.stats().expect("stats readable").into_iter().filter(|(_, v)| *v > 0).collect()
    }

    pub(crate) fn conntrack_len(&mut self) -> usize {
        self.maps.conntrack().keys().count()
    }

    /// Whether the entry holding masquerade port `port` says the
    /// connection is gone (reset: SCTP ABORT or SHUTDOWN COMPLETE).
    pub(crate) fn snat_reset(&mut self, port: u16) -> bool {
        self.maps.nat().iter().map(|entry| entry.expect("conntrack readable")).any(
            |(key, value)| {
                key.dir == forwarder_common::CT_SNAT_REPLY
                    && key.dport == port.to_be()
                    && value.flags & forwarder_common::CT_RESET != 0
            },
        )
    }

    /// The clock the tests control: every conntrack and masquerade
    /// entry's last packet moves `seconds` into the past, as if that much
    /// time went by.
    pub(crate) fn advance(&mut self, seconds: u32) {
        for nat in [false, true] {
            let map = if nat { self.maps.nat() } else { self.maps.conntrack() };
            let entries: Vec<(CtKey, CtValue)> =
                map.iter().map(|e| e.expect("map readable")).collect();
            for (key, value) in entries {
                let older = CtValue { last_seen: value.last_seen.wrapping_sub(seconds), ..value };
                map.insert(key, older, 0).expect("map writable");
            }
        }
    }
}

/// A harness whose TCP NodePort 30080 endpoint (10.244.2.2:8080) is on
/// another node, so flows to it from outside are masqueraded.
pub(crate) fn masquerade_harness() -> Harness {
    let mut harness = Harness::new();
    let mut services = default_services();
    services[0].1 = vec!["10.244.2.2:8080"];
    harness.set_services_remote(&services, &["10.244.2.2"]);
    harness
}

/// What XDP passes up for a reject it hands to TC ingress: the frame
/// unchanged behind four bytes of metadata naming the reason (test runs
/// return the metadata with the frame).
pub(crate) fn deferred_reject(input: &[u8], reason: u32) -> Vec<u8> {
    let mut out = (forwarder_common::DEFERRED_REJECT | reason).to_ne_bytes().to_vec();
    out.extend_from_slice(input);
    out
}

/// The source port the egress program masqueraded with, checked in range.
pub(crate) fn masquerade_port(out: &[u8]) -> u16 {
    let port = u16::from_be_bytes([out[34], out[35]]);
    assert!(SnatPorts::DEFAULT.contains(port), "masquerade port {port} out of range");
    port
}

pub(crate) fn backend_of(out: &[u8]) -> String {
    format!("{}.{}.{}.{}", out[30], out[31], out[32], out[33])
}
