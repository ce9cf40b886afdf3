//! One node against a real control plane (`k8s.rs`): the topology with
//! echo servers on pod-a and pod-b, the apiserver holding this Node and
//! namespace `demo`, and API helpers for the tests.
use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    echo::{EchoServer, tcp_once},
    forwarder::Forwarder,
    k8s::ControlPlane,
    netns::NetNs,
    topology::{NODE_IFACE, NODE_IP, NODE_NAME, Topology},
};

/// How long a change may take to show in traffic before the test fails
/// (the latency goal itself is measured by the benchmark).
const FOLLOWS_WITHIN: Duration = Duration::from_secs(5);

/// Field order is drop order: the agent stops before the API goes away.
pub struct Cluster {
    pub forwarder: Option<Forwarder>,
    _servers: Vec<EchoServer>,
    pub plane: ControlPlane,
    /// The control plane's own namespace, when it has one.
    pub plane_ns: Option<NetNs>,
    pub topology: Topology,
}

/// The control plane's address in its own namespace, and the node's link.
pub const PLANE_IP: &str = "172.31.255.2";
pub const PLANE_LINK: &str = "cp0";

impl Cluster {
    /// The control plane on the node's loopback.
    pub fn new(tag: &str) -> Self {
        let topology = Topology::new(tag);
        let dir = std::env::temp_dir().join(format!("{}-k8s", topology.node.name));
        let plane = ControlPlane::start(&dir, Some(&topology.node.name))
            .unwrap_or_else(|e| panic!("control plane: {e}"));
        Self::populate(topology, plane, None)
    }

    /// The control plane in a namespace of its own, reached from the node
    /// over link `PLANE_LINK` at `PLANE_IP`: the link can fail.
    pub fn with_remote_plane(tag: &str) -> Self {
        let topology = Topology::new(tag);
        let plane_ns = NetNs::new(format!("{}-cp", topology.node.name));
        topology.node.veth(PLANE_LINK, &plane_ns, "eth0");
        topology.node.ip(&["addr", "add", "172.31.255.1/30", "dev", PLANE_LINK]);
        topology.node.ip(&["link", "set", PLANE_LINK, "up"]);
        plane_ns.ip(&["addr", "add", &format!("{PLANE_IP}/30"), "dev", "eth0"]);
        plane_ns.ip(&["link", "set", "eth0", "up"]);
        plane_ns.ip(&["link", "set", "lo", "up"]);
        let dir = std::env::temp_dir().join(format!("{}-k8s", topology.node.name));
        let plane = ControlPlane::start_at(&dir, Some(&plane_ns.name), PLANE_IP)
            .unwrap_or_else(|e| panic!("control plane: {e}"));
        Self::populate(topology, plane, Some(plane_ns))
    }

    fn populate(topology: Topology, plane: ControlPlane, plane_ns: Option<NetNs>) -> Self {
        let servers = ["pod-a", "pod-b"]
            .iter()
            .map(|name| EchoServer::start(&topology.pod(name).ns, name))
            .collect();
        register_node(&plane);
        Self { forwarder: None, _servers: servers, plane, plane_ns, topology }
    }

    /// An API call as the admin; panics with the answer on failure.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string());
        let answer = self
            .plane
            .request(method, path, body.as_deref())
            .unwrap_or_else(|e| panic!("API call failed: {e}"));
        serde_json::from_str(&answer).unwrap_or(Value::Null)
    }

    pub fn start_forwarder(&mut self) -> &Forwarder {
        let node = &self.topology.node;
        self.forwarder.insert(Forwarder::start_cluster(
            node,
            &self.plane.kubeconfig,
            NODE_NAME,
            NODE_IFACE,
        ))
    }

    pub fn log(&self) -> String {
        self.forwarder.as_ref().map(Forwarder::log_text).unwrap_or_default()
    }
}

/// This Node (its InternalIP the topology's node address) and namespace
/// `demo` in the API.
pub fn register_node(plane: &ControlPlane) {
    register_node_at(plane, NODE_NAME, NODE_IP);
}

/// Node `name` with InternalIP `ip`, and namespace `demo`.
pub fn register_node_at(plane: &ControlPlane, name: &str, ip: &str) {
    let call = |method: &str, path: &str, body: Value| {
        plane
            .request(method, path, Some(&body.to_string()))
            .unwrap_or_else(|e| panic!("API call failed: {e}"));
    };
    call("POST", "/api/v1/nodes", json!({"metadata": {"name": name}}));
    call(
        "PATCH",
        &format!("/api/v1/nodes/{name}/status"),
        json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}}),
    );
    call("POST", "/api/v1/namespaces", json!({"metadata": {"name": "demo"}}));
}

/// A selector-less NodePort Service (the apiserver allocates its ClusterIP
/// and NodePort); returns both.
pub fn create_echo_service(cluster: &Cluster) -> (String, u64) {
    create_service(cluster, "echo")
}

/// As `create_echo_service`, named `name`.
pub fn create_service(cluster: &Cluster, name: &str) -> (String, u64) {
    let service = cluster.call(
        "POST",
        "/api/v1/namespaces/demo/services",
        Some(json!({
            "metadata": {"name": name, "namespace": "demo"},
            "spec": {"type": "NodePort", "ports": [{"name": "tcp", "port": 80, "targetPort": 8080}]}
        })),
    );
    let cluster_ip = service["spec"]["clusterIP"].as_str().expect("allocated clusterIP");
    let node_port = service["spec"]["ports"][0]["nodePort"].as_u64().expect("allocated nodePort");
    (cluster_ip.to_owned(), node_port)
}

pub fn endpoints(ips: &[&str]) -> Value {
    let list: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": NODE_NAME}))
        .collect();
    Value::Array(list)
}

pub fn create_echo_slice(cluster: &Cluster, ips: &[&str]) {
    create_slice(cluster, "echo", ips);
}

/// Slice `<service>-1` of `service`, to port 8080 of `ips`.
pub fn create_slice(cluster: &Cluster, service: &str, ips: &[&str]) {
    cluster.call(
        "POST",
        "/apis/discovery.k8s.io/v1/namespaces/demo/endpointslices",
        Some(json!({
            "metadata": {"name": format!("{service}-1"), "namespace": "demo",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "tcp", "protocol": "TCP", "port": 8080}],
            "endpoints": endpoints(ips),
        })),
    );
}

/// The pods that answered `tries` new connections.
pub fn answering(client: &NetNs, frontend: &str, tries: usize) -> BTreeSet<String> {
    (0..tries).filter_map(|_| tcp_once(client, frontend).ok()).collect()
}

impl Cluster {
    /// Polls until `done` holds, or fails with the agent's log.
    pub fn eventually(&self, what: &str, done: impl FnMut() -> bool) {
        self.eventually_within(FOLLOWS_WITHIN, what, done);
    }

    pub fn eventually_within(&self, limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within {limit:?}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
