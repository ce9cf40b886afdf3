//! The dataplanes the side-by-side benchmarks compare, and what each
//! counted: shared by `versus` and `remote` (included by path).
use forwarder_tests::{
    forwarder::{Forwarder, packet_counters},
    kube_proxy::{KubeProxy, ProxyMode, conntrack_stats},
    netns::NetNs,
    xdp_pass::{TcPass, XdpPass},
};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The client talks to the endpoints' addresses: no Service translation.
    Direct,
    /// As `Direct`, with do-nothing programs on each of forwarder's hooks
    /// (XDP and TC both ways on the node interface, TC both ways on the
    /// pods' interfaces): what the hooks cost before any work is done in
    /// them.
    Hooks,
    Forwarder,
    KubeProxy(ProxyMode),
}

impl Mode {
    pub const ALL: [Self; 5] = [
        Self::Direct,
        Self::Hooks,
        Self::Forwarder,
        Self::KubeProxy(ProxyMode::IptablesLegacy),
        Self::KubeProxy(ProxyMode::Nftables),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Hooks => "direct-hooks",
            Self::Forwarder => "forwarder",
            Self::KubeProxy(ProxyMode::Iptables) => "kube-proxy-iptables-nft",
            Self::KubeProxy(ProxyMode::IptablesLegacy) => "kube-proxy-iptables",
            Self::KubeProxy(ProxyMode::Nftables) => "kube-proxy-nftables",
        }
    }

    pub fn is_direct(self) -> bool {
        matches!(self, Self::Direct | Self::Hooks)
    }
}

/// The running dataplane; dropping it ends it.
pub enum Active {
    Nothing,
    /// Held for their links: dropping them detaches the programs.
    Hooks {
        _xdp: Vec<XdpPass>,
        _tc: Vec<TcPass>,
    },
    Forwarder(Forwarder),
    KubeProxy(KubeProxy),
}

impl Active {
    /// Do-nothing programs on forwarder's hooks in `node`: XDP and TC both
    /// ways on `node_iface`, TC both ways on each of `pod_ifaces`.
    pub fn hooks(node: &NetNs, node_iface: &str, pod_ifaces: &[&str]) -> Self {
        let xdp = vec![XdpPass::attach(node, node_iface)];
        let mut tc =
            vec![TcPass::attach(node, node_iface, false), TcPass::attach(node, node_iface, true)];
        for iface in pod_ifaces {
            tc.extend([TcPass::attach(node, iface, false), TcPass::attach(node, iface, true)]);
        }
        Self::Hooks { _xdp: xdp, _tc: tc }
    }

    /// What the dataplane counted over its life in `node`, read before it
    /// stops: forwarder's packets by reason, netfilter conntrack's
    /// statistics for kube-proxy; drops explain failed transactions.
    pub fn counters(&self, node: &NetNs) -> Value {
        Value::Object(match self {
            Self::Forwarder(_) => packet_counters(node),
            Self::KubeProxy(_) => conntrack_stats(node),
            Self::Nothing | Self::Hooks { .. } => serde_json::Map::new(),
        })
    }
}
