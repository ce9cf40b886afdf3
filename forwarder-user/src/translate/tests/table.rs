//! The translation table: Services and EndpointSlices in, the frontends and
//! their endpoints out, one row per behaviour.
#[allow(clippy::wildcard_imports, reason = "the shared test vocabulary")]
use super::*;

struct Case {
    name: &'static str,
    services: &'static str,
    slices: &'static str,
    expect: Vec<(Frontend, Vec<&'static str>)>,
    skipped: Vec<&'static str>,
}

#[test]
fn translation_table() {
    let cases = vec![
        Case {
            name: "clusterIP and nodePort; named targetPort resolved per slice; only ready endpoints",
            services: WEB,
            slices: WEB_SLICES,
            expect: vec![
                (fe(None, 30080, Proto::Tcp), vec!["10.244.1.2:8080", "10.244.1.3:8080", "10.244.2.2:9090"]),
                (fe(Some("10.96.0.10"), 53, Proto::Udp), vec!["10.244.1.2:5353", "10.244.1.3:5353"]),
                (fe(Some("10.96.0.10"), 80, Proto::Tcp), vec!["10.244.1.2:8080", "10.244.1.3:8080", "10.244.2.2:9090"]),
            ],
            skipped: vec![],
        },
        Case {
            name: "ClusterIP type exposes no nodePort even if one is set",
            services: "
metadata: {name: web, namespace: demo}
spec: {type: ClusterIP, clusterIP: 10.96.0.10, ports: [{name: http, port: 80, nodePort: 30080}]}
",
            slices: WEB_SLICES,
            expect: vec![(fe(Some("10.96.0.10"), 80, Proto::Tcp), vec!["10.244.1.2:8080", "10.244.1.3:8080", "10.244.2.2:9090"])],
            skipped: vec![],
        },
        Case {
            name: "a Service without slices still has its frontend, with no endpoints",
            services: "
metadata: {name: lonely, namespace: demo}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}
",
            slices: "",
            expect: vec![(fe(Some("10.96.0.20"), 80, Proto::Tcp), vec![])],
            skipped: vec![],
        },
        Case {
            name: "unnamed port matches the unnamed slice port",
            services: "
metadata: {name: plain, namespace: demo}
spec: {clusterIP: 10.96.0.21, ports: [{port: 80, targetPort: 8080}]}
",
            slices: "
metadata: {name: plain-x, namespace: demo, labels: {kubernetes.io/service-name: plain}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.9, 10.244.1.9]}]
",
            expect: vec![(fe(Some("10.96.0.21"), 80, Proto::Tcp), vec!["10.244.1.9:8080"])],
            skipped: vec![],
        },
        Case {
            name: "ExternalName, headless and ClusterIP-less Services are ignored silently",
            services: "
metadata: {name: ext, namespace: demo}
spec: {type: ExternalName, externalName: example.com, ports: [{port: 80}]}
---
metadata: {name: headless, namespace: demo}
spec: {clusterIP: None, ports: [{port: 80}]}
---
metadata: {name: pending, namespace: demo}
spec: {ports: [{port: 80}]}
",
            slices: WEB_SLICES,
            expect: vec![],
            skipped: vec![],
        },
        Case {
            name: "unsupported protocol and IPv6 are skipped with a reason; other ports stay",
            services: "
metadata: {name: mixed, namespace: demo}
spec: {clusterIP: 10.96.0.30, ports: [{name: a, port: 80}, {name: s, port: 9, protocol: DCCP}]}
---
metadata: {name: v6, namespace: demo}
spec: {clusterIP: 'fd00::1', ports: [{port: 80}]}
---
metadata: {name: junk, namespace: demo}
spec: {clusterIP: 'ten.nine', ports: [{port: 80}]}
",
            slices: "",
            expect: vec![(fe(Some("10.96.0.30"), 80, Proto::Tcp), vec![])],
            skipped: vec![
                "demo/junk: clusterIP \"ten.nine\" is not an IP address",
                "demo/mixed: port 9: protocol DCCP is not supported",
                "demo/v6: clusterIP fd00::1 is IPv6; this dataplane serves IPv4 only",
            ],
        },
        Case {
            name: "one port number over TCP, UDP and SCTP: three frontends, each its own targets",
            services: "
metadata: {name: sig, namespace: demo}
spec:
  clusterIP: 10.96.0.31
  ports:
  - {name: t, port: 3868, targetPort: 3868}
  - {name: u, port: 3868, targetPort: 3869, protocol: UDP}
  - {name: s, port: 3868, targetPort: sig, protocol: SCTP}
",
            slices: "
metadata: {name: sig-1, namespace: demo, labels: {kubernetes.io/service-name: sig}}
addressType: IPv4
ports: [{name: t, port: 3868}, {name: u, port: 3869, protocol: UDP}, {name: s, port: 3870, protocol: SCTP}]
endpoints: [{addresses: [10.244.1.9]}]
",
            expect: vec![
                (fe(Some("10.96.0.31"), 3868, Proto::Tcp), vec!["10.244.1.9:3868"]),
                (fe(Some("10.96.0.31"), 3868, Proto::Udp), vec!["10.244.1.9:3869"]),
                (fe(Some("10.96.0.31"), 3868, Proto::Sctp), vec!["10.244.1.9:3870"]),
            ],
            skipped: vec![],
        },
        Case {
            name: "dual-stack: the IPv4 entry of clusterIPs, whichever comes first",
            services: "
metadata: {name: dual, namespace: demo}
spec: {clusterIP: 'fd00::10', clusterIPs: ['fd00::10', 10.96.0.60], ports: [{port: 80}]}
",
            slices: "",
            expect: vec![(fe(Some("10.96.0.60"), 80, Proto::Tcp), vec![])],
            skipped: vec![],
        },
        Case {
            name: "a nodePort claimed twice keeps the first Service by name",
            services: "
metadata: {name: b, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.0.41, ports: [{port: 80, nodePort: 30001}]}
---
metadata: {name: a, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.0.40, ports: [{port: 80, nodePort: 30001}]}
",
            slices: "",
            expect: vec![
                (fe(None, 30001, Proto::Tcp), vec![]),
                (fe(Some("10.96.0.40"), 80, Proto::Tcp), vec![]),
                (fe(Some("10.96.0.41"), 80, Proto::Tcp), vec![]),
            ],
            skipped: vec!["demo/b: frontend <node>:30001/TCP is already used by demo/a"],
        },
        Case {
            name: "externalIPs and LoadBalancer ingress IPs are frontends; ipMode Proxy and IPv6 are not",
            services: "
metadata: {name: lb, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.70
  externalIPs: [198.51.100.1, '2001:db8::1']
  ports: [{port: 80, nodePort: 30070}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}, {ip: 203.0.113.11, ipMode: Proxy}, {ip: 203.0.113.12, ipMode: VIP}, {hostname: lb.example}]
",
            slices: "
metadata: {name: lb-1, namespace: demo, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.2]}]
",
            expect: vec![
                (fe(None, 30070, Proto::Tcp), vec!["10.244.1.2:8080"]),
                (fe(Some("10.96.0.70"), 80, Proto::Tcp), vec!["10.244.1.2:8080"]),
                (fe(Some("198.51.100.1"), 80, Proto::Tcp), vec!["10.244.1.2:8080"]),
                (fe(Some("203.0.113.10"), 80, Proto::Tcp), vec!["10.244.1.2:8080"]),
                (fe(Some("203.0.113.12"), 80, Proto::Tcp), vec!["10.244.1.2:8080"]),
            ],
            skipped: vec![],
        },
        Case {
            name: "addresses written with leading zeros are decimal in every field, as kube-proxy reads them",
            services: "
metadata: {name: zeros, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 010.096.000.090
  clusterIPs: [010.096.000.090]
  externalIPs: [192.168.099.011]
  ports: [{port: 80, nodePort: 30090}]
status: {loadBalancer: {ingress: [{ip: 198.051.100.090}]}}
",
            slices: "
metadata: {name: zeros-1, namespace: demo, labels: {kubernetes.io/service-name: zeros}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [010.244.001.002]}]
",
            expect: vec![
                (fe(None, 30090, Proto::Tcp), vec!["10.244.1.2:8080"]),
                (fe(Some("10.96.0.90"), 80, Proto::Tcp), vec!["10.244.1.2:8080"]),
                (fe(Some("192.168.99.11"), 80, Proto::Tcp), vec!["10.244.1.2:8080"]),
                (fe(Some("198.51.100.90"), 80, Proto::Tcp), vec!["10.244.1.2:8080"]),
            ],
            skipped: vec![],
        },
        Case {
            name: "load balancer status counts only for type LoadBalancer",
            services: "
metadata: {name: was-lb, namespace: demo}
spec: {type: ClusterIP, clusterIP: 10.96.0.71, ports: [{port: 80}]}
status: {loadBalancer: {ingress: [{ip: 203.0.113.20}]}}
",
            slices: "",
            expect: vec![(fe(Some("10.96.0.71"), 80, Proto::Tcp), vec![])],
            skipped: vec![],
        },
        Case {
            name: "Services labelled for another proxy or as headless are ignored",
            services: "
metadata: {name: other-proxy, namespace: demo, labels: {service.kubernetes.io/service-proxy-name: cilium}}
spec: {clusterIP: 10.96.0.80, ports: [{port: 80}]}
---
metadata: {name: labelled-headless, namespace: demo, labels: {service.kubernetes.io/headless: ''}}
spec: {clusterIP: 10.96.0.81, ports: [{port: 80}]}
---
metadata: {name: unrelated-label, namespace: demo, labels: {app: web}}
spec: {clusterIP: 10.96.0.82, ports: [{port: 80}]}
",
            slices: "",
            expect: vec![(fe(Some("10.96.0.82"), 80, Proto::Tcp), vec![])],
            skipped: vec![],
        },
        Case {
            name: "ready endpoints win; serving-and-terminating ones only when none is ready",
            services: "
metadata: {name: a, namespace: demo}
spec: {clusterIP: 10.96.0.90, ports: [{port: 80}]}
---
metadata: {name: b, namespace: demo}
spec: {clusterIP: 10.96.0.91, ports: [{port: 80}]}
---
metadata: {name: c, namespace: demo}
spec: {clusterIP: 10.96.0.92, ports: [{port: 80}]}
",
            slices: "
metadata: {name: a-1, namespace: demo, labels: {kubernetes.io/service-name: a}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.2], conditions: {ready: true, serving: true, terminating: false}}
- {addresses: [10.244.1.3], conditions: {ready: false, serving: true, terminating: true}}
---
metadata: {name: b-1, namespace: demo, labels: {kubernetes.io/service-name: b}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.3], conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.1.4], conditions: {ready: false, serving: false, terminating: true}}
- {addresses: [10.244.1.5], conditions: {ready: false, serving: true, terminating: false}}
- {addresses: [10.244.1.6], conditions: {ready: false, terminating: true}}
---
metadata: {name: c-1, namespace: demo, labels: {kubernetes.io/service-name: c}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.4], conditions: {ready: false, serving: false, terminating: true}}
",
            expect: vec![
                (fe(Some("10.96.0.90"), 80, Proto::Tcp), vec!["10.244.1.2:8080"]),
                (fe(Some("10.96.0.91"), 80, Proto::Tcp), vec!["10.244.1.3:8080", "10.244.1.6:8080"]),
                (fe(Some("10.96.0.92"), 80, Proto::Tcp), vec![]),
            ],
            skipped: vec![],
        },
        Case {
            name: "slice ports without a number, and FQDN or IPv6 slices, give no endpoints",
            services: "
metadata: {name: odd, namespace: demo}
spec: {clusterIP: 10.96.0.95, ports: [{port: 80}]}
",
            slices: "
metadata: {name: odd-1, namespace: demo, labels: {kubernetes.io/service-name: odd}}
addressType: IPv4
ports: [{protocol: TCP}]
endpoints: [{addresses: [10.244.1.2]}]
---
metadata: {name: odd-2, namespace: demo, labels: {kubernetes.io/service-name: odd}}
addressType: FQDN
ports: [{port: 8080}]
endpoints: [{addresses: [backend.example.com]}]
---
metadata: {name: odd-3, namespace: demo, labels: {kubernetes.io/service-name: odd}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ['fd00::2']}]
---
metadata: {name: odd-4, namespace: demo, labels: {kubernetes.io/service-name: odd}}
addressType: IPv4
ports: [{port: 9090}]
endpoints: [{addresses: [10.244.1.3, 'not-an-ip']}]
",
            expect: vec![(fe(Some("10.96.0.95"), 80, Proto::Tcp), vec!["10.244.1.3:9090"])],
            skipped: vec![],
        },
        Case {
            name: "externalTrafficPolicy Local: outside clients get this node's endpoints, pods all",
            services: "
metadata: {name: etp, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.1.1, externalTrafficPolicy: Local, externalIPs: [198.51.100.5],
       ports: [{port: 80, nodePort: 30100}]}
",
            slices: POLICY_SLICES,
            expect: vec![
                (fe(None, 30100, Proto::Tcp), vec!["10.244.1.2:8080"]),
                (fi(None, 30100, Proto::Tcp), vec!["10.244.1.2:8080", "10.244.2.2:8080"]),
                (fe(Some("10.96.1.1"), 80, Proto::Tcp), vec!["10.244.1.2:8080", "10.244.2.2:8080"]),
                (fe(Some("198.51.100.5"), 80, Proto::Tcp), vec!["10.244.1.2:8080"]),
                (fi(Some("198.51.100.5"), 80, Proto::Tcp), vec!["10.244.1.2:8080", "10.244.2.2:8080"]),
            ],
            skipped: vec![],
        },
        Case {
            name: "internalTrafficPolicy Local: the ClusterIP gets this node's endpoints only",
            services: "
metadata: {name: etp, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.1.1, internalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30100}]}
",
            slices: POLICY_SLICES,
            expect: vec![
                (fe(None, 30100, Proto::Tcp), vec!["10.244.1.2:8080", "10.244.2.2:8080"]),
                (fe(Some("10.96.1.1"), 80, Proto::Tcp), vec!["10.244.1.2:8080"]),
            ],
            skipped: vec![],
        },
        Case {
            name: "both policies Local: pods still reach every endpoint of external frontends",
            services: "
metadata: {name: etp, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.1.1, internalTrafficPolicy: Local, externalTrafficPolicy: Local,
       ports: [{port: 80, nodePort: 30100}]}
",
            slices: POLICY_SLICES,
            expect: vec![
                (fe(None, 30100, Proto::Tcp), vec!["10.244.1.2:8080"]),
                (fi(None, 30100, Proto::Tcp), vec!["10.244.1.2:8080", "10.244.2.2:8080"]),
                (fe(Some("10.96.1.1"), 80, Proto::Tcp), vec!["10.244.1.2:8080"]),
            ],
            skipped: vec![],
        },
        Case {
            name: "Local policy falls back to this node's serving-terminating endpoints",
            services: "
metadata: {name: etp, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.1.1, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30100}]}
",
            slices: "
metadata: {name: etp-1, namespace: demo, labels: {kubernetes.io/service-name: etp}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.3], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.2.2], nodeName: node-b, conditions: {ready: true}}
",
            expect: vec![
                (fe(None, 30100, Proto::Tcp), vec!["10.244.1.3:8080"]),
                (fi(None, 30100, Proto::Tcp), vec!["10.244.2.2:8080"]),
                (fe(Some("10.96.1.1"), 80, Proto::Tcp), vec!["10.244.2.2:8080"]),
            ],
            skipped: vec![],
        },
        Case {
            name: "out-of-range port numbers are skipped",
            services: "
metadata: {name: big, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.0.50, ports: [{port: 70000}, {name: n, port: 81, nodePort: 0}]}
",
            slices: "",
            expect: vec![(fe(Some("10.96.0.50"), 81, Proto::Tcp), vec![])],
            skipped: vec!["demo/big: port 70000 is outside 1-65535", "demo/big: nodePort 0 is outside 1-65535"],
        },
    ];
    for case in cases {
        let out = translate(&services(case.services), &slices(case.slices), "node-a");
        let expect: BTreeMap<Frontend, Vec<Endpoint>> = case
            .expect
            .into_iter()
            .map(|(f, eps)| (f, eps.into_iter().map(ep).collect()))
            .collect();
        assert_eq!(out.state.services, expect, "case: {}", case.name);
        let skipped: Vec<String> =
            out.skipped.iter().map(|s| format!("{}: {}", s.object, s.reason)).collect();
        assert_eq!(skipped, case.skipped, "case: {}", case.name);
    }
}
