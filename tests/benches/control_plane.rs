//! The control plane against a real kube-apiserver, forwarder and the real
//! kube-proxy (iptables and nftables, each with its default
//! `minSyncPeriod` and with 0) one after the other on the same API: with
//! 10,000 Services and 100,000 endpoints already in, the time from each
//! agent's start to its first full sync (its own
//! `*_sync_proxy_rules_last_timestamp_seconds`); then 100 single-endpoint
//! changes, one at a time, and the network programming latency of each
//! (the agent's own `*_network_programming_duration_seconds`, from the
//! slice's `last-change-trigger-time` to the change being programmed);
//! the agent's peak RSS and CPU-seconds. Prints one JSON line per agent;
//! `cargo xtask bench` records them. `FORWARDER_BENCH_SERVICES` scales it
//! down; `FORWARDER_BENCH_SMOKE=1` is 10 Services and 5 changes.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use forwarder_tests::{
    api_cluster::Cluster,
    forwarder::{Forwarder, attachments, http_get},
    kube_proxy::{KubeProxy, ProxyMode, leftovers, metric, unix_now},
    netns::NetNs,
    topology::{NODE_IFACE, NODE_NAME},
};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::{Value, json};

const ENDPOINTS_PER_SERVICE: usize = 10;
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Requests in flight while filling the API.
const CONCURRENCY: usize = 64;
/// Both agents serve metrics here (their common default port) in the node.
const METRICS: &str = "127.0.0.1:10249";
const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// How long one agent's changes may take in all (the results say how many
/// were made).
const CHANGE_BUDGET: Duration = Duration::from_secs(240);

#[derive(Clone, Copy)]
enum Agent {
    Forwarder,
    /// kube-proxy in this mode, with this `--iptables-min-sync-period`
    /// (`None`: its default, 1s).
    KubeProxy(ProxyMode, Option<&'static str>),
}

const AGENTS: [(&str, Agent); 5] = [
    ("forwarder", Agent::Forwarder),
    // The legacy backend: see `ProxyMode::IptablesLegacy`.
    ("kube-proxy-iptables", Agent::KubeProxy(ProxyMode::IptablesLegacy, None)),
    ("kube-proxy-iptables-min-sync-0", Agent::KubeProxy(ProxyMode::IptablesLegacy, Some("0s"))),
    ("kube-proxy-nftables", Agent::KubeProxy(ProxyMode::Nftables, None)),
    ("kube-proxy-nftables-min-sync-0", Agent::KubeProxy(ProxyMode::Nftables, Some("0s"))),
];

/// A running agent and the prefix of its metric names.
enum Running {
    Forwarder(Forwarder),
    KubeProxy(KubeProxy),
}

impl Running {
    fn prefix(&self) -> &'static str {
        match self {
            Self::Forwarder(_) => "forwarder",
            Self::KubeProxy(_) => "kubeproxy",
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Self::Forwarder(f) => f.pid(),
            Self::KubeProxy(k) => k.pid(),
        }
    }

    fn flags(&self, map_max: &str) -> Value {
        match self {
            Self::Forwarder(_) => json!(["--bpf-lb-map-max", map_max]),
            Self::KubeProxy(k) => json!(k.flags),
        }
    }
}

fn endpoint_ip(service: usize, index: usize) -> String {
    let n = u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0)) + (service * 16 + index) as u32;
    std::net::Ipv4Addr::from(n).to_string()
}

fn slice(service: usize, ips: &[String]) -> Value {
    let endpoints: Vec<_> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node-b"}))
        .collect();
    json!({
        "metadata": {"name": format!("svc-{service}-1"), "namespace": "demo",
                     "labels": {"kubernetes.io/service-name": format!("svc-{service}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": endpoints,
    })
}

async fn client(kubeconfig: &Path) -> Client {
    let file = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config =
        Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await.expect("config");
    Client::try_from(config).expect("client")
}

/// Creates the Services and their slices, `CONCURRENCY` requests at a time.
async fn fill(client: &Client, services: usize) -> Duration {
    let svcs: Api<Service> = Api::namespaced(client.clone(), "demo");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "demo");
    let started = Instant::now();
    futures::stream::iter(0..services)
        .map(|i| {
            let (svcs, slices) = (svcs.clone(), slices.clone());
            async move {
                let service: Service = serde_json::from_value(json!({
                    "metadata": {"name": format!("svc-{i}"), "namespace": "demo"},
                    "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
                }))?;
                svcs.create(&PostParams::default(), &service).await?;
                let ips: Vec<String> =
                    (0..ENDPOINTS_PER_SERVICE).map(|j| endpoint_ip(i, j)).collect();
                let slice: EndpointSlice = serde_json::from_value(slice(i, &ips))?;
                slices.create(&PostParams::default(), &slice).await?;
                Ok::<_, Box<dyn std::error::Error>>(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .expect("filling the API");
    started.elapsed()
}

/// `<prefix>_network_programming_duration_seconds` (count, sum).
fn programming(node: &NetNs, prefix: &str) -> (u64, f64) {
    let body = http_get(node, METRICS, "/metrics").map(|(_, b)| b).unwrap_or_default();
    let name = format!("{prefix}_network_programming_duration_seconds");
    let count = metric(&body, &format!("{name}_count")).unwrap_or(0.0);
    (count as u64, metric(&body, &format!("{name}_sum")).unwrap_or(0.0))
}

/// `<prefix>_sync_proxy_rules_last_timestamp_seconds`, once it is set.
fn wait_first_sync(node: &NetNs, prefix: &str) -> f64 {
    let name = format!("{prefix}_sync_proxy_rules_last_timestamp_seconds");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let body = http_get(node, METRICS, "/metrics").map(|(_, b)| b).unwrap_or_default();
        if let Some(at) = metric(&body, &name).filter(|t| *t > 0.0) {
            return at;
        }
        assert!(Instant::now() < deadline, "{name} never set");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")?.split_whitespace().next()?.parse().ok())
}

/// User and system CPU of the process and of the children it waited for
/// (kube-proxy's iptables-restore and nft runs).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command's closing parenthesis: state is the first,
    // utime, stime, cutime and cstime the 12th to 15th.
    let fields: Vec<u64> = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|f| f.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (fields.len() == 4).then(|| fields.iter().sum::<u64>() as f64 / ticks)
}

fn main() {
    let smoke = std::env::var_os("FORWARDER_BENCH_SMOKE").is_some_and(|v| v == "1");
    let services: usize = std::env::var("FORWARDER_BENCH_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if smoke { 10 } else { 10_000 });
    let changes = if smoke { 5 } else { 100 };
    let cluster = Cluster::new("cpbench");
    let kubeconfig = cluster.plane.kubeconfig.clone();
    let node: &NetNs = &cluster.topology.node;
    // One thread in the node's namespace, where the apiserver listens: one
    // client, one connection, so the latencies are the agents', not curl's.
    node.run(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let client = client(&kubeconfig).await;
            let fill_time = fill(&client, services).await;
            eprintln!("control_plane: {services} Services in the API after {fill_time:?}");
            let mut variants = Variants::default();
            for (name, agent) in AGENTS {
                let run = Run { node, kubeconfig: &kubeconfig, client: &client, services, changes };
                let mut result = run.measure(agent, &mut variants).await;
                result["agent"] = json!(name);
                result["fill_api_s"] = json!(fill_time.as_secs_f64());
                println!("{result}");
                eprintln!("control_plane: {name} done");
            }
        })
    });
}

/// Which replacement endpoint each changed Service's slice holds now
/// (0: none), so that every change is a real one, whichever agent makes it.
#[derive(Default)]
struct Variants(std::collections::HashMap<usize, usize>);

impl Variants {
    /// The next slice of `service`: its first endpoint replaced by another.
    fn next(&mut self, service: usize) -> Value {
        let variant = self.0.entry(service).or_default();
        *variant = (*variant + 1) % 6;
        let mut ips: Vec<String> =
            (0..ENDPOINTS_PER_SERVICE).map(|j| endpoint_ip(service, j)).collect();
        if *variant > 0 {
            ips[0] = endpoint_ip(service, ENDPOINTS_PER_SERVICE + *variant);
        }
        slice(service, &ips)
    }
}

struct Run<'a> {
    node: &'a NetNs,
    kubeconfig: &'a Path,
    client: &'a Client,
    services: usize,
    changes: usize,
}

impl Run<'_> {
    /// One agent from start to stop: its first sync, `changes` changes, what it
    /// cost; then it is stopped, cleaned up, and checked to have left nothing.
    async fn measure(&self, agent: Agent, variants: &mut Variants) -> Value {
        let Self { node, kubeconfig, services, changes, .. } = *self;
        let map_max =
            (services * (ENDPOINTS_PER_SERVICE + 1) + 4096).next_power_of_two().to_string();
        let started = unix_now();
        let running = match agent {
            Agent::Forwarder => Running::Forwarder(Forwarder::start_cluster_with(
                node,
                kubeconfig,
                NODE_NAME,
                NODE_IFACE,
                &["--bpf-lb-map-max", &map_max],
            )),
            Agent::KubeProxy(mode, min_sync) => Running::KubeProxy(KubeProxy::start(
                node,
                kubeconfig,
                NODE_NAME,
                mode,
                min_sync,
                CLUSTER_CIDR,
            )),
        };
        let synced = wait_first_sync(node, running.prefix());
        let pid = running.pid().expect("agent runs");
        let cpu_at_sync = cpu_seconds(pid);
        let latencies = self.change_latencies(running.prefix(), variants).await;
        let result = json!({
            "services": services,
            "endpoints": services * ENDPOINTS_PER_SERVICE,
            "flags": running.flags(&map_max),
            "start_to_programmed_s": synced - started,
            "changes_planned": changes,
            "changes": latencies.len(),
            "programming_p50_ms": percentile(&latencies, 0.50) * 1e3,
            "programming_p99_ms": percentile(&latencies, 0.99) * 1e3,
            "programming_max_ms": latencies.last().copied().unwrap_or(f64::NAN) * 1e3,
            "peak_rss_mib": peak_rss_kib(pid).map(|kib| kib as f64 / 1024.0),
            "cpu_s_to_programmed": cpu_at_sync,
            "cpu_s_total": cpu_seconds(pid),
        });
        match running {
            Running::Forwarder(forwarder) => drop(forwarder),
            Running::KubeProxy(mut proxy) => drop(proxy.stop()),
        }
        let (programs, rules) = (attachments(node), leftovers(node));
        assert!(programs.is_empty() && rules.is_empty(), "left behind: {programs:?} {rules:#?}");
        result
    }

    /// `changes` single-endpoint changes, one at a time, each stamped with its
    /// trigger time just before it is sent; returns each one's latency as the
    /// agent measured it (seconds, sorted).
    async fn change_latencies(&self, prefix: &str, variants: &mut Variants) -> Vec<f64> {
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), "demo");
        let mut latencies = Vec::with_capacity(self.changes);
        let (mut count, mut sum) = programming(self.node, prefix);
        let started = Instant::now();
        for change in 0..self.changes {
            // kube-proxy's nftables mode takes about 18 s per sync at this size
            // here: past the budget, the changes made so far are the sample.
            if started.elapsed() > CHANGE_BUDGET {
                break;
            }
            // Spread over the Services, a different one each time.
            let service = change * 7919 % self.services;
            let mut patch = variants.next(service);
            patch["metadata"]["annotations"] = json!({TRIGGER_TIME: Timestamp::now().to_string()});
            slices
                .patch(&format!("svc-{service}-1"), &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .expect("patch");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let (now_count, now_sum) = programming(self.node, prefix);
                if now_count > count {
                    latencies.push((now_sum - sum) / (now_count - count) as f64);
                    (count, sum) = (now_count, now_sum);
                    break;
                }
                assert!(Instant::now() < deadline, "{prefix}: change {change} never programmed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        latencies.sort_by(f64::total_cmp);
        latencies
    }
}
