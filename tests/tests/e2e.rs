//! End-to-end: real sockets across namespaces, forwarder running in the node.
use std::{
    collections::BTreeSet,
    io::ErrorKind,
    time::{Duration, Instant},
};

use forwarder_tests::{
    echo::{
        EchoConn, EchoServer, UdpClient, tcp_connect_error, tcp_once, tcp_once_seen, tcp_upload,
        udp_connected_error, udp_large, udp_once, udp_once_connected,
    },
    forwarder::{Forwarder, attachments},
    manifest::{ManifestCopy, demo_manifest},
    netns::NetNs,
    sctp::{self, SctpEcho, sctp_once},
    topology::{CLIENT_IP, NODE_IFACE, NODE_IP, NODE_NAME, POD_GATEWAY, Topology},
};

const CLUSTER_IP: &str = "10.96.0.10";

struct Setup {
    forwarder: Forwarder,
    _servers: Vec<EchoServer>,
    manifest: ManifestCopy,
    topology: Topology,
}

fn setup(tag: &str) -> Setup {
    setup_with(tag, None)
}

/// The topology with echo servers on pod-a and pod-b, and forwarder running
/// on `manifest` (the demo's by default).
fn setup_with(tag: &str, manifest: Option<&str>) -> Setup {
    let topology = Topology::new(tag);
    let servers = ["pod-a", "pod-b"]
        .iter()
        .map(|name| EchoServer::start(&topology.pod(name).ns, name))
        .collect();
    let manifest = match manifest {
        Some(text) => ManifestCopy::with_text(&topology, text),
        None => ManifestCopy::new(&topology),
    };
    let forwarder = Forwarder::start(&topology.node, &manifest.0, NODE_NAME, NODE_IFACE);
    Setup { forwarder, _servers: servers, manifest, topology }
}

/// Asks over new TCP connections until both pods answered (or panics).
fn tcp_reaches_both(client: &NetNs, frontend: &str, forwarder: &Forwarder) {
    let mut seen = BTreeSet::new();
    for _ in 0..64 {
        let who = tcp_once(client, frontend)
            .unwrap_or_else(|e| panic!("TCP to {frontend}: {e}\n{}", forwarder.log_text()));
        seen.insert(who);
        if seen.len() == 2 {
            return;
        }
    }
    panic!("TCP to {frontend} reached only {seen:?}");
}

fn udp_reaches_both(client: &NetNs, frontend: &str, forwarder: &Forwarder) {
    let mut seen = BTreeSet::new();
    for _ in 0..64 {
        let (who, from) = udp_once(client, frontend)
            .unwrap_or_else(|e| panic!("UDP to {frontend}: {e}\n{}", forwarder.log_text()));
        assert_eq!(from.to_string(), frontend, "reply must come from the frontend");
        seen.insert(who);
        if seen.len() == 2 {
            return;
        }
    }
    panic!("UDP to {frontend} reached only {seen:?}");
}

/// Asks over new SCTP associations until both pods answered; returns the
/// client addresses they saw.
fn sctp_reaches_both(client: &NetNs, frontend: &str, forwarder: &Forwarder) -> BTreeSet<String> {
    let (mut pods, mut seen) = (BTreeSet::new(), BTreeSet::new());
    for _ in 0..64 {
        let (pod, from) = sctp_once(client, frontend).unwrap_or_else(|e| {
            panic!("SCTP from {} to {frontend}: {e}\n{}", client.name, forwarder.log_text())
        });
        pods.insert(pod);
        seen.insert(from.split(':').next().unwrap_or_default().to_owned());
        if pods.len() == 2 {
            return seen;
        }
    }
    panic!("SCTP to {frontend} reached only {pods:?}");
}

// TCP replies must come from the frontend too, or the handshake would not
// complete: every successful TCP request proves it.

#[test]
fn nodeport_from_external_client_reaches_both_pods() {
    let s = setup("np");
    let tcp = format!("{NODE_IP}:30080");
    tcp_reaches_both(&s.topology.client, &tcp, &s.forwarder);
    udp_reaches_both(&s.topology.client, &format!("{NODE_IP}:30053"), &s.forwarder);
}

#[test]
fn cluster_ip_from_a_pod_reaches_both_pods() {
    let s = setup("cip");
    let client = &s.topology.pod("pod-c").ns;
    tcp_reaches_both(client, &format!("{CLUSTER_IP}:80"), &s.forwarder);
    udp_reaches_both(client, &format!("{CLUSTER_IP}:53"), &s.forwarder);
}

/// Datagrams larger than the MTU cross in IP fragments, requests and
/// replies alike, through a NodePort from outside and a ClusterIP from a
/// pod, to both pods.
#[test]
fn large_udp_datagrams_cross_in_fragments() {
    let s = setup("frag");
    let nodeport = (&s.topology.client, format!("{NODE_IP}:30053"));
    let cluster_ip = (&s.topology.pod("pod-c").ns, format!("{CLUSTER_IP}:53"));
    for (client, frontend) in [nodeport, cluster_ip] {
        for size in [4 * 1024, 60 * 1024] {
            let mut seen = BTreeSet::new();
            for _ in 0..16 {
                let (who, from) = udp_large(client, &frontend, size).unwrap_or_else(|e| {
                    panic!("{size} bytes to {frontend}: {e}\n{}", s.forwarder.log_text())
                });
                assert_eq!(from.to_string(), frontend, "reply must come from the frontend");
                seen.insert(who);
            }
            assert_eq!(seen.len(), 2, "{size} bytes to {frontend} reached only {seen:?}");
        }
    }
}

/// Path MTU discovery through a NodePort: the pods' links take 1280 bytes
/// while the client's take 1500, so the node answers the client's full
/// segments with "fragmentation needed" about the packet after DNAT. Only
/// translated back to the NodePort does the client's TCP find its socket
/// in the quote, lower its segment size and get 100 KB through.
#[test]
fn path_mtu_discovery_through_a_node_port() {
    let s = setup("pmtu");
    for pod_link in ["veth-a", "veth-b"] {
        s.topology.node.ip(&["link", "set", pod_link, "mtu", "1280"]);
    }
    let frontend = format!("{NODE_IP}:30080");
    for _ in 0..4 {
        tcp_upload(&s.topology.client, &frontend, 100 * 1024, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("100 KB to {frontend}: {e}\n{}", s.forwarder.log_text()));
    }
}

/// A UDP flow whose endpoint leaves moves to another endpoint instead of
/// being blackholed (kube-proxy's stale UDP conntrack cleanup).
#[test]
fn a_udp_flow_moves_when_its_endpoint_leaves() {
    let s = setup("udpstale");
    let client = UdpClient::bind(&s.topology.pod("pod-c").ns).expect("UDP socket");
    let frontend = format!("{CLUSTER_IP}:53");
    let (first, _) = client.ask(&frontend).expect("first answer");
    let ip = s.topology.pod(&first).ip;
    s.manifest.edit(
        &format!("- addresses: [{ip}]\n  conditions: {{ready: true}}"),
        &format!("- addresses: [{ip}]\n  conditions: {{ready: false}}"),
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        // The same socket: the same flow, all along.
        if let Ok((pod, _)) = client.ask(&frontend)
            && pod != first
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the UDP flow stayed on {first}:\n{}",
            s.forwarder.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(s.forwarder.log_text().contains("removed UDP flows"), "{}", s.forwarder.log_text());
}

/// The echo pods behind a LoadBalancer Service with an external IP.
const LOAD_BALANCER: &str = "
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalIPs: [198.51.100.10]
  loadBalancerSourceRanges: [' 192.168.010.0/24 ']
  ports: [{name: tcp, port: 80, targetPort: 8080, nodePort: 30090}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10, ipMode: VIP}, {ip: 203.0.113.11, ipMode: Proxy}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: demo, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{name: tcp, port: 8080}]
endpoints: [{addresses: [10.244.1.2]}, {addresses: [10.244.1.3]}]
---
apiVersion: v1
kind: Service
metadata: {name: lb-closed, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.21
  loadBalancerSourceRanges: [10.0.0.0/8]
  ports: [{name: tcp, port: 80, targetPort: 8080, nodePort: 30091}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.20}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-closed-1, namespace: demo, labels: {kubernetes.io/service-name: lb-closed}}
addressType: IPv4
ports: [{name: tcp, port: 8080}]
endpoints: [{addresses: [10.244.1.2]}]
";

/// The node's own connected UDP socket (a resolver's, a metrics agent's)
/// went straight to a backend at `connect`. When that backend leaves the
/// Service, the socket is closed under its owner (ECONNABORTED, as
/// Cilium does), and a new one reaches a backend that serves; it would
/// otherwise keep talking to a pod no longer in the Service.
#[test]
fn a_node_udp_socket_connected_to_an_endpoint_that_left_is_closed() {
    let s = setup("udpsock");
    let frontend = format!("{CLUSTER_IP}:53");
    let node = &s.topology.node;
    let socket = node.run(|| std::net::UdpSocket::bind("0.0.0.0:0")).expect("UDP socket");
    socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    node.run(|| socket.connect(&frontend)).expect("connect through the ClusterIP");
    socket.send(b"who").unwrap();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("an answer");
    let first = String::from_utf8_lossy(&buf[..n]).split_whitespace().next().unwrap().to_owned();
    let ip = s.topology.pod(&first).ip;
    s.manifest.edit(
        &format!("- addresses: [{ip}]\n  conditions: {{ready: true}}"),
        &format!("- addresses: [{ip}]\n  conditions: {{ready: false}}"),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    // The abort is reported once, to whichever call comes first: a send
    // right after it takes it, and the receive then only times out.
    let aborted = |e: &std::io::Error| e.raw_os_error() == Some(libc::ECONNABORTED);
    loop {
        if socket.send(b"who").as_ref().is_err_and(aborted)
            || socket.recv(&mut buf).as_ref().is_err_and(aborted)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the socket still talks to {first}:\n{}",
            s.forwarder.log_text()
        );
    }
    let (pod, _) = udp_once_connected(node, &frontend).expect("a new socket gets an answer");
    assert_ne!(pod, first);
    assert!(
        s.forwarder.log_text().contains("closed node UDP sockets"),
        "{}",
        s.forwarder.log_text()
    );
}

#[test]
fn external_and_load_balancer_ips_from_external_client() {
    let s = setup_with("lbip", Some(LOAD_BALANCER));
    let client = &s.topology.client;
    tcp_reaches_both(client, "198.51.100.10:80", &s.forwarder);
    tcp_reaches_both(client, "203.0.113.10:80", &s.forwarder);
    tcp_reaches_both(client, &format!("{NODE_IP}:30090"), &s.forwarder);
    // ipMode Proxy: the load balancer delivers to the node, not to that IP.
    assert!(tcp_once(client, "203.0.113.11:80").is_err());
    // Source ranges close the load balancer IP to clients outside them;
    // the NodePort stays open.
    assert_eq!(tcp_connect_error(client, "203.0.113.20:80").0, ErrorKind::TimedOut, "dropped");
    assert_eq!(tcp_once(client, &format!("{NODE_IP}:30091")).expect("NodePort"), "pod-a");
}

const NO_ENDPOINTS: &str = "
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.30
  ports: [{name: tcp, port: 80, nodePort: 30099}, {name: udp, port: 53, protocol: UDP, nodePort: 30098}]
";

/// No endpoints, or a ClusterIP port nobody declares: ICMP port
/// unreachable, so clients see "connection refused" at once.
#[test]
fn no_endpoints_and_unknown_ports_refuse_at_once() {
    let s = setup_with("refuse", Some(NO_ENDPOINTS));
    let pod = &s.topology.pod("pod-c").ns;
    // Some CNIs turn TX offload off on host-side veths: the kernel then
    // completes the pod's partial checksum inside the ICMP quote on the way
    // back, which must leave the ICMP checksum valid.
    s.topology.node.exec(&["ethtool", "-K", "veth-c", "tx", "off"]);
    for (from, frontend) in [
        (&s.topology.node, "10.96.0.30:80".to_owned()),
        (&s.topology.client, format!("{NODE_IP}:30099")),
        (pod, "10.96.0.30:80".to_owned()),
        (pod, "10.96.0.30:81".to_owned()),
        (&s.topology.client, "10.96.0.30:81".to_owned()),
    ] {
        let (kind, took) = tcp_connect_error(from, &frontend);
        assert_eq!(
            kind,
            ErrorKind::ConnectionRefused,
            "TCP to {frontend}:\n{}",
            s.forwarder.log_text()
        );
        assert!(took < Duration::from_secs(1), "TCP to {frontend} took {took:?}");
    }
    assert_eq!(
        udp_connected_error(&s.topology.client, &format!("{NODE_IP}:30098")),
        Some(ErrorKind::ConnectionRefused)
    );
    assert_eq!(udp_connected_error(pod, "10.96.0.30:53"), Some(ErrorKind::ConnectionRefused));
}

/// Host-network processes of the node (kubelet probes, say) reach Services
/// too, through the socket-level programs; getpeername shows the frontend.
#[test]
fn the_node_itself_reaches_cluster_ips_and_node_ports() {
    let s = setup("host");
    let node = &s.topology.node;
    for frontend in [format!("{CLUSTER_IP}:80"), format!("{NODE_IP}:30080")] {
        tcp_reaches_both(node, &frontend, &s.forwarder);
        let conn = EchoConn::connect(node, &frontend).expect("connect");
        assert_eq!(conn.peer_addr().unwrap().to_string(), frontend, "getpeername");
    }
    let seen = tcp_once_seen(node, &format!("{CLUSTER_IP}:80")).expect("request").1;
    assert!(
        seen.starts_with("192.168.10.1:") || seen.starts_with(&format!("{}:", POD_GATEWAY)),
        "{seen}"
    );
    // UDP, as resolvers do it: sendto() on an unconnected socket, and the
    // answer must come from the address asked.
    let udp = UdpClient::bind(node).expect("UDP socket");
    let frontend = format!("{CLUSTER_IP}:53");
    for _ in 0..8 {
        let (_, from) =
            udp.ask(&frontend).unwrap_or_else(|e| panic!("UDP: {e}\n{}", s.forwarder.log_text()));
        assert_eq!(from.to_string(), frontend, "recvfrom must show the frontend");
    }
    // Several queries in flight on one unconnected socket, as musl's
    // resolver sends A and AAAA: each may reach another backend, and every
    // answer must still show the frontend (or the resolver drops it).
    let socket = node.run(|| std::net::UdpSocket::bind("0.0.0.0:0")).expect("UDP socket");
    socket.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    // 24 random picks all alike: 2^-23.
    for _ in 0..24 {
        socket.send_to(b"who", &frontend).expect("sendto");
    }
    let mut pods = BTreeSet::new();
    for _ in 0..24 {
        let mut buf = [0u8; 256];
        let (n, from) = socket.recv_from(&mut buf).expect("every answer arrives");
        assert_eq!(from.to_string(), frontend, "recvfrom must show the frontend");
        pods.insert(
            String::from_utf8_lossy(&buf[..n]).split_whitespace().next().map(str::to_owned),
        );
    }
    assert_eq!(pods.len(), 2, "both backends answered the burst: {pods:?}");
    // A connected UDP socket gets the same.
    let (_, from) = udp_once_connected(node, &frontend).expect("connected UDP");
    assert_eq!(from.to_string(), frontend);
}

#[test]
fn nodeport_from_a_pod_reaches_both_pods() {
    let s = setup("podnp");
    let client = &s.topology.pod("pod-c").ns;
    tcp_reaches_both(client, &format!("{NODE_IP}:30080"), &s.forwarder);
    udp_reaches_both(client, &format!("{NODE_IP}:30053"), &s.forwarder);
}

#[test]
fn frontends_are_unreachable_without_the_datapath() {
    let topology = Topology::new("none");
    let _servers: Vec<EchoServer> =
        ["pod-a", "pod-b"].iter().map(|n| EchoServer::start(&topology.pod(n).ns, n)).collect();
    // Pods themselves are reachable: the topology is sound...
    assert_eq!(tcp_once(&topology.client, "10.244.1.2:8080").expect("direct to pod"), "pod-a");
    // ...but no Service frontend is, until forwarder runs.
    assert!(tcp_once(&topology.client, &format!("{NODE_IP}:30080")).is_err());
    assert!(udp_once(&topology.client, &format!("{NODE_IP}:30053")).is_err());
    assert!(tcp_once(&topology.pod("pod-c").ns, &format!("{CLUSTER_IP}:80")).is_err());
    let rules = topology.node.exec(&[
        "sh",
        "-c",
        "nft list ruleset 2>/dev/null; iptables-save 2>/dev/null; true",
    ]);
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        !rules.contains("DNAT") && !rules.contains("dnat"),
        "netfilter NAT in the topology: {rules}"
    );

    let manifest = ManifestCopy::new(&topology);
    let forwarder = Forwarder::start(&topology.node, &manifest.0, NODE_NAME, NODE_IFACE);
    assert!(
        tcp_once(&topology.client, &format!("{NODE_IP}:30080")).is_ok(),
        "{}",
        forwarder.log_text()
    );
}

/// A stopped agent (a DaemonSet update, a crash) leaves the datapath
/// forwarding; `forwarder cleanup` is what removes it, all of it.
#[test]
fn sigterm_leaves_the_datapath_forwarding_and_cleanup_removes_it() {
    let s = setup("term");
    let attached = attachments(&s.topology.node);
    for expected in [
        "xdp eth-ext fwd_xdp_node",
        "ingress eth-ext fwd_tc_node",
        "egress eth-ext fwd_tc_rnat",
        "ingress veth-a fwd_tc_pod",
        "egress veth-a fwd_tc_rnat",
        "ingress veth-c fwd_tc_pod",
    ] {
        assert!(attached.iter().any(|a| a == expected), "{expected} missing: {attached:?}");
    }
    assert!(
        !attached.iter().any(|a| a.contains("ingress eth-ext fwd_tc_pod")),
        "the pods' program on the node iface: {attached:?}"
    );
    let Setup { mut forwarder, topology, _servers, .. } = s;
    let status = forwarder.stop();
    assert!(status.success(), "exit status {status}");
    assert_eq!(attachments(&topology.node), attached, "SIGTERM leaves every attachment");
    tcp_reaches_both(&topology.client, &format!("{NODE_IP}:30080"), &forwarder);
    tcp_reaches_both(&topology.pod("pod-c").ns, &format!("{CLUSTER_IP}:80"), &forwarder);

    forwarder.cleanup();
    // Links go when their last pin does, which the kernel may finish later.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut attached = attachments(&topology.node);
    while !attached.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        attached = attachments(&topology.node);
    }
    assert!(attached.is_empty(), "programs left attached: {attached:?}");
    let pins: Vec<_> = std::fs::read_dir(forwarder.bpffs_root.as_ref().expect("the tests' bpffs"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(pins.is_empty(), "pins left: {pins:?}");
    assert!(tcp_once(&topology.client, &format!("{NODE_IP}:30080")).is_err());
}

#[test]
fn pod_interfaces_created_after_start_get_the_program() {
    let s = setup("late");
    let late = NetNs::new(format!("{}-late", s.topology.node.name));
    s.topology.node.veth("veth-late", &late, "eth0");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let attached = attachments(&s.topology.node);
        if attached.iter().any(|a| a == "ingress veth-late fwd_tc_pod") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "veth-late never attached: {attached:?}\n{}",
            s.forwarder.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn manifest_edit_applies_live_and_keeps_established_connections() {
    let s = setup("edit");
    let client = &s.topology.client;
    let tcp = format!("{NODE_IP}:30080");
    // An established connection, pinned to whichever pod it got.
    let mut established = EchoConn::connect(client, &tcp).expect("connect");
    let pinned = established.ask().expect("first answer");
    let other = if pinned == "pod-a" { "pod-b" } else { "pod-a" };
    let pinned_ip = s.topology.pod(&pinned).ip;

    // Remove the pinned pod's endpoint: new connections go to the other.
    s.manifest.edit(
        &format!("- addresses: [{pinned_ip}]\n  conditions: {{ready: true}}"),
        &format!("- addresses: [{pinned_ip}]\n  conditions: {{ready: false}}"),
    );
    // Edits apply within 1 s; the margin absorbs parallel tests on 2 cores.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut all_other = false;
    while Instant::now() < deadline {
        let answers: BTreeSet<String> =
            (0..16).map(|_| tcp_once(client, &tcp).expect("request")).collect();
        if answers == BTreeSet::from([other.to_owned()]) {
            all_other = true;
            break;
        }
    }
    assert!(all_other, "endpoint removal not applied within ~1 s:\n{}", s.forwarder.log_text());
    assert_eq!(established.ask().expect("established connection survives"), pinned);

    // Add it back: both are reached again, and the old connection still works.
    s.manifest.edit(
        &format!("- addresses: [{pinned_ip}]\n  conditions: {{ready: false}}"),
        &format!("- addresses: [{pinned_ip}]\n  conditions: {{ready: true}}"),
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let answers: BTreeSet<String> =
            (0..16).map(|_| tcp_once(client, &tcp).expect("request")).collect();
        if answers.len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "endpoint not back:\n{}", s.forwarder.log_text());
    }
    assert_eq!(established.ask().expect("still alive"), pinned);
}

#[test]
fn a_broken_manifest_keeps_the_last_good_state() {
    let s = setup("broken");
    let tcp = format!("{NODE_IP}:30080");
    std::fs::write(&s.manifest.0, "apiVersion: v1\nkind: Service\n  oops: [").unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !s.forwarder.log_text().contains("invalid YAML") {
        assert!(Instant::now() < deadline, "broken file not reported:\n{}", s.forwarder.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(s.forwarder.log_text().contains("keeping its last good objects"));
    tcp_reaches_both(&s.topology.client, &tcp, &s.forwarder);
    udp_reaches_both(&s.topology.client, &format!("{NODE_IP}:30053"), &s.forwarder);
}

/// SCTP through a NodePort (external client) and a ClusterIP (pod),
/// on the port numbers the TCP port uses. CRC offload is off on every
/// sender, so each receiver verifies the CRC32c the programs updated.
/// Kernels without SCTP sockets skip the test, saying so, unless
/// `FORWARDER_REQUIRE_SCTP` is set (the `cargo xtask vm` guests set it).
#[test]
fn sctp_reaches_both_pods_through_nodeport_and_cluster_ip() {
    if !sctp::available() {
        assert!(
            std::env::var_os("FORWARDER_REQUIRE_SCTP").is_none(),
            "FORWARDER_REQUIRE_SCTP is set but this kernel has no SCTP sockets"
        );
        eprintln!("skipped: no SCTP sockets in this kernel (CONFIG_IP_SCTP); the VM tests run it");
        return;
    }
    let demo = std::fs::read_to_string(demo_manifest()).expect("demo manifest");
    let (service_port, slice_port) =
        ("  - name: udp\n", "- {name: udp, protocol: UDP, port: 5353}\n");
    assert!(demo.contains(service_port) && demo.contains(slice_port), "demo manifest changed");
    let manifest = demo
        .replacen(
            service_port,
            &format!("  - {{name: sctp, protocol: SCTP, port: 80, targetPort: 3868, nodePort: 30080}}\n{service_port}"),
            1,
        )
        .replacen(slice_port, &format!("{slice_port}- {{name: sctp, protocol: SCTP, port: 3868}}\n"), 1);
    let s = setup_with("sctp", Some(&manifest));
    let _servers: Vec<SctpEcho> = ["pod-a", "pod-b"]
        .iter()
        .map(|name| SctpEcho::start(&s.topology.pod(name).ns, name).expect("SCTP listener"))
        .collect();
    // The client's interface already computes every checksum itself.
    for pod in &s.topology.pods {
        pod.ns.exec(&["ethtool", "-K", "eth0", "tx-checksum-sctp", "off"]);
    }
    s.topology.node.exec(&["ethtool", "-K", NODE_IFACE, "tx-checksum-sctp", "off"]);

    let seen = sctp_reaches_both(&s.topology.client, &format!("{NODE_IP}:30080"), &s.forwarder);
    assert_eq!(seen, [CLIENT_IP.to_owned()].into(), "local endpoints see the client's address");
    sctp_reaches_both(&s.topology.pod("pod-c").ns, &format!("{CLUSTER_IP}:80"), &s.forwarder);
    // The node's own SCTP sockets are not translated: the kernel runs no
    // cgroup connect hook for SCTP (see the README's known limits).
    // The TCP port with the same number still goes to the TCP targets.
    tcp_reaches_both(&s.topology.client, &format!("{NODE_IP}:30080"), &s.forwarder);
}

/// Started exactly as the README tells a user (every flag but the three
/// it names at its default), under `ip netns exec`, which leaves no bpffs
/// at /sys/fs/bpf, on a node interface whose veth peer runs no XDP
/// program (a container used as a node): NodePort, ClusterIP and rejects
/// all work.
#[test]
fn runs_with_the_readmes_flags_on_a_bare_node() {
    let topology = Topology::new("readme");
    let _servers: Vec<_> =
        ["pod-a", "pod-b"].iter().map(|n| EchoServer::start(&topology.pod(n).ns, n)).collect();
    let demo = std::fs::read_to_string(demo_manifest()).expect("demo manifest");
    let manifest = ManifestCopy::with_text(&topology, &format!("{demo}\n---\n{NO_ENDPOINTS}"));
    let forwarder = Forwarder::start_as_readme(&topology.node, &manifest.0, NODE_NAME, NODE_IFACE);
    let pod = &topology.pod("pod-c").ns;
    tcp_reaches_both(&topology.client, &format!("{NODE_IP}:30080"), &forwarder);
    udp_reaches_both(&topology.client, &format!("{NODE_IP}:30053"), &forwarder);
    tcp_reaches_both(pod, &format!("{CLUSTER_IP}:80"), &forwarder);
    udp_reaches_both(pod, &format!("{CLUSTER_IP}:53"), &forwarder);
    for (from, frontend) in [
        (&topology.client, format!("{NODE_IP}:30099")),
        (&topology.client, "10.96.0.30:81".to_owned()),
        (pod, "10.96.0.30:80".to_owned()),
    ] {
        let (kind, took) = tcp_connect_error(from, &frontend);
        assert_eq!(
            kind,
            ErrorKind::ConnectionRefused,
            "TCP to {frontend}:\n{}",
            forwarder.log_text()
        );
        assert!(took < Duration::from_secs(1), "TCP to {frontend} took {took:?}");
    }
    assert_eq!(
        udp_connected_error(&topology.client, &format!("{NODE_IP}:30098")),
        Some(ErrorKind::ConnectionRefused)
    );
}

/// Two Services whose only endpoint is pod-a.
const SHARED_BACKEND: &str = "
apiVersion: v1
kind: Service
metadata: {name: one, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.0.40, ports: [{name: tcp, port: 80, nodePort: 30400}]}
---
apiVersion: v1
kind: Service
metadata: {name: two, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.0.41, ports: [{name: tcp, port: 80, nodePort: 30401}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: one-a, namespace: demo, labels: {kubernetes.io/service-name: one}}
addressType: IPv4
ports: [{name: tcp, protocol: TCP, port: 8080}]
endpoints: [{addresses: [10.244.1.2], conditions: {ready: true}, nodeName: node-a}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: two-a, namespace: demo, labels: {kubernetes.io/service-name: two}}
addressType: IPv4
ports: [{name: tcp, protocol: TCP, port: 8080}]
endpoints: [{addresses: [10.244.1.2], conditions: {ready: true}, nodeName: node-a}]
";

/// One client port used towards two Services that share their only
/// backend, at the same time: after DNAT both connections would be one, so
/// the second one's source port is moved (netfilter's clash resolution)
/// and both work, from a pod and from outside.
#[test]
fn one_client_port_reaches_two_services_sharing_their_backend() {
    let demo = std::fs::read_to_string(demo_manifest()).expect("demo manifest");
    let s = setup_with("clash", Some(&format!("{demo}\n---\n{SHARED_BACKEND}")));
    let pod = &s.topology.pod("pod-c").ns;
    let node_port = |port: u16| format!("{NODE_IP}:{port}");
    for (from, frontends) in [
        (pod, ["10.96.0.40:80".to_owned(), "10.96.0.41:80".to_owned()]),
        (&s.topology.client, [node_port(30400), node_port(30401)]),
    ] {
        let mut connections: Vec<EchoConn> = frontends
            .iter()
            .map(|frontend| {
                EchoConn::connect_from(from, 45000, frontend).unwrap_or_else(|e| {
                    panic!("from port 45000 to {frontend}: {e}\n{}", s.forwarder.log_text())
                })
            })
            .collect();
        for _ in 0..3 {
            for (conn, frontend) in connections.iter_mut().zip(&frontends) {
                let who = conn.ask().unwrap_or_else(|e| panic!("asking {frontend}: {e}"));
                assert_eq!(who, "pod-a", "{frontend}");
                assert_eq!(conn.peer_addr().unwrap().to_string(), *frontend);
            }
        }
    }
}
