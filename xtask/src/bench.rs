//! `cargo xtask bench`: runs the datapath benchmark and writes the results,
//! with the machine they came from, to `bench/results/`.
use std::{collections::BTreeMap, fmt::Write as _, process::Command};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::setup::{self, workspace_root};

/// Per-packet cost, in the order the table shows it.
const PATHS: [(&str, &str, &str); 6] = [
    ("no_match", "batch", "bare_xdp_pass"),
    ("established", "batch", "bare_xdp_pass"),
    ("new_flow", "single", "bare_xdp_pass"),
    ("new_flow_masquerade", "single", "bare_xdp_pass"),
    ("reply", "batch", "bare_tc_ok"),
    ("reply", "batch", "bare_xdp_pass"),
];

pub fn run() -> anyhow::Result<()> {
    setup::run()?;
    datapath()?;
    control_plane()
}

fn datapath() -> anyhow::Result<()> {
    let root = workspace_root();
    let out = Command::new("cargo")
        .current_dir(&root)
        .args(["bench", "--package", "forwarder-tests", "--bench", "datapath"])
        .output()
        .context("cargo bench")?;
    if !out.status.success() {
        bail!("benchmark failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let samples: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;

    // (services, path, mode) -> every round's ns.
    let mut runs: BTreeMap<(u64, String, String), Vec<f64>> = BTreeMap::new();
    for s in &samples {
        let key = (
            s["services"].as_u64().unwrap_or(0),
            s["path"].as_str().unwrap_or("").to_owned(),
            s["mode"].as_str().unwrap_or("").to_owned(),
        );
        runs.entry(key).or_default().push(s["ns"].as_f64().unwrap_or(f64::NAN));
    }
    let stats = |services: u64, path: &str, mode: &str| -> Option<(f64, f64, f64)> {
        let mut v = runs.get(&(services, path.to_owned(), mode.to_owned()))?.clone();
        v.sort_by(f64::total_cmp);
        Some((v[v.len() / 2], v[0], v[v.len() - 1]))
    };

    let machine = machine();
    let mut md = String::new();
    writeln!(md, "# Datapath cost per packet (BPF_PROG_TEST_RUN)\n")?;
    writeln!(md, "Machine: {}\n", machine["summary"].as_str().unwrap_or("?"))?;
    writeln!(
        md,
        "Median of 5 rounds (min–max), ns per packet, and the ratio to a do-nothing program measured the same way in the same run. Batch: 200,000 repeats of one packet; single: 20,000 distinct packets, one run each (kernel-timed), median.\n"
    )?;
    writeln!(md, "| path | mode | services | ns (min–max) | baseline | ns | ratio |")?;
    writeln!(md, "|---|---|---:|---:|---|---:|---:|")?;
    let mut summary = Vec::new();
    for (path, mode, baseline) in PATHS {
        for services in [10u64, 100_000] {
            let (Some((med, lo, hi)), Some((base, _, _))) =
                (stats(services, path, mode), stats(services, baseline, mode))
            else {
                continue;
            };
            let ratio = med / base;
            writeln!(
                md,
                "| {path} | {mode} | {services} | {med:.0} ({lo:.0}–{hi:.0}) | {baseline} | {base:.0} | {ratio:.1}× |"
            )?;
            summary.push(json!({"path": path, "mode": mode, "services": services, "median_ns": med, "min_ns": lo, "max_ns": hi, "baseline": baseline, "baseline_ns": base, "ratio": ratio}));
        }
    }
    writeln!(md, "\nScale: 100,000 Services against 10 (median ns):\n")?;
    for (path, mode, _) in &PATHS[..5] {
        if let (Some((small, ..)), Some((large, ..))) =
            (stats(10, path, mode), stats(100_000, path, mode))
        {
            writeln!(md, "- {path}: {:+.1}%", (large / small - 1.0) * 100.0)?;
        }
    }
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let results = json!({"machine": machine, "summary": summary, "samples": samples});
    std::fs::write(dir.join("datapath.json"), serde_json::to_string_pretty(&results)? + "\n")?;
    std::fs::write(dir.join("datapath.md"), &md)?;
    print!("{md}");
    println!("\nwritten: bench/results/datapath.json, bench/results/datapath.md");
    Ok(())
}

/// The control plane against the real apiserver (`benches/control_plane.rs`).
fn control_plane() -> anyhow::Result<()> {
    crate::k8s::build()?;
    let root = workspace_root();
    // The agent as it would be deployed: an optimized build.
    setup::build_agent(true)?;
    let out = Command::new("cargo")
        .current_dir(&root)
        .args(["bench", "--package", "forwarder-tests", "--bench", "control_plane"])
        .env("FORWARDER_BIN", root.join("target/release/forwarder"))
        .output()
        .context("cargo bench")?;
    if !out.status.success() {
        bail!("control-plane benchmark failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with('{')).context("no result line")?;
    let r: Value = serde_json::from_str(line)?;
    let num = |key: &str| r[key].as_f64().unwrap_or(f64::NAN);
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let machine = machine();
    let mut md = String::new();
    writeln!(md, "# Control plane against a real kube-apiserver\n")?;
    writeln!(md, "Machine: {}\n", machine["summary"].as_str().unwrap_or("?"))?;
    writeln!(
        md,
        "{} Services with {} endpoints (one EndpointSlice each) in kube-apiserver v1.35.4 (etcd on the same machine); the agent starts after they are all in, then {} single-endpoint changes, one at a time. Latency is the agent's own `forwarder_network_programming_duration_seconds`: from the slice's `last-change-trigger-time` (stamped by the client just before the request) to the change being in the maps.\n",
        r["services"], r["endpoints"], r["changes"]
    )?;
    writeln!(md, "| measure | result | goal | |\n|---|---:|---:|---|")?;
    let start = num("start_to_programmed_s");
    writeln!(
        md,
        "| agent start to every Service programmed | {start:.2} s | < 2 s | {} |",
        verdict(start < 2.0)
    )?;
    writeln!(md, "| of which the first sync | {:.0} ms | | |", num("first_sync_ms"))?;
    let (p50, p99) = (num("programming_p50_ms"), num("programming_p99_ms"));
    writeln!(md, "| single change, p50 | {p50:.1} ms | | |")?;
    writeln!(md, "| single change, p99 | {p99:.1} ms | < 100 ms | {} |", verdict(p99 < 100.0))?;
    writeln!(md, "| single change, max | {:.1} ms | | |", num("programming_max_ms"))?;
    let rss = num("agent_peak_rss_mib");
    writeln!(
        md,
        "| agent peak RSS | {rss:.0} MiB | < 150 MB | {} |",
        verdict(rss * 1.048_576 < 150.0)
    )?;
    writeln!(md, "| filling the API (not the agent) | {:.0} s | | |", num("fill_api_s"))?;
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let results = json!({"machine": machine, "result": r});
    std::fs::write(dir.join("control_plane.json"), serde_json::to_string_pretty(&results)? + "\n")?;
    std::fs::write(dir.join("control_plane.md"), &md)?;
    print!("{md}");
    println!("\nwritten: bench/results/control_plane.json, bench/results/control_plane.md");
    Ok(())
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let kernel =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:").and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        })
        .unwrap_or(0);
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let summary = format!(
        "{cpu}, {cores} vCPUs, {} GiB RAM, kernel {kernel}, {date} (a shared VM: compare ratios, not absolute times)",
        mem_kib / (1024 * 1024)
    );
    json!({"cpu": cpu, "vcpus": cores, "mem_kib": mem_kib, "kernel": kernel, "date": date, "summary": summary})
}
