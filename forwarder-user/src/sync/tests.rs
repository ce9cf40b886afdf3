use std::collections::BTreeSet;

use super::{fake::FakeDatapath, *};
use crate::model::desired as state;

fn fe(addr: &str, port: u16) -> Frontend {
    Frontend::new(Some(addr.parse().unwrap()), port, Proto::Tcp)
}

fn unlimited() -> Syncer {
    Syncer::new(usize::MAX, usize::MAX)
}

fn resolved(dp: &FakeDatapath) -> Vec<(String, Vec<String>)> {
    dp.resolve().into_iter().collect()
}

#[test]
fn encodes_keys_in_network_order() {
    let mut dp = FakeDatapath::default();
    let nodeport = Frontend::new(None, 30080, Proto::Udp);
    unlimited().apply(&state(&[(nodeport, &["10.244.1.2:8080"])]), &mut dp);
    let key = *dp.services.keys().next().unwrap();
    assert_eq!(key.addr, 0);
    assert_eq!(key.port.to_ne_bytes(), 30080u16.to_be_bytes());
    assert_eq!(key.proto, 17);
    let backend = dp.backends.values().next().unwrap();
    assert_eq!(backend.addr.to_ne_bytes(), [10, 244, 1, 2]);
    assert_eq!(backend.port.to_ne_bytes(), 8080u16.to_be_bytes());
}

#[test]
fn unchanged_state_writes_nothing() {
    let mut dp = FakeDatapath::default();
    let mut syncer = unlimited();
    let desired = state(&[(fe("10.96.0.10", 80), &["10.244.1.2:8080", "10.244.1.3:8080"])]);
    let first = syncer.apply(&desired, &mut dp);
    assert_eq!(first.writes, 5, "2 backends, 2 slots, 1 frontend: {:?}", dp.log);
    let again = syncer.apply(&desired, &mut dp);
    assert_eq!(again.writes, 0);
    assert!(again.errors.is_empty());
}

#[test]
fn shrinking_lowers_count_before_removing_slot_and_backend() {
    let mut dp = FakeDatapath::default();
    let mut syncer = unlimited();
    let f = fe("10.96.0.10", 80);
    syncer.apply(&state(&[(f, &["10.244.1.2:8080", "10.244.1.3:8080"])]), &mut dp);
    dp.log.clear();
    syncer.apply(&state(&[(f, &["10.244.1.2:8080"])]), &mut dp);
    assert_eq!(
        dp.log,
        ["put svc 10.96.0.10:80/6#0", "remove svc 10.96.0.10:80/6#2", "remove backend 2"]
    );
    assert_eq!(resolved(&dp), [("10.96.0.10:80/6".into(), vec!["10.244.1.2:8080".into()])]);
}

#[test]
fn removed_frontend_disappears_before_its_slots_and_backends() {
    let mut dp = FakeDatapath::default();
    let mut syncer = unlimited();
    let (a, b) = (fe("10.96.0.10", 80), fe("10.96.0.11", 80));
    syncer.apply(&state(&[(a, &["10.244.1.2:8080"]), (b, &["10.244.1.2:8080"])]), &mut dp);
    assert_eq!(dp.backends.len(), 1, "the shared endpoint is one backend");
    dp.log.clear();
    syncer.apply(&state(&[(b, &["10.244.1.2:8080"])]), &mut dp);
    assert_eq!(dp.log, ["remove svc 10.96.0.10:80/6#0", "remove svc 10.96.0.10:80/6#1"]);
    assert_eq!(dp.backends.len(), 1, "still used by the other frontend");
    syncer.apply(&DesiredState::default(), &mut dp);
    assert!(dp.services.is_empty() && dp.backends.is_empty(), "{:?}", dp.log);
}

#[test]
fn full_backend_map_keeps_previous_state_and_recovers() {
    let mut dp = FakeDatapath { backends_capacity: Some(2), ..FakeDatapath::default() };
    let mut syncer = unlimited();
    let f = fe("10.96.0.10", 80);
    syncer.apply(&state(&[(f, &["10.244.1.2:8080", "10.244.1.3:8080"])]), &mut dp);
    let before = resolved(&dp);
    let report = syncer
        .apply(&state(&[(f, &["10.244.1.2:8080", "10.244.1.3:8080", "10.244.1.4:8080"])]), &mut dp);
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(report.errors[0].contains("map full"), "{report:?}");
    assert_eq!(resolved(&dp), before, "the frontend keeps its previous backends");

    dp.backends_capacity = Some(3);
    let report = syncer
        .apply(&state(&[(f, &["10.244.1.2:8080", "10.244.1.3:8080", "10.244.1.4:8080"])]), &mut dp);
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(resolved(&dp)[0].1.len(), 3);
}

#[test]
fn full_services_map_refuses_the_frontend_without_mixing_backends() {
    let mut dp = FakeDatapath::default();
    // Room for two frontends with one backend each, and nothing more.
    let mut syncer = Syncer::new(4, usize::MAX);
    let (a, b) = (fe("10.96.0.10", 80), fe("10.96.0.11", 80));
    syncer.apply(&state(&[(a, &["10.244.1.2:8080"]), (b, &["10.244.1.3:8080"])]), &mut dp);
    let before = resolved(&dp);
    dp.log.clear();
    let report = syncer.apply(
        &state(&[(a, &["10.244.1.4:8080", "10.244.1.5:8080"]), (b, &["10.244.1.3:8080"])]),
        &mut dp,
    );
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(
        report.errors[0].contains("SVC4_V1") && report.errors[0].contains("full"),
        "{report:?}"
    );
    assert_eq!(resolved(&dp), before, "a keeps exactly its previous backend");
    assert!(dp.log.is_empty(), "nothing written for the refused frontend: {:?}", dp.log);

    // Removing b frees room: the same desired state then fits.
    let report = syncer.apply(&state(&[(a, &["10.244.1.4:8080", "10.244.1.5:8080"])]), &mut dp);
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(resolved(&dp)[0].1, ["10.244.1.4:8080", "10.244.1.5:8080"]);
}

#[test]
fn freed_backend_ids_are_reused_oldest_first() {
    let mut dp = FakeDatapath::default();
    let mut syncer = unlimited();
    let f = fe("10.96.0.10", 80);
    syncer
        .apply(&state(&[(f, &["10.244.1.2:8080", "10.244.1.3:8080", "10.244.1.4:8080"])]), &mut dp);
    syncer.apply(&state(&[(f, &["10.244.1.4:8080"])]), &mut dp);
    syncer.apply(&state(&[(f, &["10.244.1.4:8080", "10.244.1.9:8080"])]), &mut dp);
    let ids: BTreeSet<u32> = dp.backends.keys().copied().collect();
    assert_eq!(ids, BTreeSet::from([1, 3]), "the oldest freed id (1) is reused, not the newest");
}

#[test]
fn random_changes_converge_and_never_expose_a_broken_service() {
    // A fixed LCG keeps the sequence reproducible without extra crates.
    let mut seed: u64 = 0x5eed;
    let mut next = |n: u64| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let mut dp = FakeDatapath::default();
    let mut syncer = unlimited();
    for _ in 0..300 {
        let mut services = BTreeMap::new();
        for svc in 0..next(6) {
            let endpoints: BTreeSet<Endpoint> = (0..next(5))
                .map(|_| Endpoint { addr: Ipv4Addr::new(10, 244, 0, next(8) as u8), port: 8080 })
                .collect();
            services.insert(fe(&format!("10.96.0.{svc}"), 80), endpoints.into_iter().collect());
        }
        let desired = DesiredState { services, ..DesiredState::default() };
        let report = syncer.apply(&desired, &mut dp);
        assert!(report.errors.is_empty(), "{report:?}");
        // Slots keep their backends, so compare the sets.
        let expect: Vec<(String, BTreeSet<String>)> = desired
            .services
            .iter()
            .map(|(f, eps)| {
                (f.to_string().replace("/TCP", "/6"), eps.iter().map(ToString::to_string).collect())
            })
            .collect();
        let got: Vec<(String, BTreeSet<String>)> =
            resolved(&dp).into_iter().map(|(f, eps)| (f, eps.into_iter().collect())).collect();
        assert_eq!(got, expect);
        let used: BTreeSet<u32> =
            dp.services.iter().filter(|(k, _)| k.slot > 0).map(|(_, v)| v.backend_id).collect();
        assert_eq!(used, dp.backends.keys().copied().collect(), "no leaked backends");
    }
}

#[test]
fn node_ips_follow_desired_set() {
    let mut dp = FakeDatapath::default();
    let mut syncer = unlimited();
    let a: Ipv4Addr = "192.168.0.1".parse().unwrap();
    let b: Ipv4Addr = "192.168.0.2".parse().unwrap();
    syncer.apply_node_ips(&[a, b].into(), &mut dp);
    let report = syncer.apply_node_ips(&[b].into(), &mut dp);
    assert_eq!(report.writes, 1);
    assert_eq!(dp.node_ips, [(b, NODE_IP_NODEPORT)].into());
}

#[test]
fn masquerade_addresses_are_marked_before_use_and_unmarked_after() {
    let mut dp = FakeDatapath::default();
    let mut syncer = unlimited();
    let node: Ipv4Addr = "192.168.0.1".parse().unwrap();
    let other: Ipv4Addr = "10.0.0.1".parse().unwrap();
    syncer.apply_node_ips(&[node].into(), &mut dp);
    syncer.apply_snat_addrs(&[(1, node), (2, other)].into(), &mut dp);
    assert_eq!(
        dp.node_ips,
        [(other, NODE_IP_MASQUERADE), (node, NODE_IP_NODEPORT | NODE_IP_MASQUERADE)].into()
    );
    let marked = dp.log.iter().position(|w| w == "put node 10.0.0.1 2").unwrap();
    let used = dp.log.iter().position(|w| w == "put snat 2 10.0.0.1").unwrap();
    assert!(marked < used, "{:#?}", dp.log);
    // A NodePort address change keeps the masquerade flag, and the other way.
    syncer.apply_node_ips(&[].into(), &mut dp);
    syncer.apply_snat_addrs(&[(1, node)].into(), &mut dp);
    assert_eq!(dp.node_ips, [(node, NODE_IP_MASQUERADE)].into());
    let unused = dp.log.iter().position(|w| w == "remove snat 2").unwrap();
    let unmarked = dp.log.iter().position(|w| w == "remove node 10.0.0.1").unwrap();
    assert!(unused < unmarked, "{:#?}", dp.log);
    assert_eq!(syncer.node_ips(), BTreeSet::new());
}

#[test]
fn source_ranges_are_in_the_map_whenever_the_flag_is() {
    let mut dp = FakeDatapath::default();
    let mut syncer = unlimited();
    let lb = fe("203.0.113.10", 80);
    let range: crate::cidr::Cidr = "192.168.10.0/24".parse().unwrap();
    let mut desired = state(&[(lb, &["10.244.1.2:8080"])]);
    desired.source_ranges.insert(lb, [range].into());
    syncer.apply(&desired, &mut dp);
    let head = dp.services[&svc_key(&lb, 0)];
    assert_ne!(head.flags & forwarder_common::SVC_SOURCE_RANGES, 0);
    assert_eq!(dp.source_ranges, [(lb, range)].into());

    desired.source_ranges.clear();
    syncer.apply(&desired, &mut dp);
    let head = dp.services[&svc_key(&lb, 0)];
    assert_eq!(head.flags & forwarder_common::SVC_SOURCE_RANGES, 0);
    assert!(dp.source_ranges.is_empty());
}

#[test]
fn backends_keep_their_slots() {
    for (current, wanted, expect) in [
        (vec![1, 2, 3], vec![1, 2, 3, 4], vec![1, 2, 3, 4]),
        (vec![1, 2, 3], vec![1, 3], vec![1, 3]),
        (vec![1, 2, 3], vec![2, 3], vec![3, 2]),
        (vec![1, 2, 3], vec![4, 2, 3], vec![4, 2, 3]),
        (vec![1, 2, 3], vec![3], vec![3]),
        (vec![], vec![5, 6], vec![5, 6]),
        (vec![1, 2], vec![], vec![]),
    ] {
        assert_eq!(super::stable_order(&current, &wanted), expect, "{current:?} -> {wanted:?}");
    }
}

#[test]
fn adding_an_endpoint_moves_no_existing_backend() {
    let mut dp = FakeDatapath::default();
    let mut syncer = unlimited();
    let f = fe("10.96.0.10", 80);
    syncer.apply(&state(&[(f, &["10.244.1.2:8080", "10.244.1.5:8080"])]), &mut dp);
    let before = resolved(&dp)[0].1.clone();
    dp.log.clear();
    syncer
        .apply(&state(&[(f, &["10.244.1.2:8080", "10.244.1.3:8080", "10.244.1.5:8080"])]), &mut dp);
    let after = resolved(&dp)[0].1.clone();
    assert_eq!(after[..2], before[..], "existing backends kept their slots");
    assert_eq!(dp.log, ["put backend 3", "put svc 10.96.0.10:80/6#3", "put svc 10.96.0.10:80/6#0"]);
}
