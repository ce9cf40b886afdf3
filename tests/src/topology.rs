//! One node between an external client and its pods, all in namespaces:
//!
//! ```text
//!  client 192.168.10.2 ──eth0│eth-ext── node 192.168.10.1 ──veth-a│eth0── pod-a 10.244.1.2
//!                                          │                ──veth-b│eth0── pod-b 10.244.1.3
//!                                          │                ──veth-c│eth0── pod-c 10.244.1.9 (a client pod)
//! ```
//!
//! Pods are routed like Calico does it: a /32 route per pod on the node and
//! a default route via a link-local gateway that every host-side veth holds.
//! There are no routes or netfilter rules for Service addresses anywhere:
//! only forwarder's programs make them reachable.
use crate::netns::{NetNs, unique_prefix};

pub const NODE_IP: &str = "192.168.10.1";
pub const CLIENT_IP: &str = "192.168.10.2";
pub const NODE_IFACE: &str = "eth-ext";
pub const NODE_NAME: &str = "node-a";
/// The pods' default gateway, held by each host-side veth.
pub const POD_GATEWAY: &str = "169.254.1.1";

pub struct Pod {
    pub name: &'static str,
    pub ip: &'static str,
    pub ns: NetNs,
}

/// Field order is drop order: pods and client go before the node.
pub struct Topology {
    pub pods: Vec<Pod>,
    pub client: NetNs,
    pub node: NetNs,
}

/// Backends `pod-a` and `pod-b`, and `pod-c` as a client pod.
pub const PODS: [(&str, &str); 3] =
    [("pod-a", "10.244.1.2"), ("pod-b", "10.244.1.3"), ("pod-c", "10.244.1.9")];

/// A pod namespace wired to `node` with a host-side veth `veth-<x>`, where
/// `name` is `pod-<x>`.
pub fn add_pod(node: &NetNs, prefix: &str, name: &'static str, ip: &'static str) -> Pod {
    let ns = NetNs::new(format!("{prefix}-{name}"));
    let host_side = format!("veth-{}", &name[4..]);
    node.veth(&host_side, &ns, "eth0");
    node.ip(&["link", "set", &host_side, "up"]);
    node.ip(&["addr", "add", &format!("{POD_GATEWAY}/32"), "dev", &host_side, "noprefixroute"]);
    node.ip(&["route", "add", &format!("{ip}/32"), "dev", &host_side]);
    ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["route", "add", POD_GATEWAY, "dev", "eth0", "scope", "link"]);
    ns.ip(&["route", "add", "default", "via", POD_GATEWAY, "dev", "eth0"]);
    Pod { name, ip, ns }
}

/// A node's forwarding settings: strict reverse-path filtering, the
/// strictest a node may have (reverse NAT must not depend on it being off).
pub fn configure_node(node: &NetNs) {
    node.sysctl("net.ipv4.ip_forward", "1");
    node.sysctl("net.ipv4.conf.all.rp_filter", "1");
    node.sysctl("net.ipv4.conf.default.rp_filter", "1");
}

impl Topology {
    pub fn new(tag: &str) -> Self {
        let prefix = unique_prefix(tag);
        let node = NetNs::new(format!("{prefix}-node"));
        configure_node(&node);

        let client = NetNs::new(format!("{prefix}-client"));
        node.veth(NODE_IFACE, &client, "eth0");
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", NODE_IFACE]);
        node.ip(&["link", "set", NODE_IFACE, "up"]);
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"]);
        client.ip(&["link", "set", "eth0", "up"]);
        client.ip(&["route", "add", "default", "via", NODE_IP]);
        // A real wire carries complete checksums; veth would otherwise pass
        // CHECKSUM_PARTIAL packets that no NIC ever hands to XDP.
        client.exec(&["ethtool", "-K", "eth0", "tx", "off"]);
        // No XDP program on the client's end, as on a container used as a
        // node: XDP_TX frames would not reach it, so rejects must not rely
        // on them.

        let pods = PODS.iter().map(|(name, ip)| add_pod(&node, &prefix, name, ip)).collect();
        Self { pods, client, node }
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).expect("known pod")
    }
}
