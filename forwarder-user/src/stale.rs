//! Stale UDP flows: when a UDP endpoint leaves a frontend (deleted, or no
//! longer serving), its conntrack entries are removed so clients are
//! balanced anew instead of blackholed. TCP flows are left to finish, as
//! kube-proxy does.
use crate::model::{DesiredState, Endpoint, Frontend, Proto};

/// UDP (frontend, endpoint) pairs in `old` that `new` no longer has.
pub fn removed_udp_endpoints(old: &DesiredState, new: &DesiredState) -> Vec<(Frontend, Endpoint)> {
    let mut removed = Vec::new();
    for (frontend, endpoints) in old.services.iter().filter(|(f, _)| f.proto == Proto::Udp) {
        let kept = new.services.get(frontend).map_or(&[][..], Vec::as_slice);
        removed.extend(endpoints.iter().filter(|e| !kept.contains(e)).map(|e| (*frontend, *e)));
    }
    removed
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
}
