//! Kernel decisions as fixture tables run through BPF_PROG_TEST_RUN: input
//! frame, seeded maps, expected verdict and expected output bytes.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use aya::{
    Ebpf,
    maps::HashMap,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use forwarder_common::{AffinityKey, AffinityValue, CtKey, map_names, program_names, stat};
use forwarder_tests::packet::{MF, Packet, SYN, ethernet, port_unreachable, verify_checksums};
use forwarder_user::{
    dataplane::{Capacity, Maps, load_object},
    model::{DesiredState, Endpoint, Frontend, Proto, Scope},
    sync::Syncer,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const NODE_IP: &str = "192.168.10.1";
const CLUSTER_IP: &str = "10.96.0.10";

#[derive(Clone, Copy, Debug)]
enum Prog {
    Xdp,
    /// Ingress of a pod-facing interface.
    Tc,
    /// Egress of any interface.
    TcEgress,
}

struct Harness {
    ebpf: Ebpf,
    maps: Maps,
    syncer: Syncer,
}

fn frontend(addr: Option<&str>, port: u16, proto: Proto) -> Frontend {
    Frontend::new(addr.map(|a| a.parse().unwrap()), port, proto)
}

fn endpoint(s: &str) -> Endpoint {
    let (a, p) = s.split_once(':').unwrap();
    Endpoint { addr: a.parse().unwrap(), port: p.parse().unwrap() }
}

/// The Services every fixture starts with: NodePort 30080 and ClusterIP
/// 10.96.0.10:80 for TCP and UDP, each with one backend so the expected
/// bytes are exact.
fn default_services() -> Vec<(Frontend, Vec<&'static str>)> {
    vec![
        (frontend(None, 30080, Proto::Tcp), vec!["10.244.1.2:8080"]),
        (frontend(None, 30080, Proto::Udp), vec!["10.244.1.2:5353"]),
        (frontend(Some(CLUSTER_IP), 80, Proto::Tcp), vec!["10.244.1.2:8080"]),
        (frontend(Some(CLUSTER_IP), 53, Proto::Udp), vec!["10.244.1.2:5353"]),
        (frontend(Some("10.96.0.99"), 80, Proto::Tcp), vec![]),
    ]
}

impl Harness {
    fn new() -> Self {
        let mut ebpf =
            load_object(Capacity::default(), 0).expect("eBPF object loads (are you root?)");
        let maps = Maps::take(&mut ebpf).expect("maps present");
        let mut harness = Self { ebpf, maps, syncer: Syncer::new(usize::MAX, usize::MAX) };
        let report =
            harness.syncer.apply_node_ips(&[NODE_IP.parse().unwrap()].into(), &mut harness.maps);
        assert!(report.errors.is_empty(), "{report:?}");
        harness.set_services(&default_services());
        harness
    }

    /// Every endpoint on this node.
    fn set_services(&mut self, services: &[(Frontend, Vec<&str>)]) {
        self.set_services_remote(services, &[]);
    }

    /// Endpoints on this node except those at the `remote` addresses.
    fn set_services_remote(&mut self, services: &[(Frontend, Vec<&str>)], remote: &[&str]) {
        self.set_services_with(services, remote, &[]);
    }

    /// As `set_services_remote`; `drop_when_empty` frontends drop instead of
    /// rejecting when empty.
    fn set_services_dropping(
        &mut self,
        services: &[(Frontend, Vec<&str>)],
        remote: &[&str],
        drop_when_empty: &[Frontend],
    ) {
        self.apply(services, remote, &[], drop_when_empty);
    }

    fn set_services_with(
        &mut self,
        services: &[(Frontend, Vec<&str>)],
        remote: &[&str],
        affinity: &[(Frontend, u32)],
    ) {
        self.apply(services, remote, affinity, &[]);
    }

    fn apply(
        &mut self,
        services: &[(Frontend, Vec<&str>)],
        remote: &[&str],
        affinity: &[(Frontend, u32)],
        drop_when_empty: &[Frontend],
    ) {
        self.apply_ranges(services, remote, affinity, drop_when_empty, &[]);
    }

    fn apply_ranges(
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

    fn run(&self, prog: Prog, input: &[u8]) -> (u32, Vec<u8>) {
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
            Prog::Tc | Prog::TcEgress => {
                let name = match prog {
                    Prog::Tc => program_names::TC_POD,
                    _ => program_names::TC_REVERSE_NAT,
                };
                let p: &SchedClassifier = self.ebpf.program(name).unwrap().try_into().unwrap();
                p.test_run(opts)
            }
        }
        .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn stats(&self) -> Vec<(&'static str, u64)> {
        self.maps.stats().expect("stats readable").into_iter().filter(|(_, v)| *v > 0).collect()
    }

    fn conntrack_len(&mut self) -> usize {
        self.maps.conntrack().keys().count()
    }
}

struct Step {
    prog: Prog,
    input: Vec<u8>,
    verdict: u32,
    /// `None`: the frame must come out unchanged.
    output: Option<Vec<u8>>,
}

fn step(prog: Prog, input: &Packet, verdict: u32, output: Option<&Packet>) -> Step {
    Step { prog, input: input.bytes(), verdict, output: output.map(Packet::bytes) }
}

/// A step answered with ICMP port unreachable.
fn reject(prog: Prog, input: &Packet, verdict: u32) -> Step {
    let input = input.bytes();
    let output = port_unreachable(&input);
    Step { prog, input, verdict, output: Some(output) }
}

fn raw(prog: Prog, input: Vec<u8>, verdict: u32) -> Step {
    Step { prog, input, verdict, output: None }
}

struct Fixture {
    name: &'static str,
    steps: Vec<Step>,
    /// Non-zero counters after the steps.
    stats: Vec<(&'static str, u64)>,
}

fn fixtures() -> Vec<Fixture> {
    use Prog::{Tc, TcEgress, Xdp};
    let np_tcp = Packet::tcp("192.168.10.2:40000", "192.168.10.1:30080");
    let np_udp = Packet::udp("192.168.10.2:40001", "192.168.10.1:30080");
    let np_udp_nocsum = Packet { no_udp_checksum: true, ..np_udp.clone() };
    let cip_tcp = Packet::tcp("10.244.1.9:41000", "10.96.0.10:80");
    let cip_udp = Packet::udp("10.244.1.9:41001", "10.96.0.10:53");
    let with_options = Packet { ip_options: vec![0x94, 0x04, 0, 0], ..np_tcp.clone() }; // Router Alert
    let first_fragment = Packet { frag: MF, ..np_udp.clone() };
    let later_fragment = Packet { frag: 185, ..Packet::udp("192.168.10.2:1", "10.96.0.10:53") };
    let mut truncated_tcp = np_tcp.bytes();
    truncated_tcp.truncate(14 + 20 + 10);
    let mut bad_ihl = np_tcp.bytes();
    bad_ihl[14] = 0x43;
    // Total length covers the IP header only; the TCP header bytes after it
    // are link padding, not part of the datagram.
    let mut short_total = np_tcp.bytes();
    short_total[16..18].copy_from_slice(&20u16.to_be_bytes());
    let cip_udp_nocsum = Packet { no_udp_checksum: true, ..cip_udp.clone() };
    let mut ipv6 = ethernet(0x86dd);
    ipv6.extend_from_slice(&[0x60; 60]);

    vec![
        Fixture {
            name: "NodePort TCP from the wire is DNATed to the backend",
            steps: vec![step(Xdp, &np_tcp, XDP_PASS, Some(&np_tcp.with_dst("10.244.1.2:8080")))],
            stats: vec![("dnat", 1)],
        },
        Fixture {
            name: "NodePort UDP is DNATed",
            steps: vec![step(Xdp, &np_udp, XDP_PASS, Some(&np_udp.with_dst("10.244.1.2:5353")))],
            stats: vec![("dnat", 1)],
        },
        Fixture {
            name: "UDP checksum 0 stays 0",
            steps: vec![step(
                Xdp,
                &np_udp_nocsum,
                XDP_PASS,
                Some(&np_udp_nocsum.with_dst("10.244.1.2:5353")),
            )],
            stats: vec![("dnat", 1)],
        },
        Fixture {
            name: "ClusterIP from the wire is DNATed by XDP",
            steps: vec![step(Xdp, &cip_tcp, XDP_PASS, Some(&cip_tcp.with_dst("10.244.1.2:8080")))],
            stats: vec![("dnat", 1)],
        },
        Fixture {
            name: "ClusterIP TCP from a pod is DNATed by TC",
            steps: vec![step(Tc, &cip_tcp, TC_ACT_OK, Some(&cip_tcp.with_dst("10.244.1.2:8080")))],
            stats: vec![("dnat", 1)],
        },
        Fixture {
            name: "ClusterIP UDP from a pod is DNATed by TC",
            steps: vec![step(Tc, &cip_udp, TC_ACT_OK, Some(&cip_udp.with_dst("10.244.1.2:5353")))],
            stats: vec![("dnat", 1)],
        },
        Fixture {
            name: "NodePort reply is reverse-translated to the node address the client used",
            steps: vec![
                step(Xdp, &np_tcp, XDP_PASS, Some(&np_tcp.with_dst("10.244.1.2:8080"))),
                step(
                    TcEgress,
                    &np_tcp.with_dst("10.244.1.2:8080").reversed(),
                    TC_ACT_OK,
                    Some(&np_tcp.reversed()),
                ),
            ],
            stats: vec![("dnat", 1), ("reverse_nat", 1)],
        },
        Fixture {
            name: "ClusterIP UDP reply is reverse-translated",
            steps: vec![
                step(Tc, &cip_udp, TC_ACT_OK, Some(&cip_udp.with_dst("10.244.1.2:5353"))),
                step(
                    TcEgress,
                    &cip_udp.with_dst("10.244.1.2:5353").reversed(),
                    TC_ACT_OK,
                    Some(&cip_udp.reversed()),
                ),
            ],
            stats: vec![("dnat", 1), ("reverse_nat", 1)],
        },
        Fixture {
            name: "a packet that is no reply and no Service passes untouched",
            steps: vec![
                step(Tc, &Packet::tcp("10.244.1.2:8080", "192.168.10.2:40000"), TC_ACT_OK, None),
                step(
                    TcEgress,
                    &Packet::tcp("10.244.1.2:8080", "192.168.10.2:40000"),
                    TC_ACT_OK,
                    None,
                ),
            ],
            stats: vec![],
        },
        Fixture {
            name: "NodePort port on an address that is not the node's passes untouched",
            steps: vec![step(Xdp, &np_tcp.with_dst("192.168.99.9:30080"), XDP_PASS, None)],
            stats: vec![],
        },
        Fixture {
            name: "no matching Service port passes untouched",
            steps: vec![
                step(Xdp, &np_tcp.with_dst("192.168.10.1:22"), XDP_PASS, None),
                step(Xdp, &np_tcp.with_dst("198.51.100.1:80"), XDP_PASS, None),
                step(Tc, &cip_tcp.with_dst("198.51.100.1:80"), TC_ACT_OK, None),
            ],
            stats: vec![],
        },
        Fixture {
            name: "a ClusterIP port no Service declares is rejected with ICMP port unreachable",
            steps: vec![
                reject(Xdp, &cip_tcp.with_dst("10.96.0.10:81"), XDP_TX),
                reject(Tc, &cip_udp.with_dst("10.96.0.10:81"), TC_ACT_REDIRECT),
            ],
            stats: vec![("reject_unknown_port", 2)],
        },
        Fixture {
            name: "IP options: L4 found from IHL, options kept, checksums right",
            steps: vec![step(
                Xdp,
                &with_options,
                XDP_PASS,
                Some(&with_options.with_dst("10.244.1.2:8080")),
            )],
            stats: vec![("dnat", 1)],
        },
        Fixture {
            name: "first fragment to a Service is dropped and counted",
            steps: vec![
                step(Xdp, &first_fragment, XDP_DROP, None),
                step(Tc, &first_fragment, TC_ACT_SHOT, None),
            ],
            stats: vec![("drop_fragment", 2)],
        },
        Fixture {
            name: "a fragmented reply cannot be translated whole: dropped and counted",
            steps: vec![
                step(Tc, &cip_udp, TC_ACT_OK, Some(&cip_udp.with_dst("10.244.1.2:5353"))),
                step(
                    TcEgress,
                    &Packet { frag: MF, ..cip_udp.with_dst("10.244.1.2:5353").reversed() },
                    TC_ACT_SHOT,
                    None,
                ),
            ],
            stats: vec![("drop_fragment", 1), ("dnat", 1)],
        },
        Fixture {
            name: "DNAT happens only on ingress, reverse NAT only on egress",
            steps: vec![
                step(TcEgress, &cip_tcp, TC_ACT_OK, None),
                step(Tc, &cip_tcp, TC_ACT_OK, Some(&cip_tcp.with_dst("10.244.1.2:8080"))),
                step(Tc, &cip_tcp.with_dst("10.244.1.2:8080").reversed(), TC_ACT_OK, None),
            ],
            stats: vec![("dnat", 1)],
        },
        Fixture {
            name: "later fragments carry no ports and pass",
            steps: vec![step(Xdp, &later_fragment, XDP_PASS, None)],
            stats: vec![],
        },
        Fixture {
            name: "truncated headers pass untouched",
            steps: vec![
                raw(Xdp, truncated_tcp.clone(), XDP_PASS),
                raw(Xdp, np_tcp.bytes()[..14 + 12].to_vec(), XDP_PASS),
                raw(Tc, truncated_tcp, TC_ACT_OK),
            ],
            stats: vec![],
        },
        Fixture {
            name: "IHL below 5 is never rewritten, passed to the stack and counted",
            steps: vec![raw(Xdp, bad_ihl.clone(), XDP_PASS), raw(Tc, bad_ihl, TC_ACT_OK)],
            stats: vec![("malformed_passed", 2)],
        },
        Fixture {
            name: "IP total length shorter than IP + L4 header: never rewritten, counted",
            steps: vec![raw(Xdp, short_total.clone(), XDP_PASS), raw(Tc, short_total, TC_ACT_OK)],
            stats: vec![("malformed_passed", 2)],
        },
        Fixture {
            name: "TC keeps a zero UDP checksum zero, both ways",
            steps: vec![
                step(
                    Tc,
                    &cip_udp_nocsum,
                    TC_ACT_OK,
                    Some(&cip_udp_nocsum.with_dst("10.244.1.2:5353")),
                ),
                step(
                    TcEgress,
                    &cip_udp_nocsum.with_dst("10.244.1.2:5353").reversed(),
                    TC_ACT_OK,
                    Some(&cip_udp_nocsum.reversed()),
                ),
            ],
            stats: vec![("dnat", 1), ("reverse_nat", 1)],
        },
        Fixture { name: "non-IPv4 passes", steps: vec![raw(Xdp, ipv6, XDP_PASS)], stats: vec![] },
        Fixture {
            name: "a Service without endpoints rejects with ICMP port unreachable",
            steps: vec![
                reject(Xdp, &cip_tcp.with_dst("10.96.0.99:80"), XDP_TX),
                reject(Tc, &cip_tcp.with_dst("10.96.0.99:80"), TC_ACT_REDIRECT),
            ],
            stats: vec![("reject_no_endpoints", 2)],
        },
        Fixture {
            name: "a rejected packet with IP options is dropped: the quote would not fit",
            steps: vec![step(
                Xdp,
                &Packet { ip_options: vec![0x94, 0x04, 0, 0], ..cip_tcp.with_dst("10.96.0.99:80") },
                XDP_DROP,
                None,
            )],
            stats: vec![("drop_reject_failed", 1)],
        },
    ]
}

#[test]
fn fixture_table() {
    for fixture in fixtures() {
        let harness = Harness::new();
        for (i, step) in fixture.steps.iter().enumerate() {
            let context = format!("{} (step {i}, {:?})", fixture.name, step.prog);
            let (verdict, out) = harness.run(step.prog, &step.input);
            assert_eq!(verdict, step.verdict, "verdict: {context}");
            let expected = step.output.as_ref().unwrap_or(&step.input);
            assert_eq!(&out, expected, "output bytes: {context}");
            if step.output.is_some() {
                verify_checksums(&out).unwrap_or_else(|e| panic!("{e}: {context}"));
            }
        }
        assert_eq!(harness.stats(), fixture.stats, "counters: {}", fixture.name);
    }
}

#[test]
fn established_flow_keeps_its_backend_when_backends_change() {
    let mut harness = Harness::new();
    let flow = Packet::tcp("192.168.10.2:40000", "192.168.10.1:30080");
    let (_, out) = harness.run(Prog::Xdp, &flow.bytes());
    assert_eq!(out, flow.with_dst("10.244.1.2:8080").bytes());

    let mut services = default_services();
    services[0].1 = vec!["10.244.1.3:8080"];
    harness.set_services(&services);

    let (_, out) = harness.run(Prog::Xdp, &flow.bytes());
    assert_eq!(out, flow.with_dst("10.244.1.2:8080").bytes(), "established flow moved");
    let new_flow = flow.with_src("192.168.10.2:40001");
    let (_, out) = harness.run(Prog::Xdp, &new_flow.bytes());
    assert_eq!(out, new_flow.with_dst("10.244.1.3:8080").bytes(), "new flow uses the new backend");
    assert_eq!(harness.conntrack_len(), 4, "forward and reply entry per flow");
}

#[test]
fn new_flows_spread_over_all_ready_backends() {
    let mut harness = Harness::new();
    let mut services = default_services();
    services[0].1 = vec!["10.244.1.2:8080", "10.244.1.3:8080"];
    harness.set_services(&services);
    let mut hits = [0u32; 2];
    for sport in 0..200u16 {
        let flow = Packet::tcp(&format!("192.168.10.2:{}", 20000 + sport), "192.168.10.1:30080");
        let (_, out) = harness.run(Prog::Xdp, &flow.bytes());
        let dst = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        hits[usize::from(dst.octets()[3] - 2)] += 1;
    }
    // Binomial(200, 0.5): outside 60..=140 has probability ~1e-8.
    assert!(hits.iter().all(|h| (60..=140).contains(h)), "uneven spread: {hits:?}");
}

/// One client port to two frontends that share a backend: after DNAT both
/// flows would be the same tuple.
#[test]
fn same_client_port_to_two_frontends_of_one_backend() {
    let mut harness = Harness::new();
    let via_cluster_ip = Packet::tcp("10.244.1.9:41000", "10.96.0.10:80");
    let via_node_port = Packet::tcp("10.244.1.9:41000", "192.168.10.1:30080");
    let to_backend = via_cluster_ip.with_dst("10.244.1.2:8080");
    harness.run(Prog::Tc, &via_cluster_ip.bytes());

    // One backend only: the second flow is refused, the first keeps its reply.
    let (verdict, _) = harness.run(Prog::Tc, &via_node_port.bytes());
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(harness.stats(), [("drop_ct_collision", 1), ("dnat", 1)]);
    let (_, out) = harness.run(Prog::TcEgress, &to_backend.reversed().bytes());
    assert_eq!(out, via_cluster_ip.reversed().bytes(), "first flow's reply hijacked");

    // With a second backend the new flow goes there instead.
    let mut services = default_services();
    services[0].1 = vec!["10.244.1.2:8080", "10.244.1.3:8080"];
    harness.set_services(&services);
    let (verdict, out) = harness.run(Prog::Tc, &via_node_port.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, via_node_port.with_dst("10.244.1.3:8080").bytes());
}

#[test]
fn a_finished_flows_reply_entry_does_not_block_a_new_flow() {
    let mut harness = Harness::new();
    let via_cluster_ip = Packet::tcp("10.244.1.9:41000", "10.96.0.10:80");
    let via_node_port = Packet::tcp("10.244.1.9:41000", "192.168.10.1:30080");
    harness.run(Prog::Tc, &via_cluster_ip.bytes());
    // The first flow's forward entry is gone (evicted, or the flow ended).
    let forward = CtKey {
        saddr: u32::from_ne_bytes([10, 244, 1, 9]),
        daddr: u32::from_ne_bytes([10, 96, 0, 10]),
        sport: 41000u16.to_be(),
        dport: 80u16.to_be(),
        proto: 6,
        dir: forwarder_common::CT_FORWARD,
        _pad: [0; 2],
    };
    harness.maps.conntrack().remove(&forward).expect("forward entry existed");
    let (verdict, out) = harness.run(Prog::Tc, &via_node_port.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, via_node_port.with_dst("10.244.1.2:8080").bytes());
    let (_, out) =
        harness.run(Prog::TcEgress, &via_node_port.with_dst("10.244.1.2:8080").reversed().bytes());
    assert_eq!(out, via_node_port.reversed().bytes(), "reply belongs to the new flow");
}

#[test]
fn counters_are_named_for_every_reason() {
    assert_eq!(stat::NAMES.len(), stat::COUNT as usize);
}

/// The source port the egress program masqueraded with, checked in range.
fn masquerade_port(out: &[u8]) -> u16 {
    let port = u16::from_be_bytes([out[34], out[35]]);
    assert!(port >= forwarder_common::SNAT_PORT_MIN, "masquerade port {port} out of range");
    port
}

/// External client to a NodePort whose endpoint is on another node: DNAT in
/// XDP, masquerade on egress; the reply is un-masqueraded in XDP and
/// reverse-NATed on egress. Every hop's bytes are exact.
#[test]
fn remote_endpoint_is_masqueraded_and_the_reply_restored() {
    let mut harness = Harness::new();
    let mut services = default_services();
    services[0].1 = vec!["10.244.2.2:8080"];
    harness.set_services_remote(&services, &["10.244.2.2"]);
    let request = Packet::tcp("192.168.10.2:40000", "192.168.10.1:30080");

    let (verdict, out) = harness.run(Prog::Xdp, &request.bytes());
    assert_eq!((verdict, &out), (XDP_PASS, &request.with_dst("10.244.2.2:8080").bytes()));
    let (verdict, out) = harness.run(Prog::TcEgress, &out);
    assert_eq!(verdict, TC_ACT_OK);
    let port = masquerade_port(&out);
    let masqueraded = request.with_src(&format!("192.168.10.1:{port}")).with_dst("10.244.2.2:8080");
    assert_eq!(out, masqueraded.bytes());
    verify_checksums(&out).unwrap();
    // Later packets of the flow keep the same port.
    let (_, again) = harness.run(Prog::TcEgress, &request.with_dst("10.244.2.2:8080").bytes());
    assert_eq!(again, out);

    let reply = masqueraded.reversed();
    let (verdict, out) = harness.run(Prog::Xdp, &reply.bytes());
    assert_eq!(
        (verdict, &out),
        (XDP_PASS, &Packet::tcp("10.244.2.2:8080", "192.168.10.2:40000").bytes())
    );
    let (_, out) = harness.run(Prog::TcEgress, &out);
    assert_eq!(out, request.reversed().bytes(), "the client sees the NodePort answer");
    verify_checksums(&out).unwrap();
    assert_eq!(
        harness.stats(),
        [("dnat", 1), ("reverse_nat", 1), ("snat", 2), ("reverse_snat", 1)]
    );
}

#[test]
fn local_endpoint_keeps_the_client_address() {
    let harness = Harness::new();
    let request = Packet::tcp("192.168.10.2:40000", "192.168.10.1:30080");
    let (_, out) = harness.run(Prog::Xdp, &request.bytes());
    let (_, out) = harness.run(Prog::TcEgress, &out);
    assert_eq!(out, request.with_dst("10.244.1.2:8080").bytes(), "no masquerade");
}

/// A pod reaching itself through its Service: masqueraded so that its reply
/// goes back through the node, where both translations are undone.
#[test]
fn hairpin_is_masqueraded() {
    let harness = Harness::new();
    let request = Packet::tcp("10.244.1.2:41000", "10.96.0.10:80");
    let (_, out) = harness.run(Prog::Tc, &request.bytes());
    assert_eq!(out, request.with_dst("10.244.1.2:8080").bytes());
    let (_, out) = harness.run(Prog::TcEgress, &out);
    let port = masquerade_port(&out);
    let masqueraded = request.with_src(&format!("192.168.10.1:{port}")).with_dst("10.244.1.2:8080");
    assert_eq!(out, masqueraded.bytes());

    let (_, out) = harness.run(Prog::Tc, &masqueraded.reversed().bytes());
    assert_eq!(out, Packet::tcp("10.244.1.2:8080", "10.244.1.2:41000").bytes());
    let (_, out) = harness.run(Prog::TcEgress, &out);
    assert_eq!(out, request.reversed().bytes());
    verify_checksums(&out).unwrap();
}

/// `externalTrafficPolicy: Local`: traffic from outside uses only this
/// node's endpoints (none: dropped); pods on the node use the internal set.
#[test]
fn traffic_policy_scopes_follow_the_origin() {
    let mut harness = Harness::new();
    let nodeport = frontend(None, 30080, Proto::Tcp);
    let internal = Frontend { scope: Scope::Internal, ..nodeport };
    let mut services = default_services();
    services[0].1 = vec!["10.244.1.2:8080"];
    services.push((internal, vec!["10.244.2.2:8080"]));
    harness.set_services_remote(&services, &["10.244.2.2"]);
    let from_outside = Packet::tcp("192.168.10.2:40000", "192.168.10.1:30080");
    let from_pod = Packet::tcp("10.244.1.9:40000", "192.168.10.1:30080");
    let (_, out) = harness.run(Prog::Xdp, &from_outside.bytes());
    assert_eq!(out, from_outside.with_dst("10.244.1.2:8080").bytes());
    let (_, out) = harness.run(Prog::Tc, &from_pod.bytes());
    assert_eq!(out, from_pod.with_dst("10.244.2.2:8080").bytes());

    // No local endpoint: outside traffic is dropped, pods still served.
    services[0].1 = vec![];
    harness.set_services_dropping(&services, &["10.244.2.2"], &[nodeport]);
    let new_outside = from_outside.with_src("192.168.10.2:40001");
    let (verdict, _) = harness.run(Prog::Xdp, &new_outside.bytes());
    assert_eq!(verdict, XDP_DROP);
    let new_pod = from_pod.with_src("10.244.1.9:40001");
    let (_, out) = harness.run(Prog::Tc, &new_pod.bytes());
    assert_eq!(out, new_pod.with_dst("10.244.2.2:8080").bytes());
}

fn backend_of(out: &[u8]) -> String {
    format!("{}.{}.{}.{}", out[30], out[31], out[32], out[33])
}

/// `sessionAffinity: ClientIP`: a client stays on its backend while its
/// binding is younger than the timeout and its backend still serves.
#[test]
fn session_affinity_binds_a_client_to_its_backend() {
    let mut harness = Harness::new();
    let cluster_ip = frontend(Some(CLUSTER_IP), 80, Proto::Tcp);
    let mut services = default_services();
    services[2].1 = vec!["10.244.1.2:8080", "10.244.1.3:8080"];
    // Short, so that "expired" below is reachable right after a VM boots
    // (the binding clock is CLOCK_MONOTONIC, time since boot).
    harness.set_services_with(&services, &[], &[(cluster_ip, 2)]);
    let flow = |client: &str, port: u16| Packet::tcp(&format!("{client}:{port}"), "10.96.0.10:80");

    let (_, first) = harness.run(Prog::Tc, &flow("10.244.1.9", 1000).bytes());
    let bound = backend_of(&first);
    for port in 1001..1030 {
        let (_, out) = harness.run(Prog::Tc, &flow("10.244.1.9", port).bytes());
        assert_eq!(backend_of(&out), bound, "new flow {port} left the bound backend");
    }

    // Adding an endpoint moves nobody's binding.
    services[2].1 = vec!["10.244.1.2:8080", "10.244.1.3:8080", "10.244.1.4:8080"];
    harness.set_services_with(&services, &[], &[(cluster_ip, 2)]);
    for port in 1030..1040 {
        let (_, out) = harness.run(Prog::Tc, &flow("10.244.1.9", port).bytes());
        assert_eq!(backend_of(&out), bound, "a new endpoint moved the binding");
    }
    services[2].1 = vec!["10.244.1.2:8080", "10.244.1.3:8080"];
    harness.set_services_with(&services, &[], &[(cluster_ip, 2)]);

    // Expired bindings are balanced anew: twenty clients bound long ago to
    // the same backend do not all stay there (probability 2^-20).
    let mut affinity: HashMap<_, AffinityKey, AffinityValue> =
        HashMap::try_from(harness.ebpf.take_map(map_names::AFFINITY).unwrap()).unwrap();
    let entries: Vec<(AffinityKey, AffinityValue)> = affinity.iter().map(Result::unwrap).collect();
    let (key, value) = entries[0];
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    let now_ns = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
    let mut moved = false;
    for client in 20..40u8 {
        let stale = AffinityValue { last_used_ns: now_ns.saturating_sub(5_000_000_000), ..value };
        let key = AffinityKey { client: u32::from_ne_bytes([10, 244, 3, client]), ..key };
        affinity.insert(key, stale, 0).unwrap();
        let (_, out) = harness.run(Prog::Tc, &flow(&format!("10.244.3.{client}"), 2000).bytes());
        moved |= backend_of(&out) != bound;
    }
    assert!(moved, "expired bindings were still followed");

    // A binding whose backend left the Service is dropped.
    let other = if bound == "10.244.1.2" { "10.244.1.3:8080" } else { "10.244.1.2:8080" };
    services[2].1 = vec![other];
    harness.set_services_with(&services, &[], &[(cluster_ip, 2)]);
    let (_, out) = harness.run(Prog::Tc, &flow("10.244.1.9", 3000).bytes());
    assert_eq!(format!("{}:8080", backend_of(&out)), other);
}

/// `loadBalancerSourceRanges`: clients outside the ranges cannot open flows
/// to the load balancer IP (dropped, counted); the NodePort stays open.
#[test]
fn source_ranges_admit_only_listed_clients() {
    let mut harness = Harness::new();
    let lb = frontend(Some("203.0.113.10"), 80, Proto::Tcp);
    let mut services = default_services();
    services.push((lb, vec!["10.244.1.2:8080"]));
    harness.apply_ranges(&services, &[], &[], &[], &[(lb, "192.168.10.0/24")]);
    let inside = Packet::tcp("192.168.10.2:40000", "203.0.113.10:80");
    let (verdict, out) = harness.run(Prog::Xdp, &inside.bytes());
    assert_eq!((verdict, out), (XDP_PASS, inside.with_dst("10.244.1.2:8080").bytes()));
    let outside = Packet::tcp("172.16.0.1:40000", "203.0.113.10:80");
    let (verdict, _) = harness.run(Prog::Xdp, &outside.bytes());
    assert_eq!(verdict, XDP_DROP);
    let node_port = Packet::tcp("172.16.0.1:40001", "192.168.10.1:30080");
    let (verdict, out) = harness.run(Prog::Xdp, &node_port.bytes());
    assert_eq!((verdict, out), (XDP_PASS, node_port.with_dst("10.244.1.2:8080").bytes()));
    assert_eq!(harness.stats(), [("drop_source_range", 1), ("dnat", 2)]);
}

/// The masqueraded flow of `remote_endpoint_is_masqueraded_and_the_reply_restored`,
/// on a harness whose NodePort 30080 endpoint is on another node.
fn masquerade_harness() -> Harness {
    let mut harness = Harness::new();
    let mut services = default_services();
    services[0].1 = vec!["10.244.2.2:8080"];
    harness.set_services_remote(&services, &["10.244.2.2"]);
    harness
}

/// Sends the first packet of a flow from `client` through XDP and egress;
/// returns the masquerade port, or `None` if egress dropped it.
fn masquerade(harness: &Harness, client: &str) -> Option<u16> {
    let request = Packet::tcp(client, "192.168.10.1:30080");
    let (_, out) = harness.run(Prog::Xdp, &request.bytes());
    let (verdict, out) = harness.run(Prog::TcEgress, &out);
    (verdict == TC_ACT_OK).then(|| masquerade_port(&out))
}

fn snat_reply_entries(harness: &mut Harness) -> Vec<(CtKey, forwarder_common::CtValue)> {
    let ct = harness.maps.conntrack();
    let all: Vec<_> = ct.iter().map(Result::unwrap).collect();
    all.into_iter().filter(|(k, _)| k.dir == forwarder_common::CT_SNAT_REPLY).collect()
}

/// Losing half of a masquerade (LRU eviction) never misdirects a reply:
/// a port whose reply entry now restores someone else is given up.
#[test]
fn masquerade_survives_eviction_without_misdirecting_replies() {
    let mut harness = masquerade_harness();
    let port = masquerade(&harness, "192.168.10.2:40000").expect("masqueraded");

    // The reply entry is evicted: the next packet puts it back, same port.
    let (key, value) = snat_reply_entries(&mut harness)[0];
    harness.maps.conntrack().remove(&key).unwrap();
    assert_eq!(masquerade(&harness, "192.168.10.2:40000"), Some(port));
    assert_eq!(snat_reply_entries(&mut harness).len(), 1);

    // Another client took the port meanwhile: the flow moves to another.
    let stolen =
        forwarder_common::CtValue { nat_addr: u32::from_ne_bytes([192, 168, 10, 77]), ..value };
    harness.maps.conntrack().insert(key, stolen, 0).unwrap();
    let moved = masquerade(&harness, "192.168.10.2:40000").expect("masqueraded");
    assert_ne!(moved, port);
    let reply = Packet::tcp("10.244.2.2:8080", &format!("192.168.10.1:{moved}"));
    let (_, out) = harness.run(Prog::Xdp, &reply.bytes());
    assert_eq!(out, Packet::tcp("10.244.2.2:8080", "192.168.10.2:40000").bytes());
}

/// Ports of finished flows are reused: with most of the range held by
/// flows that have closed long ago, new flows still get a port.
#[test]
fn masquerade_ports_of_finished_flows_are_reused() {
    // "Long ago" is measured from boot: right after a VM boots there is no
    // long ago yet.
    let uptime = |_| {
        std::fs::read_to_string("/proc/uptime")
            .unwrap()
            .split('.')
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    while uptime(()) <= u64::from(forwarder_common::SNAT_CLOSED_TIMEOUT) + 1 {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let mut harness = masquerade_harness();
    for i in 0..4000u32 {
        let client = format!("172.16.{}.{}:40000", i / 250, i % 250 + 1);
        masquerade(&harness, &client);
    }
    let held = snat_reply_entries(&mut harness);
    assert!(held.len() > 3000, "only {} ports allocated", held.len());
    for (key, value) in held {
        let closed = forwarder_common::CtValue {
            flags: value.flags | forwarder_common::CT_CLOSING,
            last_seen: 0,
            ..value
        };
        harness.maps.conntrack().insert(key, closed, 0).unwrap();
    }
    let before = harness.stats().iter().find(|(n, _)| *n == "drop_snat").map_or(0, |(_, v)| *v);
    let failed = (0..500u32)
        .filter(|i| {
            masquerade(&harness, &format!("172.17.{}.{}:40000", i / 250, i % 250 + 1)).is_none()
        })
        .count();
    assert_eq!(failed, 0, "{failed} new flows found no port ({before} drops while filling)");
}

/// A SYN reusing the client port of a flow whose backend is gone opens a
/// new flow; other packets of the old flow stay where they were.
#[test]
fn a_new_connection_does_not_follow_a_finished_flow_to_a_deleted_backend() {
    let mut harness = Harness::new();
    let flow = Packet::tcp("192.168.10.2:40000", "192.168.10.1:30080");
    harness.run(Prog::Xdp, &flow.bytes());
    // The pod behind 10.244.1.2:8080 goes away: no frontend uses it.
    let mut services = default_services();
    services[0].1 = vec!["10.244.1.3:8080"];
    services[2].1 = vec!["10.244.1.3:8080"];
    harness.set_services(&services);
    let (_, out) = harness.run(Prog::Xdp, &flow.bytes());
    assert_eq!(out, flow.with_dst("10.244.1.2:8080").bytes(), "established packets stay");
    let syn = Packet { tcp_flags: SYN, ..flow.clone() };
    let (_, out) = harness.run(Prog::Xdp, &syn.bytes());
    assert_eq!(out, syn.with_dst("10.244.1.3:8080").bytes(), "the new connection is balanced anew");
}
