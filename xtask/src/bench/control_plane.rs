//! The control plane against a real apiserver (`benches/control_plane.rs`):
//! forwarder and kube-proxy in each mode, one after another on the same
//! API, into `control_plane.{json,md,png}`.
use std::{fmt::Write as _, path::Path};

use anyhow::bail;
use plotters::style::RGBColor;
use serde_json::json;

use super::{bench_lines, machine, plot, write};

/// (agent as the bench names it, short label, description)
const AGENTS: [(&str, &str, &str); 5] = [
    ("forwarder", "forwarder", "forwarder"),
    (
        "kube-proxy-iptables",
        "iptables",
        "kube-proxy iptables (legacy backend), minSyncPeriod 1s (default)",
    ),
    (
        "kube-proxy-iptables-min-sync-0",
        "iptables 0",
        "kube-proxy iptables (legacy backend), minSyncPeriod 0",
    ),
    ("kube-proxy-nftables", "nftables", "kube-proxy nftables, minSyncPeriod 1s (default)"),
    ("kube-proxy-nftables-min-sync-0", "nftables 0", "kube-proxy nftables, minSyncPeriod 0"),
];

const FIELDS: [&str; 7] = [
    "start_to_programmed_s",
    "programming_p50_ms",
    "programming_p99_ms",
    "programming_max_ms",
    "peak_rss_mib",
    "cpu_s_to_programmed",
    "cpu_s_total",
];

pub fn run(dir: &Path, smoke: bool) -> anyhow::Result<()> {
    render(dir, &bench_lines("control_plane", smoke)?, machine())
}

/// The report again from the lines a run kept in `control_plane.json`.
pub fn rerender(dir: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(dir.join("control_plane.json"))?;
    let saved: serde_json::Value = serde_json::from_str(&text)?;
    let lines = saved["agents"].as_array().map(Vec::as_slice).unwrap_or_default();
    render(dir, lines, saved["machine"].clone())
}

fn render(
    dir: &Path,
    lines: &[serde_json::Value],
    machine: serde_json::Value,
) -> anyhow::Result<()> {
    // First: the report can be made again from it.
    let results = json!({"machine": machine, "agents": lines});
    write(dir, "control_plane.json", &(serde_json::to_string_pretty(&results)? + "\n"))?;
    let agent = |name: &str| lines.iter().find(|l| l["agent"] == name);
    let mut missing = Vec::new();
    for (name, ..) in AGENTS {
        for field in FIELDS {
            if !agent(name).and_then(|a| a[field].as_f64()).is_some_and(f64::is_finite) {
                missing.push(format!("{name} {field}"));
            }
        }
    }
    if !missing.is_empty() {
        bail!("control plane: agents without numbers: {missing:?}");
    }
    let num =
        |name: &str, field: &str| agent(name).and_then(|a| a[field].as_f64()).unwrap_or(f64::NAN);
    let first = &lines[0];
    let mut md = String::new();
    writeln!(md, "# Control plane against a real kube-apiserver: forwarder and kube-proxy\n")?;
    writeln!(md, "Machine: {}\n", machine["summary"].as_str().unwrap_or("?"))?;
    writeln!(
        md,
        "{} Services with {} endpoints (one EndpointSlice each) in kube-apiserver v1.35.4 (etcd on the same machine), filled in {:.0} s before any agent starts. Then each agent in turn: started, its first full sync timed from its start (the agent's own `*_sync_proxy_rules_last_timestamp_seconds`), then up to {} single-endpoint changes one at a time (as many as fit in 4 minutes), each one's network programming latency as the agent reports it (`*_network_programming_duration_seconds`, from the slice's `last-change-trigger-time`, stamped just before the request, to the change being programmed); peak RSS (VmHWM) and CPU-seconds (its own and its waited-for children's: kube-proxy's iptables-restore and nft); then stopped and cleaned up, and checked to have left nothing.\n",
        first["services"],
        first["endpoints"],
        first["fill_api_s"].as_f64().unwrap_or(f64::NAN),
        first["changes_planned"]
    )?;
    writeln!(
        md,
        "| agent | start to programmed | changes | change p50 | p99 | max | peak RSS | CPU-s to programmed | CPU-s in all |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for (name, _, title) in AGENTS {
        let n = |f| num(name, f);
        writeln!(
            md,
            "| {title} | {:.2} s | {:.0} | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} MiB | {:.2} | {:.2} |",
            n("start_to_programmed_s"),
            n("changes"),
            n("programming_p50_ms"),
            n("programming_p99_ms"),
            n("programming_max_ms"),
            n("peak_rss_mib"),
            n("cpu_s_to_programmed"),
            n("cpu_s_total")
        )?;
    }
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let (start, p99) =
        (num("forwarder", "start_to_programmed_s"), num("forwarder", "programming_p99_ms"));
    writeln!(md, "\n| goal | measured | |\n|---|---:|---|")?;
    writeln!(
        md,
        "| forwarder: full programming < 2 s | {start:.2} s | {} |",
        verdict(start < 2.0)
    )?;
    writeln!(
        md,
        "| forwarder: single change p99 < 100 ms | {p99:.1} ms | {} |",
        verdict(p99 < 100.0)
    )?;
    for (name, _, title) in &AGENTS[1..] {
        writeln!(
            md,
            "| against {title}: start {:.1}× faster, change p99 {:.1}× lower | | |",
            num(name, "start_to_programmed_s") / start,
            num(name, "programming_p99_ms") / p99
        )?;
    }
    writeln!(md, "\nFlags:\n")?;
    for (name, _, title) in AGENTS {
        let flags: Vec<String> = agent(name)
            .and_then(|a| a["flags"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|f| f.as_str().map_or(f.to_string(), str::to_owned))
            .collect();
        writeln!(md, "- {title}: `{}`", flags.join(" "))?;
    }
    writeln!(
        md,
        "\n(kube-proxy's one flag for the minimum sync period in every mode but IPVS is `--iptables-min-sync-period`.)"
    )?;

    write(dir, "control_plane.md", &md)?;
    let labels: Vec<&str> = AGENTS.iter().map(|a| a.1).collect();
    let of = |field: &str| AGENTS.iter().map(|a| num(a.0, field)).collect::<Vec<f64>>();
    plot::figure(&dir.join("control_plane.png"), (1, 2), |i, area| match i {
        0 => plot::bars(
            area,
            "Single change: network programming latency",
            "ms (log)",
            &labels,
            &[
                ("p50", RGBColor(86, 180, 233), of("programming_p50_ms")),
                ("p99", RGBColor(0, 114, 178), of("programming_p99_ms")),
            ],
        ),
        _ => plot::bars(
            area,
            "Start to every Service programmed",
            "s (log)",
            &labels,
            &[("start to programmed", RGBColor(0, 158, 115), of("start_to_programmed_s"))],
        ),
    })?;
    print!("{md}");
    println!(
        "\nwritten to {}: control_plane.json, control_plane.md, control_plane.png",
        dir.display()
    );
    Ok(())
}
