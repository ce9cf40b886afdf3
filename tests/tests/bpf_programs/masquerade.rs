//! Masquerading to endpoints on other nodes, hairpin, port reuse.
#[allow(clippy::wildcard_imports, reason = "the shared test vocabulary")]
use crate::harness::*;

/// External client to a NodePort whose endpoint is on another node: DNAT in
/// XDP, masquerade on egress; the reply is un-masqueraded in XDP and
/// reverse-NATed on egress. Every hop's bytes are exact.
#[test]
fn remote_endpoint_is_masqueraded_and_the_reply_restored() {
    let harness = masquerade_harness();
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
    hairpin_round_trip(&Harness::new());
}

/// A hairpin connection's first packet and its reply through both TC
/// programs, each hop's bytes exact.
fn hairpin_round_trip(harness: &Harness) {
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

/// `--nodeport-addresses` may leave out the address flows are masqueraded
/// to: replies to it are restored all the same, and it serves no NodePort.
#[test]
fn replies_to_a_masquerade_address_that_serves_no_nodeport_are_restored() {
    let mut harness = Harness::new();
    let report = harness.syncer.apply_node_ips(&Default::default(), &mut harness.maps);
    assert!(report.errors.is_empty(), "{report:?}");
    let nodeport = Packet::tcp("192.168.10.2:40000", "192.168.10.1:30080");
    assert_eq!(harness.run(Prog::Xdp, &nodeport.bytes()), (XDP_PASS, nodeport.bytes()));
    hairpin_round_trip(&harness);
}

/// Sends the first packet of a flow from `client` through XDP and egress;
/// returns the masquerade port, or `None` if egress dropped it.
fn masquerade(harness: &Harness, client: &str) -> Option<u16> {
    let request = Packet { tcp_flags: SYN, ..Packet::tcp(client, "192.168.10.1:30080") };
    let (_, out) = harness.run(Prog::Xdp, &request.bytes());
    let (verdict, out) = harness.run(Prog::TcEgress, &out);
    (verdict == TC_ACT_OK).then(|| masquerade_port(&out))
}

fn snat_reply_entries(harness: &mut Harness) -> Vec<(CtKey, forwarder_common::CtValue)> {
    let ct = harness.maps.nat();
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
    harness.maps.nat().remove(&key).unwrap();
    assert_eq!(masquerade(&harness, "192.168.10.2:40000"), Some(port));
    assert_eq!(snat_reply_entries(&mut harness).len(), 1);

    // Another client took the port meanwhile: the flow moves to another.
    let stolen =
        forwarder_common::CtValue { nat_addr: u32::from_ne_bytes([192, 168, 10, 77]), ..value };
    harness.maps.nat().insert(key, stolen, 0).unwrap();
    let moved = masquerade(&harness, "192.168.10.2:40000").expect("masqueraded");
    assert_ne!(moved, port);
    let reply = Packet::tcp("10.244.2.2:8080", &format!("192.168.10.1:{moved}"));
    let (_, out) = harness.run(Prog::Xdp, &reply.bytes());
    assert_eq!(out, Packet::tcp("10.244.2.2:8080", "192.168.10.2:40000").bytes());
}

/// Ports of finished flows are reused: with every port of a small range
/// held by flows that then close, new flows get ports again once the close
/// timeout passed, and not before.
#[test]
fn masquerade_ports_of_finished_flows_are_reused() {
    let ports = SnatPorts { low_min: 1024, low_count: 0, high_min: 65_000, high_count: 536 };
    let mut harness = Harness::with_tuning(Tuning { snat_ports: ports, ..Tuning::default() });
    let mut services = default_services();
    services[0].1 = vec!["10.244.2.2:8080"];
    harness.set_services_remote(&services, &["10.244.2.2"]);
    let client = |i: u32| format!("172.16.{}.{}:40000", i / 250, i % 250 + 1);
    // Hashed probes find all but the last few free ports.
    let held = (0..600u32).filter(|i| masquerade(&harness, &client(*i)).is_some()).count();
    assert!((500..=536).contains(&held), "{held} of the range's 536 ports held");
    use forwarder_common::{CT_BACKEND_CLOSING, CT_CLIENT_CLOSING};
    for (key, value) in snat_reply_entries(&mut harness) {
        let closed = forwarder_common::CtValue {
            flags: value.flags | CT_CLIENT_CLOSING | CT_BACKEND_CLOSING,
            ..value
        };
        harness.maps.nat().insert(key, closed, 0).unwrap();
    }
    let new_client = |i: u32| format!("172.17.{}.{}:40000", i / 250, i % 250 + 1);
    let early = (0..50u32).filter(|i| masquerade(&harness, &new_client(*i)).is_some()).count();
    assert!(early <= 536 - held, "{early} ports taken from closed flows within the close timeout");
    harness.advance(CtTimeouts::DEFAULT.tcp_close + 1);
    let failed = (50..350u32).filter(|i| masquerade(&harness, &new_client(*i)).is_none()).count();
    assert_eq!(failed, 0, "{failed} of 300 new flows found no port after the close timeout");
}

/// A client port that is a masquerade port and free is kept, as netfilter
/// keeps it; a second client with the same port to the same backend gets
/// another one.
#[test]
fn masquerade_keeps_the_clients_port_when_it_can() {
    let harness = masquerade_harness();
    assert_eq!(masquerade(&harness, "192.168.10.2:5000"), Some(5000));
    let other = masquerade(&harness, "192.168.10.3:5000").expect("masqueraded");
    assert_ne!(other, 5000);
    assert!(SnatPorts::DEFAULT.contains(other), "{other}");
    // From the node's ephemeral range too (its own connections that clash
    // are moved instead, below); never a NodePort-range port.
    assert_eq!(masquerade(&harness, "192.168.10.2:40000"), Some(40000));
    let moved = masquerade(&harness, "192.168.10.2:31000").expect("masqueraded");
    assert!(!(30_000..=32_767).contains(&moved), "{moved}");
}

/// A connection of the node's own that the kernel gave the port a
/// masqueraded flow holds to the same backend (masquerade ports include the
/// ephemeral range) moves to another port, as netfilter moves it; each
/// connection's replies reach it, and the masqueraded flow keeps its port.
#[test]
fn a_node_connection_on_a_held_port_moves_to_another() {
    let harness = masquerade_harness();
    assert_eq!(masquerade(&harness, "192.168.10.2:40000"), Some(40000));
    let own = Packet { tcp_flags: SYN, ..Packet::tcp("192.168.10.1:40000", "10.244.2.2:8080") };
    let (verdict, out) = harness.run(Prog::TcEgress, &own.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    let moved = masquerade_port(&out);
    assert_ne!(moved, 40000);
    assert_eq!(out, own.with_src(&format!("192.168.10.1:{moved}")).bytes());
    verify_checksums(&out).unwrap();
    // Its later packets keep the new port.
    let (_, again) =
        harness.run(Prog::TcEgress, &Packet::tcp("192.168.10.1:40000", "10.244.2.2:8080").bytes());
    assert_eq!(masquerade_port(&again), moved);

    let to_node = Packet::tcp("10.244.2.2:8080", &format!("192.168.10.1:{moved}"));
    let (_, out) = harness.run(Prog::Xdp, &to_node.bytes());
    assert_eq!(out, Packet::tcp("10.244.2.2:8080", "192.168.10.1:40000").bytes());
    let to_client = Packet::tcp("10.244.2.2:8080", "192.168.10.1:40000");
    let (_, out) = harness.run(Prog::Xdp, &to_client.bytes());
    assert_eq!(out, Packet::tcp("10.244.2.2:8080", "192.168.10.2:40000").bytes());

    // A node connection on a port nobody holds, and one to another
    // backend port, are left alone.
    for free in ["192.168.10.1:40001", "192.168.10.1:40000"] {
        let backend = if free.ends_with("40001") { "10.244.2.2:8080" } else { "10.244.2.2:9090" };
        let syn = Packet { tcp_flags: SYN, ..Packet::tcp(free, backend) };
        let (_, out) = harness.run(Prog::TcEgress, &syn.bytes());
        assert_eq!(out, syn.bytes(), "{free} to {backend}");
    }
}

/// A port some frontend uses on the node address is never a masquerade
/// port: the replies would be taken for new flows to that frontend.
#[test]
fn masquerade_never_picks_a_frontends_port() {
    let mut harness = Harness::new();
    let mut services = default_services();
    services[0].1 = vec!["10.244.2.2:8080"];
    services.push((frontend(Some(NODE_IP), 5000, Proto::Tcp), vec!["10.244.1.2:8080"]));
    harness.set_services_remote(&services, &["10.244.2.2"]);
    let port = masquerade(&harness, "192.168.10.2:5000").expect("masqueraded");
    assert_ne!(port, 5000);
}

/// Every masquerade port to one backend can be in use at once: a storm of
/// 20,000 concurrent flows from many clients on one port, all to the one
/// remote endpoint, each gets a port (the range before held 4,536).
#[test]
fn masquerade_capacity_exceeds_a_storm_to_one_backend() {
    let harness = masquerade_harness();
    let failed = (0..20_000u32)
        .filter(|i| {
            let client = format!("172.16.{}.{}:40000", i / 250, i % 250 + 1);
            masquerade(&harness, &client).is_none()
        })
        .count();
    assert_eq!(failed, 0, "{:?}", harness.stats());
}
