//! What every mode is measured on: the one-node topology (external client,
//! node, pods), a real control plane on the node's loopback holding the
//! Services, and servers in pod-a and pod-b.
//!
//! Every endpoint is an address of its own (Services share no backend, as
//! in a cluster): pod-a answers on all of 10.245.0.0/16 and pod-b on all of
//! 10.246.0.0/16 (a local route in the pod, a route to the pod's veth on
//! the node). Service `i` has 2 to 4 endpoints, alternating between the
//! two pods, and two ports: TCP 80 to 8080 and UDP 53 to 5353.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path as FilePath,
    time::Duration,
};

use forwarder_tests::{
    api_cluster::register_node,
    k8s::ControlPlane,
    netns::NetNs,
    topology::{NODE_IP, NODE_NAME, Topology},
};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, Config,
    api::PostParams,
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::json;

use crate::{
    server::{Server, TCP_PORT, UDP_PORT},
    workloads::{Protocol, SERVER_CPU},
};

/// The pods' CIDR as kube-proxy is told it (the endpoint blocks included).
pub const CLUSTER_CIDR: &str = "10.244.0.0/14";
/// Two NodePorts per Service, 10,000 Services: more than the default range,
/// and below the node's ephemeral ports, where the apiserver listens.
const NODE_PORTS: &str = "11000-32767";
/// (server pod, its host-side veth, the endpoint addresses it answers on)
const SERVER_PODS: [(&str, &str, Ipv4Addr); 2] = [
    ("pod-a", "veth-a", Ipv4Addr::new(10, 245, 0, 0)),
    ("pod-b", "veth-b", Ipv4Addr::new(10, 246, 0, 0)),
];
/// The pod that is the ClusterIP client.
const CLIENT_POD: &str = "pod-c";
/// API requests in flight while creating Services.
const CONCURRENCY: usize = 64;
/// Services in the random sample a workload spreads over.
const SAMPLE: usize = 16;

/// A Service as the apiserver allocated it.
#[derive(Clone, Debug)]
pub struct ServiceRef {
    pub index: usize,
    pub cluster_ip: Ipv4Addr,
    pub tcp_node_port: u16,
    pub udp_node_port: u16,
    pub endpoints: Vec<Ipv4Addr>,
}

/// How a client reaches a Service, and through which of forwarder's hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// The external client to `nodeIP:nodePort` (XDP on the node interface).
    NodePort,
    /// A pod to `clusterIP:port` (TC on the pod's interface).
    ClusterIp,
}

impl Path {
    pub const ALL: [Self; 2] = [Self::NodePort, Self::ClusterIp];

    pub fn name(self) -> &'static str {
        match self {
            Self::NodePort => "nodeport",
            Self::ClusterIp => "clusterip",
        }
    }
}

/// Which Services a workload goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Targets {
    /// The one created last (last in kube-proxy's iptables chains).
    Last,
    /// A fixed random sample, taken in turn.
    Sample,
}

impl Targets {
    pub fn name(self) -> &'static str {
        match self {
            Self::Last => "last",
            Self::Sample => "sample",
        }
    }
}

/// Field order is drop order: servers and the API before the namespaces.
pub struct Bench {
    _servers: Vec<Server>,
    pub plane: ControlPlane,
    pub topology: Topology,
    /// Every Service created so far, in creation order.
    pub services: Vec<ServiceRef>,
}

/// Endpoint `j` of Service `i`: pods alternate, each address used once.
fn endpoint(i: usize, j: usize) -> Ipv4Addr {
    let (_, _, block) = SERVER_PODS[j % 2];
    Ipv4Addr::from(u32::from(block) + 1 + (i * 2 + j / 2) as u32)
}

fn endpoint_count(i: usize) -> usize {
    2 + i % 3
}

impl Bench {
    pub fn new() -> Self {
        let topology = Topology::new("versus");
        for (pod, veth, block) in SERVER_PODS {
            let block = format!("{block}/16");
            topology.node.ip(&["route", "add", &block, "dev", veth]);
            topology.pod(pod).ns.ip(&["route", "add", "local", &block, "dev", "lo"]);
        }
        // Many short connections from one address: every port, and ports in
        // TIME_WAIT reused (netns-local settings, the clients' own).
        for client in [&topology.client, &topology.pod(CLIENT_POD).ns] {
            client.sysctl("net.ipv4.ip_local_port_range", "1024 65000");
            client.sysctl("net.ipv4.tcp_tw_reuse", "1");
        }
        let servers =
            SERVER_PODS.iter().map(|(pod, ..)| Server::start(&topology.pod(pod).ns, SERVER_CPU));
        let servers = servers.collect();
        let dir = std::env::temp_dir().join(format!("{}-k8s", topology.node.name));
        let plane = ControlPlane::start_with_node_ports(
            &dir,
            Some(&topology.node.name),
            "127.0.0.1",
            NODE_PORTS,
        )
        .unwrap_or_else(|e| panic!("control plane: {e}"));
        register_node(&plane);
        Self { _servers: servers, plane, topology, services: Vec::new() }
    }

    pub fn node(&self) -> &NetNs {
        &self.topology.node
    }

    pub fn client(&self, path: Path) -> &NetNs {
        match path {
            Path::NodePort => &self.topology.client,
            Path::ClusterIp => &self.topology.pod(CLIENT_POD).ns,
        }
    }

    /// Creates Services (and their slices) until there are `total`.
    pub fn grow_to(&mut self, total: usize) {
        let (kubeconfig, from) = (self.plane.kubeconfig.clone(), self.services.len());
        let created = self.topology.node.run(|| {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(create_services(&kubeconfig, from..total))
        });
        self.services.extend(created);
        self.services.sort_by_key(|s| s.index);
    }

    pub fn last(&self) -> &ServiceRef {
        self.services.last().expect("Services were created")
    }

    /// `SAMPLE` Services drawn with a fixed seed (the same in every mode).
    pub fn sample(&self) -> Vec<&ServiceRef> {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ self.services.len() as u64;
        let mut picked = std::collections::BTreeSet::new();
        while picked.len() < SAMPLE.min(self.services.len()) {
            // xorshift: reproducible, and enough for picking.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            picked.insert((state % self.services.len() as u64) as usize);
        }
        picked.into_iter().map(|i| &self.services[i]).collect()
    }

    /// Where `path` and `targets` send `protocol`: the Services' frontends,
    /// or with `direct`, their endpoints themselves.
    pub fn addresses(
        &self,
        path: Path,
        targets: Targets,
        protocol: Protocol,
        direct: bool,
    ) -> Vec<SocketAddr> {
        let services = match targets {
            Targets::Last => vec![self.last()],
            Targets::Sample => self.sample(),
        };
        let node_ip: Ipv4Addr = NODE_IP.parse().expect("node address");
        let mut addresses = Vec::new();
        for service in services {
            if direct {
                let port = match protocol {
                    Protocol::Tcp => TCP_PORT,
                    Protocol::Udp => UDP_PORT,
                };
                addresses.extend(service.endpoints.iter().map(|ip| SocketAddr::from((*ip, port))));
                continue;
            }
            addresses.push(match (path, protocol) {
                (Path::NodePort, Protocol::Tcp) => (node_ip, service.tcp_node_port).into(),
                (Path::NodePort, Protocol::Udp) => (node_ip, service.udp_node_port).into(),
                (Path::ClusterIp, Protocol::Tcp) => (service.cluster_ip, 80).into(),
                (Path::ClusterIp, Protocol::Udp) => (service.cluster_ip, 53).into(),
            });
        }
        addresses
    }

    /// Whether a new TCP connection to the last Service's frontend on
    /// `path` gets an answer.
    pub fn frontend_answers(&self, path: Path) -> bool {
        let target = self.addresses(path, Targets::Last, Protocol::Tcp, false)[0];
        self.client(path).run(|| {
            let mut stream =
                match std::net::TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
                    Ok(stream) => stream,
                    Err(_) => return false,
                };
            use std::io::{Read as _, Write as _};
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; crate::workloads::MESSAGE];
            stream.write_all(&buf).is_ok() && stream.read_exact(&mut buf).is_ok()
        })
    }
}

async fn api_client(kubeconfig: &FilePath) -> Client {
    let file = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config =
        Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await.expect("config");
    Client::try_from(config).expect("API client")
}

async fn create_services(kubeconfig: &FilePath, range: std::ops::Range<usize>) -> Vec<ServiceRef> {
    let client = api_client(kubeconfig).await;
    let services: Api<Service> = Api::namespaced(client.clone(), "demo");
    let slices: Api<EndpointSlice> = Api::namespaced(client, "demo");
    futures::stream::iter(range)
        .map(|i| {
            let (services, slices) = (services.clone(), slices.clone());
            async move { create_service(&services, &slices, i).await }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("creating Services: {e}"))
}

async fn create_service(
    services: &Api<Service>,
    slices: &Api<EndpointSlice>,
    i: usize,
) -> Result<ServiceRef, Box<dyn std::error::Error>> {
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": "demo"},
        "spec": {"type": "NodePort", "ports": [
            {"name": "tcp", "protocol": "TCP", "port": 80, "targetPort": TCP_PORT},
            {"name": "udp", "protocol": "UDP", "port": 53, "targetPort": UDP_PORT},
        ]}
    }))?;
    let created = services.create(&PostParams::default(), &service).await?;
    let endpoints: Vec<Ipv4Addr> = (0..endpoint_count(i)).map(|j| endpoint(i, j)).collect();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}-1"), "namespace": "demo",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "protocol": "TCP", "port": TCP_PORT},
                  {"name": "udp", "protocol": "UDP", "port": UDP_PORT}],
        "endpoints": endpoints.iter().map(|ip| json!({
            "addresses": [ip.to_string()], "conditions": {"ready": true}, "nodeName": NODE_NAME,
        })).collect::<Vec<_>>(),
    }))?;
    slices.create(&PostParams::default(), &slice).await?;
    let spec = created.spec.ok_or("no spec")?;
    let cluster_ip = spec.cluster_ip.ok_or("no clusterIP")?.parse()?;
    let node_port = |name: &str| -> Result<u16, Box<dyn std::error::Error>> {
        let port = spec.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name));
        Ok(u16::try_from(port.and_then(|p| p.node_port).ok_or("no nodePort")?)?)
    };
    Ok(ServiceRef {
        index: i,
        cluster_ip,
        tcp_node_port: node_port("tcp")?,
        udp_node_port: node_port("udp")?,
        endpoints,
    })
}
