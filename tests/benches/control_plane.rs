//! The control plane against a real kube-apiserver: with 10,000 Services and
//! 100,000 endpoints in the API, the time from agent start to fully
//! programmed maps; then 100 single-endpoint changes and the network
//! programming latency of each (the agent's own measure, from the slice's
//! `last-change-trigger-time` to the change being in the maps); the
//! agent's peak RSS. Prints one JSON line; `cargo xtask bench` records it.
//! `FORWARDER_BENCH_SERVICES` scales it down for a quick look.
use std::{
    io::{Read as _, Write as _},
    path::Path,
    time::{Duration, Instant},
};

use forwarder_tests::{
    api_cluster::Cluster,
    forwarder::Forwarder,
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
use serde_json::json;

const ENDPOINTS_PER_SERVICE: usize = 10;
const CHANGES: usize = 100;
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Requests in flight while filling the API.
const CONCURRENCY: usize = 64;

fn endpoint_ip(service: usize, index: usize) -> String {
    let n = u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0)) + (service * 16 + index) as u32;
    std::net::Ipv4Addr::from(n).to_string()
}

fn slice(service: usize, ips: &[String]) -> serde_json::Value {
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

/// `forwarder_network_programming_duration_seconds` (count, sum), read
/// from a thread already in the node's namespace.
fn programming() -> (u64, f64) {
    let mut stream = std::net::TcpStream::connect("127.0.0.1:10249").expect("metrics port");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: forwarder\r\n\r\n").expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("metrics");
    let value = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("forwarder_network_programming_duration_seconds_count") as u64,
        value("forwarder_network_programming_duration_seconds_sum"),
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// The elapsed_ms of the agent's first logged sync.
fn first_sync_ms(log: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains(" synced "))?;
    let plain: String =
        line.split('\u{1b}').map(|part| part.split_once('m').map_or(part, |(_, t)| t)).collect();
    plain.split_whitespace().find_map(|w| w.strip_prefix("elapsed_ms=")?.parse().ok())
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")?.split_whitespace().next()?.parse().ok())
}

fn main() {
    let services: usize = std::env::var("FORWARDER_BENCH_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut cluster = Cluster::new("cpbench");
    let kubeconfig = cluster.plane.kubeconfig.clone();
    let node: &NetNs = &cluster.topology.node;
    // One thread in the node's namespace, where the apiserver listens: one
    // client, one connection, so the latencies are the agent's, not curl's.
    let (result, forwarder) = node.run(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let client = client(&kubeconfig).await;
            let fill_time = fill(&client, services).await;
            eprintln!("control_plane: {services} Services in the API after {fill_time:?}");
            let map_max =
                (services * (ENDPOINTS_PER_SERVICE + 1) + 4096).next_power_of_two().to_string();
            let started = Instant::now();
            let forwarder = Forwarder::start_cluster_with(
                node,
                &kubeconfig,
                NODE_NAME,
                NODE_IFACE,
                &["--bpf-lb-map-max", &map_max],
            );
            let to_programmed = started.elapsed();
            let first_sync = first_sync_ms(&forwarder.log_text());
            let latencies = changes(&client, services).await;
            let rss = forwarder.pid().and_then(peak_rss_kib);
            let result = json!({
                "services": services,
                "endpoints": services * ENDPOINTS_PER_SERVICE,
                "fill_api_s": fill_time.as_secs_f64(),
                "start_to_programmed_s": to_programmed.as_secs_f64(),
                "first_sync_ms": first_sync,
                "changes": CHANGES,
                "programming_p50_ms": percentile(&latencies, 0.50) * 1e3,
                "programming_p99_ms": percentile(&latencies, 0.99) * 1e3,
                "programming_max_ms": latencies.last().copied().unwrap_or(f64::NAN) * 1e3,
                "agent_peak_rss_mib": rss.map(|kib| kib as f64 / 1024.0),
            });
            (result, forwarder)
        })
    });
    println!("{result}");
    cluster.forwarder = Some(forwarder);
}

/// `CHANGES` single-endpoint changes, one at a time, each stamped with its
/// trigger time just before it is sent; returns each one's latency as the
/// agent measured it (seconds, sorted).
async fn changes(client: &Client, services: usize) -> Vec<f64> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "demo");
    let mut latencies = Vec::with_capacity(CHANGES);
    let (mut count, mut sum) = programming();
    for change in 0..CHANGES {
        let service = change * services.max(CHANGES) / CHANGES % services;
        let mut ips: Vec<String> =
            (0..ENDPOINTS_PER_SERVICE).map(|j| endpoint_ip(service, j)).collect();
        ips[0] = endpoint_ip(service, ENDPOINTS_PER_SERVICE + change % 4);
        let mut patch = slice(service, &ips);
        patch["metadata"]["annotations"] = json!({TRIGGER_TIME: Timestamp::now().to_string()});
        slices
            .patch(&format!("svc-{service}-1"), &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("patch");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (now_count, now_sum) = programming();
            if now_count > count {
                latencies.push((now_sum - sum) / (now_count - count) as f64);
                (count, sum) = (now_count, now_sum);
                break;
            }
            assert!(Instant::now() < deadline, "change {change} never programmed");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}
