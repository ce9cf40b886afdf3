//! Two nodes and an external client on one L2 segment (a bridge in its own
//! namespace), pods on each node, and host-gateway routes between the pod
//! CIDRs:
//!
//! ```text
//!   client 192.168.20.100 ─┐
//!   node-a 192.168.20.1 ───┤ br0 (switch namespace)
//!   node-b 192.168.20.2 ───┘
//!   node-a: pod-a1 10.244.1.2, pod-a2 10.244.1.3   (10.244.1.0/24)
//!   node-b: pod-b1 10.244.2.2                      (10.244.2.0/24)
//! ```
//!
//! As in `topology`, nothing routes or translates Service addresses.
use crate::{
    netns::{NetNs, unique_prefix},
    topology::{Pod, add_pod, configure_node},
};

pub const CLIENT_IP: &str = "192.168.20.100";
pub const NODE_IFACE: &str = "eth0";

pub struct Node {
    pub name: &'static str,
    pub ip: &'static str,
    pub ns: NetNs,
}

/// Field order is drop order: pods and hosts before the switch.
pub struct Cluster {
    pub pods: Vec<Pod>,
    pub client: NetNs,
    pub nodes: Vec<Node>,
    pub switch: NetNs,
}

struct NodeSpec {
    name: &'static str,
    ip: &'static str,
    pod_cidr: &'static str,
    /// (pod, pod address)
    pods: &'static [(&'static str, &'static str)],
}

const NODES: [NodeSpec; 2] = [
    NodeSpec {
        name: "node-a",
        ip: "192.168.20.1",
        pod_cidr: "10.244.1.0/24",
        pods: &[("pod-a1", "10.244.1.2"), ("pod-a2", "10.244.1.3")],
    },
    NodeSpec {
        name: "node-b",
        ip: "192.168.20.2",
        pod_cidr: "10.244.2.0/24",
        pods: &[("pod-b1", "10.244.2.2")],
    },
];

/// Plugs `host`'s `iface` into the switch with `addr/24`; the wire carries
/// complete checksums (TX offload off), as XDP on a real NIC sees them.
fn wire(switch: &NetNs, host: &NetNs, port: &str, iface: &str, addr: &str) {
    switch.veth(port, host, iface);
    switch.ip(&["link", "set", port, "master", "br0", "up"]);
    host.ip(&["addr", "add", &format!("{addr}/24"), "dev", iface]);
    host.ip(&["link", "set", iface, "up"]);
    host.exec(&["ethtool", "-K", iface, "tx", "off"]);
}

impl Cluster {
    pub fn new(tag: &str) -> Self {
        let prefix = unique_prefix(tag);
        let switch = NetNs::new(format!("{prefix}-sw"));
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);

        let client = NetNs::new(format!("{prefix}-client"));
        // As in `topology`, the switch runs no XDP on its ports: rejects
        // must reach the client without it.
        wire(&switch, &client, "p-client", "eth0", CLIENT_IP);
        client.ip(&["route", "add", "default", "via", NODES[0].ip]);

        let mut nodes = Vec::new();
        let mut pods = Vec::new();
        for (i, spec) in NODES.iter().enumerate() {
            let ns = NetNs::new(format!("{prefix}-{}", spec.name));
            configure_node(&ns);
            wire(&switch, &ns, &format!("p-{}", spec.name), NODE_IFACE, spec.ip);
            let peer = &NODES[1 - i];
            ns.ip(&["route", "add", peer.pod_cidr, "via", peer.ip]);
            for (pod, pod_ip) in spec.pods {
                pods.push(add_pod(&ns, &prefix, pod, pod_ip));
            }
            nodes.push(Node { name: spec.name, ip: spec.ip, ns });
        }
        Self { pods, client, nodes, switch }
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).expect("known node")
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).expect("known pod")
    }
}
