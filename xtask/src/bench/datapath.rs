//! The programs' cost per packet through `BPF_PROG_TEST_RUN`
//! (`benches/datapath.rs`), next to do-nothing programs.
use std::{collections::BTreeMap, fmt::Write as _, path::Path, process::Command};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::machine;
use crate::setup::workspace_root;

/// Per-packet cost, in the order the table shows it.
const PATHS: [(&str, &str, &str); 6] = [
    ("no_match", "batch", "bare_xdp_pass"),
    ("established", "batch", "bare_xdp_pass"),
    ("new_flow", "single", "bare_xdp_pass"),
    ("new_flow_masquerade", "single", "bare_xdp_pass"),
    ("reply", "batch", "bare_tc_ok"),
    ("reply", "batch", "bare_xdp_pass"),
];

pub fn run(dir: &Path) -> anyhow::Result<()> {
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
    let results = json!({"machine": machine, "summary": summary, "samples": samples});
    std::fs::write(dir.join("datapath.json"), serde_json::to_string_pretty(&results)? + "\n")?;
    std::fs::write(dir.join("datapath.md"), &md)?;
    print!("{md}");
    println!("\nwritten: bench/results/datapath.json, bench/results/datapath.md");
    Ok(())
}
