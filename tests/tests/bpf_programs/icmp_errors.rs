//! ICMP errors about translated flows, translated back in the outer and the
//! quoted headers, for every error type and kind of NAT, in each direction
//! and hook. Expected frames are built from scratch around the packet the
//! error's receiver sent, so every checksum (outer IP, ICMP, quoted IP,
//! quoted L4 where quoted) is checked exactly.
#[allow(clippy::wildcard_imports, reason = "the shared test vocabulary")]
use crate::harness::*;
use forwarder_tests::packet::{icmp_error, verify_quoted_ip_checksum};

/// Destination unreachable (port; fragmentation needed with a next-hop MTU
/// of 1280), time exceeded, parameter problem (pointer 9).
const ERRORS: [(u8, u8, [u8; 4]); 4] =
    [(3, 3, [0; 4]), (3, 4, [0, 0, 5, 0]), (11, 0, [0; 4]), (12, 0, [9, 0, 0, 0])];

/// A whole quote, as Linux sends; and RFC 792's minimum of 8 bytes, which
/// cuts TCP's checksum off.
const WHOLE: usize = 548;
const MINIMAL: usize = 8;

fn checked(frame: &[u8]) -> &[u8] {
    verify_checksums(frame).unwrap();
    verify_quoted_ip_checksum(frame).unwrap();
    frame
}

/// Runs `input` through `prog`, which must pass it as `expected`.
fn expect(harness: &Harness, prog: Prog, input: &[u8], expected: &[u8], what: &str) {
    let (verdict, out) = harness.run(prog, input);
    let pass = if matches!(prog, Prog::Xdp) { XDP_PASS } else { TC_ACT_OK };
    assert_eq!(verdict, pass, "{what}");
    assert_eq!(out, checked(expected), "{what}");
}

/// Errors about a NodePort request, sent by the backend itself or by a
/// router before it, reach the client about the packet it sent: egress
/// restores the frontend in the quote, and as the outer source only when
/// the backend sent it.
#[test]
fn errors_about_a_node_port_request_reach_the_client_as_sent() {
    for error in ERRORS {
        for (proto, quoted) in [("tcp", WHOLE), ("tcp", MINIMAL), ("udp", WHOLE), ("udp", MINIMAL)]
        {
            let harness = Harness::new();
            let request = match proto {
                "tcp" => Packet::tcp("192.168.10.2:40000", "192.168.10.1:30080"),
                _ => Packet::udp("192.168.10.2:40001", "192.168.10.1:30080"),
            };
            let backend_port = if proto == "tcp" { "8080" } else { "5353" };
            let (_, dnat) = harness.run(Prog::Xdp, &request.bytes());
            assert_eq!(dnat, request.with_dst(&format!("10.244.1.2:{backend_port}")).bytes());
            let sent = request.bytes();
            let what = format!("{error:?} {proto} quoting {quoted}");

            let from_backend = icmp_error(error, "10.244.1.2", "192.168.10.2", &dnat, quoted);
            let expected = icmp_error(error, "192.168.10.1", "192.168.10.2", &sent, quoted);
            expect(&harness, Prog::TcEgress, &from_backend, &expected, &what);

            let from_router = icmp_error(error, "10.244.1.1", "192.168.10.2", &dnat, quoted);
            let expected = icmp_error(error, "10.244.1.1", "192.168.10.2", &sent, quoted);
            expect(&harness, Prog::TcEgress, &from_router, &expected, &what);
            assert_eq!(harness.stats(), [("dnat", 1), ("icmp_error_nat", 2)], "{what}");
        }
    }
}

/// Errors about a reply, from the client (its socket is gone) or a router
/// before it: the backend gets them about the packet it sent, in XDP for a
/// NodePort and in TC for a pod's ClusterIP flow.
#[test]
fn errors_about_a_reply_reach_the_backend_as_sent() {
    for error in ERRORS {
        let harness = Harness::new();
        let request = Packet::udp("192.168.10.2:40001", "192.168.10.1:30080");
        let (_, dnat) = harness.run(Prog::Xdp, &request.bytes());
        let reply = Packet::udp("10.244.1.2:5353", "192.168.10.2:40001");
        assert_eq!(dnat, reply.reversed().bytes());
        let (_, seen) = harness.run(Prog::TcEgress, &reply.bytes());
        let from_client = icmp_error(error, "192.168.10.2", "192.168.10.1", &seen, WHOLE);
        let expected = icmp_error(error, "192.168.10.2", "10.244.1.2", &reply.bytes(), WHOLE);
        expect(&harness, Prog::Xdp, &from_client, &expected, &format!("{error:?} NodePort"));

        let request = Packet::tcp("10.244.1.9:41000", "10.96.0.10:80");
        let (_, dnat) = harness.run(Prog::Tc, &request.bytes());
        let reply = Packet::tcp("10.244.1.2:8080", "10.244.1.9:41000");
        assert_eq!(dnat, reply.reversed().bytes());
        let (_, seen) = harness.run(Prog::TcEgress, &reply.bytes());
        let from_router = icmp_error(error, "10.244.1.1", "10.96.0.10", &seen, MINIMAL);
        let expected = icmp_error(error, "10.244.1.1", "10.244.1.2", &reply.bytes(), MINIMAL);
        expect(&harness, Prog::Tc, &from_router, &expected, &format!("{error:?} ClusterIP"));
        assert_eq!(
            harness.stats(),
            [("dnat", 2), ("reverse_nat", 2), ("icmp_error_nat", 2)],
            "{error:?}"
        );
    }
}

/// A pod's ClusterIP flow: an error about its request from the backend.
#[test]
fn errors_about_a_cluster_ip_request_reach_the_pod_as_sent() {
    for error in ERRORS {
        let harness = Harness::new();
        let request = Packet::tcp("10.244.1.9:41000", "10.96.0.10:80");
        let (_, dnat) = harness.run(Prog::Tc, &request.bytes());
        let from_backend = icmp_error(error, "10.244.1.2", "10.244.1.9", &dnat, WHOLE);
        let expected = icmp_error(error, "10.96.0.10", "10.244.1.9", &request.bytes(), WHOLE);
        expect(&harness, Prog::TcEgress, &from_backend, &expected, &format!("{error:?}"));
    }
}

/// NodePort to an endpoint on another node, masqueraded. An error about the
/// request from a router behind the node (say, fragmentation needed on the
/// other node's pod link) comes to the node address: XDP restores the
/// client, egress the frontend. An error about the reply from the client
/// goes back the other way: XDP restores the backend, egress the node
/// address and port the backend knows.
#[test]
fn errors_about_a_masqueraded_flow_in_both_directions() {
    for error in ERRORS {
        let harness = masquerade_harness();
        let request = Packet::tcp("192.168.10.2:40000", "192.168.10.1:30080");
        let (_, dnat) = harness.run(Prog::Xdp, &request.bytes());
        let (_, masqueraded) = harness.run(Prog::TcEgress, &dnat);
        let port = masquerade_port(&masqueraded);
        let what = format!("{error:?}");

        let from_router = icmp_error(error, "192.168.10.3", "192.168.10.1", &masqueraded, WHOLE);
        let to_client = icmp_error(error, "192.168.10.3", "192.168.10.2", &dnat, WHOLE);
        expect(&harness, Prog::Xdp, &from_router, &to_client, &what);
        let expected = icmp_error(error, "192.168.10.3", "192.168.10.2", &request.bytes(), WHOLE);
        expect(&harness, Prog::TcEgress, &to_client, &expected, &what);

        let reply = Packet::tcp("10.244.2.2:8080", &format!("192.168.10.1:{port}"));
        let (_, restored) = harness.run(Prog::Xdp, &reply.bytes());
        let (_, seen) = harness.run(Prog::TcEgress, &restored);
        assert_eq!(seen, request.reversed().bytes(), "{what}");
        let from_client = icmp_error(error, "192.168.10.2", "192.168.10.1", &seen, WHOLE);
        let to_backend = icmp_error(error, "192.168.10.2", "10.244.2.2", &restored, WHOLE);
        expect(&harness, Prog::Xdp, &from_client, &to_backend, &what);
        let expected = icmp_error(error, "192.168.10.1", "10.244.2.2", &reply.bytes(), WHOLE);
        expect(&harness, Prog::TcEgress, &to_backend, &expected, &what);
        assert_eq!(
            harness.stats(),
            [
                ("dnat", 1),
                ("reverse_nat", 1),
                ("snat", 1),
                ("reverse_snat", 1),
                ("icmp_error_nat", 4)
            ],
            "{what}"
        );
    }
}

/// A clash moved the second flow's source port (the first flow, through
/// the ClusterIP, holds the tuple): the error about its request shows the
/// port the client used, and the NodePort.
#[test]
fn an_error_restores_a_port_a_clash_moved() {
    let harness = Harness::new();
    let first = Packet::tcp("10.244.1.9:41000", "10.96.0.10:80");
    harness.run(Prog::Tc, &first.bytes());
    let request = Packet::tcp("10.244.1.9:41000", "192.168.10.1:30080");
    let (_, moved) = harness.run(Prog::Tc, &request.bytes());
    assert_ne!(moved, request.with_dst("10.244.1.2:8080").bytes(), "the port moved");
    let from_backend = icmp_error(ERRORS[1], "10.244.1.2", "10.244.1.9", &moved, WHOLE);
    let expected = icmp_error(ERRORS[1], "192.168.10.1", "10.244.1.9", &request.bytes(), WHOLE);
    expect(&harness, Prog::TcEgress, &from_backend, &expected, "moved port");
}

/// What is not an error about a translated flow passes untouched: errors
/// about other flows, echo requests, errors quoting a later fragment or
/// too little to hold the ports, fragmented errors.
#[test]
fn other_icmp_passes_untouched() {
    let harness = Harness::new();
    let request = Packet::udp("192.168.10.2:40001", "192.168.10.1:30080");
    let (_, dnat) = harness.run(Prog::Xdp, &request.bytes());
    let unrelated = Packet::udp("192.168.10.2:40002", "10.244.1.2:5353").bytes();
    let later_fragment = Packet { frag: 3, ..request.with_dst("10.244.1.2:5353") }.bytes();
    let mut echo = icmp_error((8, 0, [0, 1, 0, 1]), "10.244.1.2", "192.168.10.2", &dnat, WHOLE);
    echo.truncate(14 + 20 + 8);
    let mut fragmented = icmp_error(ERRORS[0], "10.244.1.2", "192.168.10.2", &dnat, WHOLE);
    fragmented[14 + 6] = 0x20; // MF
    let inputs = [
        icmp_error(ERRORS[0], "10.244.1.2", "192.168.10.2", &unrelated, WHOLE),
        icmp_error(ERRORS[0], "10.244.1.2", "192.168.10.2", &later_fragment, WHOLE),
        icmp_error(ERRORS[0], "10.244.1.2", "192.168.10.2", &dnat, 4),
        echo,
        fragmented,
    ];
    for (i, input) in inputs.iter().enumerate() {
        for prog in [Prog::Xdp, Prog::Tc, Prog::TcEgress] {
            let (_, out) = harness.run(prog, input);
            assert_eq!(&out, input, "input {i} through {prog:?}");
        }
    }
    assert_eq!(harness.stats(), [("dnat", 1)]);
}
