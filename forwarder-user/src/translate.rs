//! Kubernetes objects -> desired datapath state. Pure: no I/O, no clock.
use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::{EndpointHints, EndpointSlice},
};

use crate::{
    cidr::{Cidr, parse_ipv4},
    model::{DesiredState, Endpoint, Frontend, Proto, Scope},
};

/// Label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Something in the input that was skipped, with enough context to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// `namespace/name` of the object.
    pub object: String,
    pub reason: String,
}

/// A health check node port to serve for an `externalTrafficPolicy: Local`
/// Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready (not terminating) endpoints on this node.
    pub local_endpoints: usize,
}

#[derive(Debug, Default)]
pub struct Translation {
    pub state: DesiredState,
    /// By `healthCheckNodePort`.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    pub skipped: Vec<Skipped>,
}

/// Labels that take a Service away from kube-proxy (and from us).
const IGNORE_LABELS: [&str; 2] =
    ["service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless"];

/// Builds the desired state from Services and EndpointSlices, for the node
/// `here` (its name, and its zone for topology hints).
///
/// Ignored on purpose, as kube-proxy does: ExternalName and headless
/// Services, Services without a ClusterIP, Services labelled for another
/// proxy or as headless. Endpoints are the ready ones (readiness unknown
/// counts as ready, as the API says); when none is ready, the serving and
/// terminating ones (upstream's ProxyTerminatingEndpoints), and the same
/// rule applies within this node's endpoints for a `Local` policy.
/// Cluster-wide sets follow the EndpointSlice hints that the Service's
/// `trafficDistribution` (or the topology-aware-routing annotation) made
/// the controller write, with kube-proxy's fallbacks to every endpoint.
///
/// ClusterIPs follow `internalTrafficPolicy`. External frontends (node
/// ports, external and load balancer IPs) follow `externalTrafficPolicy`
/// for traffic from outside; pods and the node itself reach them through
/// every endpoint (a separate `Scope::Internal` entry where that differs).
pub fn translate<'a>(
    services: &[impl Borrow<Service>],
    slices: &[impl Borrow<EndpointSlice>],
    here: impl Into<Locality<'a>>,
) -> Translation {
    let here = here.into();
    let node_name = here.node;
    let mut out = Translation::default();
    let mut owner: BTreeMap<Frontend, String> = BTreeMap::new();
    let mut sorted: Vec<&Service> = services.iter().map(Borrow::borrow).collect();
    sorted.sort_by_cached_key(|s| object_name(&s.metadata));
    let slices_by_service = index_slices(slices);
    for service in sorted {
        let name = object_name(&service.metadata);
        let labels = service.metadata.labels.as_ref();
        if labels.is_some_and(|l| IGNORE_LABELS.iter().any(|k| l.contains_key(*k))) {
            continue;
        }
        let Some(cluster_ip) = cluster_ip(service, &name, &mut out.skipped) else {
            continue;
        };
        out.state.cluster_ips.insert(cluster_ip);
        let (external_ips, load_balancer_ips) = external_ips(service, &name, &mut out.skipped);
        let source_ranges = source_ranges(service, &name, &mut out.skipped);
        let spec = service.spec.as_ref().expect("cluster_ip checked spec");
        let exposes_node_port = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
        let key = (service.metadata.namespace.as_deref(), service.metadata.name.as_deref());
        let own_slices = slices_by_service.get(&key).map(Vec::as_slice).unwrap_or_default();
        let affinity = session_affinity(service);
        if external_local
            && exposes_node_port
            && let Some(port) = spec.health_check_node_port
        {
            match u16::try_from(port) {
                Ok(port) if port != 0 => {
                    let meta = &service.metadata;
                    out.health_checks.insert(
                        port,
                        HealthCheck {
                            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
                            name: meta.name.clone().unwrap_or_default(),
                            local_endpoints: ready_on_node(own_slices, node_name),
                        },
                    );
                }
                _ => out.skipped.push(Skipped {
                    object: name.clone(),
                    reason: format!("healthCheckNodePort {port} is outside 1-65535"),
                }),
            }
        }
        for port in spec.ports.iter().flatten() {
            let Some(proto) = protocol(port, &name, &mut out.skipped) else {
                continue;
            };
            let Some(service_port) = port_number(port.port, "port", &name, &mut out.skipped) else {
                continue;
            };
            let candidates = candidates(port, proto, own_slices, here.node);
            let cluster = cluster_endpoints(&candidates, here);
            let local = local_endpoints(&candidates);
            out.state.local_endpoints.extend(local.iter().map(|e| e.addr));
            let internal = if internal_local { &local } else { &cluster };
            let external = if external_local { &local } else { &cluster };

            let mut entries =
                vec![(Frontend::new(Some(cluster_ip), service_port, proto), internal)];
            let mut external_ports: Vec<(Option<Ipv4Addr>, u16)> = external_ips
                .iter()
                .chain(&load_balancer_ips)
                .map(|ip| (Some(*ip), service_port))
                .collect();
            if exposes_node_port
                && let Some(node_port) = port.node_port
                && let Some(node_port) = port_number(node_port, "nodePort", &name, &mut out.skipped)
            {
                external_ports.push((None, node_port));
            }
            for (addr, port) in external_ports {
                let frontend = Frontend::new(addr, port, proto);
                entries.push((frontend, external));
                // Pods and the node itself reach an external frontend
                // "subject to neither traffic policy" (kube-proxy): with
                // `Local`, they get every endpoint in their own entry.
                if external_local && *external != cluster {
                    entries.push((Frontend { scope: Scope::Internal, ..frontend }, &cluster));
                }
            }
            for (frontend, endpoints) in entries {
                if let Some(first) = owner.get(&frontend) {
                    out.skipped.push(Skipped {
                        object: name.clone(),
                        reason: format!("frontend {frontend} is already used by {first}"),
                    });
                    continue;
                }
                owner.insert(frontend, name.clone());
                if endpoints.is_empty() && !cluster.is_empty() {
                    out.state.drop_when_empty.insert(frontend);
                }
                out.state.services.insert(frontend, endpoints.clone());
                if let Some(timeout) = affinity {
                    out.state.affinity.insert(frontend, timeout);
                }
                let load_balancer = frontend.addr.is_some_and(|a| load_balancer_ips.contains(&a));
                if load_balancer && !source_ranges.is_empty() {
                    out.state.source_ranges.insert(frontend, source_ranges.clone());
                }
            }
        }
    }
    out
}

fn object_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("<unnamed>")
    )
}

/// The Service's IPv4 ClusterIP: `clusterIPs` holds both families of a
/// dual-stack Service in either order; `clusterIP` is its first entry.
fn cluster_ip(service: &Service, name: &str, skipped: &mut Vec<Skipped>) -> Option<Ipv4Addr> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let ips: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    let ips: Vec<&str> = ips.into_iter().filter(|ip| !ip.is_empty() && *ip != "None").collect();
    if ips.is_empty() {
        return None;
    }
    if let Some(v4) = ips.iter().find_map(|ip| parse_ipv4(ip)) {
        return Some(v4);
    }
    let reason = match ips.iter().find(|ip| ip.parse::<std::net::Ipv6Addr>().is_err()) {
        Some(bad) => format!("clusterIP {bad:?} is not an IP address"),
        None => format!("clusterIP {} is IPv6; this dataplane serves IPv4 only", ips[0]),
    };
    skipped.push(Skipped { object: name.to_owned(), reason });
    None
}

/// `spec.externalIPs`, and for LoadBalancer Services the load balancer's
/// ingress IPs (except `ipMode: Proxy`, where the load balancer delivers to
/// the node itself). IPv6 entries are left to an IPv6 dataplane.
fn external_ips(
    service: &Service,
    name: &str,
    skipped: &mut Vec<Skipped>,
) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>) {
    let spec = service.spec.as_ref();
    let external = spec.and_then(|s| s.external_ips.as_ref()).into_iter().flatten();
    let load_balancer = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .filter(|_| spec.and_then(|s| s.type_.as_deref()) == Some("LoadBalancer"))
        .into_iter()
        .flatten()
        .filter(|ingress| ingress.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|ingress| ingress.ip.as_ref());
    let mut parse = |ips: &mut Vec<Ipv4Addr>, ip: &String| match parse_ipv4(ip) {
        Some(ip) if !ips.contains(&ip) => ips.push(ip),
        Some(_) => {}
        None if ip.parse::<std::net::Ipv6Addr>().is_ok() => {}
        None => skipped.push(Skipped {
            object: name.to_owned(),
            reason: format!("external IP {ip:?} is not an IP address"),
        }),
    };
    let (mut externals, mut load_balancers) = (Vec::new(), Vec::new());
    external.for_each(|ip| parse(&mut externals, ip));
    load_balancer.for_each(|ip| parse(&mut load_balancers, ip));
    load_balancers.retain(|ip| !externals.contains(ip));
    (externals, load_balancers)
}

/// `loadBalancerSourceRanges`, normalised; invalid entries are reported and
/// left out (as kube-proxy does), IPv6 ones left to an IPv6 dataplane.
fn source_ranges(service: &Service, name: &str, skipped: &mut Vec<Skipped>) -> BTreeSet<Cidr> {
    let ranges = service.spec.as_ref().and_then(|s| s.load_balancer_source_ranges.as_ref());
    let mut out = BTreeSet::new();
    for range in ranges.into_iter().flatten() {
        match range.parse::<Cidr>() {
            Ok(cidr) => {
                out.insert(cidr);
            }
            Err(_) if range.contains(':') => {}
            Err(err) => skipped.push(Skipped {
                object: name.to_owned(),
                reason: format!("loadBalancerSourceRanges: {err}"),
            }),
        }
    }
    out
}

/// `sessionAffinity: ClientIP`'s timeout: `timeoutSeconds`, 10800 (three
/// hours) by default, as the API defines it.
fn session_affinity(service: &Service) -> Option<u32> {
    let spec = service.spec.as_ref()?;
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .and_then(|t| u32::try_from(t).ok())
        .filter(|t| *t > 0);
    Some(timeout.unwrap_or(10_800))
}

/// Distinct ready endpoint addresses on `node`, across the Service's slices.
fn ready_on_node(slices: &[&EndpointSlice], node: &str) -> usize {
    slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.node_name.as_deref() == Some(node))
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| &e.addresses)
        .collect::<BTreeSet<_>>()
        .len()
}

fn protocol(port: &ServicePort, name: &str, skipped: &mut Vec<Skipped>) -> Option<Proto> {
    match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        "SCTP" => Some(Proto::Sctp),
        other => {
            skipped.push(Skipped {
                object: name.to_owned(),
                reason: format!("port {}: protocol {other} is not supported", port.port),
            });
            None
        }
    }
}

fn port_number(value: i32, field: &str, name: &str, skipped: &mut Vec<Skipped>) -> Option<u16> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Some(port),
        _ => {
            skipped.push(Skipped {
                object: name.to_owned(),
                reason: format!("{field} {value} is outside 1-65535"),
            });
            None
        }
    }
}

/// IPv4 slices by the (namespace, name) of the Service they belong to: one
/// pass, so translation stays linear in the number of objects.
type SliceIndex<'a> = HashMap<(Option<&'a str>, Option<&'a str>), Vec<&'a EndpointSlice>>;

fn index_slices(slices: &[impl Borrow<EndpointSlice>]) -> SliceIndex<'_> {
    let mut index: SliceIndex<'_> = HashMap::new();
    for slice in slices.iter().map(Borrow::borrow).filter(|s| s.address_type == "IPv4") {
        let service = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL));
        if let Some(service) = service {
            let key = (slice.metadata.namespace.as_deref(), Some(service.as_str()));
            index.entry(key).or_default().push(slice);
        }
    }
    index
}

/// This node as topology-aware routing sees it: kube-proxy reads the zone
/// from its own Node's `topology.kubernetes.io/zone` label.
#[derive(Clone, Copy, Debug, Default)]
pub struct Locality<'a> {
    pub node: &'a str,
    pub zone: Option<&'a str>,
}

impl<'a> From<&'a str> for Locality<'a> {
    fn from(node: &'a str) -> Self {
        Self { node, zone: None }
    }
}

/// One endpoint of a Service port, with what decides whether it is used.
struct Candidate<'a> {
    endpoint: Endpoint,
    ready: bool,
    /// Not ready, but serving and terminating: the fallback.
    terminating: bool,
    on_node: bool,
    hints: Option<&'a EndpointHints>,
}

impl Candidate<'_> {
    fn hinted_for_zone(&self, zone: &str) -> bool {
        let zones = self.hints.and_then(|h| h.for_zones.as_ref());
        zones.is_some_and(|zones| zones.iter().any(|z| z.name == zone))
    }

    fn hinted_for_node(&self, node: &str) -> bool {
        let nodes = self.hints.and_then(|h| h.for_nodes.as_ref());
        nodes.is_some_and(|nodes| nodes.iter().any(|n| n.name == node))
    }

    fn has_zone_hints(&self) -> bool {
        self.hints.and_then(|h| h.for_zones.as_ref()).is_some_and(|z| !z.is_empty())
    }

    fn has_node_hints(&self) -> bool {
        self.hints.and_then(|h| h.for_nodes.as_ref()).is_some_and(|n| !n.is_empty())
    }
}

/// Every endpoint of one Service port across its slices. The slice port is
/// matched by name and protocol; its number is the resolved targetPort,
/// which may differ from slice to slice for a named targetPort.
fn candidates<'a>(
    port: &ServicePort,
    proto: Proto,
    slices: &[&'a EndpointSlice],
    node: &str,
) -> Vec<Candidate<'a>> {
    let wanted_name = port.name.as_deref().unwrap_or("");
    let mut out = Vec::new();
    for slice in slices {
        let Some(target) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| {
                p.name.as_deref().unwrap_or("") == wanted_name
                    && p.protocol.as_deref().unwrap_or("TCP") == proto.to_string()
            })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            // As kube-proxy reads them: an unset `serving` counts as serving.
            let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let usable = ready || (serving && terminating);
            if !usable {
                continue;
            }
            for addr in endpoint.addresses.iter().filter_map(|a| parse_ipv4(a)) {
                out.push(Candidate {
                    endpoint: Endpoint { addr, port: target },
                    ready,
                    terminating: !ready,
                    on_node: endpoint.node_name.as_deref() == Some(node),
                    hints: endpoint.hints.as_ref(),
                });
            }
        }
    }
    out
}

/// Which hints narrow the cluster-wide endpoints, as kube-proxy decides
/// (`topologyModeFromHints`): node hints if every ready endpoint has some
/// and one names this node (PreferSameNode); else zone hints if every
/// ready endpoint has some and one names this node's zone (PreferClose,
/// PreferSameZone); else none (every endpoint).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode<'a> {
    All,
    Node(&'a str),
    Zone(&'a str),
}

fn topology_mode<'a>(candidates: &[Candidate<'_>], here: Locality<'a>) -> TopologyMode<'a> {
    let ready: Vec<&Candidate<'_>> = candidates.iter().filter(|c| c.ready).collect();
    if ready.is_empty() {
        return TopologyMode::All;
    }
    if ready.iter().all(|c| c.has_node_hints())
        && ready.iter().any(|c| c.hinted_for_node(here.node))
    {
        return TopologyMode::Node(here.node);
    }
    if let Some(zone) = here.zone
        && ready.iter().all(|c| c.has_zone_hints())
        && ready.iter().any(|c| c.hinted_for_zone(zone))
    {
        return TopologyMode::Zone(zone);
    }
    TopologyMode::All
}

/// The endpoints any client of the Service port uses (`Cluster` policy):
/// the ready ones the topology hints leave for this node, or if none, the
/// serving terminating ones (kube-proxy applies no hints to those).
fn cluster_endpoints(candidates: &[Candidate<'_>], here: Locality<'_>) -> Vec<Endpoint> {
    let mode = topology_mode(candidates, here);
    let ready: BTreeSet<Endpoint> = candidates
        .iter()
        .filter(|c| c.ready)
        .filter(|c| match mode {
            TopologyMode::All => true,
            TopologyMode::Node(node) => c.hinted_for_node(node),
            TopologyMode::Zone(zone) => c.hinted_for_zone(zone),
        })
        .map(|c| c.endpoint)
        .collect();
    if !ready.is_empty() {
        return ready.into_iter().collect();
    }
    let terminating: BTreeSet<Endpoint> =
        candidates.iter().filter(|c| c.terminating).map(|c| c.endpoint).collect();
    terminating.into_iter().collect()
}

/// The endpoints on this node (`Local` policy): the ready ones, or if none
/// is ready, the serving terminating ones. Hints play no part.
fn local_endpoints(candidates: &[Candidate<'_>]) -> Vec<Endpoint> {
    let on_node = || candidates.iter().filter(|c| c.on_node);
    let ready: BTreeSet<Endpoint> = on_node().filter(|c| c.ready).map(|c| c.endpoint).collect();
    if !ready.is_empty() {
        return ready.into_iter().collect();
    }
    let terminating: BTreeSet<Endpoint> =
        on_node().filter(|c| c.terminating).map(|c| c.endpoint).collect();
    terminating.into_iter().collect()
}

#[cfg(test)]
mod tests;
