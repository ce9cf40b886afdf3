//! Against a real kube-apiserver (with etcd, both built from the pinned
//! release; see `tests/src/k8s.rs`): Services, EndpointSlices and the Node
//! created, changed and deleted through the API drive real traffic.
use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use forwarder_tests::{
    api_cluster::{Cluster, answering, create_echo_service, create_echo_slice, endpoints},
    echo::tcp_connect_error,
    forwarder::{Forwarder, http_get},
    kube_proxy::{KubeProxy, ProxyMode, leftovers},
    topology::{NODE_IFACE, NODE_IP, NODE_NAME},
};
use serde::Deserialize as _;
use serde_json::{Value, json};

const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Now in RFC 3339 with nanoseconds, as the EndpointSlice controller writes it.
fn utc_now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%NZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn services_and_slices_from_the_api_are_forwarded_and_follow_changes() {
    let mut cluster = Cluster::new("api");
    let (cluster_ip, node_port) = create_echo_service(&cluster);
    create_echo_slice(&cluster, &["10.244.1.2", "10.244.1.3"]);
    cluster.start_forwarder();
    let both: BTreeSet<String> = ["pod-a".to_owned(), "pod-b".to_owned()].into();
    let pod_c = &cluster.topology.pod("pod-c").ns;
    let cluster_ip_frontend = format!("{cluster_ip}:80");
    let node_port_frontend = format!("{NODE_IP}:{node_port}");
    assert_eq!(answering(pod_c, &cluster_ip_frontend, 32), both, "{}", cluster.log());
    assert_eq!(answering(&cluster.topology.client, &node_port_frontend, 32), both);

    // pod-b leaves the slice: new connections go to pod-a only. The
    // trigger time is what the EndpointSlice controller would set.
    cluster.call(
        "PATCH",
        "/apis/discovery.k8s.io/v1/namespaces/demo/endpointslices/echo-1",
        Some(json!({
            "metadata": {"annotations": {TRIGGER_TIME: utc_now()}},
            "endpoints": endpoints(&["10.244.1.2"]),
        })),
    );
    cluster.eventually("pod-b leaving", || {
        answering(pod_c, &cluster_ip_frontend, 16) == ["pod-a".to_owned()].into()
    });
    let metrics = http_get(&cluster.topology.node, "127.0.0.1:10249", "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default();
    for line in [
        "forwarder_network_programming_duration_seconds_count 1",
        "forwarder_map_entries{map=\"BACKEND4_V1\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} missing:\n{metrics}");
    }
    let dnat =
        metrics.lines().find_map(|l| l.strip_prefix("forwarder_packets_total{reason=\"dnat\"} "));
    assert!(dnat.and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n > 0), "{metrics}");

    // The Service goes: its frontends stop answering.
    cluster.call("DELETE", "/api/v1/namespaces/demo/services/echo", None);
    cluster.eventually("the Service's deletion", || {
        tcp_connect_error(pod_c, &cluster_ip_frontend).0 != std::io::ErrorKind::Other
            && tcp_connect_error(&cluster.topology.client, &node_port_frontend).0
                != std::io::ErrorKind::Other
    });
}

/// The kube-proxy built from the same release syncs its iptables rules
/// from the same apiserver (the benchmark compares against it), in a
/// namespace of its own, and removes them all with `--cleanup`.
#[test]
fn kube_proxy_syncs_rules_from_the_same_apiserver() {
    let cluster = Cluster::new("kproxy");
    let (cluster_ip, _) = create_echo_service(&cluster);
    create_echo_slice(&cluster, &["10.244.1.2"]);
    let node = &cluster.topology.node;
    let mut kube_proxy = KubeProxy::start(
        node,
        &cluster.plane.kubeconfig,
        NODE_NAME,
        ProxyMode::Iptables,
        None,
        "10.244.0.0/16",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rules = node.exec(&["iptables-save", "-t", "nat"]);
        let rules = String::from_utf8_lossy(&rules.stdout);
        if rules.contains(&format!("-d {cluster_ip}/32")) && rules.contains("KUBE-SVC-") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kube-proxy wrote no rules for {cluster_ip}:\n{rules}\n{}",
            kube_proxy.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // What the benchmark checks between its modes: the rules are seen,
    // and none is left once stopped (`--cleanup` keeps only KUBE-FIREWALL,
    // which `stop` removes).
    assert!(!leftovers(node).is_empty(), "kube-proxy's rules not found");
    let left_by_cleanup = kube_proxy.stop();
    assert!(
        left_by_cleanup.iter().all(|l| l.contains("KUBE-FIREWALL")),
        "kube-proxy --cleanup left more than KUBE-FIREWALL: {left_by_cleanup:#?}"
    );
    let left = leftovers(node);
    assert!(left.is_empty(), "left after stopping kube-proxy: {left:#?}");
}

/// The collection a manifest object is created in: `/api/v1/...` or
/// `/apis/<group>/<version>/...`, namespaced or not.
fn collection_path(object: &Value) -> String {
    let version = object["apiVersion"].as_str().expect("apiVersion");
    let root = if version == "v1" { "/api/v1".to_owned() } else { format!("/apis/{version}") };
    let kind = object["kind"].as_str().expect("kind").to_lowercase();
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{root}/namespaces/{ns}/{kind}s"),
        None => format!("{root}/{kind}s"),
    }
}

/// `deploy/forwarder.yaml` passes the apiserver's own validation (strict:
/// unknown fields fail) without creating anything, and its RBAC is enough
/// to run the agent: the ServiceAccount's token drives a real sync, and
/// is refused what the agent does not need.
#[test]
fn deploy_manifests_pass_dry_run_and_their_rbac_is_enough() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/forwarder.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/forwarder.yaml");
    let objects: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .collect();
    let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]
    );
    let mut cluster = Cluster::new("deploy");
    for object in &objects {
        let path = format!("{}?dryRun=All&fieldValidation=Strict", collection_path(object));
        cluster.call("POST", &path, Some(object.clone()));
    }
    let daemonsets = cluster.call("GET", "/apis/apps/v1/namespaces/kube-system/daemonsets", None);
    assert_eq!(daemonsets["items"], json!([]), "a dry run creates nothing");

    for object in objects.iter().filter(|o| o["kind"].as_str().is_some_and(|k| k != "DaemonSet")) {
        cluster.call("POST", &collection_path(object), Some(object.clone()));
    }
    let request = cluster.call(
        "POST",
        "/api/v1/namespaces/kube-system/serviceaccounts/forwarder/token",
        Some(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                    "spec": {"expirationSeconds": 3600}})),
    );
    let token = request["status"]["token"].as_str().expect("a token").to_owned();
    let refused = cluster.plane.request_as(&token, "GET", "/api/v1/secrets", None);
    assert!(refused.as_ref().is_err_and(|e| e.contains("HTTP 403")), "{refused:?}");

    let (cluster_ip, _) = create_echo_service(&cluster);
    create_echo_slice(&cluster, &["10.244.1.2", "10.244.1.3"]);
    let kubeconfig = cluster.plane.dir.join("forwarder-sa.kubeconfig");
    cluster.plane.write_kubeconfig(&kubeconfig, &token).expect("kubeconfig");
    let node = &cluster.topology.node;
    cluster.forwarder = Some(Forwarder::start_cluster(node, &kubeconfig, NODE_NAME, NODE_IFACE));
    let both: BTreeSet<String> = ["pod-a".to_owned(), "pod-b".to_owned()].into();
    let pod_c = &cluster.topology.pod("pod-c").ns;
    assert_eq!(answering(pod_c, &format!("{cluster_ip}:80"), 32), both, "{}", cluster.log());
}
