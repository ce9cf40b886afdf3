//! Flows across backend changes, collisions and reuse of client ports.
#[allow(clippy::wildcard_imports, reason = "the shared test vocabulary")]
use crate::harness::*;

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
    harness.set_services(&two_node_port_backends());
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

/// Under a connection storm the LRU evicts entries of live flows; their
/// next packets must reach the backend they were on, or it resets them.
#[test]
fn flows_whose_entries_were_evicted_keep_their_backend() {
    let mut harness = Harness::new();
    harness.set_services(&two_node_port_backends());
    let flows: Vec<Packet> = (0..32u16)
        .map(|i| Packet::tcp(&format!("192.168.10.2:{}", 40000 + i), "192.168.10.1:30080"))
        .collect();
    let backends: Vec<String> =
        flows.iter().map(|f| backend_of(&harness.run(Prog::Xdp, &f.bytes()).1)).collect();
    let keys: Vec<CtKey> = harness.maps.conntrack().keys().map(|k| k.unwrap()).collect();
    for key in &keys {
        harness.maps.conntrack().remove(key).expect("entry removable");
    }
    assert_eq!(harness.conntrack_len(), 0);
    // A random pick would keep all 32 with probability 2^-32.
    for (flow, before) in flows.iter().zip(&backends) {
        let (_, out) = harness.run(Prog::Xdp, &flow.bytes());
        assert_eq!(&backend_of(&out), before, "flow {flow:?} moved after eviction");
    }
    assert!(backends.iter().any(|b| b != &backends[0]), "both backends used: {backends:?}");
}

/// The kernel sizes a map with an LRU list per CPU in multiples of the
/// possible CPUs; the agent must expect that size, or it warns on every
/// start that the pinned maps kept another one.
#[test]
fn conntrack_is_created_with_the_size_the_agent_expects() {
    let wanted = Capacity { conntrack: 262_145, ..Capacity::default() }.as_created();
    let ebpf = load_object(wanted, forwarder_user::dataplane::Tuning::default(), 0, None)
        .expect("eBPF object loads (are you root?)");
    let Some(aya::maps::Map::LruHashMap(map)) = ebpf.map(forwarder_common::map_names::CONNTRACK)
    else {
        panic!("conntrack is an LRU hash map");
    };
    let info = map.info().expect("map info");
    let flags = forwarder_common::CONNTRACK_FLAGS;
    assert_eq!(info.map_flags() & flags, flags, "BPF_F_NO_COMMON_LRU: a list per CPU");
    assert_eq!(info.max_entries(), wanted.conntrack);
}

/// The default Services, the TCP NodePort with two backends.
pub(crate) fn two_node_port_backends() -> Vec<(Frontend, Vec<&'static str>)> {
    let mut services = default_services();
    services[0].1 = vec!["10.244.1.2:8080", "10.244.1.3:8080"];
    services
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

/// Each node hashes flows with a seed of its own (a client cannot compute
/// which ports reach which backend), kept across restarts (a restarted
/// agent's flows hash as before); an earlier build's maps are unpinned.
#[test]
fn the_hash_seed_is_the_nodes_own_and_outlives_the_agent() {
    use forwarder_user::{
        dataplane::{Dataplane, Tuning},
        pins::PinDir,
    };
    let root = forwarder_tests::forwarder::bpffs_dir("hash-seed");
    let seed_of = |node: &str| {
        let pins = PinDir::new(&root, node);
        let mut dataplane =
            Dataplane::load(Capacity::default(), Tuning::default(), pins).expect("loads");
        dataplane.maps.ensure_hash_seed().expect("seed readable")
    };
    let first = seed_of("node-a");
    assert_ne!(first, 0);
    for name in forwarder_user::dataplane::MAPS {
        assert!(root.join("node-a").join(name).exists(), "{name} is not pinned");
    }
    // A map under a name no build reads any more, as an earlier layout's.
    let stale = root.join("node-a").join("OLD_MAP_V0");
    aya::maps::MapData::from_pin(root.join("node-a").join(map_names::HASH_SEED))
        .expect("seed pinned")
        .pin(&stale)
        .expect("pin again");
    assert_eq!(seed_of("node-a"), first, "a second load keeps the seed");
    assert!(!stale.exists(), "an earlier layout's map is unpinned");
    assert_ne!(seed_of("node-b"), first, "another node has another (1 in 2^32 alike)");
    for node in ["node-a", "node-b"] {
        PinDir::new(&root, node).remove_all().expect("pins removable");
    }
    let _ = std::fs::remove_dir(&root);
}
