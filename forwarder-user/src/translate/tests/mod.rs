use std::collections::BTreeSet;

use super::*;

mod table;
mod topology;

pub(super) fn services(yaml: &str) -> Vec<Service> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("test Service parses"))
        .collect()
}

pub(super) fn slices(yaml: &str) -> Vec<EndpointSlice> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("test EndpointSlice parses"))
        .collect()
}

pub(super) fn fe(addr: Option<&str>, port: u16, proto: Proto) -> Frontend {
    Frontend::new(addr.map(|a| a.parse().unwrap()), port, proto)
}

/// The entry for pods on this node, where it differs.
pub(super) fn fi(addr: Option<&str>, port: u16, proto: Proto) -> Frontend {
    Frontend { scope: Scope::Internal, ..fe(addr, port, proto) }
}

pub(super) fn ep(s: &str) -> Endpoint {
    let (addr, port) = s.split_once(':').unwrap();
    Endpoint { addr: addr.parse().unwrap(), port: port.parse().unwrap() }
}

pub(super) const WEB: &str = "
metadata: {name: web, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
";

pub(super) const WEB_SLICES: &str = "
metadata: {name: web-a, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.244.1.2], conditions: {ready: true}}
- {addresses: [10.244.1.3]}
- {addresses: [10.244.1.4], conditions: {ready: false}}
---
metadata: {name: web-b, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 9090, protocol: TCP}]
endpoints:
- {addresses: [10.244.2.2], conditions: {ready: true}}
---
metadata: {name: other, namespace: demo, labels: {kubernetes.io/service-name: other}}
addressType: IPv4
ports: [{name: http, port: 7070, protocol: TCP}]
endpoints: [{addresses: [10.244.9.9]}]
---
metadata: {name: web-elsewhere, namespace: prod, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 7070, protocol: TCP}]
endpoints: [{addresses: [10.244.8.8]}]
";

/// One endpoint on this node (node-a), one on node-b.
pub(super) const POLICY_SLICES: &str = "
metadata: {name: etp-1, namespace: demo, labels: {kubernetes.io/service-name: etp}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.2], nodeName: node-a}
- {addresses: [10.244.2.2], nodeName: node-b}
";

#[test]
fn endpoints_on_this_node_are_known_as_local() {
    let services = services(
        "
metadata: {name: etp, namespace: demo}
spec: {clusterIP: 10.96.1.1, ports: [{port: 80}]}
",
    );
    let out = translate(&services, &slices(POLICY_SLICES), "node-a");
    assert_eq!(out.state.local_endpoints, ["10.244.1.2".parse().unwrap()].into());
}

#[test]
fn session_affinity_timeout_applies_to_every_frontend_entry() {
    let services = services(
        "
metadata: {name: etp, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.1.1, sessionAffinity: ClientIP, externalTrafficPolicy: Local,
       sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}, ports: [{port: 80, nodePort: 30100}]}
---
metadata: {name: default-timeout, namespace: demo}
spec: {clusterIP: 10.96.1.2, sessionAffinity: ClientIP, ports: [{port: 80}]}
---
metadata: {name: none, namespace: demo}
spec: {clusterIP: 10.96.1.3, sessionAffinity: None, ports: [{port: 80}]}
",
    );
    let out = translate(&services, &slices(POLICY_SLICES), "node-a");
    let expect: BTreeMap<Frontend, u32> = [
        (fe(None, 30100, Proto::Tcp), 60),
        (fi(None, 30100, Proto::Tcp), 60),
        (fe(Some("10.96.1.1"), 80, Proto::Tcp), 60),
        (fe(Some("10.96.1.2"), 80, Proto::Tcp), 10_800),
    ]
    .into();
    assert_eq!(out.state.affinity, expect);
}

/// Empty because of a `Local` policy on this node: drop (kube-proxy does);
/// empty everywhere: reject. Every ClusterIP is known, for unknown ports.
#[test]
fn empty_sets_drop_or_reject_and_cluster_ips_are_listed() {
    let services = services(
        "
metadata: {name: etp, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.1.1, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30100}]}
---
metadata: {name: empty, namespace: demo}
spec: {clusterIP: 10.96.1.2, ports: [{port: 80}]}
",
    );
    let slices = slices(
        "
metadata: {name: etp-1, namespace: demo, labels: {kubernetes.io/service-name: etp}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.2.2], nodeName: node-b}]
",
    );
    let out = translate(&services, &slices, "node-a");
    assert_eq!(out.state.drop_when_empty, [fe(None, 30100, Proto::Tcp)].into());
    assert_eq!(out.state.services[&fe(Some("10.96.1.2"), 80, Proto::Tcp)], vec![]);
    let cluster_ips: BTreeSet<std::net::Ipv4Addr> =
        ["10.96.1.1".parse().unwrap(), "10.96.1.2".parse().unwrap()].into();
    assert_eq!(out.state.cluster_ips, cluster_ips);
}

#[test]
fn health_check_node_ports_count_ready_local_endpoints() {
    let services = services(
        "
metadata: {name: etp, namespace: demo}
spec: {type: LoadBalancer, clusterIP: 10.96.1.1, externalTrafficPolicy: Local, healthCheckNodePort: 32000,
       ports: [{port: 80, nodePort: 30100}]}
---
metadata: {name: cluster, namespace: demo}
spec: {type: LoadBalancer, clusterIP: 10.96.1.2, healthCheckNodePort: 32001, ports: [{port: 80, nodePort: 30101}]}
",
    );
    let slices = slices(
        "
metadata: {name: etp-1, namespace: demo, labels: {kubernetes.io/service-name: etp}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.2], nodeName: node-a}
- {addresses: [10.244.1.3], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.2.2], nodeName: node-b}
",
    );
    let out = translate(&services, &slices, "node-a");
    let check =
        |n: usize| HealthCheck { namespace: "demo".into(), name: "etp".into(), local_endpoints: n };
    assert_eq!(out.health_checks, [(32000, check(1))].into());
    let out = translate(&services, &slices, "node-c");
    assert_eq!(out.health_checks, [(32000, check(0))].into());
}

#[test]
fn source_ranges_guard_load_balancer_ips_only() {
    let services = services(
        "
metadata: {name: lb, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 10.96.1.1
  externalIPs: [198.51.100.1]
  loadBalancerSourceRanges: [' 192.168.010.0/24 ', 10.1.2.3/8, 'fd00::/8', nonsense]
  ports: [{port: 80, nodePort: 30100}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.10}]}}
",
    );
    let out = translate(&services, &[] as &[EndpointSlice], "node-a");
    let cidrs: BTreeSet<crate::cidr::Cidr> =
        ["10.0.0.0/8".parse().unwrap(), "192.168.10.0/24".parse().unwrap()].into();
    let expect: BTreeMap<Frontend, BTreeSet<crate::cidr::Cidr>> =
        [(fe(Some("203.0.113.10"), 80, Proto::Tcp), cidrs)].into();
    assert_eq!(out.state.source_ranges, expect);
    let skipped: Vec<String> = out.skipped.iter().map(|s| s.reason.clone()).collect();
    assert_eq!(
        skipped,
        [r#"loadBalancerSourceRanges: "nonsense" is not an IPv4 CIDR (a.b.c.d/n)"#]
    );
}
