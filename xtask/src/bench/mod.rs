//! `cargo xtask bench`: the datapath's per-packet cost, forwarder against
//! kube-proxy side by side (datapath, connections to endpoints on another
//! node, control plane), written with the machine they came from to
//! `bench/results/` (JSON, markdown, PNG plots).
//! `--smoke`: the side-by-side benchmarks at 10 Services, one short run of
//! each mode, into `target/bench-smoke/`; fails unless every mode produced
//! numbers (`cargo xtask test` runs it). `--report`: the tables and plots
//! again from the JSON in `bench/results/`.
mod control_plane;
mod datapath;
mod plot;
mod remote;
mod versus;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::setup::{self, workspace_root};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Datapath,
    /// The randomized differential test of the programs, at full size.
    Differential,
    Versus,
    /// New connections to endpoints on another node (masqueraded NodePort).
    Remote,
    ControlPlane,
}

pub fn run(smoke: bool, report: bool, only: &[Part]) -> anyhow::Result<()> {
    let wanted = |part| only.is_empty() || only.contains(&part);
    if report {
        // Tables and plots again from the committed JSON, measuring nothing.
        let dir = workspace_root().join("bench/results");
        versus::rerender(&dir)?;
        return control_plane::rerender(&dir);
    }
    setup::run()?;
    if smoke {
        return self::smoke();
    }
    let dir = workspace_root().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    if wanted(Part::Datapath) {
        datapath::run(&dir)?;
    }
    if wanted(Part::Differential) {
        differential(&dir)?;
    }
    prepare()?;
    if wanted(Part::Versus) {
        versus::run(&dir, false)?;
    }
    if wanted(Part::Remote) {
        remote::run(&dir, false)?;
    }
    if wanted(Part::ControlPlane) {
        control_plane::run(&dir, false)?;
    }
    Ok(())
}

/// Packets the full differential run sends (`cargo xtask test` sends 20,000).
const DIFFERENTIAL_PACKETS: u32 = 2_000_000;

/// The randomized differential test at full size: millions of random and
/// mutated packets against the model. A failure fails the benchmark; the
/// last passing run is recorded in `differential.md`.
fn differential(dir: &std::path::Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let out = Command::new("cargo")
        .current_dir(workspace_root())
        .args(["test", "--package", "forwarder-tests", "--test", "bpf_programs"])
        .args(["differential", "--", "--nocapture"])
        .env("FORWARDER_DIFFERENTIAL_PACKETS", DIFFERENTIAL_PACKETS.to_string())
        .output()
        .context("cargo test (differential)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("differential run failed:\n{stderr}\n{}", String::from_utf8_lossy(&out.stdout));
    }
    let line = stderr.lines().find(|l| l.starts_with("differential:")).unwrap_or_default();
    let report = format!(
        "# Randomized differential test, full size\n\n{line}\n\nAll passed in {:.0} s: \
         every packet's outcome matched the model (no wrong rewrite, no Service packet \
         passed untranslated, every drop counted once).\n",
        started.elapsed().as_secs_f64()
    );
    std::fs::write(dir.join("differential.md"), &report)?;
    println!("{report}");
    Ok(())
}

/// The side-by-side benchmarks in their smoke variant (set-up done).
pub fn smoke() -> anyhow::Result<()> {
    prepare()?;
    let dir = workspace_root().join("target/bench-smoke");
    std::fs::create_dir_all(&dir)?;
    versus::run(&dir, true)?;
    remote::run(&dir, true)?;
    control_plane::run(&dir, true)?;
    println!("bench smoke: every mode produced numbers ({})", dir.display());
    Ok(())
}

/// kube-apiserver and kube-proxy, and the agent as it would be deployed.
fn prepare() -> anyhow::Result<()> {
    crate::k8s::build()?;
    setup::build_agent(true)
}

/// Runs benchmark `name` of the tests crate against the release agent and
/// returns the JSON lines it printed.
fn bench_lines(name: &str, smoke: bool) -> anyhow::Result<Vec<Value>> {
    let root = workspace_root();
    let mut cargo = Command::new("cargo");
    cargo
        .current_dir(&root)
        .args(["bench", "--package", "forwarder-tests", "--bench", name])
        .env("FORWARDER_BIN", root.join("target/release/forwarder"));
    if smoke {
        cargo.env("FORWARDER_BENCH_SMOKE", "1");
    }
    let out = cargo.output().with_context(|| format!("cargo bench {name}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        bail!("benchmark {name} failed:\n{}", lines[lines.len().saturating_sub(60)..].join("\n"));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).with_context(|| format!("{name} printed {l}")))
        .collect()
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("{}", path.display()))?;
    Ok(path)
}

/// Median, minimum and maximum; `None` for no values.
fn spread(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some((v[v.len() / 2], v[0], v[v.len() - 1]))
}

/// The drops a dataplane counted, as `name value` (forwarder's `drop_*`
/// packet counters; netfilter conntrack's `drop`, `early_drop`,
/// `insert_failed`, `invalid`), those above zero only.
fn counted_drops<'a>(counters: impl IntoIterator<Item = (&'a String, &'a Value)>) -> Vec<String> {
    counters
        .into_iter()
        .filter(|(k, v)| {
            let drop_like = k.starts_with("drop")
                || ["early_drop", "insert_failed", "invalid"].contains(&k.as_str());
            drop_like && v.as_f64().unwrap_or(0.0) > 0.0
        })
        .map(|(k, v)| format!("{k} {}", v.as_f64().unwrap_or(0.0)))
        .collect()
}

/// Each BPF program that ran in `results` (samples with `ok` connections
/// and the live `programs` statistics): (runs per connection, ns per run),
/// medians over the samples.
fn live_programs(results: &[Value]) -> std::collections::BTreeMap<String, (f64, f64)> {
    let mut per: std::collections::BTreeMap<String, (Vec<f64>, Vec<f64>)> = Default::default();
    for result in results {
        let connections = result["ok"].as_f64().unwrap_or(0.0).max(1.0);
        for (name, used) in result["programs"].as_object().into_iter().flatten() {
            let entry = per.entry(name.clone()).or_default();
            entry.0.push(used["runs"].as_f64().unwrap_or(0.0) / connections);
            entry.1.extend(used["ns_per_run"].as_f64());
        }
    }
    let median = |v: &[f64]| spread(v).map_or(f64::NAN, |s| s.0);
    per.into_iter().map(|(name, (runs, ns))| (name, (median(&runs), median(&ns)))).collect()
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
