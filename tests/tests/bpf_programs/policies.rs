//! Traffic policies, session affinity, source ranges.
#[allow(clippy::wildcard_imports, reason = "the shared test vocabulary")]
use crate::harness::*;

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
