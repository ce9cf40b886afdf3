//! Conntrack lifetimes by TCP state, new connections on reused client
//! ports, and clashes of two flows that become one tuple after DNAT. Time
//! is the harness's clock: `advance` moves every entry into the past.
#[allow(clippy::wildcard_imports, reason = "the shared test vocabulary")]
use crate::harness::*;
use forwarder_user::conntrack::{collect, now_seconds};

const CLIENT: &str = "192.168.10.2:40000";
const NODE_PORT: &str = "192.168.10.1:30080";
const OLD: &str = "10.244.1.2:8080";
const NEW: &str = "10.244.1.3:8080";

/// The NodePort moves from `OLD` to `NEW`; `OLD` stays a backend (of the
/// ClusterIP), so only the flow's own state decides where it goes.
fn move_node_port(harness: &mut Harness) {
    let mut services = default_services();
    services[0].1 = vec![NEW];
    harness.set_services(&services);
}

fn tcp(flags: u8) -> Packet {
    Packet { tcp_flags: flags, ..Packet::tcp(CLIENT, NODE_PORT) }
}

/// Where the XDP program sends `packet`.
fn backend(harness: &Harness, packet: &Packet) -> String {
    let (verdict, out) = harness.run(Prog::Xdp, &packet.bytes());
    assert_eq!(verdict, XDP_PASS, "{packet:?}");
    verify_checksums(&out).unwrap();
    let port = u16::from_be_bytes([out[36], out[37]]);
    format!("{}:{port}", backend_of(&out))
}

#[test]
fn a_handshake_lives_for_the_syn_timeout() {
    let mut harness = Harness::new();
    assert_eq!(backend(&harness, &tcp(SYN)), OLD);
    move_node_port(&mut harness);
    harness.advance(CtTimeouts::DEFAULT.tcp_syn - 1);
    assert_eq!(backend(&harness, &tcp(SYN)), OLD, "a retransmitted SYN keeps its backend");
    harness.advance(CtTimeouts::DEFAULT.tcp_syn + 1);
    assert_eq!(backend(&harness, &tcp(SYN)), NEW, "after the SYN timeout: a new flow");
}

#[test]
fn an_established_flow_lives_for_the_established_timeout() {
    let mut harness = Harness::new();
    assert_eq!(backend(&harness, &tcp(SYN)), OLD);
    assert_eq!(backend(&harness, &tcp(ACK)), OLD);
    move_node_port(&mut harness);
    harness.advance(CtTimeouts::DEFAULT.tcp_established - 1);
    assert_eq!(backend(&harness, &tcp(ACK)), OLD, "idle for a day less a second");
    harness.advance(CtTimeouts::DEFAULT.tcp_established + 1);
    assert_eq!(backend(&harness, &tcp(ACK)), NEW, "expired: balanced anew, as netfilter does");
}

#[test]
fn a_syn_after_the_clients_fin_or_reset_is_a_new_connection() {
    for (closing, name) in [(FIN | ACK, "FIN"), (RST, "RST")] {
        let mut harness = Harness::new();
        assert_eq!(backend(&harness, &tcp(ACK)), OLD);
        move_node_port(&mut harness);
        assert_eq!(backend(&harness, &tcp(closing)), OLD, "{name} follows its flow");
        assert_eq!(backend(&harness, &tcp(ACK)), OLD, "late packets after the {name} too");
        assert_eq!(backend(&harness, &tcp(SYN)), NEW, "a SYN after the {name} opens anew");
    }
}

/// The backend's FIN or RST ended the connection too: a SYN on the same
/// client port opens a new one, with entries of its own (the old state
/// would give the new connection the close timeout).
#[test]
fn a_syn_after_the_backends_fin_or_reset_is_a_new_connection() {
    for (closing, name) in [(FIN | ACK, "FIN"), (RST, "RST")] {
        let mut harness = Harness::new();
        assert_eq!(backend(&harness, &tcp(ACK)), OLD);
        let reply = Packet { tcp_flags: closing, ..tcp(ACK).with_dst(OLD).reversed() };
        let (_, out) = harness.run(Prog::TcEgress, &reply.bytes());
        assert_eq!(out, Packet { tcp_flags: closing, ..tcp(ACK).reversed() }.bytes(), "{name}");
        move_node_port(&mut harness);
        assert_eq!(backend(&harness, &tcp(ACK)), OLD, "late packets after the {name}");
        assert_eq!(backend(&harness, &tcp(SYN)), NEW, "a SYN after the backend's {name}");
    }
}

/// A UDP flow only its backend keeps sending on (a stream) lives by its
/// replies: the client's next datagram stays on the backend.
#[test]
fn a_udp_flow_lives_while_its_backend_sends() {
    let mut harness = Harness::new();
    let datagram = Packet::udp(CLIENT, NODE_PORT);
    assert_eq!(backend(&harness, &datagram), "10.244.1.2:5353");
    let mut services = default_services();
    services[1].1 = vec!["10.244.1.3:5353"];
    harness.set_services(&services);
    harness.advance(CtTimeouts::DEFAULT.udp + 1);
    harness.run(Prog::TcEgress, &datagram.with_dst("10.244.1.2:5353").reversed().bytes());
    assert_eq!(backend(&harness, &datagram), "10.244.1.2:5353");
}

#[test]
fn a_syn_on_an_open_connection_keeps_its_backend_while_it_serves() {
    let mut harness = Harness::new();
    assert_eq!(backend(&harness, &tcp(ACK)), OLD);
    move_node_port(&mut harness);
    assert_eq!(backend(&harness, &tcp(SYN)), OLD);
}

#[test]
fn udp_flows_live_for_the_udp_timeout() {
    let mut harness = Harness::new();
    let datagram = Packet::udp(CLIENT, NODE_PORT);
    assert_eq!(backend(&harness, &datagram), "10.244.1.2:5353");
    let mut services = default_services();
    services[1].1 = vec!["10.244.1.3:5353"];
    harness.set_services(&services);
    harness.advance(CtTimeouts::DEFAULT.udp - 1);
    assert_eq!(backend(&harness, &datagram), "10.244.1.2:5353");
    harness.advance(CtTimeouts::DEFAULT.udp + 1);
    assert_eq!(backend(&harness, &datagram), "10.244.1.3:5353");
}

/// The source port a translated packet leaves with.
fn source_port(out: &[u8]) -> u16 {
    u16::from_be_bytes([out[34], out[35]])
}

/// One client port to two frontends that share their only backend: after
/// DNAT both would be one connection. The second flow's source port is
/// moved (netfilter's clash resolution); replies get the client's own port
/// and frontend back. From a pod (TC) and from the wire (XDP).
#[test]
fn a_clash_moves_the_second_flows_source_port() {
    for (prog, client, ingress_ok) in
        [(Prog::Tc, "10.244.1.9:41000", TC_ACT_OK), (Prog::Xdp, "192.168.10.2:41000", XDP_PASS)]
    {
        let harness = Harness::new();
        let via_cluster_ip = Packet::tcp(client, "10.96.0.10:80");
        let via_node_port = Packet::tcp(client, NODE_PORT);
        let (_, out) = harness.run(prog, &via_cluster_ip.bytes());
        assert_eq!(out, via_cluster_ip.with_dst(OLD).bytes(), "{prog:?}: the first flow");

        let (verdict, out) = harness.run(prog, &via_node_port.bytes());
        assert_eq!(verdict, ingress_ok, "{prog:?}");
        verify_checksums(&out).unwrap();
        let moved = source_port(&out);
        assert_ne!(moved, 41000, "{prog:?}: the second flow keeps the taken tuple");
        assert!(moved >= 1024);
        let client_ip = client.split(':').next().unwrap();
        let second = via_node_port.with_src(&format!("{client_ip}:{moved}")).with_dst(OLD);
        assert_eq!(out, second.bytes(), "{prog:?}");
        let (_, again) = harness.run(prog, &via_node_port.bytes());
        assert_eq!(again, out, "{prog:?}: the flow keeps its port");

        let (_, out) =
            harness.run(Prog::TcEgress, &via_cluster_ip.with_dst(OLD).reversed().bytes());
        assert_eq!(out, via_cluster_ip.reversed().bytes(), "{prog:?}: the first flow's reply");
        let (_, out) = harness.run(Prog::TcEgress, &second.reversed().bytes());
        verify_checksums(&out).unwrap();
        assert_eq!(out, via_node_port.reversed().bytes(), "{prog:?}: the second flow's reply");
        assert!(!harness.stats().iter().any(|(name, _)| name.starts_with("drop")));
    }
}

/// Closed both ways, a flow holds its tuple for the close timeout (stray
/// packets, the backend's TIME_WAIT), then a new flow to another frontend
/// may have it as it is.
#[test]
fn a_closed_flow_frees_its_tuple_after_the_close_timeout() {
    for (wait, expect_moved) in
        [(CtTimeouts::DEFAULT.tcp_close - 1, true), (CtTimeouts::DEFAULT.tcp_close + 1, false)]
    {
        let mut harness = Harness::new();
        let first = Packet::tcp("10.244.1.9:41000", "10.96.0.10:80");
        harness.run(Prog::Tc, &first.bytes());
        harness.run(Prog::TcEgress, &first.with_dst(OLD).reversed().bytes());
        let fin = |p: &Packet| Packet { tcp_flags: FIN | ACK, ..p.clone() };
        harness.run(Prog::Tc, &fin(&first).bytes());
        harness.run(Prog::TcEgress, &fin(&first.with_dst(OLD).reversed()).bytes());
        harness.advance(wait);
        let second = Packet { tcp_flags: SYN, ..Packet::tcp("10.244.1.9:41000", NODE_PORT) };
        let (_, out) = harness.run(Prog::Tc, &second.bytes());
        assert_eq!(source_port(&out) != 41000, expect_moved, "{wait} s after both FINs");
    }
}

/// The garbage collector removes the entries of flows whose time is up,
/// and only those.
#[test]
fn garbage_collection_removes_only_finished_flows() {
    let mut harness = Harness::new();
    let done = Packet::tcp("10.244.1.9:41000", "10.96.0.10:80");
    let live = Packet::tcp("10.244.1.9:41001", "10.96.0.10:80");
    for packet in [&done, &live] {
        harness.run(Prog::Tc, &packet.bytes());
        harness.run(Prog::TcEgress, &packet.with_dst(OLD).reversed().bytes());
    }
    let fin = |p: &Packet| Packet { tcp_flags: FIN | ACK, ..p.clone() };
    harness.run(Prog::Tc, &fin(&done).bytes());
    harness.run(Prog::TcEgress, &fin(&done.with_dst(OLD).reversed()).bytes());
    assert_eq!(harness.conntrack_len(), 4);
    harness.advance(CtTimeouts::DEFAULT.tcp_close + 1);
    // The live flow carries on, in both directions.
    harness.run(Prog::Tc, &live.bytes());
    harness.run(Prog::TcEgress, &live.with_dst(OLD).reversed().bytes());
    let report = collect(harness.maps.conntrack(), &CtTimeouts::DEFAULT, now_seconds()).unwrap();
    assert_eq!((report.examined, report.removed), (4, 2));
    let left: Vec<u16> = harness
        .maps
        .conntrack()
        .keys()
        .map(|k| k.unwrap())
        .map(|k| {
            u16::from_be(if k.dir == forwarder_common::CT_FORWARD { k.sport } else { k.dport })
        })
        .collect();
    assert_eq!(left, [41001, 41001], "the live flow's two entries stay");
}

/// An LRU hash map of the earlier layout (16-byte keys and values), pinned
/// at `path`, made with raw syscalls as an earlier build would have.
fn pin_v1_map(path: &std::path::Path) {
    use std::os::fd::{FromRawFd, OwnedFd};
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_LRU_HASH: u64 = 9;
    let mut attr = [0u64; 16];
    attr[0] = BPF_MAP_TYPE_LRU_HASH | (16 << 32); // map_type, key_size
    attr[1] = 16 | (1024 << 32); // value_size, max_entries
    // SAFETY: a zeroed bpf_attr with the fields BPF_MAP_CREATE reads.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_mut_ptr(), 128) };
    assert!(fd >= 0, "map create: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor we own.
    let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64;
    attr[1] = std::os::fd::AsRawFd::as_raw_fd(&map) as u64;
    // SAFETY: as above, for BPF_OBJ_PIN.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_mut_ptr(), 128) };
    assert_eq!(rc, 0, "pin: {}", std::io::Error::last_os_error());
}

/// An upgrade from the build before lifetimes keeps its flows: their
/// entries move to the new map, and packets follow them.
#[test]
fn an_earlier_builds_conntrack_is_migrated() {
    use forwarder_common::{CT_ESTABLISHED, CT_FORWARD, CT_MASQUERADE};
    use forwarder_user::conntrack::{CtValueV1, V1_NAME, migrate_v1};
    let dir = forwarder_tests::forwarder::bpffs_dir("conntrack-v1");
    let path = dir.join(V1_NAME);
    pin_v1_map(&path);
    let forward = CtKey {
        saddr: u32::from_ne_bytes([192, 168, 10, 2]),
        daddr: u32::from_ne_bytes([192, 168, 10, 1]),
        sport: 40000u16.to_be(),
        dport: 30080u16.to_be(),
        proto: 6,
        dir: CT_FORWARD,
        _pad: [0; 2],
    };
    // Not where the hash would send the flow: only the entry says so.
    let old = CtValueV1 {
        nat_addr: u32::from_ne_bytes([10, 244, 1, 3]),
        nat_port: 8080u16.to_be(),
        flags: CT_MASQUERADE,
        backend_id: 1,
        last_seen: 0,
    };
    let map = aya::maps::MapData::from_pin(&path).unwrap();
    let mut v1: HashMap<_, CtKey, CtValueV1> =
        HashMap::try_from(aya::maps::Map::LruHashMap(map)).unwrap();
    v1.insert(forward, old, 0).unwrap();
    drop(v1);

    let mut harness = Harness::new();
    let moved = migrate_v1(&path, &mut harness.maps, now_seconds()).unwrap();
    assert_eq!(moved, 1);
    assert!(!path.exists(), "the old map is unpinned");
    let migrated = harness.maps.conntrack().get(&forward, 0).unwrap();
    assert_eq!(migrated.client_port, forward.sport);
    assert_eq!(migrated.flags, CT_MASQUERADE | CT_ESTABLISHED);
    assert_eq!(backend(&harness, &tcp(ACK)), NEW, "the flow stays where it was");
    let _ = std::fs::remove_dir(&dir);
}

/// The LRU may take an established flow's reply entry: the flow's other
/// entries are looked at on its first packet in a new second (not on every
/// packet, which would double an established packet's cost), and the reply
/// entry comes back then.
#[test]
fn an_evicted_reply_entry_comes_back_within_a_second() {
    let mut harness = Harness::new();
    let request = tcp(ACK);
    let (_, out) = harness.run(Prog::Xdp, &request.bytes());
    assert_eq!(out, request.with_dst(OLD).bytes());
    let reply = Packet::tcp(OLD, CLIENT);
    let reply_key = |harness: &mut Harness| {
        harness
            .maps
            .conntrack()
            .keys()
            .map(|k| k.unwrap())
            .find(|k| k.dir == forwarder_common::CT_REPLY)
    };
    let key = reply_key(&mut harness).expect("a reply entry");
    harness.maps.conntrack().remove(&key).unwrap();
    harness.run(Prog::Xdp, &request.bytes());
    assert_eq!(reply_key(&mut harness), None, "looked for once a second only");
    assert_eq!(harness.run(Prog::TcEgress, &reply.bytes()).1, reply.bytes(), "not restored yet");

    harness.advance(1);
    harness.run(Prog::Xdp, &request.bytes());
    assert_eq!(reply_key(&mut harness), Some(key));
    let (_, out) = harness.run(Prog::TcEgress, &reply.bytes());
    assert_eq!(out, reply.with_src(NODE_PORT).bytes(), "the reply shows the NodePort again");
}

/// A client that reopens one source port over and over towards a frontend
/// whose tuple after DNAT another live flow holds: every reopening is moved
/// again, to the port its previous one had (found by a differential run:
/// each incarnation used to take a new probe port until none was left).
#[test]
fn a_clashing_flow_reopened_again_and_again_keeps_getting_through() {
    let harness = Harness::new();
    let client = "192.168.10.2:41000";
    let via_cluster_ip = Packet::tcp(client, "10.96.0.10:80");
    harness.run(Prog::Xdp, &via_cluster_ip.bytes());
    let mut ports = BTreeSet::new();
    for _ in 0..40 {
        for flags in [SYN, ACK, RST] {
            let packet = Packet { tcp_flags: flags, ..Packet::tcp(client, NODE_PORT) };
            let (verdict, out) = harness.run(Prog::Xdp, &packet.bytes());
            assert_eq!(verdict, XDP_PASS, "{:?}", harness.stats());
            ports.insert(source_port(&out));
        }
    }
    assert_eq!(ports.len(), 1, "one moved port for every incarnation: {ports:?}");
    assert!(!ports.contains(&41000));
}
