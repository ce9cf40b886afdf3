//! Against a real kube-apiserver (with etcd, both built from the pinned
//! release; see `tests/src/k8s.rs`): Services, EndpointSlices and the Node
//! created, changed and deleted through the API drive real traffic.
use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use forwarder_tests::{
    echo::{EchoServer, tcp_connect_error, tcp_once},
    forwarder::Forwarder,
    k8s::ControlPlane,
    netns::NetNs,
    topology::{NODE_IFACE, NODE_IP, NODE_NAME, Topology},
};
use serde_json::{Value, json};

/// How long a change may take to show in traffic before the test fails
/// (the latency goal itself is measured by the benchmark).
const FOLLOWS_WITHIN: Duration = Duration::from_secs(5);

/// Field order is drop order: the agent stops before the API goes away.
struct Cluster {
    forwarder: Option<Forwarder>,
    _servers: Vec<EchoServer>,
    plane: ControlPlane,
    topology: Topology,
}

/// The one-node topology with echo servers on pod-a and pod-b, and the
/// control plane on the node's loopback, holding this Node and namespace
/// `demo`.
fn cluster(tag: &str) -> Cluster {
    let topology = Topology::new(tag);
    let dir = std::env::temp_dir().join(format!("{}-k8s", topology.node.name));
    let plane = ControlPlane::start(&dir, Some(&topology.node.name))
        .unwrap_or_else(|e| panic!("control plane: {e}"));
    let servers = ["pod-a", "pod-b"]
        .iter()
        .map(|name| EchoServer::start(&topology.pod(name).ns, name))
        .collect();
    let cluster = Cluster { forwarder: None, _servers: servers, plane, topology };
    cluster.call("POST", "/api/v1/nodes", Some(json!({"metadata": {"name": NODE_NAME}})));
    cluster.call(
        "PATCH",
        &format!("/api/v1/nodes/{NODE_NAME}/status"),
        Some(json!({"status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}})),
    );
    cluster.call("POST", "/api/v1/namespaces", Some(json!({"metadata": {"name": "demo"}})));
    cluster
}

impl Cluster {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string());
        let answer = self
            .plane
            .request(method, path, body.as_deref())
            .unwrap_or_else(|e| panic!("API call failed: {e}"));
        serde_json::from_str(&answer).unwrap_or(Value::Null)
    }

    fn start_forwarder(&mut self) -> &Forwarder {
        let node = &self.topology.node;
        self.forwarder
            .insert(Forwarder::start_cluster(node, &self.plane.kubeconfig, NODE_NAME, NODE_IFACE))
    }

    fn log(&self) -> String {
        self.forwarder.as_ref().map(Forwarder::log_text).unwrap_or_default()
    }
}

/// A selector-less NodePort Service (the apiserver allocates its ClusterIP
/// and NodePort); returns both.
fn create_echo_service(cluster: &Cluster) -> (String, u64) {
    let service = cluster.call(
        "POST",
        "/api/v1/namespaces/demo/services",
        Some(json!({
            "metadata": {"name": "echo", "namespace": "demo"},
            "spec": {"type": "NodePort", "ports": [{"name": "tcp", "port": 80, "targetPort": 8080}]}
        })),
    );
    let cluster_ip = service["spec"]["clusterIP"].as_str().expect("allocated clusterIP");
    let node_port = service["spec"]["ports"][0]["nodePort"].as_u64().expect("allocated nodePort");
    (cluster_ip.to_owned(), node_port)
}

fn endpoints(ips: &[&str]) -> Value {
    let list: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": NODE_NAME}))
        .collect();
    Value::Array(list)
}

fn create_echo_slice(cluster: &Cluster, ips: &[&str]) {
    cluster.call(
        "POST",
        "/apis/discovery.k8s.io/v1/namespaces/demo/endpointslices",
        Some(json!({
            "metadata": {"name": "echo-1", "namespace": "demo",
                         "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4",
            "ports": [{"name": "tcp", "protocol": "TCP", "port": 8080}],
            "endpoints": endpoints(ips),
        })),
    );
}

/// The pods that answered `tries` new connections.
fn answering(client: &NetNs, frontend: &str, tries: usize) -> BTreeSet<String> {
    (0..tries).filter_map(|_| tcp_once(client, frontend).ok()).collect()
}

/// Polls until `done` holds, or fails with the agent's log.
fn eventually(cluster: &Cluster, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + FOLLOWS_WITHIN;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {FOLLOWS_WITHIN:?}\n{}", cluster.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn services_and_slices_from_the_api_are_forwarded_and_follow_changes() {
    let mut cluster = cluster("api");
    let (cluster_ip, node_port) = create_echo_service(&cluster);
    create_echo_slice(&cluster, &["10.244.1.2", "10.244.1.3"]);
    cluster.start_forwarder();
    let both: BTreeSet<String> = ["pod-a".to_owned(), "pod-b".to_owned()].into();
    let pod_c = &cluster.topology.pod("pod-c").ns;
    let cluster_ip_frontend = format!("{cluster_ip}:80");
    let node_port_frontend = format!("{NODE_IP}:{node_port}");
    assert_eq!(answering(pod_c, &cluster_ip_frontend, 32), both, "{}", cluster.log());
    assert_eq!(answering(&cluster.topology.client, &node_port_frontend, 32), both);

    // pod-b leaves the slice: new connections go to pod-a only.
    cluster.call(
        "PATCH",
        "/apis/discovery.k8s.io/v1/namespaces/demo/endpointslices/echo-1",
        Some(json!({"endpoints": endpoints(&["10.244.1.2"])})),
    );
    eventually(&cluster, "pod-b leaving", || {
        answering(pod_c, &cluster_ip_frontend, 16) == ["pod-a".to_owned()].into()
    });

    // The Service goes: its frontends stop answering.
    cluster.call("DELETE", "/api/v1/namespaces/demo/services/echo", None);
    eventually(&cluster, "the Service's deletion", || {
        tcp_connect_error(pod_c, &cluster_ip_frontend).0 != std::io::ErrorKind::Other
            && tcp_connect_error(&cluster.topology.client, &node_port_frontend).0
                != std::io::ErrorKind::Other
    });
}

/// The kube-proxy built from the same release syncs its iptables rules
/// from the same apiserver (the benchmark compares against it), in a
/// namespace of its own.
#[test]
fn kube_proxy_syncs_rules_from_the_same_apiserver() {
    let cluster = cluster("kproxy");
    let (cluster_ip, _) = create_echo_service(&cluster);
    create_echo_slice(&cluster, &["10.244.1.2"]);
    let node = &cluster.topology.node;
    let log = cluster.plane.dir.join("kube-proxy.log");
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &node.name])
        .arg(forwarder_tests::k8s::bin_dir().join("kube-proxy"))
        .arg(format!("--kubeconfig={}", cluster.plane.kubeconfig.display()))
        .args(["--proxy-mode=iptables", &format!("--hostname-override={NODE_NAME}")])
        // nf_conntrack_max is global: a test namespace must not change it.
        .arg("--conntrack-max-per-core=0")
        .args(["--metrics-bind-address=127.0.0.1:10249", "--healthz-bind-address=127.0.0.1:10256"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("kube-proxy log"))
        .spawn()
        .expect("kube-proxy starts");
    let _kube_proxy = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rules = node.exec(&["iptables-save", "-t", "nat"]);
        let rules = String::from_utf8_lossy(&rules.stdout);
        if rules.contains(&format!("-d {cluster_ip}/32")) && rules.contains("KUBE-SVC-") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kube-proxy wrote no rules for {cluster_ip}:\n{rules}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
