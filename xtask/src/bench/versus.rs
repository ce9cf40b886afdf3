//! forwarder against kube-proxy and direct-to-pod (`benches/versus/`):
//! every sample into `versus.json`, medians (min–max) and the goals into
//! `versus.md`, and two plots.
use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::bail;
use plotters::style::RGBColor;
use serde_json::{Value, json};

use super::{
    bench_lines, counted_drops, live_programs, machine,
    plot::{self, Series},
    spread, write,
};

const MODES: [(&str, &str, RGBColor); 5] = [
    ("direct", "direct to pod", RGBColor(120, 120, 120)),
    ("direct-hooks", "direct, empty hooks", RGBColor(190, 190, 190)),
    ("forwarder", "forwarder", RGBColor(0, 114, 178)),
    ("kube-proxy-iptables", "kube-proxy iptables (legacy)", RGBColor(213, 94, 0)),
    ("kube-proxy-nftables", "kube-proxy nftables", RGBColor(0, 158, 115)),
];
const PATHS: [(&str, &str); 2] = [
    ("nodeport", "NodePort from an external client (forwarder: XDP)"),
    ("clusterip", "ClusterIP from a pod (forwarder: TC)"),
];
/// (workload, targets) as the harness measures them.
const CASES: [(&str, &str); 4] = [
    ("connection_rate", "last"),
    ("connection_rate", "sample"),
    ("request_latency", "last"),
    ("udp_rate", "last"),
];

/// (services, mode, path, workload, targets) → every repeat's result.
type Samples = BTreeMap<(u64, String, String, String, String), Vec<Value>>;

struct Results {
    samples: Samples,
    scales: Vec<u64>,
}

impl Results {
    fn new(lines: &[Value]) -> Self {
        let mut samples = Samples::new();
        for s in lines.iter().filter(|l| l["kind"] == "sample") {
            let text = |k: &str| s[k].as_str().unwrap_or_default().to_owned();
            let key = (
                s["services"].as_u64().unwrap_or(0),
                text("mode"),
                text("path"),
                text("workload"),
                text("targets"),
            );
            samples.entry(key).or_default().push(s["result"].clone());
        }
        let mut scales: Vec<u64> = samples.keys().map(|k| k.0).collect();
        scales.dedup();
        Self { samples, scales }
    }

    /// Median (min, max) over the repeats of one result field.
    fn stat(
        &self,
        services: u64,
        mode: &str,
        path: &str,
        case: (&str, &str),
        field: &str,
    ) -> Option<(f64, f64, f64)> {
        let key = (services, mode.into(), path.into(), case.0.into(), case.1.into());
        let values: Vec<f64> =
            self.samples.get(&key)?.iter().filter_map(|r| r[field].as_f64()).collect();
        spread(&values)
    }

    fn median(
        &self,
        services: u64,
        mode: &str,
        path: &str,
        case: (&str, &str),
        field: &str,
    ) -> Option<f64> {
        self.stat(services, mode, path, case, field).map(|s| s.0)
    }

    /// Every mode, path and case at every scale has a success and numbers.
    fn check_complete(&self) -> anyhow::Result<()> {
        let mut missing = Vec::new();
        for &services in &self.scales {
            for (mode, ..) in MODES {
                for (path, _) in PATHS {
                    for case in CASES {
                        let ok = self.median(services, mode, path, case, "ok").unwrap_or(0.0);
                        let rate = self.median(services, mode, path, case, "rate");
                        let p99 = self.median(services, mode, path, case, "p99_us");
                        if ok < 1.0 || rate.is_none() || p99.is_none() {
                            missing.push(format!("{services} {mode} {path} {} {}", case.0, case.1));
                        }
                    }
                }
            }
        }
        if self.scales.is_empty() || !missing.is_empty() {
            bail!("modes without numbers: {missing:?} (scales {:?})", self.scales);
        }
        Ok(())
    }
}

fn cell(stat: Option<(f64, f64, f64)>, digits: usize) -> String {
    stat.map_or("–".into(), |(m, lo, hi)| format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

pub fn run(dir: &Path, smoke: bool) -> anyhow::Result<()> {
    render(dir, &bench_lines("versus", smoke)?, machine())
}

/// The report again from the lines a run kept in `versus.json`.
pub fn rerender(dir: &Path) -> anyhow::Result<()> {
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("versus.json"))?)?;
    let lines = saved["lines"].as_array().map(Vec::as_slice).unwrap_or_default();
    render(dir, lines, saved["machine"].clone())
}

fn render(dir: &Path, lines: &[Value], machine: Value) -> anyhow::Result<()> {
    // First, and every line as printed: the report can be made again from it.
    let json = json!({"machine": machine, "lines": lines});
    write(dir, "versus.json", &(serde_json::to_string_pretty(&json)? + "\n"))?;
    let results = Results::new(lines);
    results.check_complete()?;
    let env = lines.iter().find(|l| l["kind"] == "environment").cloned().unwrap_or(Value::Null);
    let modes: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "mode").collect();
    let cleanups: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "cleanup").collect();
    let counters: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "counters").collect();
    let md = report(&results, &machine, &env, &modes, &cleanups, &counters)?;
    write(dir, "versus.md", &md)?;
    plots(dir, &results)?;
    print!("{md}");
    println!(
        "\nwritten to {}: versus.json, versus.md, versus_connections.png, versus_latency.png",
        dir.display()
    );
    Ok(())
}

fn report(
    r: &Results,
    machine: &Value,
    env: &Value,
    modes: &[&Value],
    cleanups: &[&Value],
    counters: &[&Value],
) -> anyhow::Result<String> {
    let load = &env["load"];
    let mut md = String::new();
    writeln!(md, "# forwarder against kube-proxy, side by side\n")?;
    writeln!(md, "Machine: {}\n", machine["summary"].as_str().unwrap_or("?"))?;
    writeln!(
        md,
        "Same namespaces, pods and Services for every mode: one node between an external client and its pods, Services (type NodePort, TCP 80 and UDP 53, 2–4 endpoints each, every endpoint an address of its own) created once through kube-apiserver {kp}, which forwarder and kube-proxy {kp} both watch: its iptables mode on iptables' legacy backend (the PATH's `{ipt}` did not finish a first sync at 10,000 Services within 5 minutes), its nftables mode with {nft}. One dataplane at a time; between modes each one's own clean-up runs (`forwarder cleanup`, `kube-proxy --cleanup`) and the harness checks that no program, no `KUBE-*` rule and no kube-proxy table is left and that the frontends no longer answer. `nf_conntrack_max` {ct} (kube-proxy runs with `--conntrack-max-per-core=0`, leaving it), conntrack flushed before every run. Clients pinned to CPU {ccpu}, servers to CPU {scpu}. Each point: median of {rep} runs of {sec} s (min–max).\n",
        kp = env["kube_proxy"].as_str().unwrap_or("?"),
        ipt = env["iptables"].as_str().unwrap_or("?"),
        nft = env["nft"].as_str().unwrap_or("?"),
        ct = env["nf_conntrack_max"].as_str().unwrap_or("?"),
        ccpu = load["client_cpu"],
        scpu = load["server_cpu"],
        rep = load["repeats"],
        sec = load["seconds"],
    )?;
    writeln!(md, "## New connections per second\n")?;
    writeln!(
        md,
        "Connect, one {}-byte request and response, close; {} concurrent clients. *last*: the Service created last (kube-proxy orders its chains by Go map iteration, so not last there: its position is under Modes); *sample*: 16 Services drawn at random, taken in turn.\n",
        load["message_bytes"], load["clients"]
    )?;
    for (path, title) in PATHS {
        writeln!(md, "### {title}\n")?;
        write!(md, "| Services | targets |")?;
        for (_, t, _) in MODES {
            write!(md, " {t} |")?;
        }
        writeln!(
            md,
            " forwarder ÷ iptables | ÷ nftables | ÷ direct |\n|---:|---|{}",
            "---:|".repeat(MODES.len() + 3)
        )?;
        for &n in &r.scales {
            for targets in ["last", "sample"] {
                let case = ("connection_rate", targets);
                write!(md, "| {n} | {targets} |")?;
                for (mode, ..) in MODES {
                    write!(md, " {} |", cell(r.stat(n, mode, path, case, "rate"), 0))?;
                }
                let m = |mode| r.median(n, mode, path, case, "rate");
                writeln!(
                    md,
                    " {} | {} | {} |",
                    ratio(m("forwarder"), m("kube-proxy-iptables")),
                    ratio(m("forwarder"), m("kube-proxy-nftables")),
                    ratio(m("forwarder"), m("direct"))
                )?;
            }
        }
        writeln!(md)?;
    }

    writeln!(md, "## Request latency on persistent connections, µs\n")?;
    writeln!(
        md,
        "{} requests/s in all over {} connections to the last Service, sent on schedule (open loop) and timed from when each was due: p50 / p99 / p999, each the median of the runs.\n",
        load["requests_per_second"], load["connections"]
    )?;
    mode_table(&mut md, r, |n, mode, path| {
        let q = |f| {
            r.median(n, mode, path, ("request_latency", "last"), f)
                .map_or("–".into(), |v| format!("{v:.0}"))
        };
        format!("{} / {} / {}", q("p50_us"), q("p99_us"), q("p999_us"))
    })?;

    writeln!(md, "\n## UDP requests per second\n")?;
    writeln!(
        md,
        "{} clients, one flow each, to the last Service, request and response of {} bytes.\n",
        load["clients"], load["message_bytes"]
    )?;
    mode_table(&mut md, r, |n, mode, path| {
        cell(r.stat(n, mode, path, ("udp_rate", "last"), "rate"), 0)
    })?;

    writeln!(md, "\n## CPU\n")?;
    writeln!(
        md,
        "During the connection-rate runs to the last Service: softirq and system time as shares of both CPUs, and kernel time (system, irq, softirq) per connection, µs (medians).\n"
    )?;
    mode_table(&mut md, r, |n, mode, path| {
        let q = |f| r.median(n, mode, path, ("connection_rate", "last"), f).unwrap_or(f64::NAN);
        format!(
            "{:.0}% / {:.0}% / {:.1} µs",
            q("softirq_pct"),
            q("system_pct"),
            q("kernel_cpu_us_per_op")
        )
    })?;
    live_programs_table(&mut md, r)?;
    failures(&mut md, r, counters)?;
    writeln!(md)?;

    goals(&mut md, r)?;

    writeln!(md, "\n## Modes\n")?;
    for mode in modes {
        let info = &mode["info"];
        if let Some(flags) = info["flags"].as_array() {
            let flags: Vec<String> =
                flags.iter().map(|f| f.as_str().map_or(f.to_string(), str::to_owned)).collect();
            writeln!(
                md,
                "- {} at {} Services: `{}`",
                info["mode"].as_str().unwrap_or("?"),
                info["services"],
                flags.join(" ")
            )?;
        }
        if let Some(rule) = info.get("last_service_rule") {
            writeln!(
                md,
                "  - the last Service's rule: {} of {} in `KUBE-SERVICES`, {} of {} in `KUBE-NODEPORTS` (reached after all of `KUBE-SERVICES`)",
                rule["KUBE-SERVICES"]["position"],
                rule["KUBE-SERVICES"]["rules"],
                rule["KUBE-NODEPORTS"]["position"],
                rule["KUBE-NODEPORTS"]["rules"]
            )?;
        }
    }
    let mut left: Vec<String> = cleanups
        .iter()
        .flat_map(|c| c["left_by_cleanup"].as_array().cloned().unwrap_or_default())
        .filter_map(|l| l.as_str().map(str::to_owned))
        .collect();
    left.sort();
    left.dedup();
    if !left.is_empty() {
        writeln!(
            md,
            "\n`kube-proxy --cleanup` left these, which the harness then removed:\n\n```text\n{}\n```",
            left.join("\n")
        )?;
    }
    Ok(md)
}

/// Each BPF program's live cost in the connection-rate runs to the last
/// Service: forwarder's next to the do-nothing programs on its hooks.
fn live_programs_table(md: &mut String, r: &Results) -> std::fmt::Result {
    writeln!(md, "\n## BPF programs, live\n")?;
    writeln!(
        md,
        "During the connection-rate runs to the last Service, from the kernel's BPF statistics (`BPF_ENABLE_STATS`, the switch behind `kernel.bpf_stats_enabled`, on in every mode): each program's mean run time, ns, and its runs per connection (medians). What packets pay on the live machine, cold caches included; *direct, empty hooks* has do-nothing programs on the same hooks.\n"
    )?;
    writeln!(
        md,
        "| Services, path | mode | program: ns per run (runs per connection) | ns per connection |"
    )?;
    writeln!(md, "|---|---|---|---:|")?;
    for &n in &r.scales {
        for (path, _) in PATHS {
            for (mode, title, _) in [MODES[2], MODES[1]] {
                let key = (n, mode.into(), path.into(), "connection_rate".into(), "last".into());
                let used = live_programs(r.samples.get(&key).map_or(&[], Vec::as_slice));
                let cells: Vec<String> = used
                    .iter()
                    .map(|(name, (runs, ns))| format!("`{name}` {ns:.0} ({runs:.1})"))
                    .collect();
                let total: f64 = used.values().map(|(runs, ns)| runs * ns).sum();
                writeln!(md, "| {n}, {path} | {title} | {} | {total:.0} |", cells.join(", "))?;
            }
        }
    }
    Ok(())
}

/// Failed transactions by mode, and what each dataplane counted of drops.
fn failures(md: &mut String, r: &Results, counters: &[&Value]) -> std::fmt::Result {
    writeln!(md, "\n## Failures\n")?;
    writeln!(
        md,
        "Transactions that failed (timeouts and refusals, counted, never retried), of all runs; and the drops the dataplane itself counted over its life at that scale (forwarder: its packet counters; kube-proxy: netfilter conntrack's `drop`, `early_drop`, `insert_failed`, `invalid`).\n"
    )?;
    writeln!(
        md,
        "| Services | mode | failed / tried | dropped, as the dataplane counted |\n|---:|---|---:|---|"
    )?;
    for &n in &r.scales {
        for (mode, title, _) in MODES {
            let runs =
                r.samples.iter().filter(|(k, _)| k.0 == n && k.1 == mode).flat_map(|(_, v)| v);
            let (failed, ok) = runs.fold((0.0, 0.0), |(f, o), v| {
                (f + v["failed"].as_f64().unwrap_or(0.0), o + v["ok"].as_f64().unwrap_or(0.0))
            });
            let recorded: Vec<_> = counters
                .iter()
                .filter(|c| c["mode"] == mode && c["services"].as_u64() == Some(n))
                .filter_map(|c| c["counters"].as_object())
                .filter(|m| !m.is_empty())
                .collect();
            let counted = counted_drops(recorded.iter().flat_map(|m| m.iter()));
            let counted = match (recorded.is_empty(), counted.is_empty()) {
                (true, _) => "–".to_owned(),
                (false, true) => "none".to_owned(),
                (false, false) => counted.join(", "),
            };
            writeln!(md, "| {n} | {title} | {failed:.0} / {:.0} | {counted} |", failed + ok)?;
        }
    }
    Ok(())
}

/// A row per scale and path, a column per mode.
fn mode_table(
    md: &mut String,
    r: &Results,
    cell: impl Fn(u64, &str, &str) -> String,
) -> std::fmt::Result {
    write!(md, "| Services, path |")?;
    for (_, title, _) in MODES {
        write!(md, " {title} |")?;
    }
    writeln!(md, "\n|---|{}", "---:|".repeat(MODES.len()))?;
    for &n in &r.scales {
        for (path, _) in PATHS {
            write!(md, "| {n}, {path} |")?;
            for (mode, ..) in MODES {
                write!(md, " {} |", cell(n, mode, path))?;
            }
            writeln!(md)?;
        }
    }
    Ok(())
}

/// The issue's goals, each met or missed as measured.
fn goals(md: &mut String, r: &Results) -> anyhow::Result<()> {
    let (Some(&small), Some(&large)) = (r.scales.first(), r.scales.last()) else { return Ok(()) };
    writeln!(md, "## Goals\n")?;
    writeln!(md, "| goal | path, targets | measured | |\n|---|---|---:|---|")?;
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    for (path, _) in PATHS {
        for targets in ["last", "sample"] {
            let case = ("connection_rate", targets);
            let m = |n, mode| r.median(n, mode, path, case, "rate").unwrap_or(f64::NAN);
            for (goal, n, other, bound) in [
                ("new connections ≥ 2× kube-proxy iptables", large, "kube-proxy-iptables", 2.0),
                ("new connections ≥ 1.2× kube-proxy nftables", large, "kube-proxy-nftables", 1.2),
                ("new connections within 10% of direct to pod", large, "direct", 0.9),
                (
                    "new connections no worse than kube-proxy iptables",
                    small,
                    "kube-proxy-iptables",
                    1.0,
                ),
                (
                    "new connections no worse than kube-proxy nftables",
                    small,
                    "kube-proxy-nftables",
                    1.0,
                ),
            ] {
                let x = m(n, "forwarder") / m(n, other);
                writeln!(
                    md,
                    "| {goal}, {n} Services | {path}, {targets} | {x:.2}× | {} |",
                    verdict(x >= bound)
                )?;
            }
        }
        for &n in &r.scales {
            let p99 = |mode| {
                r.median(n, mode, path, ("request_latency", "last"), "p99_us").unwrap_or(f64::NAN)
            };
            let worst_ok = p99("kube-proxy-iptables").min(p99("kube-proxy-nftables"));
            writeln!(
                md,
                "| p99 latency no worse than kube-proxy, {n} Services | {path}, last | {:.0} µs (kube-proxy {:.0} / {:.0}) | {} |",
                p99("forwarder"),
                p99("kube-proxy-iptables"),
                p99("kube-proxy-nftables"),
                verdict(p99("forwarder") <= worst_ok)
            )?;
        }
    }
    Ok(())
}

fn plots(dir: &Path, r: &Results) -> anyhow::Result<()> {
    let series = |path: &str, case: (&str, &str), field: &str| -> Vec<Series> {
        MODES
            .iter()
            .map(|&(mode, title, color)| Series {
                name: title.into(),
                color,
                points: r
                    .scales
                    .iter()
                    .filter_map(|&n| {
                        let (m, lo, hi) = r.stat(n, mode, path, case, field)?;
                        Some((n as f64, m, lo, hi))
                    })
                    .collect(),
            })
            .collect()
    };
    plot::figure(&dir.join("versus_connections.png"), (2, 2), |i, area| {
        let (path, targets) = (PATHS[i / 2].0, ["last", "sample"][i % 2]);
        let title = format!(
            "New connections/s: {path}, {targets} Service{}",
            if targets == "last" { "" } else { "s" }
        );
        plot::lines(
            area,
            &title,
            "connections per second",
            &series(path, ("connection_rate", targets), "rate"),
        )
    })?;
    plot::figure(&dir.join("versus_latency.png"), (1, 2), |i, area| {
        let path = PATHS[i].0;
        let title = format!("Request latency p99: {path}, open loop");
        plot::lines(area, &title, "p99 µs", &series(path, ("request_latency", "last"), "p99_us"))
    })
}

#[cfg(test)]
#[path = "versus_tests.rs"]
mod tests;
