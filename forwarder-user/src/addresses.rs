//! Which node addresses serve NodePorts and which one masquerades on each
//! interface: pure functions of the interfaces, the Node object and flags.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::core::v1::Node;

use crate::{cidr::Cidr, netlink::Link};

/// The address masquerading uses on each interface: its first IPv4
/// address; on interfaces without one (and as `SNAT_ADDR_DEFAULT`), the
/// first address of the first node interface.
pub fn snat_addresses(
    by_interface: &[(u32, Ipv4Addr)],
    links: &[Link],
    node_ifaces: &[String],
) -> BTreeMap<u32, Ipv4Addr> {
    let mut out = BTreeMap::new();
    for (index, ip) in by_interface.iter().filter(|(_, ip)| !ip.is_loopback()) {
        out.entry(*index).or_insert(*ip);
    }
    let primary = node_ifaces
        .iter()
        .filter_map(|name| links.iter().find(|l| &l.name == name))
        .find_map(|l| out.get(&l.index).copied());
    if let Some(primary) = primary {
        out.insert(forwarder_common::SNAT_ADDR_DEFAULT, primary);
    }
    out
}

/// The addresses NodePorts are served on: the node's own, plus its Node
/// object's, within `--nodeport-addresses` when given. Never 127.0.0.0/8:
/// traffic from the wire to loopback must not be forwarded (CVE-2020-8558).
pub fn nodeport_addresses(
    local: &BTreeSet<Ipv4Addr>,
    from_node_object: &BTreeSet<Ipv4Addr>,
    allowed: &[Cidr],
) -> BTreeSet<Ipv4Addr> {
    local
        .union(from_node_object)
        .filter(|ip| !ip.is_loopback())
        .filter(|ip| allowed.is_empty() || allowed.iter().any(|c| c.contains(**ip)))
        .copied()
        .collect()
}

/// IPv4 InternalIP/ExternalIP addresses of the Node named `node_name`.
pub fn node_ips(nodes: &[impl std::borrow::Borrow<Node>], node_name: &str) -> BTreeSet<Ipv4Addr> {
    nodes
        .iter()
        .map(std::borrow::Borrow::borrow)
        .filter(|n| n.metadata.name.as_deref() == Some(node_name))
        .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter(|a| matches!(a.type_.as_str(), "InternalIP" | "ExternalIP"))
        .filter_map(|a| crate::cidr::parse_ipv4(&a.address))
        .collect()
}

/// The zone of the Node named `node_name` (its `topology.kubernetes.io/zone`
/// label), for topology hints.
pub fn node_zone<'a>(
    nodes: &'a [impl std::borrow::Borrow<Node>],
    node_name: &str,
) -> Option<&'a str> {
    nodes
        .iter()
        .map(std::borrow::Borrow::borrow)
        .find(|n| n.metadata.name.as_deref() == Some(node_name))?
        .metadata
        .labels
        .as_ref()?
        .get("topology.kubernetes.io/zone")
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> BTreeSet<Ipv4Addr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn nodeports_never_on_loopback() {
        let local = ips(&["127.0.0.1", "127.0.1.1", "192.168.10.1"]);
        let node = ips(&["203.0.113.7", "127.0.0.53"]);
        assert_eq!(nodeport_addresses(&local, &node, &[]), ips(&["192.168.10.1", "203.0.113.7"]));
    }

    #[test]
    fn snat_address_per_interface_and_default_from_the_node_interface() {
        let links = [
            Link { index: 1, name: "lo".into() },
            Link { index: 2, name: "eth0".into() },
            Link { index: 3, name: "veth-a".into() },
            Link { index: 4, name: "cali1".into() },
        ];
        let addrs = [
            (1, "127.0.0.1".parse().unwrap()),
            (2, "192.168.10.1".parse().unwrap()),
            (2, "192.168.10.99".parse().unwrap()),
            (3, "169.254.1.1".parse().unwrap()),
        ];
        let snat = snat_addresses(&addrs, &links, &["eth0".to_owned()]);
        let expect: BTreeMap<u32, Ipv4Addr> = [
            (0, "192.168.10.1".parse().unwrap()),
            (2, "192.168.10.1".parse().unwrap()),
            (3, "169.254.1.1".parse().unwrap()),
        ]
        .into();
        assert_eq!(snat, expect);
    }

    #[test]
    fn nodeport_addresses_flag_limits_the_set_but_never_admits_loopback() {
        let local = ips(&["127.0.0.1", "192.168.10.1", "10.0.0.5"]);
        let allowed: Vec<Cidr> =
            vec!["192.168.0.0/16".parse().unwrap(), "127.0.0.0/8".parse().unwrap()];
        assert_eq!(nodeport_addresses(&local, &BTreeSet::new(), &allowed), ips(&["192.168.10.1"]));
    }

    #[test]
    /// The ExternalIP written with leading zeros, read as kube-proxy reads it.
    fn node_object_addresses_of_this_node_only() {
        let nodes: Vec<Node> = serde_yaml::from_str(
            "
- metadata: {name: node-a}
  status: {addresses: [{type: InternalIP, address: 10.0.0.1}, {type: Hostname, address: node-a},
                       {type: ExternalIP, address: 203.000.113.007}, {type: InternalIP, address: 'fd00::1'}]}
- metadata: {name: node-b}
  status: {addresses: [{type: InternalIP, address: 10.0.0.2}]}
",
        )
        .unwrap();
        assert_eq!(node_ips(&nodes, "node-a"), ips(&["10.0.0.1", "203.0.113.7"]));
    }
}
