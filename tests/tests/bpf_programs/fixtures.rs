//! The fixture table: input frame, seeded maps, expected verdict and
//! expected output bytes.
#[allow(clippy::wildcard_imports, reason = "the shared test vocabulary")]
use crate::harness::*;

struct Step {
    prog: Prog,
    input: Vec<u8>,
    verdict: u32,
    /// `None`: the frame must come out unchanged.
    output: Option<Vec<u8>>,
    /// Bytes of XDP metadata in front of the output frame.
    meta_len: usize,
}

fn step(prog: Prog, input: &Packet, verdict: u32, output: Option<&Packet>) -> Step {
    Step { prog, input: input.bytes(), verdict, output: output.map(Packet::bytes), meta_len: 0 }
}

/// A step answered with ICMP port unreachable.
fn reject(prog: Prog, input: &Packet, verdict: u32) -> Step {
    let input = input.bytes();
    let output = port_unreachable(&input);
    Step { prog, input, verdict, output: Some(output), meta_len: 0 }
}

/// XDP's half of a reject: the frame passed up with the reason for
/// `fwd_tc_node` in its metadata (no test run can hand metadata to a TC
/// program; the e2e tests prove the whole path).
fn handed_to_tc(input: &Packet, reason: u32) -> Step {
    let input = input.bytes();
    let output = deferred_reject(&input, reason);
    Step { prog: Prog::Xdp, input, verdict: XDP_PASS, output: Some(output), meta_len: 4 }
}

fn raw(prog: Prog, input: Vec<u8>, verdict: u32) -> Step {
    Step { prog, input, verdict, output: None, meta_len: 0 }
}

struct Fixture {
    name: &'static str,
    steps: Vec<Step>,
    /// Non-zero counters after the steps.
    stats: Vec<(&'static str, u64)>,
}

fn fixtures() -> Vec<Fixture> {
    use Prog::{Tc, TcEgress, TcNode, Xdp};
    let np_tcp = Packet::tcp("192.168.10.2:40000", "192.168.10.1:30080");
    let np_udp = Packet::udp("192.168.10.2:40001", "192.168.10.1:30080");
    let np_udp_nocsum = Packet { no_udp_checksum: true, ..np_udp.clone() };
    let cip_tcp = Packet::tcp("10.244.1.9:41000", "10.96.0.10:80");
    let cip_udp = Packet::udp("10.244.1.9:41001", "10.96.0.10:53");
    let with_options = Packet { ip_options: vec![0x94, 0x04, 0, 0], ..np_tcp.clone() }; // Router Alert
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
                handed_to_tc(&cip_tcp.with_dst("10.96.0.10:81"), stat::REJECT_UNKNOWN_PORT),
                reject(Tc, &cip_udp.with_dst("10.96.0.10:81"), TC_ACT_REDIRECT),
            ],
            stats: vec![("reject_unknown_port", 1)],
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
            name: "DNAT happens only on ingress, reverse NAT only on egress",
            steps: vec![
                step(TcEgress, &cip_tcp, TC_ACT_OK, None),
                step(Tc, &cip_tcp, TC_ACT_OK, Some(&cip_tcp.with_dst("10.244.1.2:8080"))),
                step(Tc, &cip_tcp.with_dst("10.244.1.2:8080").reversed(), TC_ACT_OK, None),
            ],
            stats: vec![("dnat", 1)],
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
                handed_to_tc(&cip_tcp.with_dst("10.96.0.99:80"), stat::REJECT_NO_ENDPOINTS),
                reject(Tc, &cip_tcp.with_dst("10.96.0.99:80"), TC_ACT_REDIRECT),
                // Without the metadata, node ingress lets everything pass.
                step(TcNode, &cip_tcp.with_dst("10.96.0.99:80"), TC_ACT_OK, None),
            ],
            stats: vec![("reject_no_endpoints", 1)],
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
                verify_checksums(&out[step.meta_len..])
                    .unwrap_or_else(|e| panic!("{e}: {context}"));
            }
        }
        assert_eq!(harness.stats(), fixture.stats, "counters: {}", fixture.name);
    }
}

#[test]
fn counters_are_named_for_every_reason() {
    assert_eq!(stat::NAMES.len(), stat::COUNT as usize);
}

/// A flood to a Service without endpoints gets a burst of answers, then
/// drops counted as `drop_reject_rate`, on every hook that rejects. Here at
/// 100 a second per CPU (bursts of 5); the bound allows for what the
/// bucket earns while the loop runs, however slow the machine.
#[test]
fn rejects_are_rate_limited() {
    // One CPU: the buckets are per CPU.
    let mut cpus = nix::sched::CpuSet::new();
    cpus.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).unwrap();
    for (prog, answered) in [(Prog::Tc, TC_ACT_REDIRECT), (Prog::Xdp, XDP_PASS)] {
        let harness = Harness::with_tuning(Tuning { reject_rate: 100, ..Tuning::default() });
        let flood = Packet { tcp_flags: SYN, ..Packet::tcp("10.244.1.9:41000", "10.96.0.99:80") };
        let started = std::time::Instant::now();
        let answers = (0..200).filter(|_| harness.run(prog, &flood.bytes()).0 == answered).count();
        let earned = (started.elapsed().as_secs_f64() * 100.0).ceil() as usize;
        assert!(
            (5..=5 + earned).contains(&answers),
            "{prog:?}: {answers} answers, {earned} earned"
        );
        let dropped =
            harness.stats().iter().find(|(n, _)| *n == "drop_reject_rate").map(|(_, v)| *v);
        assert_eq!(dropped.unwrap_or(0), 200 - answers as u64, "{prog:?}");
    }
}
