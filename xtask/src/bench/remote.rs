//! New connections to endpoints on another node (`benches/remote.rs`):
//! the masqueraded NodePort and the ClusterIP from a pod, per mode, with
//! the failures and each BPF program's live run time. Every line into
//! `remote.json`, the tables into `remote.md`.
use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::bail;
use serde_json::{Value, json};

use super::{bench_lines, counted_drops, live_programs, machine, spread, write};

const MODES: [(&str, &str); 5] = [
    ("direct", "direct to pod"),
    ("direct-hooks", "direct, empty hooks"),
    ("forwarder", "forwarder"),
    ("kube-proxy-iptables", "kube-proxy iptables (legacy)"),
    ("kube-proxy-nftables", "kube-proxy nftables"),
];
const PATHS: [(&str, &str); 2] = [
    ("nodeport_masqueraded", "NodePort from an external client, masqueraded to the other node"),
    ("clusterip_remote", "ClusterIP from a pod, to the other node"),
];
/// Programs whose live figures the report must have: on forwarder's path
/// and on the empty hooks' (`xdp_pass`).
const EXPECTED_PROGRAMS: [(&str, &str); 2] =
    [("forwarder", "fwd_xdp_node"), ("direct-hooks", "pass_xdp")];

/// (mode, path) → every repeat's sample line.
struct Results(BTreeMap<(String, String), Vec<Value>>);

impl Results {
    fn new(lines: &[Value]) -> Self {
        let mut samples: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
        for s in lines.iter().filter(|l| l["kind"] == "sample") {
            let text = |k: &str| s[k].as_str().unwrap_or_default().to_owned();
            samples.entry((text("mode"), text("path"))).or_default().push(s.clone());
        }
        Self(samples)
    }

    fn samples(&self, mode: &str, path: &str) -> &[Value] {
        self.0.get(&(mode.into(), path.into())).map_or(&[], Vec::as_slice)
    }

    fn stat(&self, mode: &str, path: &str, field: &str) -> Option<(f64, f64, f64)> {
        let values: Vec<f64> =
            self.samples(mode, path).iter().filter_map(|s| s["result"][field].as_f64()).collect();
        spread(&values)
    }

    fn median(&self, mode: &str, path: &str, field: &str) -> Option<f64> {
        self.stat(mode, path, field).map(|s| s.0)
    }

    fn programs(&self, mode: &str, path: &str) -> BTreeMap<String, (f64, f64)> {
        let results: Vec<Value> =
            self.samples(mode, path).iter().map(|s| s["result"].clone()).collect();
        live_programs(&results)
    }

    /// Every mode has connections on every path, and the live statistics
    /// saw forwarder's programs and the empty hooks'.
    fn check_complete(&self) -> anyhow::Result<()> {
        let mut missing = Vec::new();
        for (mode, _) in MODES {
            for (path, _) in PATHS {
                if self.median(mode, path, "ok").unwrap_or(0.0) < 1.0 {
                    missing.push(format!("{mode} {path}: no connection"));
                }
            }
        }
        for (mode, program) in EXPECTED_PROGRAMS {
            let (path, _) = PATHS[0];
            if !self.programs(mode, path).contains_key(program) {
                missing.push(format!("{mode} {path}: no live statistics of {program}"));
            }
        }
        if !missing.is_empty() {
            bail!("remote-endpoint benchmark incomplete: {missing:?}");
        }
        Ok(())
    }
}

pub fn run(dir: &Path, smoke: bool) -> anyhow::Result<()> {
    let lines = bench_lines("remote", smoke)?;
    let machine = machine();
    let json = json!({"machine": machine, "lines": lines});
    write(dir, "remote.json", &(serde_json::to_string_pretty(&json)? + "\n"))?;
    let results = Results::new(&lines);
    results.check_complete()?;
    let env = lines.iter().find(|l| l["kind"] == "environment").cloned().unwrap_or(Value::Null);
    let counters: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "counters").collect();
    let md = report(&results, &machine, &env, &counters)?;
    write(dir, "remote.md", &md)?;
    print!("{md}");
    println!("\nwritten to {}: remote.json, remote.md", dir.display());
    Ok(())
}

fn cell(stat: Option<(f64, f64, f64)>) -> String {
    stat.map_or("–".into(), |(m, lo, hi)| format!("{m:.0} ({lo:.0}–{hi:.0})"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

fn report(
    r: &Results,
    machine: &Value,
    env: &Value,
    counters: &[&Value],
) -> anyhow::Result<String> {
    let load = &env["load"];
    let mut md = String::new();
    writeln!(md, "# New connections to endpoints on another node\n")?;
    writeln!(md, "Machine: {}\n", machine["summary"].as_str().unwrap_or("?"))?;
    writeln!(
        md,
        "The two-node topology of the tests: an external client and nodes node-a and node-b on one L2 segment (a bridge), pods behind each node. One Service (type NodePort, TCP, `externalTrafficPolicy: Cluster`) whose only endpoint is pod-b1 on node-b, in kube-apiserver {kp}. The dataplane under test runs on node-a, the node that translates: forwarder; kube-proxy {kp} in iptables mode (legacy backend) or nftables mode; or nothing, the client connecting to the endpoint's address (direct), also with do-nothing BPF programs on forwarder's hooks (XDP and TC both ways on node-a's interface, TC both ways on its pods' interfaces). NodePort: every connection masqueraded to node-a's address. ClusterIP: pod-a2's connections routed to node-b with the pod's own address. Connect, one {bytes}-byte request and response, close; {clients} concurrent clients on CPU {ccpu}, the server on CPU {scpu}, conntrack flushed before every run. Each figure: median of {rep} runs of {sec} s (min–max).\n",
        kp = env["kube_proxy"].as_str().unwrap_or("?"),
        bytes = load["message_bytes"],
        clients = load["clients"],
        ccpu = load["client_cpu"],
        scpu = load["server_cpu"],
        rep = load["repeats"],
        sec = load["seconds"],
    )?;
    writeln!(md, "## New connections per second\n")?;
    write!(md, "| path |")?;
    for (_, title) in MODES {
        write!(md, " {title} |")?;
    }
    writeln!(
        md,
        " forwarder ÷ iptables | ÷ nftables | ÷ direct |\n|---|{}",
        "---:|".repeat(MODES.len() + 3)
    )?;
    for (path, title) in PATHS {
        write!(md, "| {title} |")?;
        for (mode, _) in MODES {
            write!(md, " {} |", cell(r.stat(mode, path, "rate")))?;
        }
        let m = |mode| r.median(mode, path, "rate");
        writeln!(
            md,
            " {} | {} | {} |",
            ratio(m("forwarder"), m("kube-proxy-iptables")),
            ratio(m("forwarder"), m("kube-proxy-nftables")),
            ratio(m("forwarder"), m("direct"))
        )?;
    }

    writeln!(md, "\n## Failures\n")?;
    writeln!(
        md,
        "Connections that failed (timeouts and refusals, counted, never retried), of all runs; and the drops the dataplane counted over its life (forwarder: its packet counters; kube-proxy: netfilter conntrack's `drop`, `early_drop`, `insert_failed`, `invalid`).\n"
    )?;
    writeln!(md, "| mode | failed / tried | dropped, as the dataplane counted |\n|---|---:|---|")?;
    for (mode, title) in MODES {
        let (mut failed, mut ok) = (0.0, 0.0);
        for (path, _) in PATHS {
            for s in r.samples(mode, path) {
                failed += s["result"]["failed"].as_f64().unwrap_or(0.0);
                ok += s["result"]["ok"].as_f64().unwrap_or(0.0);
            }
        }
        let recorded =
            counters.iter().find(|c| c["mode"] == mode).and_then(|c| c["counters"].as_object());
        let counted = match recorded.filter(|m| !m.is_empty()) {
            None => "–".to_owned(),
            Some(m) => {
                let drops = counted_drops(m);
                if drops.is_empty() { "none".into() } else { drops.join(", ") }
            }
        };
        writeln!(md, "| {title} | {failed:.0} / {:.0} | {counted} |", failed + ok)?;
    }

    writeln!(md, "\n## Kernel CPU per connection\n")?;
    writeln!(
        md,
        "System, irq and softirq time of the whole machine per connection, µs (medians): client, both nodes and the server all run on this machine's two CPUs.\n"
    )?;
    write!(md, "| path |")?;
    for (_, title) in MODES {
        write!(md, " {title} |")?;
    }
    writeln!(md, "\n|---|{}", "---:|".repeat(MODES.len()))?;
    for (path, title) in PATHS {
        write!(md, "| {title} |")?;
        for (mode, _) in MODES {
            let us = r.median(mode, path, "kernel_cpu_us_per_op");
            write!(md, " {} |", us.map_or("–".into(), |v| format!("{v:.1}")))?;
        }
        writeln!(md)?;
    }

    programs(&mut md, r)?;
    Ok(md)
}

/// Each BPF program's live cost during the connection-rate runs, from the
/// kernel's statistics, forwarder's next to the empty hooks'.
fn programs(md: &mut String, r: &Results) -> std::fmt::Result {
    writeln!(md, "\n## BPF programs, live, during these runs\n")?;
    writeln!(
        md,
        "From the kernel's BPF statistics (`BPF_ENABLE_STATS`, the switch behind `kernel.bpf_stats_enabled`, on for every mode of the run): each program's runs per connection and its mean run time, ns (medians over the runs). This is what a packet pays on a live machine, cold caches included, where a warm `BPF_PROG_TEST_RUN` loop reports far less. *direct, empty hooks* runs do-nothing programs on the same hooks: the floor any program there pays.\n"
    )?;
    for (path, title) in PATHS {
        writeln!(md, "### {title}\n")?;
        writeln!(md, "| mode | program | runs per connection | ns per run | ns per connection |")?;
        writeln!(md, "|---|---|---:|---:|---:|")?;
        for (mode, mode_title) in [MODES[2], MODES[1]] {
            let used = r.programs(mode, path);
            let mut total = 0.0;
            for (name, (runs, ns)) in &used {
                total += runs * ns;
                writeln!(
                    md,
                    "| {mode_title} | `{name}` | {runs:.1} | {ns:.0} | {:.0} |",
                    runs * ns
                )?;
            }
            writeln!(md, "| {mode_title} | all | | | **{total:.0}** |")?;
        }
        writeln!(md)?;
    }
    Ok(())
}
