//! SCTP gets the same NAT as TCP and UDP; its CRC32c, which covers the
//! ports, is updated with them (or left to the device when it was).
#[allow(clippy::wildcard_imports, reason = "the shared test vocabulary")]
use crate::harness::*;
use forwarder_tests::packet::{SCTP_ABORT, SCTP_INIT};

const NODEPORT_BACKEND: &str = "10.244.1.2:3868";
const CLUSTER_IP_BACKEND: &str = "10.244.1.2:3869";

/// The default Services plus SCTP on the same NodePort and ClusterIP port
/// numbers, with their own target ports.
fn harness_remote(remote: &[&str], nodeport_backend: &'static str) -> Harness {
    let mut harness = Harness::new();
    let mut services = default_services();
    services.push((frontend(None, 30080, Proto::Sctp), vec![nodeport_backend]));
    services.push((frontend(Some(CLUSTER_IP), 80, Proto::Sctp), vec![CLUSTER_IP_BACKEND]));
    harness.set_services_remote(&services, remote);
    harness
}

fn harness() -> Harness {
    harness_remote(&[], NODEPORT_BACKEND)
}

/// Runs one step and checks verdict, exact bytes and the checksums.
fn expect(harness: &Harness, prog: Prog, input: &Packet, verdict: u32, output: &Packet) {
    let (got, out) = harness.run(prog, &input.bytes());
    let context =
        format!("{prog:?} {}:{} -> {}:{}", input.src, input.sport, input.dst, input.dport);
    assert_eq!(got, verdict, "verdict: {context}");
    assert_eq!(out, output.bytes(), "output bytes: {context}");
    verify_checksums(&out).unwrap_or_else(|e| panic!("{e}: {context}"));
}

#[test]
fn nodeport_is_translated_both_ways_with_the_crc_updated() {
    let harness = harness();
    for payload in [b"hello".to_vec(), vec![0xa5; 1400]] {
        let request =
            Packet { payload, ..Packet::sctp("192.168.10.2:40000", "192.168.10.1:30080") };
        let translated = request.with_dst(NODEPORT_BACKEND);
        expect(&harness, Prog::Xdp, &request, XDP_PASS, &translated);
        expect(&harness, Prog::TcEgress, &translated.reversed(), TC_ACT_OK, &request.reversed());
    }
    assert_eq!(harness.stats(), [("dnat", 2), ("reverse_nat", 2)]);
}

#[test]
fn cluster_ip_from_a_pod_picks_the_sctp_port_not_the_tcp_one() {
    let harness = harness();
    let request = Packet::sctp("10.244.1.9:41000", "10.96.0.10:80");
    let translated = request.with_dst(CLUSTER_IP_BACKEND);
    expect(&harness, Prog::Tc, &request, TC_ACT_OK, &translated);
    expect(&harness, Prog::TcEgress, &translated.reversed(), TC_ACT_OK, &request.reversed());
    let tcp = Packet::tcp("10.244.1.9:41000", "10.96.0.10:80");
    expect(&harness, Prog::Tc, &tcp, TC_ACT_OK, &tcp.with_dst("10.244.1.2:8080"));
}

/// A pod's socket leaves the CRC to the device (veth offloads it): the zero
/// field must stay zero so the CRC is computed over the rewritten ports.
#[test]
fn a_crc_left_to_the_device_stays_zero() {
    let harness = harness();
    let request = Packet { no_sctp_crc: true, ..Packet::sctp("10.244.1.9:41000", "10.96.0.10:80") };
    let translated = request.with_dst(CLUSTER_IP_BACKEND);
    expect(&harness, Prog::Tc, &request, TC_ACT_OK, &translated);
    expect(&harness, Prog::TcEgress, &translated.reversed(), TC_ACT_OK, &request.reversed());
    let from_wire =
        Packet { no_sctp_crc: true, ..Packet::sctp("192.168.10.2:40000", "192.168.10.1:30080") };
    expect(&harness, Prog::Xdp, &from_wire, XDP_PASS, &from_wire.with_dst(NODEPORT_BACKEND));
}

/// The quote reaches the INIT's initiate tag: with a zero verification tag
/// that is what Linux matches the error to its association by.
#[test]
fn an_init_to_an_undeclared_cluster_ip_port_is_rejected() {
    let harness = harness();
    let init =
        Packet { sctp_chunk: SCTP_INIT, ..Packet::sctp("10.244.1.9:41000", "10.96.0.10:81") };
    let (verdict, out) = harness.run(Prog::Tc, &init.bytes());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, port_unreachable(&init.bytes()));
    assert_eq!(&out[14 + 20 + 8 + 20 + 12..][..8], &init.bytes()[14 + 20 + 12..][..8]);
    verify_checksums(&out).unwrap();
    let (verdict, out) = harness.run(Prog::Xdp, &init.bytes());
    let handed = deferred_reject(&init.bytes(), stat::REJECT_UNKNOWN_PORT);
    assert_eq!((verdict, out), (XDP_PASS, handed));
}

/// To an endpoint on another node: DNAT, masquerade with a new source
/// port, and both undone for the reply; the CRC right at every hop.
#[test]
fn remote_endpoint_is_masqueraded_with_the_crc_updated() {
    let remote = "10.244.2.2:3868";
    let mut harness = harness_remote(&["10.244.2.2"], remote);
    let request = Packet::sctp("192.168.10.2:40000", "192.168.10.1:30080");
    expect(&harness, Prog::Xdp, &request, XDP_PASS, &request.with_dst(remote));
    let (verdict, out) = harness.run(Prog::TcEgress, &request.with_dst(remote).bytes());
    assert_eq!(verdict, TC_ACT_OK);
    let port = masquerade_port(&out);
    let masqueraded = request.with_src(&format!("192.168.10.1:{port}")).with_dst(remote);
    assert_eq!(out, masqueraded.bytes());
    verify_checksums(&out).unwrap();

    let reply = masqueraded.reversed();
    let unmasqueraded = Packet::sctp(remote, "192.168.10.2:40000");
    expect(&harness, Prog::Xdp, &reply, XDP_PASS, &unmasqueraded);
    expect(&harness, Prog::TcEgress, &unmasqueraded, TC_ACT_OK, &request.reversed());

    // An ABORT ends the association: its masquerade port is marked closing.
    let abort = Packet { sctp_chunk: SCTP_ABORT, ..request.with_dst(remote) };
    let (_, out) = harness.run(Prog::TcEgress, &abort.bytes());
    assert_eq!(masquerade_port(&out), port, "same association, same port");
    assert!(harness.snat_reset(port), "ABORT marks the port's entry reset");
}
