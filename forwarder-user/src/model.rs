//! The desired datapath state: what the maps should hold, independent of
//! how they are encoded.
use crate::cidr::Cidr;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub const fn from_number(number: u8) -> Option<Self> {
        match number {
            forwarder_common::PROTO_TCP => Some(Self::Tcp),
            forwarder_common::PROTO_UDP => Some(Self::Udp),
            forwarder_common::PROTO_SCTP => Some(Self::Sctp),
            _ => None,
        }
    }

    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => forwarder_common::PROTO_TCP,
            Self::Udp => forwarder_common::PROTO_UDP,
            Self::Sctp => forwarder_common::PROTO_SCTP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// Which clients an endpoint set serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Every client, unless an `Internal` set exists for the frontend.
    External,
    /// Pods on this node, when their set differs (an external frontend with
    /// `externalTrafficPolicy: Local` still reaches every endpoint from pods).
    Internal,
}

/// Where a Service is reached: `clusterIP:port`, an external or load
/// balancer IP, or any local node address on a `nodePort` (`addr` is
/// `None`); and which clients the entry serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: Option<Ipv4Addr>,
    pub port: u16,
    pub proto: Proto,
    pub scope: Scope,
}

impl Frontend {
    /// The entry every client uses.
    pub const fn new(addr: Option<Ipv4Addr>, port: u16, proto: Proto) -> Self {
        Self { addr, port, proto, scope: Scope::External }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            Some(addr) => write!(f, "{addr}:{}/{}", self.port, self.proto)?,
            None => write!(f, "<node>:{}/{}", self.port, self.proto)?,
        }
        match self.scope {
            Scope::External => Ok(()),
            Scope::Internal => f.write_str(" (from local pods)"),
        }
    }
}

/// A pod endpoint: `podIP:targetPort` (the protocol is the frontend's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)
    }
}

/// Every frontend with its usable endpoints, sorted and deduplicated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<Frontend, Vec<Endpoint>>,
    /// Endpoint addresses on this node (`nodeName`): traffic from outside
    /// the node to any other endpoint is masqueraded.
    pub local_endpoints: BTreeSet<Ipv4Addr>,
    /// `sessionAffinity: ClientIP` timeout in seconds, per frontend entry.
    pub affinity: BTreeMap<Frontend, u32>,
    /// Entries whose empty endpoint set means "none on this node" (a
    /// `Local` policy): new flows are dropped. Otherwise an empty set
    /// rejects them with ICMP port unreachable.
    pub drop_when_empty: BTreeSet<Frontend>,
    /// Every ClusterIP: packets to undeclared ports on them are rejected.
    pub cluster_ips: BTreeSet<Ipv4Addr>,
    /// `loadBalancerSourceRanges` of load balancer frontends: only clients
    /// in these may open flows.
    pub source_ranges: BTreeMap<Frontend, BTreeSet<Cidr>>,
}

/// `DesiredState` from `(frontend, ["podIP:port", ...])` pairs, for tests.
#[cfg(test)]
pub fn desired(entries: &[(Frontend, &[&str])]) -> DesiredState {
    let services = entries
        .iter()
        .map(|(f, eps)| {
            let eps = eps
                .iter()
                .map(|s| {
                    let (a, p) = s.split_once(':').expect("podIP:port");
                    Endpoint { addr: a.parse().unwrap(), port: p.parse().unwrap() }
                })
                .collect();
            (*f, eps)
        })
        .collect();
    DesiredState { services, ..DesiredState::default() }
}
