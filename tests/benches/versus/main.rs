//! forwarder against the real kube-proxy (iptables and nftables modes) and
//! against no Service translation at all, on the same namespaces, pods and
//! Services (created once through a real kube-apiserver that every
//! dataplane watches), at growing numbers of Services.
//!
//! Pieces: `topology` (namespaces, the API and its Services, the paths a
//! client takes), `modes` (the dataplanes, one at a time, checked clean in
//! between), `workloads` (the load generators and the CPU they cost),
//! `server` (the pods' echo server). Each sample also holds every BPF
//! program's live run time over it (`bpf_stats`). Prints one JSON line per
//! measurement; `cargo xtask bench` turns them into the results, tables
//! and plots.
//! `FORWARDER_BENCH_SMOKE=1`: 10 Services, one short run of everything;
//! `FORWARDER_BENCH_SCALES=10,1000` and `FORWARDER_BENCH_MODES=forwarder,...`
//! pick a subset.
#[path = "../shared/dataplane.rs"]
mod dataplane;
mod modes;
mod server;
mod topology;
mod workloads;

use std::{process::Command, time::Duration};

use forwarder_tests::{
    bpf_stats::{self, Collecting, Snapshot},
    kube_proxy::{ProxyMode, pinned_release},
};
use serde_json::{Value, json};

use crate::{
    modes::Mode,
    topology::{Bench, Path, Targets},
    workloads::{Load, Workload},
};

struct Plan {
    scales: Vec<usize>,
    modes: Vec<Mode>,
    repeats: usize,
    load: Load,
}

/// Each workload and the Services it targets, measured in every repeat.
const CASES: [(Workload, Targets); 4] = [
    (Workload::ConnectionRate, Targets::Last),
    (Workload::ConnectionRate, Targets::Sample),
    (Workload::RequestLatency, Targets::Last),
    (Workload::UdpRate, Targets::Last),
];

fn plan() -> Plan {
    let smoke = std::env::var_os("FORWARDER_BENCH_SMOKE").is_some_and(|v| v == "1");
    let load = Load {
        duration: Duration::from_millis(if smoke { 500 } else { 2000 }),
        clients: 8,
        connections: 4,
        requests_per_second: 2000,
    };
    let scales = std::env::var("FORWARDER_BENCH_SCALES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| if smoke { vec![10] } else { vec![10, 1_000, 10_000] });
    // A subset of the modes by name, for a look at one (`direct,forwarder`).
    let modes = match std::env::var("FORWARDER_BENCH_MODES") {
        Ok(names) => {
            Mode::ALL.into_iter().filter(|m| names.split(',').any(|n| n == m.name())).collect()
        }
        Err(_) => Mode::ALL.to_vec(),
    };
    Plan { scales, modes, repeats: if smoke { 1 } else { 5 }, load }
}

fn emit(line: Value) {
    println!("{line}");
}

fn main() {
    let plan = plan();
    let mut bench = Bench::new();
    // Each BPF program's live run time, in every mode alike (two clock
    // reads per program run).
    let _collecting = Collecting::start();
    for &scale in &plan.scales {
        bench.grow_to(scale);
        eprintln!("versus: {scale} Services in the API");
        for mode in plan.modes.iter().copied() {
            let active = modes::start(mode, &bench);
            emit(json!({"kind": "mode", "info": modes::describe(mode, &active, &bench)}));
            for path in Path::ALL {
                measure(&bench, &plan, mode, path);
            }
            let counters = active.counters(bench.node());
            emit(
                json!({"kind": "counters", "mode": mode.name(), "services": scale, "counters": counters}),
            );
            let left = modes::stop(active, &bench);
            emit(json!({"kind": "cleanup", "mode": mode.name(), "left_by_cleanup": left}));
            eprintln!("versus: {scale} Services, {} done", mode.name());
        }
    }
    // Last: kube-proxy has loaded conntrack by now, so its size is there.
    emit(environment(&plan));
}

fn measure(bench: &Bench, plan: &Plan, mode: Mode, path: Path) {
    let client = bench.client(path);
    let address = |workload: Workload, targets| {
        bench.addresses(path, targets, workload.protocol(), mode.is_direct())
    };
    // Neighbours resolved, caches warm: discarded.
    let warm_up = Load { duration: Duration::from_millis(300), ..plan.load };
    let warm_targets = address(Workload::ConnectionRate, Targets::Sample);
    workloads::run(Workload::ConnectionRate, client, &warm_targets, &warm_up);
    // Repeats outermost: a slow moment of the machine hits every case once.
    for repeat in 0..plan.repeats {
        for (workload, targets) in CASES {
            modes::flush_conntrack(bench);
            let before = Snapshot::take();
            let measured =
                workloads::run(workload, client, &address(workload, targets), &plan.load);
            let mut result = measured.json();
            result["programs"] = bpf_stats::json(&Snapshot::take().since(&before));
            emit(json!({
                "kind": "sample",
                "services": bench.services.len(),
                "mode": mode.name(),
                "path": path.name(),
                "workload": workload.name(),
                "targets": targets.name(),
                "repeat": repeat,
                "result": result,
            }));
        }
    }
}

/// What the numbers depend on besides the code: versions, the iptables
/// backend, conntrack's size, the load.
fn environment(plan: &Plan) -> Value {
    let output = |program: &str, args: &[&str]| {
        Command::new(program).args(args).output().map_or_else(
            |e| format!("{program}: {e}"),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
    };
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default().trim().to_owned();
    json!({
        "kind": "environment",
        "iptables": output("iptables", &["--version"]),
        "nft": output("nft", &["--version"]),
        "kube_proxy": pinned_release(),
        "nf_conntrack_max": read("/proc/sys/net/netfilter/nf_conntrack_max"),
        "kube_proxy_modes": [ProxyMode::Iptables.name(), ProxyMode::Nftables.name()],
        "load": {
            "seconds": plan.load.duration.as_secs_f64(),
            "clients": plan.load.clients,
            "connections": plan.load.connections,
            "requests_per_second": plan.load.requests_per_second,
            "message_bytes": workloads::MESSAGE,
            "repeats": plan.repeats,
            "client_cpu": workloads::CLIENT_CPU,
            "server_cpu": workloads::SERVER_CPU,
        },
    })
}
