//! Service semantics across two nodes, each running its own forwarder:
//! masquerading to endpoints on other nodes, traffic policies, hairpin.
use std::collections::BTreeSet;

use forwarder_tests::{
    cluster::{CLIENT_IP, Cluster, NODE_IFACE},
    echo::{
        EchoConn, EchoServer, tcp_connect_error, tcp_once, tcp_once_seen, tcp_upload, udp_large,
    },
    forwarder::{Forwarder, http_get},
    netns::NetNs,
};

const MANIFEST: &str = "
apiVersion: v1
kind: Service
metadata: {name: spread, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.0.11, externalTrafficPolicy: Local, healthCheckNodePort: 32000,
       ports: [{port: 80, targetPort: 8080, nodePort: 30081}]}
---
apiVersion: v1
kind: Service
metadata: {name: local-b-only, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.0.12, externalTrafficPolicy: Local, healthCheckNodePort: 32001,
       ports: [{port: 80, targetPort: 8080, nodePort: 30082}]}
---
apiVersion: v1
kind: Service
metadata: {name: itp, namespace: demo}
spec: {clusterIP: 10.96.0.13, internalTrafficPolicy: Local, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: self, namespace: demo}
spec: {clusterIP: 10.96.0.14, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.0.15, sessionAffinity: ClientIP,
       sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}},
       ports: [{port: 80, targetPort: 8080, nodePort: 30085}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-1, namespace: demo, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.2], nodeName: node-a}, {addresses: [10.244.2.2], nodeName: node-b}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: spread-1, namespace: demo, labels: {kubernetes.io/service-name: spread}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.2], nodeName: node-a}, {addresses: [10.244.2.2], nodeName: node-b}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: demo, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.2], nodeName: node-a}, {addresses: [10.244.2.2], nodeName: node-b}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-b-only-1, namespace: demo, labels: {kubernetes.io/service-name: local-b-only}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.2.2], nodeName: node-b}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: itp-1, namespace: demo, labels: {kubernetes.io/service-name: itp}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.2], nodeName: node-a}, {addresses: [10.244.2.2], nodeName: node-b}]
---
apiVersion: v1
kind: Service
metadata: {name: remote, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.0.16, ports: [{name: tcp, port: 80, targetPort: 8080, nodePort: 30086},
       {name: udp, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30087}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: remote-1, namespace: demo, labels: {kubernetes.io/service-name: remote}}
addressType: IPv4
ports: [{name: tcp, port: 8080}, {name: udp, protocol: UDP, port: 5353}]
endpoints: [{addresses: [10.244.2.2], nodeName: node-b}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: self-1, namespace: demo, labels: {kubernetes.io/service-name: self}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.2], nodeName: node-a}]
---
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
---
apiVersion: v1
kind: Node
metadata: {name: node-b, labels: {topology.kubernetes.io/zone: zone-b}}
---
apiVersion: v1
kind: Service
metadata: {name: near, namespace: demo}
spec: {clusterIP: 10.96.0.17, trafficDistribution: PreferClose, ports: [{port: 80, targetPort: 8080}]}
---
# Hints as the EndpointSlice controller could write them for lopsided
# zones: each zone is sent to the other node's pod.
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: near-1, namespace: demo, labels: {kubernetes.io/service-name: near}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.2], nodeName: node-a, hints: {forZones: [{name: zone-b}]}}
- {addresses: [10.244.2.2], nodeName: node-b, hints: {forZones: [{name: zone-a}]}}
";

struct Setup {
    forwarders: Vec<Forwarder>,
    _servers: Vec<EchoServer>,
    _manifest: Manifest,
    cluster: Cluster,
}

struct Manifest(std::path::PathBuf);

impl Drop for Manifest {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn setup(tag: &str) -> Setup {
    let cluster = Cluster::new(tag);
    let servers = ["pod-a1", "pod-b1"]
        .iter()
        .map(|name| EchoServer::start(&cluster.pod(name).ns, name))
        .collect();
    let manifest =
        Manifest(std::env::temp_dir().join(format!("{}-cluster.yaml", cluster.switch.name)));
    std::fs::write(&manifest.0, MANIFEST).expect("write manifest");
    let forwarders = cluster
        .nodes
        .iter()
        .map(|node| Forwarder::start(&node.ns, &manifest.0, node.name, NODE_IFACE))
        .collect();
    Setup { forwarders, _servers: servers, _manifest: manifest, cluster }
}

impl Setup {
    fn logs(&self) -> String {
        self.forwarders.iter().map(Forwarder::log_text).collect::<Vec<_>>().join("\n---\n")
    }

    /// Who answers over many new connections, and the client address each
    /// pod saw (the port dropped).
    fn answers(&self, from: &NetNs, frontend: &str) -> BTreeSet<(String, String)> {
        (0..24)
            .map(|_| {
                let (pod, seen) = tcp_once_seen(from, frontend)
                    .unwrap_or_else(|e| panic!("TCP to {frontend}: {e}\n{}", self.logs()));
                let seen_ip = seen.rsplit_once(':').map_or(seen.clone(), |(ip, _)| ip.to_owned());
                (pod, seen_ip)
            })
            .collect()
    }
}

fn set(pairs: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    pairs.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
}

/// eTP Cluster: both endpoints; the one on the other node sees the node's
/// address (masqueraded), the local one sees the client.
#[test]
fn nodeport_reaches_other_nodes_masqueraded() {
    let s = setup("mnp");
    let answers = s.answers(&s.cluster.client, "192.168.20.1:30080");
    assert_eq!(answers, set(&[("pod-a1", CLIENT_IP), ("pod-b1", "192.168.20.1")]), "{}", s.logs());
}

/// Pod to ClusterIP is not masqueraded, on this node or another.
#[test]
fn cluster_ip_from_a_pod_is_not_masqueraded() {
    let s = setup("mcip");
    let answers = s.answers(&s.cluster.pod("pod-a2").ns, "10.96.0.10:80");
    assert_eq!(answers, set(&[("pod-a1", "10.244.1.3"), ("pod-b1", "10.244.1.3")]), "{}", s.logs());
}

/// eTP Local: each node serves its own endpoint, with the client's address.
#[test]
fn external_traffic_policy_local_keeps_the_client_address() {
    let s = setup("metp");
    let client = &s.cluster.client;
    assert_eq!(
        s.answers(client, "192.168.20.1:30081"),
        set(&[("pod-a1", CLIENT_IP)]),
        "{}",
        s.logs()
    );
    assert_eq!(
        s.answers(client, "192.168.20.2:30081"),
        set(&[("pod-b1", CLIENT_IP)]),
        "{}",
        s.logs()
    );
    // Node a has no endpoint of local-b-only: dropped there, served by b.
    assert_eq!(tcp_connect_error(client, "192.168.20.1:30082").0, std::io::ErrorKind::TimedOut);
    assert_eq!(s.answers(client, "192.168.20.2:30082"), set(&[("pod-b1", CLIENT_IP)]));
    // Pods on node a still reach it (internal traffic policy Cluster).
    let pod = &s.cluster.pod("pod-a2").ns;
    assert_eq!(
        s.answers(pod, "192.168.20.1:30082"),
        set(&[("pod-b1", "10.244.1.3")]),
        "{}",
        s.logs()
    );
}

/// iTP Local: pods use only endpoints on their node.
#[test]
fn internal_traffic_policy_local() {
    let s = setup("mitp");
    let answers = s.answers(&s.cluster.pod("pod-a2").ns, "10.96.0.13:80");
    assert_eq!(answers, set(&[("pod-a1", "10.244.1.3")]), "{}", s.logs());
}

/// Topology hints (`trafficDistribution`): each node's clients use the
/// endpoints hinted for the node's zone, wherever those run.
#[test]
fn topology_hints_steer_each_zone() {
    let s = setup("mtop");
    let from_a = s.answers(&s.cluster.pod("pod-a2").ns, "10.96.0.17:80");
    assert_eq!(from_a, set(&[("pod-b1", "10.244.1.3")]), "{}", s.logs());
    let from_b = s.answers(&s.cluster.pod("pod-b1").ns, "10.96.0.17:80");
    assert_eq!(from_b, set(&[("pod-a1", "10.244.2.2")]), "{}", s.logs());
}

/// A pod reaching itself through its own Service gets its answer back.
#[test]
fn hairpin() {
    let s = setup("mhp");
    let (pod, _) = tcp_once_seen(&s.cluster.pod("pod-a1").ns, "10.96.0.14:80")
        .unwrap_or_else(|e| panic!("hairpin: {e}\n{}", s.logs()));
    assert_eq!(pod, "pod-a1");
}

/// `sessionAffinity: ClientIP`: every new connection of a client goes to
/// the same pod, from a pod and from outside.
#[test]
fn session_affinity_keeps_a_client_on_one_pod() {
    let s = setup("maff");
    let from_pod = s.answers(&s.cluster.pod("pod-a2").ns, "10.96.0.15:80");
    assert_eq!(from_pod.len(), 1, "pod client spread over {from_pod:?}");
    let from_outside = s.answers(&s.cluster.client, "192.168.20.1:30085");
    assert_eq!(from_outside.len(), 1, "external client spread over {from_outside:?}");
}

/// Health check node ports answer per node: 200 and the count where the
/// node has endpoints of the Service, 503 where it has none.
#[test]
fn health_check_node_ports() {
    let s = setup("mhc");
    let client = &s.cluster.client;
    let get = |addr: &str| {
        http_get(client, addr, "/").unwrap_or_else(|| panic!("no answer from {addr}\n{}", s.logs()))
    };
    let (status, body) = get("192.168.20.1:32000");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""localEndpoints": 1"#), "{body}");
    assert_eq!(get("192.168.20.1:32001").0, 503);
    assert_eq!(get("192.168.20.2:32001").0, 200);
    assert!(get("192.168.20.2:32001").1.contains(r#""name": "local-b-only""#));
}

/// A storm of short connections from one client to a NodePort whose only
/// endpoint is on the other node: every one is masqueraded, and more of
/// them close within the close timeout than the 4,536 ports masquerading
/// used to have. None may fail.
#[test]
fn a_connection_storm_to_a_masqueraded_node_port_loses_nothing() {
    const CONNECTIONS: usize = 8_000;
    const THREADS: usize = 8;
    let s = setup("mstorm");
    let started = std::time::Instant::now();
    let failures: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                scope.spawn(|| {
                    (0..CONNECTIONS / THREADS)
                        .filter_map(|_| match tcp_once(&s.cluster.client, "192.168.20.1:30086") {
                            Ok(pod) if pod == "pod-b1" => None,
                            Ok(pod) => Some(format!("answered by {pod}")),
                            Err(error) => Some(error.to_string()),
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("storm thread")).collect()
    });
    let took = started.elapsed();
    assert!(
        failures.is_empty(),
        "{} of {CONNECTIONS} connections failed in {took:?} (first: {:?})\n{}",
        failures.len(),
        failures.first(),
        s.logs()
    );
    eprintln!("{CONNECTIONS} masqueraded connections in {took:?}, none failed");
}

/// A connection of the node's own that gets the port a masqueraded flow
/// holds to the same endpoint (masquerade ports include the node's
/// ephemeral range, where the kernel picks the node's ports without knowing
/// of masquerading) is moved to another port: both connections work, and
/// each gets its own answers.
#[test]
fn a_node_connection_on_a_masqueraded_flows_port_works_beside_it() {
    let s = setup("mclash");
    let fail = |what: &str, e: std::io::Error| -> ! { panic!("{what}: {e}\n{}", s.logs()) };
    let mut client = EchoConn::connect_from(&s.cluster.client, 45000, "192.168.20.1:30086")
        .unwrap_or_else(|e| fail("client through the NodePort", e));
    let seen_by_pod = client.ask_seen().unwrap_or_else(|e| fail("client asks", e));
    assert_eq!(seen_by_pod, ("pod-b1".to_owned(), "192.168.20.1:45000".to_owned()));
    let node = &s.cluster.node("node-a").ns;
    let mut own = EchoConn::connect_from(node, 45000, "10.244.2.2:8080")
        .unwrap_or_else(|e| fail("node-a's own connection from the same port", e));
    let (pod, seen) = own.ask_seen().unwrap_or_else(|e| fail("node-a asks", e));
    assert_eq!(pod, "pod-b1");
    assert!(seen.starts_with("192.168.20.1:") && seen != "192.168.20.1:45000", "{seen}");
    for _ in 0..3 {
        assert_eq!(client.ask_seen().unwrap_or_else(|e| fail("client again", e)), seen_by_pod);
        assert_eq!(own.ask_seen().unwrap_or_else(|e| fail("node again", e)).1, seen);
    }
}

/// Datagrams larger than the MTU to an endpoint on the other node, both
/// ways in IP fragments: masqueraded through a NodePort from outside, and
/// from a pod through a ClusterIP (not masqueraded, reverse NAT on the way
/// back).
#[test]
fn large_udp_datagrams_cross_nodes_in_fragments() {
    let s = setup("mfrag");
    let nodeport = (&s.cluster.client, "192.168.20.1:30087");
    let cluster_ip = (&s.cluster.pod("pod-a2").ns, "10.96.0.16:53");
    for (client, frontend) in [nodeport, cluster_ip] {
        for size in [4 * 1024, 60 * 1024] {
            for _ in 0..4 {
                let (who, from) = udp_large(client, frontend, size)
                    .unwrap_or_else(|e| panic!("{size} bytes to {frontend}: {e}\n{}", s.logs()));
                assert_eq!((who.as_str(), from.to_string().as_str()), ("pod-b1", frontend));
            }
        }
    }
}

/// Path MTU discovery through a masqueraded NodePort: the other node's pod
/// link takes 1280 bytes, so that node answers the masqueraded segments
/// with "fragmentation needed" to this node's address. XDP restores the
/// client in the quote, egress the NodePort; the client's TCP adapts and
/// 100 KB get through.
#[test]
fn path_mtu_discovery_through_a_masqueraded_node_port() {
    let s = setup("mpmtu");
    s.cluster.node("node-b").ns.ip(&["link", "set", "veth-b1", "mtu", "1280"]);
    for _ in 0..4 {
        let within = std::time::Duration::from_secs(10);
        let pod = tcp_upload(&s.cluster.client, "192.168.20.1:30086", 100 * 1024, within)
            .unwrap_or_else(|e| panic!("100 KB through the NodePort: {e}\n{}", s.logs()));
        assert_eq!(pod, "pod-b1");
    }
}
