//! Stale UDP flows: when a UDP endpoint leaves a frontend (deleted, or no
//! longer serving), its conntrack entries are removed so clients are
//! balanced anew instead of blackholed, and the node's own sockets the
//! socket programs connected to it are closed. TCP flows are left to
//! finish, as kube-proxy does.
use std::net::SocketAddrV4;

use crate::{
    model::{DesiredState, Endpoint, Frontend, Proto},
    sock_diag::UdpSocket,
};

/// UDP (frontend, endpoint) pairs in `old` that `new` no longer has.
pub fn removed_udp_endpoints(old: &DesiredState, new: &DesiredState) -> Vec<(Frontend, Endpoint)> {
    let mut removed = Vec::new();
    for (frontend, endpoints) in old.services.iter().filter(|(f, _)| f.proto == Proto::Udp) {
        let kept = new.services.get(frontend).map_or(&[][..], Vec::as_slice);
        removed.extend(endpoints.iter().filter(|e| !kept.contains(e)).map(|e| (*frontend, *e)));
    }
    removed
}

/// Whether `backend` is an endpoint of the UDP frontend at `frontend`
/// (a ClusterIP or external address, or a NodePort on any node address).
pub fn still_served(state: &DesiredState, frontend: SocketAddrV4, backend: SocketAddrV4) -> bool {
    let exact = Frontend::new(Some(*frontend.ip()), frontend.port(), Proto::Udp);
    let node_port = Frontend::new(None, frontend.port(), Proto::Udp);
    // The address's own frontend if it has one (as the datapath looks up):
    // a NodePort of the same number does not speak for a ClusterIP's.
    let endpoints = state.services.get(&exact).or_else(|| state.services.get(&node_port));
    endpoints.is_some_and(|endpoints| {
        endpoints.iter().any(|e| e.addr == *backend.ip() && e.port == backend.port())
    })
}

/// The node's connected UDP sockets that the socket programs connected
/// through a frontend (`via` names it: the socket map's word) to a backend
/// no longer among its endpoints in `state`.
pub fn abandoned_sockets<'a>(
    sockets: &'a [UdpSocket],
    via: impl Fn(&UdpSocket) -> Option<SocketAddrV4>,
    state: &DesiredState,
) -> Vec<&'a UdpSocket> {
    sockets
        .iter()
        .filter(|socket| via(socket).is_some_and(|f| !still_served(state, f, socket.remote)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::desired as state;

    #[test]
    fn only_udp_endpoints_that_left_their_frontend() {
        let dns = Frontend::new(Some("10.96.0.10".parse().unwrap()), 53, Proto::Udp);
        let gone = Frontend::new(Some("10.96.0.11".parse().unwrap()), 53, Proto::Udp);
        let web = Frontend::new(Some("10.96.0.10".parse().unwrap()), 80, Proto::Tcp);
        let old = state(&[
            (dns, &["10.244.1.2:53", "10.244.1.3:53"]),
            (gone, &["10.244.1.4:53"]),
            (web, &["10.244.1.2:80"]),
        ]);
        let new = state(&[(dns, &["10.244.1.3:53"]), (web, &[])]);
        let removed: Vec<String> =
            removed_udp_endpoints(&old, &new).iter().map(|(f, e)| format!("{f} {e}")).collect();
        assert_eq!(removed, ["10.96.0.10:53/UDP 10.244.1.2:53", "10.96.0.11:53/UDP 10.244.1.4:53"]);
    }

    #[test]
    fn sockets_are_abandoned_only_when_their_backend_left_their_frontend() {
        let dns = Frontend::new(Some("10.96.0.10".parse().unwrap()), 53, Proto::Udp);
        let node_port = Frontend::new(None, 30053, Proto::Udp);
        let state = state(&[(dns, &["10.244.1.3:53"]), (node_port, &["10.244.1.3:53"])]);
        let addr = |s: &str| s.parse::<SocketAddrV4>().unwrap();
        let served =
            |frontend: &str, backend: &str| still_served(&state, addr(frontend), addr(backend));
        assert!(served("10.96.0.10:53", "10.244.1.3:53"));
        assert!(!served("10.96.0.10:53", "10.244.1.2:53"), "the backend left");
        assert!(!served("10.96.0.11:53", "10.244.1.3:53"), "the Service is gone");
        assert!(served("192.168.10.1:30053", "10.244.1.3:53"), "a NodePort, on any node address");
        assert!(!served("10.96.0.10:54", "10.244.1.3:53"));
        // A ClusterIP of the NodePort's number with other endpoints.
        let other = Frontend::new(Some("10.96.0.12".parse().unwrap()), 30053, Proto::Udp);
        let mut state = state.clone();
        let endpoint = Endpoint { addr: "10.244.1.9".parse().unwrap(), port: 53 };
        state.services.insert(other, vec![endpoint]);
        assert!(!still_served(&state, addr("10.96.0.12:30053"), addr("10.244.1.3:53")));
    }
}
