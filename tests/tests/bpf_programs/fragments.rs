//! IPv4 fragments: the first fragment's translation applied to the later
//! ones, in both directions and for every kind of NAT; reordered and
//! untranslatable fragments dropped and counted, never passed untranslated
//! to a ClusterIP.
#[allow(clippy::wildcard_imports, reason = "the shared test vocabulary")]
use crate::harness::*;

/// A UDP datagram of 120 bytes of L4 data: three fragments of 48 bytes.
fn big_udp(src: &str, dst: &str) -> Packet {
    Packet { payload: (0..112u8).collect(), ..Packet::udp(src, dst) }
}

const PIECE: usize = 48;

/// Runs every fragment of `packet` through `prog`, each expected to come
/// out with `verdict`; returns the outputs.
fn run_all(harness: &Harness, prog: Prog, packet: &Packet, verdict: u32) -> Vec<Vec<u8>> {
    packet
        .fragments(PIECE)
        .iter()
        .enumerate()
        .map(|(i, fragment)| {
            let (got, out) = harness.run(prog, fragment);
            assert_eq!(got, verdict, "{prog:?}, fragment {i} of {packet:?}");
            out
        })
        .collect()
}

/// The first fragment carries the whole datagram's L4 checksum: the
/// reassembled datagram checks out from scratch.
fn reassembled(fragments: &[Vec<u8>]) -> Vec<u8> {
    let mut frame = fragments[0][..14 + 20].to_vec();
    for fragment in fragments {
        frame.extend_from_slice(&fragment[14 + 20..]);
    }
    let total = (frame.len() - 14) as u16;
    frame[16..18].copy_from_slice(&total.to_be_bytes());
    frame[20..22].copy_from_slice(&[0, 0]);
    frame[24..26].copy_from_slice(&[0, 0]);
    let check = forwarder_common::csum::compute(&frame[14..34], 0);
    frame[24..26].copy_from_slice(&check.to_be_bytes());
    frame
}

#[test]
fn a_fragmented_datagram_to_a_node_port_is_translated_whole_and_so_is_its_reply() {
    let harness = Harness::new();
    let request = big_udp("192.168.10.2:40001", "192.168.10.1:30080");
    let out = run_all(&harness, Prog::Xdp, &request, XDP_PASS);
    let backend = request.with_dst("10.244.1.2:5353");
    assert_eq!(out, backend.fragments(PIECE), "every fragment goes to the backend");
    verify_checksums(&reassembled(&out)).unwrap();

    let reply = Packet { ip_id: 0x4321, ..backend.reversed() };
    let out = run_all(&harness, Prog::TcEgress, &reply, TC_ACT_OK);
    assert_eq!(out, Packet { ip_id: 0x4321, ..request.reversed() }.fragments(PIECE));
    verify_checksums(&reassembled(&out)).unwrap();
    assert_eq!(harness.stats(), [("dnat", 3), ("reverse_nat", 3)]);
}

#[test]
fn a_fragmented_datagram_from_a_pod_to_a_cluster_ip_and_its_reply() {
    let harness = Harness::new();
    let request = big_udp("10.244.1.9:41001", "10.96.0.10:53");
    let out = run_all(&harness, Prog::Tc, &request, TC_ACT_OK);
    let backend = request.with_dst("10.244.1.2:5353");
    assert_eq!(out, backend.fragments(PIECE));

    // The reply passes the backend's own pod interface first, where it is
    // no Service packet: its later fragments must not take the entry the
    // egress program keeps for the same datagram.
    let reply = Packet { ip_id: 0x4321, ..backend.reversed() };
    assert_eq!(run_all(&harness, Prog::Tc, &reply, TC_ACT_OK), reply.fragments(PIECE));
    let out = run_all(&harness, Prog::TcEgress, &reply, TC_ACT_OK);
    assert_eq!(out, Packet { ip_id: 0x4321, ..request.reversed() }.fragments(PIECE));
    verify_checksums(&reassembled(&out)).unwrap();
    assert_eq!(harness.stats(), [("dnat", 3), ("reverse_nat", 3)]);
}

/// NodePort to an endpoint on another node: DNAT in XDP, masquerade on
/// egress, and back: the reversal of the masquerade in XDP, reverse NAT on
/// egress; every fragment of both datagrams follows its first.
#[test]
fn a_masqueraded_fragmented_datagram_and_its_reply() {
    let mut harness = Harness::new();
    let mut services = default_services();
    services[1].1 = vec!["10.244.2.2:5353"];
    harness.set_services_remote(&services, &["10.244.2.2"]);
    let request = big_udp("192.168.10.2:40001", "192.168.10.1:30080");

    let dnat = run_all(&harness, Prog::Xdp, &request, XDP_PASS);
    let backend = request.with_dst("10.244.2.2:5353");
    assert_eq!(dnat, backend.fragments(PIECE));
    let out: Vec<Vec<u8>> = dnat
        .iter()
        .map(|fragment| {
            let (verdict, out) = harness.run(Prog::TcEgress, fragment);
            assert_eq!(verdict, TC_ACT_OK);
            out
        })
        .collect();
    let port = masquerade_port(&out[0]);
    let masqueraded = backend.with_src(&format!("192.168.10.1:{port}"));
    assert_eq!(out, masqueraded.fragments(PIECE), "every fragment from the node address");
    verify_checksums(&reassembled(&out)).unwrap();

    let reply = Packet { ip_id: 0x4321, ..masqueraded.reversed() };
    let restored = run_all(&harness, Prog::Xdp, &reply, XDP_PASS);
    let to_client = Packet { ip_id: 0x4321, ..backend.reversed() };
    assert_eq!(restored, to_client.fragments(PIECE));
    let out: Vec<Vec<u8>> =
        restored.iter().map(|fragment| harness.run(Prog::TcEgress, fragment).1).collect();
    assert_eq!(out, Packet { ip_id: 0x4321, ..request.reversed() }.fragments(PIECE));
    verify_checksums(&reassembled(&out)).unwrap();
    assert_eq!(
        harness.stats(),
        [("dnat", 3), ("reverse_nat", 3), ("snat", 3), ("reverse_snat", 3)]
    );
}

/// Datagrams are told apart by their IP id: interleaved fragments of a
/// Service datagram and of one to the node itself each keep their own fate.
#[test]
fn interleaved_datagrams_keep_their_own_translation() {
    let harness = Harness::new();
    let service = big_udp("192.168.10.2:40001", "192.168.10.1:30080");
    let own = Packet { ip_id: 0x0777, ..big_udp("192.168.10.2:40001", "192.168.10.1:4789") };
    let (service_in, own_in) = (service.fragments(PIECE), own.fragments(PIECE));
    let translated = service.with_dst("10.244.1.2:5353").fragments(PIECE);
    for i in 0..3 {
        assert_eq!(harness.run(Prog::Xdp, &service_in[i]), (XDP_PASS, translated[i].clone()));
        assert_eq!(harness.run(Prog::Xdp, &own_in[i]), (XDP_PASS, own_in[i].clone()));
    }
    assert_eq!(harness.stats(), [("dnat", 3)]);
}

/// A later fragment before its first carries nothing to translate it by:
/// to a ClusterIP it is dropped and counted (only a translation can deliver
/// it); to a node address it passes (the node's own datagrams are
/// reassembled by its stack). Fragments after the first are translated.
#[test]
fn fragments_before_their_first() {
    let harness = Harness::new();
    let to_cluster_ip = big_udp("10.244.1.9:41001", "10.96.0.10:53").fragments(PIECE);
    assert_eq!(harness.run(Prog::Tc, &to_cluster_ip[2]).0, TC_ACT_SHOT);
    assert_eq!(harness.run(Prog::Xdp, &to_cluster_ip[1]).0, XDP_DROP);
    assert_eq!(harness.stats(), [("drop_fragment", 2)]);

    let to_node = big_udp("192.168.10.2:40001", "192.168.10.1:30080");
    let fragments = to_node.fragments(PIECE);
    assert_eq!(harness.run(Prog::Xdp, &fragments[1]), (XDP_PASS, fragments[1].clone()));
    let translated = to_node.with_dst("10.244.1.2:5353").fragments(PIECE);
    assert_eq!(harness.run(Prog::Xdp, &fragments[0]), (XDP_PASS, translated[0].clone()));
    assert_eq!(harness.run(Prog::Xdp, &fragments[2]), (XDP_PASS, translated[2].clone()));
}

/// SCTP's CRC covers the whole datagram, so no fragment of it can be
/// rewritten: dropped and counted, never passed half translated.
#[test]
fn a_fragmented_sctp_packet_to_a_service_is_dropped() {
    let mut harness = Harness::new();
    let mut services = default_services();
    services.push((frontend(None, 30080, Proto::Sctp), vec!["10.244.1.2:9999"]));
    harness.set_services(&services);
    let packet = Packet {
        payload: vec![7; 100],
        ..Packet::sctp("192.168.10.2:40000", "192.168.10.1:30080")
    };
    let fragments = packet.fragments(PIECE);
    assert_eq!(harness.run(Prog::Xdp, &fragments[0]).0, XDP_DROP);
    assert_eq!(
        harness.run(Prog::Tc, &packet.with_dst("10.96.0.10:80").fragments(PIECE)[1]).0,
        TC_ACT_SHOT
    );
    assert_eq!(harness.stats(), [("drop_fragment", 2)]);
}

/// A first fragment cut inside its TCP header (legal IP, which no stack
/// sends but an attacker may: RFC 1858) has no ports to be translated by:
/// dropped and counted, never passed to the node's own stack with the
/// frontend address.
#[test]
fn a_tiny_first_fragment_is_dropped() {
    let harness = Harness::new();
    let request = Packet::tcp("192.168.10.2:40000", "192.168.10.1:30080");
    let tiny = &request.fragments(8)[0];
    assert_eq!(harness.run(Prog::Xdp, tiny).0, XDP_DROP);
    let from_pod = Packet::tcp("10.244.1.9:41000", "10.96.0.10:80");
    assert_eq!(harness.run(Prog::Tc, &from_pod.fragments(8)[0]).0, TC_ACT_SHOT);
    assert_eq!(harness.stats(), [("drop_fragment", 2)]);
}
