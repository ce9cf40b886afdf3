//! The datapath outlives the agent: under continuous traffic, an agent
//! killed with SIGKILL, or stopped with SIGTERM, and started again (a crash,
//! a DaemonSet rolling update) loses no request and no established
//! connection; what changed while no agent ran is applied on start.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use forwarder_common::{Backend, map_names};
use forwarder_tests::{
    api_cluster::{Cluster, create_echo_service, create_echo_slice},
    echo::{EchoConn, EchoServer, UdpClient, tcp_once, udp_once, under_traffic},
    forwarder::{Forwarder, other_build},
    manifest::ManifestCopy,
    topology::{NODE_IFACE, NODE_IP, NODE_NAME, Topology},
};

/// Between two new connections under way.
const PAUSE: Duration = Duration::from_millis(5);

/// The one-node topology with echo servers on pod-a and pod-b, and an
/// agent on a private copy of the demo manifest.
fn start(tag: &str) -> (Topology, Vec<EchoServer>, ManifestCopy, Forwarder) {
    let topology = Topology::new(tag);
    let servers = ["pod-a", "pod-b"]
        .iter()
        .map(|name| EchoServer::start(&topology.pod(name).ns, name))
        .collect();
    let manifest = ManifestCopy::new(&topology);
    let forwarder = Forwarder::start(&topology.node, &manifest.0, NODE_NAME, NODE_IFACE);
    (topology, servers, manifest, forwarder)
}

enum Stop {
    Kill,
    Term,
    /// SIGTERM, then another build starts: a DaemonSet image update.
    Upgrade,
    /// As `Upgrade`, to a build whose node addresses' map has another
    /// layout (another name): it starts empty.
    UpgradeToNewLayout,
}

fn survives(tag: &str, how: Stop) {
    let (topology, _servers, _manifest, mut forwarder) = start(tag);
    let nodeport = format!("{NODE_IP}:30080");
    let mut established = EchoConn::connect(&topology.client, &nodeport).expect("connect");
    let first = established.ask().expect("first answer");
    // A UDP flow: one socket, one source port, one conntrack entry.
    let udp = UdpClient::bind(&topology.client).expect("UDP socket");
    let udp_frontend = format!("{NODE_IP}:30053");
    let (udp_first, _) = udp.ask(&udp_frontend).expect("first UDP answer");

    let (sent, failures) = under_traffic(&topology.client, &nodeport, PAUSE, || {
        std::thread::sleep(Duration::from_millis(200));
        match how {
            Stop::Kill => forwarder.kill(),
            Stop::Term | Stop::Upgrade | Stop::UpgradeToNewLayout => {
                forwarder.stop();
            }
        }
        if let Stop::UpgradeToNewLayout = how {
            // The running programs keep the map; the new build sees none.
            let pin = pin_path(&forwarder, map_names::NODE_IPS);
            std::fs::remove_file(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
        }
        // No agent: the pinned programs and maps keep serving.
        std::thread::sleep(Duration::from_millis(500));
        match how {
            Stop::Upgrade | Stop::UpgradeToNewLayout => {
                forwarder.upgrade(&topology.node, other_build());
            }
            Stop::Kill | Stop::Term => forwarder.restart(&topology.node),
        }
        std::thread::sleep(Duration::from_millis(300));
    });
    assert!(sent > 20, "too little traffic to tell ({sent})");
    assert!(
        failures.is_empty(),
        "{} of {sent} connections failed: {failures:?}\n{}",
        failures.len(),
        forwarder.log_text()
    );
    assert_eq!(established.ask().expect("the established connection lives"), first);
    let (udp_again, _) = udp.ask(&udp_frontend).expect("the UDP flow lives");
    assert_eq!(udp_again, udp_first, "the UDP flow keeps its backend");
    let log = forwarder.log_text();
    assert!(log.contains("adopted the state a previous agent left"), "{log}");
    // Swapped into the pinned link, not detached and attached again.
    assert!(log.contains("XDP program replaced in place"), "{log}");
}

#[test]
fn sigkill_and_restart_lose_no_connection() {
    survives("kill9", Stop::Kill);
}

#[test]
fn sigterm_and_restart_lose_no_connection() {
    survives("term", Stop::Term);
}

/// Another build (the release one after the debug one: different
/// binaries, programs loaded anew) takes over the same pins.
#[test]
fn an_upgrade_to_another_build_loses_no_connection() {
    survives("upgrade", Stop::Upgrade);
}

/// The node addresses are written before the new programs replace the
/// old ones: NodePorts stay served when the new build brings that map empty.
#[test]
fn an_upgrade_with_a_new_address_map_layout_loses_no_connection() {
    survives("layout", Stop::UpgradeToNewLayout);
}

/// An endpoint removed while no agent ran stops receiving new flows once
/// the next agent starts; UDP still flows through the pinned maps meanwhile.
#[test]
fn changes_made_while_no_agent_ran_apply_on_start() {
    let (topology, _servers, manifest, mut forwarder) = start("offline");
    forwarder.kill();
    manifest.edit(
        "- addresses: [10.244.1.3]\n  conditions: {ready: true}",
        "- addresses: [10.244.1.3]\n  conditions: {ready: false}",
    );
    let (pod, _) = udp_once(&topology.client, &format!("{NODE_IP}:30053")).expect("UDP, no agent");
    assert!(pod == "pod-a" || pod == "pod-b");
    let backends_before = pinned_backends(&forwarder);
    forwarder.restart(&topology.node);
    let answered: BTreeSet<String> = (0..24)
        .filter_map(|_| tcp_once(&topology.client, &format!("{NODE_IP}:30080")).ok())
        .collect();
    assert_eq!(answered, ["pod-a".to_owned()].into(), "{}", forwarder.log_text());
    // Restored, then swept: pod-b's backends (TCP and UDP) are gone from
    // the map, pod-a's kept their ids.
    let backends_after = pinned_backends(&forwarder);
    let pod_a: BTreeMap<u32, String> =
        backends_before.into_iter().filter(|(_, b)| b.starts_with("10.244.1.2:")).collect();
    assert_eq!(backends_after, pod_a, "{}", forwarder.log_text());
}

/// A UDP client on one fixed port (a node-local DNS cache, statsd) whose
/// endpoint was removed while no agent ran moves to another on restart,
/// instead of staying on the removed one for as long as it keeps sending.
#[test]
fn a_udp_flow_whose_endpoint_left_while_no_agent_ran_moves_on_restart() {
    let (topology, _servers, manifest, mut forwarder) = start("udpoffline");
    let client = UdpClient::bind(&topology.client).expect("UDP socket");
    let frontend = format!("{NODE_IP}:30053");
    let (first, _) = client.ask(&frontend).expect("first answer");
    forwarder.stop();
    let ip = topology.pod(&first).ip;
    manifest.edit(
        &format!("- addresses: [{ip}]\n  conditions: {{ready: true}}"),
        &format!("- addresses: [{ip}]\n  conditions: {{ready: false}}"),
    );
    // No agent: the pinned maps keep serving the flow where it was.
    assert_eq!(client.ask(&frontend).expect("answer, no agent").0, first);
    forwarder.restart(&topology.node);
    let (moved, _) = client.ask(&frontend).expect("answer after restart");
    assert_ne!(moved, first, "the flow stayed on the removed endpoint:\n{}", forwarder.log_text());
}

/// Backend id -> `address:port` in the agent's pinned backends map.
fn pin_path(forwarder: &Forwarder, map: &str) -> std::path::PathBuf {
    forwarder.bpffs_root.as_ref().expect("the tests' bpffs").join(NODE_NAME).join(map)
}

fn pinned_backends(forwarder: &Forwarder) -> BTreeMap<u32, String> {
    let path = pin_path(forwarder, map_names::BACKENDS);
    let map = MapData::from_pin(&path).expect("pinned backends map");
    let backends: HashMap<_, u32, Backend> = HashMap::try_from(Map::HashMap(map)).expect("hash");
    backends
        .iter()
        .map(|entry| {
            let (id, b) = entry.expect("readable");
            (id, format!("{}:{}", Ipv4Addr::from(b.addr.to_ne_bytes()), u16::from_be(b.port)))
        })
        .collect()
}
/// The same against the API server: the new agent waits for its lists and
/// adopts the maps, while the old programs keep serving.
#[test]
fn sigkill_and_restart_against_the_apiserver_lose_no_connection() {
    let mut cluster = Cluster::new("apikill");
    let (cluster_ip, _) = create_echo_service(&cluster);
    create_echo_slice(&cluster, &["10.244.1.2", "10.244.1.3"]);
    cluster.start_forwarder();
    let Cluster { forwarder, topology, .. } = &mut cluster;
    let forwarder = forwarder.as_mut().expect("started");
    let pod_c = &topology.pod("pod-c").ns;
    let frontend = format!("{cluster_ip}:80");
    let mut established = EchoConn::connect(pod_c, &frontend).expect("connect");
    let first = established.ask().expect("first answer");
    let (sent, failures) = under_traffic(pod_c, &frontend, PAUSE, || {
        std::thread::sleep(Duration::from_millis(200));
        forwarder.kill();
        std::thread::sleep(Duration::from_millis(500));
        forwarder.restart(&topology.node);
        std::thread::sleep(Duration::from_millis(300));
    });
    assert!(sent > 20, "too little traffic to tell ({sent})");
    assert!(failures.is_empty(), "{failures:?}\n{}", forwarder.log_text());
    assert_eq!(established.ask().expect("the established connection lives"), first);
}
