//! New connections to endpoints on another node: a NodePort from an
//! external client (masqueraded, `externalTrafficPolicy: Cluster`) and a
//! ClusterIP from a pod (not masqueraded), on the two-node topology of
//! the tests (`cluster`), for forwarder, kube-proxy's modes and no
//! translation at all. The dataplane under test runs on node-a, the node
//! that translates; node-b only hosts the endpoint (pod-b1).
//!
//! Besides the rate and the failed connections, each sample records the
//! kernel's live statistics of every BPF program that ran (`bpf_stats`):
//! forwarder's programs next to do-nothing programs on the same hooks.
//! Prints one JSON line per measurement for `cargo xtask bench`.
//! `FORWARDER_BENCH_SMOKE=1`: one short run of every mode;
//! `FORWARDER_BENCH_MODES=forwarder,...` picks a subset.
#[path = "shared/dataplane.rs"]
mod dataplane;
#[path = "versus/server.rs"]
mod server;
#[allow(dead_code)] // the latency and UDP workloads are versus's
#[path = "versus/workloads.rs"]
mod workloads;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use forwarder_tests::{
    api_cluster::register_node_at,
    bpf_stats::{self, Collecting, Snapshot},
    cluster::{Cluster, NODE_IFACE},
    forwarder::{Forwarder, attachments},
    k8s::ControlPlane,
    kube_proxy::{KubeProxy, leftovers, pinned_release},
    netns::NetNs,
};
use serde_json::{Value, json};

use crate::{
    dataplane::{Active, Mode},
    server::{Server, TCP_PORT},
    workloads::{Load, Workload},
};

const NODE: &str = "node-a";
const NODE_IP: &str = "192.168.20.1";
const NODE_PORT: u16 = 30086;
/// The endpoint, on node-b.
const ENDPOINT: &str = "10.244.2.2";
const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// node-a's pod interfaces (forwarder attaches to `veth*`).
const POD_IFACES: [&str; 2] = ["veth-a1", "veth-a2"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// The external client to `nodeIP:nodePort`, masqueraded to node-b.
    NodePort,
    /// pod-a2 to `clusterIP:80`, routed to node-b with its own address.
    ClusterIp,
}

impl Path {
    const ALL: [Self; 2] = [Self::NodePort, Self::ClusterIp];

    fn name(self) -> &'static str {
        match self {
            Self::NodePort => "nodeport_masqueraded",
            Self::ClusterIp => "clusterip_remote",
        }
    }
}

/// Field order is drop order: the server and the API before the namespaces.
struct Bench {
    _server: Server,
    plane: ControlPlane,
    cluster: Cluster,
    cluster_ip: String,
}

impl Bench {
    fn new() -> Self {
        let cluster = Cluster::new("remote");
        // Many short connections from one address: ports in TIME_WAIT
        // reused (netns-local settings, the clients' own).
        for client in [&cluster.client, &cluster.pod("pod-a2").ns] {
            client.sysctl("net.ipv4.ip_local_port_range", "1024 65000");
            client.sysctl("net.ipv4.tcp_tw_reuse", "1");
        }
        let server = Server::start(&cluster.pod("pod-b1").ns, workloads::SERVER_CPU);
        let node = &cluster.node(NODE).ns;
        // node-a forwards the direct modes' client packets out of the
        // interface they came in on: an ICMP redirect would send the client
        // straight to node-b, and the direct modes would bypass node-a.
        for scope in ["all", NODE_IFACE] {
            node.sysctl(&format!("net.ipv4.conf.{scope}.send_redirects"), "0");
        }
        let dir = std::env::temp_dir().join(format!("{}-k8s", node.name));
        let plane = ControlPlane::start_at(&dir, Some(&node.name), "127.0.0.1")
            .unwrap_or_else(|e| panic!("control plane: {e}"));
        register_node_at(&plane, NODE, NODE_IP);
        let call = |method: &str, path: &str, body: Value| {
            let answer = plane.request(method, path, Some(&body.to_string()));
            serde_json::from_str::<Value>(&answer.unwrap_or_else(|e| panic!("{path}: {e}")))
                .expect("API answer")
        };
        let service = call(
            "POST",
            "/api/v1/namespaces/demo/services",
            json!({"metadata": {"name": "remote", "namespace": "demo"},
                   "spec": {"type": "NodePort", "ports": [{"name": "tcp", "port": 80,
                            "targetPort": TCP_PORT, "nodePort": NODE_PORT}]}}),
        );
        let cluster_ip = service["spec"]["clusterIP"].as_str().expect("clusterIP").to_owned();
        call(
            "POST",
            "/apis/discovery.k8s.io/v1/namespaces/demo/endpointslices",
            json!({"metadata": {"name": "remote-1", "namespace": "demo",
                                "labels": {"kubernetes.io/service-name": "remote"}},
                   "addressType": "IPv4",
                   "ports": [{"name": "tcp", "protocol": "TCP", "port": TCP_PORT}],
                   "endpoints": [{"addresses": [ENDPOINT], "conditions": {"ready": true},
                                  "nodeName": "node-b"}]}),
        );
        Self { _server: server, plane, cluster, cluster_ip }
    }

    fn node(&self) -> &NetNs {
        &self.cluster.node(NODE).ns
    }

    fn client(&self, path: Path) -> &NetNs {
        match path {
            Path::NodePort => &self.cluster.client,
            Path::ClusterIp => &self.cluster.pod("pod-a2").ns,
        }
    }

    fn target(&self, path: Path, mode: Mode) -> SocketAddr {
        let address = match (mode.is_direct(), path) {
            (true, _) => format!("{ENDPOINT}:{TCP_PORT}"),
            (false, Path::NodePort) => format!("{NODE_IP}:{NODE_PORT}"),
            (false, Path::ClusterIp) => format!("{}:80", self.cluster_ip),
        };
        address.parse().expect("socket address")
    }

    /// Whether one new connection through `path` gets its answer.
    fn answers(&self, path: Path, mode: Mode) -> bool {
        let target = self.target(path, mode);
        self.client(path).run(|| {
            let timeout = Duration::from_millis(500);
            let Ok(mut stream) = TcpStream::connect_timeout(&target, timeout) else {
                return false;
            };
            let _ = stream.set_read_timeout(Some(timeout));
            let mut buf = [0u8; workloads::MESSAGE];
            stream.write_all(&buf).is_ok() && stream.read_exact(&mut buf).is_ok()
        })
    }

    /// Every new flow starts with empty tables on both nodes.
    fn flush_conntrack(&self) {
        for node in &self.cluster.nodes {
            // Fails harmlessly where no netfilter conntrack was loaded.
            let _ = Command::new("ip")
                .args(["netns", "exec", &node.ns.name, "conntrack", "-F"])
                .output();
        }
    }
}

fn load(smoke: bool) -> Load {
    Load {
        duration: Duration::from_secs(if smoke { 1 } else { 5 }),
        clients: 8,
        connections: 1,
        requests_per_second: 0,
    }
}

fn start(mode: Mode, bench: &Bench) -> Active {
    assert_clean(bench, "before starting");
    let node = bench.node();
    let active = match mode {
        Mode::Direct => Active::Nothing,
        Mode::Hooks => Active::hooks(node, NODE_IFACE, &POD_IFACES),
        Mode::Forwarder => Active::Forwarder(Forwarder::start_cluster(
            node,
            &bench.plane.kubeconfig,
            NODE,
            NODE_IFACE,
        )),
        Mode::KubeProxy(proxy_mode) => {
            let proxy = KubeProxy::start(
                node,
                &bench.plane.kubeconfig,
                NODE,
                proxy_mode,
                None,
                CLUSTER_CIDR,
            );
            proxy.wait_synced(node, Duration::from_secs(120));
            Active::KubeProxy(proxy)
        }
    };
    for path in Path::ALL {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !bench.answers(path, mode) {
            assert!(
                std::time::Instant::now() < deadline,
                "{}: no answer on {}",
                mode.name(),
                path.name()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    active
}

fn stop(active: Active, bench: &Bench) {
    match active {
        Active::KubeProxy(mut proxy) => drop(proxy.stop()),
        // Dropping stops the agent and runs `forwarder cleanup`.
        Active::Forwarder(forwarder) => drop(forwarder),
        // Closing the links detaches them.
        other => drop(other),
    }
    bench.flush_conntrack();
    assert_clean(bench, "after stopping");
}

/// Nothing translates: no program on node-a, no kube-proxy rule, and the
/// frontends do not answer.
fn assert_clean(bench: &Bench, when: &str) {
    let programs = attachments(bench.node());
    assert!(programs.is_empty(), "{when}: programs still attached: {programs:?}");
    let rules = leftovers(bench.node());
    assert!(rules.is_empty(), "{when}: kube-proxy rules left: {rules:#?}");
    for path in Path::ALL {
        assert!(!bench.answers(path, Mode::Forwarder), "{when}: {} translated", path.name());
    }
}

fn main() {
    let smoke = std::env::var_os("FORWARDER_BENCH_SMOKE").is_some_and(|v| v == "1");
    let (load, repeats) = (load(smoke), if smoke { 1 } else { 5 });
    let bench = Bench::new();
    // On for the whole run, every mode alike (two clock reads per program
    // run: well under a microsecond per connection).
    let _collecting = Collecting::start();
    // A subset by name, for a look at one (`FORWARDER_BENCH_MODES=forwarder`).
    let names = std::env::var("FORWARDER_BENCH_MODES").ok();
    let wanted =
        |mode: &Mode| names.as_ref().is_none_or(|n| n.split(',').any(|n| n == mode.name()));
    for mode in Mode::ALL.into_iter().filter(wanted) {
        let active = start(mode, &bench);
        // Repeats outermost: a slow moment of the machine hits both paths.
        for repeat in 0..repeats {
            for path in Path::ALL {
                bench.flush_conntrack();
                let before = Snapshot::take();
                let measured = workloads::run(
                    Workload::ConnectionRate,
                    bench.client(path),
                    &[bench.target(path, mode)],
                    &load,
                );
                let mut result = measured.json();
                result["programs"] = bpf_stats::json(&Snapshot::take().since(&before));
                println!(
                    "{}",
                    json!({
                        "kind": "sample",
                        "mode": mode.name(),
                        "path": path.name(),
                        "repeat": repeat,
                        "result": result,
                    })
                );
            }
        }
        let counters = active.counters(bench.node());
        println!("{}", json!({"kind": "counters", "mode": mode.name(), "counters": counters}));
        stop(active, &bench);
        eprintln!("remote: {} done", mode.name());
    }
    println!(
        "{}",
        json!({
            "kind": "environment",
            "kube_proxy": pinned_release(),
            "load": {"seconds": load.duration.as_secs_f64(), "clients": load.clients,
                     "repeats": repeats, "message_bytes": workloads::MESSAGE,
                     "client_cpu": workloads::CLIENT_CPU, "server_cpu": workloads::SERVER_CPU},
        })
    );
}
