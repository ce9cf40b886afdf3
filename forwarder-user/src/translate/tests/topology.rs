//! Topology hints (`trafficDistribution`, topology-aware routing): which
//! endpoints this node (node-a, zone-a) uses, row by row after kube-proxy's
//! `CategorizeEndpoints` and `topologyModeFromHints`.
#[allow(clippy::wildcard_imports, reason = "the shared test vocabulary")]
use super::*;

const SERVICE: &str = "
metadata: {name: near, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.2.1, ports: [{port: 80, targetPort: 8080, nodePort: 30200}]}
";

struct Case {
    name: &'static str,
    internal_traffic_policy_local: bool,
    zone: Option<&'static str>,
    /// The endpoints list of the one slice.
    endpoints: &'static str,
    /// Endpoints of the ClusterIP entry.
    expect: Vec<&'static str>,
}

const HINTED: &str = "
- {addresses: [10.244.1.1], nodeName: node-a, hints: {forZones: [{name: zone-a}], forNodes: [{name: node-a}]}}
- {addresses: [10.244.2.1], nodeName: node-b, hints: {forZones: [{name: zone-a}], forNodes: [{name: node-b}]}}
- {addresses: [10.244.3.1], nodeName: node-c, hints: {forZones: [{name: zone-b}], forNodes: [{name: node-c}]}}
";

#[test]
fn topology_hints_table() {
    let cases = vec![
        Case {
            name: "node hints name this node: only its endpoints (PreferSameNode)",
            internal_traffic_policy_local: false,
            zone: Some("zone-a"),
            endpoints: HINTED,
            expect: vec!["10.244.1.1:8080"],
        },
        Case {
            name: "no node hint for this node: zone hints for its zone (PreferClose)",
            internal_traffic_policy_local: false,
            zone: Some("zone-a"),
            endpoints: "
- {addresses: [10.244.2.1], nodeName: node-b, hints: {forZones: [{name: zone-a}], forNodes: [{name: node-b}]}}
- {addresses: [10.244.3.1], nodeName: node-c, hints: {forZones: [{name: zone-b}], forNodes: [{name: node-c}]}}
",
            expect: vec!["10.244.2.1:8080"],
        },
        Case {
            name: "zone hints only, for this zone",
            internal_traffic_policy_local: false,
            zone: Some("zone-b"),
            endpoints: "
- {addresses: [10.244.1.1], hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.244.3.1, 10.244.3.2], hints: {forZones: [{name: zone-b}, {name: zone-c}]}}
",
            expect: vec!["10.244.3.1:8080", "10.244.3.2:8080"],
        },
        Case {
            name: "no hint for this zone: every endpoint",
            internal_traffic_policy_local: false,
            zone: Some("zone-z"),
            endpoints: "
- {addresses: [10.244.1.1], hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.244.3.1], hints: {forZones: [{name: zone-b}]}}
",
            expect: vec!["10.244.1.1:8080", "10.244.3.1:8080"],
        },
        Case {
            name: "a node without a zone label ignores zone hints",
            internal_traffic_policy_local: false,
            zone: None,
            endpoints: "
- {addresses: [10.244.1.1], hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.244.3.1], hints: {forZones: [{name: zone-b}]}}
",
            expect: vec!["10.244.1.1:8080", "10.244.3.1:8080"],
        },
        Case {
            name: "one ready endpoint without hints: hints are ignored",
            internal_traffic_policy_local: false,
            zone: Some("zone-a"),
            endpoints: "
- {addresses: [10.244.1.1], nodeName: node-a, hints: {forZones: [{name: zone-a}], forNodes: [{name: node-a}]}}
- {addresses: [10.244.3.1]}
",
            expect: vec!["10.244.1.1:8080", "10.244.3.1:8080"],
        },
        Case {
            name: "an unready endpoint without hints does not count",
            internal_traffic_policy_local: false,
            zone: Some("zone-a"),
            endpoints: "
- {addresses: [10.244.1.1], hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.244.3.1], hints: {forZones: [{name: zone-b}]}}
- {addresses: [10.244.4.1], conditions: {ready: false}}
",
            expect: vec!["10.244.1.1:8080"],
        },
        Case {
            name: "node hints on some endpoints only: zone hints decide",
            internal_traffic_policy_local: false,
            zone: Some("zone-b"),
            endpoints: "
- {addresses: [10.244.1.1], nodeName: node-a, hints: {forZones: [{name: zone-a}], forNodes: [{name: node-a}]}}
- {addresses: [10.244.3.1], hints: {forZones: [{name: zone-b}]}}
",
            expect: vec!["10.244.3.1:8080"],
        },
        Case {
            name: "no endpoint ready: the serving terminating ones, hints not applied",
            internal_traffic_policy_local: false,
            zone: Some("zone-a"),
            endpoints: "
- {addresses: [10.244.1.1], conditions: {ready: false, serving: true, terminating: true}, hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.244.3.1], conditions: {ready: false, serving: true, terminating: true}, hints: {forZones: [{name: zone-b}]}}
",
            expect: vec!["10.244.1.1:8080", "10.244.3.1:8080"],
        },
        Case {
            name: "internalTrafficPolicy Local: this node's endpoints, hints play no part",
            internal_traffic_policy_local: true,
            zone: Some("zone-b"),
            endpoints: HINTED,
            expect: vec!["10.244.1.1:8080"],
        },
    ];
    for case in cases {
        let mut service = services(SERVICE);
        if case.internal_traffic_policy_local {
            service[0].spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
        }
        let slice = slice_with(case.endpoints);
        let here = Locality { node: "node-a", zone: case.zone };
        let out = translate(&service, &slices(&slice), here);
        let got = &out.state.services[&fe(Some("10.96.2.1"), 80, Proto::Tcp)];
        let expect: Vec<Endpoint> = case.expect.iter().map(|s| ep(s)).collect();
        assert_eq!(*got, expect, "case: {}", case.name);
    }
    // The NodePort with `externalTrafficPolicy: Local` serves outside
    // clients from this node's endpoints; pods here get the hinted set.
    let mut service = services(SERVICE);
    service[0].spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
    let slice = slice_with(
        "
- {addresses: [10.244.1.1], nodeName: node-a, hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.244.2.1], nodeName: node-b, hints: {forZones: [{name: zone-b}]}}
- {addresses: [10.244.2.2], nodeName: node-b, hints: {forZones: [{name: zone-b}]}}
",
    );
    let out =
        translate(&service, &slices(&slice), Locality { node: "node-a", zone: Some("zone-b") });
    assert_eq!(out.state.services[&fe(None, 30200, Proto::Tcp)], vec![ep("10.244.1.1:8080")]);
    assert_eq!(
        out.state.services[&fi(None, 30200, Proto::Tcp)],
        vec![ep("10.244.2.1:8080"), ep("10.244.2.2:8080")]
    );
}

/// The Service's one slice, holding `endpoints` (a YAML list).
fn slice_with(endpoints: &str) -> String {
    format!(
        "metadata: {{name: near-1, namespace: demo, labels: {{kubernetes.io/service-name: near}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:{endpoints}"
    )
}
