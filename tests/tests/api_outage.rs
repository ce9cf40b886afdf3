//! API outages: the apiserver the node talks to stops for 30 s while
//! traffic flows; meanwhile a Service is deleted (through another apiserver
//! on the same etcd, as in an HA control plane) and etcd's history is
//! compacted, so when the apiserver returns the agent's watches get `410
//! Gone` and relist. Forwarding never stops, and the deleted Service goes
//! with the relist.
use std::time::{Duration, Instant};

use forwarder_tests::{
    api_cluster::{Cluster, answering, create_service, create_slice},
    echo::{tcp_connect_error, tcp_once, under_traffic},
};

const OUTAGE: Duration = Duration::from_secs(30);

/// Reconnecting after the outage: watch backoff is capped at about 30 s.
const RECOVERY: Duration = Duration::from_secs(60);

#[test]
fn forwarding_survives_an_api_outage_and_the_relist_removes_what_was_deleted() {
    let mut cluster = Cluster::with_remote_plane("outage");
    let (kept_ip, _) = create_service(&cluster, "kept");
    // No backend shared between the two: a new connection that reuses the
    // client port of a finished one to the other frontend would be dropped
    // as a collision (a known limit), and look like an outage or a removal.
    create_slice(&cluster, "kept", &["10.244.1.3"]);
    let (deleted_ip, _) = create_service(&cluster, "deleted");
    create_slice(&cluster, "deleted", &["10.244.1.2"]);
    cluster.start_forwarder();
    let pod_c = &cluster.topology.pod("pod-c").ns;
    let (kept, deleted) = (format!("{kept_ip}:80"), format!("{deleted_ip}:80"));
    assert_eq!(answering(pod_c, &deleted, 4).len(), 1, "{}", cluster.log());

    let plane = &mut cluster.plane;
    let log = || cluster.forwarder.as_ref().map(|f| f.log_text()).unwrap_or_default();
    let (sent, failures) = under_traffic(pod_c, &kept, Duration::from_millis(20), || {
        let started = Instant::now();
        plane.stop_apiserver();
        plane
            .via_another_apiserver(|other| {
                other.request("DELETE", "/api/v1/namespaces/demo/services/deleted", None)
            })
            .and_then(|deleted| deleted)
            .unwrap_or_else(|e| panic!("delete through another apiserver: {e}"));
        plane.compact_etcd().unwrap_or_else(|e| panic!("compaction: {e}"));
        std::thread::sleep(OUTAGE.saturating_sub(started.elapsed()));
        assert_eq!(tcp_once(pod_c, &deleted).map(|_| ()).ok(), Some(()), "no agent saw it yet");
        plane.start_apiserver().unwrap_or_else(|e| panic!("apiserver restart: {e}"));
        let deadline = Instant::now() + RECOVERY;
        while tcp_connect_error(pod_c, &deleted).0 == std::io::ErrorKind::Other {
            assert!(Instant::now() < deadline, "the deleted Service still answers:\n{}", log());
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    assert!(sent > 100, "too little traffic to tell ({sent})");
    assert!(
        failures.is_empty(),
        "{} of {sent} connections to the kept Service failed: {failures:?}\n{}",
        failures.len(),
        log()
    );
    let log = log();
    assert!(log.contains("watch failed"), "the outage was never noticed:\n{log}");
    assert!(log.contains("too old resource version"), "no watch got 410 Gone:\n{log}");
}
