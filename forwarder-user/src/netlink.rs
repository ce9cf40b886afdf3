//! The node's interfaces and IPv4 addresses, and a stream of their changes.
use std::net::{IpAddr, Ipv4Addr};

use futures::{Stream, StreamExt, TryStreamExt};

use rtnetlink::{
    Handle,
    constants::{RTMGRP_IPV4_IFADDR, RTMGRP_LINK},
    packet_route::{address::AddressAttribute, link::LinkAttribute},
    sys::{AsyncSocket, SocketAddr},
};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("netlink request: {0}")]
    Request(#[from] rtnetlink::Error),
}

/// One netlink connection for requests, one subscribed to link and IPv4
/// address notifications.
pub struct Netlink {
    handle: Handle,
}

/// An interface by index and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Link {
    pub index: u32,
    pub name: String,
}

impl Netlink {
    pub fn connect() -> Result<Self, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// A stream that yields once per link or IPv4 address change.
    pub fn changes() -> Result<impl Stream<Item = ()>, NetlinkError> {
        let (mut connection, _, messages) = rtnetlink::new_connection()?;
        connection
            .socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR))?;
        tokio::spawn(connection);
        Ok(messages.map(|_| ()))
    }

    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let messages: Vec<_> = self.handle.link().get().execute().try_collect().await?;
        Ok(messages
            .into_iter()
            .filter_map(|m| {
                let name = m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(name) => Some(name.clone()),
                    _ => None,
                })?;
                Some(Link { index: m.header.index, name })
            })
            .collect())
    }

    /// The node's own IPv4 addresses, by interface index, in the kernel's
    /// order (an interface's primary address first).
    pub async fn ipv4_addrs(&self) -> Result<Vec<(u32, Ipv4Addr)>, NetlinkError> {
        let messages: Vec<_> = self.handle.address().get().execute().try_collect().await?;
        Ok(messages
            .iter()
            .filter_map(|m| {
                // On point-to-point links IFA_ADDRESS is the peer's address;
                // IFA_LOCAL, when present, is ours.
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                });
                local
                    .or_else(|| {
                        m.attributes.iter().find_map(|a| match a {
                            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                            _ => None,
                        })
                    })
                    .map(|ip| (m.header.index, ip))
            })
            .collect())
    }
}

/// Shell-style glob with `*` and `?`, enough for interface name patterns.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        for (pattern, name, matches) in [
            ("veth*", "veth1234", true),
            ("veth*", "eth0", false),
            ("cali*", "cali", true),
            ("lxc?", "lxc1", true),
            ("lxc?", "lxc12", false),
            ("*pod*", "node-pod-a", true),
            ("eth0", "eth0", true),
        ] {
            assert_eq!(glob_match(pattern, name), matches, "{pattern} vs {name}");
        }
    }
}
