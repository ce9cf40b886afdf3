//! The run's report (Markdown): every spec that ran or skipped itself, by
//! suite, and how the result compares with the specs Cilium's kube-proxy
//! replacement skips in its own CI.
use std::fmt::Write as _;

use anyhow::bail;

use super::{
    cluster::Options,
    e2e::{self, Outcome, Status, Suite},
};

/// Cilium's ginkgo skip list for its kube-proxy-replacement e2e job
/// (`.github/workflows/k8s-kind-network-e2e.yaml`, cilium/cilium commit
/// 006fd5fe2ffffc6fdadf29cc9a9ed114a86c98d2, the v1.20 branch), with the
/// reason its comments give.
const CILIUM_SKIPS: [(&str, &str); 24] = [
    ("Alpha", "features not GA"),
    ("Beta", "features not GA"),
    ("Experimental", "features not GA"),
    ("Federation", "unrelated"),
    ("PerformanceDNS", "unrelated"),
    ("Disruptive", "serial, disruptive"),
    ("Serial", "serial, disruptive"),
    ("KubeProxy", "kube-proxy specifics"),
    ("kube-proxy", "kube-proxy specifics"),
    ("ExternalIP", "needs a cloud provider"),
    ("LoadBalancer", "needs a cloud provider"),
    ("GCE", "needs a cloud provider"),
    ("Netpol", "separate job"),
    ("NetworkPolicy", "separate job"),
    ("rejected", "Cilium drops rather than rejects traffic to a Service without endpoints"),
    ("externalTrafficPolicy", "cilium/cilium#37613"),
    ("SCTPConnectivity", "no reason given"),
    ("IPv6DualStack", "no reason given"),
    (
        "Conntrack.proxy.implementation.should.not.be.vulnerable.to.the.invalid.conntrack.state.bug",
        "no reason given",
    ),
    (
        "Services.should.fallback.to.local.terminating.endpoints.when.there.are.no.ready.endpoints.with.internalTrafficPolicy=Local",
        "no reason given",
    ),
    (r"Networking.IPerf2.\[Feature:Networking\-Performance\].should.run.iperf2", "no reason given"),
    ("Networking.Granular.Checks:.Services.should.update.endpoints", "no reason given"),
    ("DualStack", "added for IPv4 or IPv6 only clusters"),
    ("IPv6", "added for IPv4 only clusters"),
];

pub fn markdown(results: &[(&Suite, Vec<Outcome>)], options: &Options) -> String {
    let mut text = String::from("# Kubernetes e2e results\n\n");
    let _ = writeln!(
        text,
        "`cargo xtask {}` on {}, kernel {}, {}.\n",
        invocation(),
        command(&["date", "-u", "+%Y-%m-%d"]),
        command(&["uname", "-r"]),
        cpu(),
    );
    let proxy = if options.forwarder {
        "forwarder (deploy/forwarder.yaml); cluster DNS: CoreDNS"
    } else {
        "none; cluster DNS: none (CoreDNS needs a Service proxy to reach the API server)"
    };
    let _ = writeln!(
        text,
        "Nodes: {}. Service proxy: {proxy}. Specs never run: `{}` (they stop or restart \
         the cluster's own components), and, where the focus selects them, these, which \
         need what this cluster or machine lacks:\n",
        options.nodes,
        e2e::NEVER
    );
    for spec in e2e::not_here() {
        let _ = writeln!(text, "- `{}`: {}.", spec.specs, spec.why);
    }
    text.push('\n');
    for (suite, outcomes) in results {
        let (passed, failed, skipped) = e2e::counts(outcomes);
        let _ = writeln!(text, "## {}\n", suite.name);
        let _ = writeln!(
            text,
            "Focus `{}`{}: {passed} passed, {failed} failed, {skipped} skipped by the spec itself.\n",
            suite.focus,
            suite.exclude.map(|e| format!(", less `{e}`")).unwrap_or_default(),
        );
        text.push_str(&e2e::table(outcomes));
        text.push('\n');
    }
    text.push_str(&cilium_comparison(results));
    text
}

/// How xtask was run, as it would be typed again.
fn invocation() -> String {
    std::env::args()
        .skip(1)
        .map(|arg| {
            if arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_=./".contains(c)) {
                arg
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn command(args: &[&str]) -> String {
    std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The CPU model and how many of them.
fn cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("an unknown CPU", |(_, m)| m.trim());
    let count = info.lines().filter(|l| l.starts_with("processor")).count();
    format!("{count} x {model}")
}

/// Every spec of the run that Cilium's list skips, and its result here.
fn cilium_comparison(results: &[(&Suite, Vec<Outcome>)]) -> String {
    let mut text = String::from(
        "## Against Cilium's skip list\n\n\
         Specs of this run that Cilium's kube-proxy replacement skips in its own e2e job \
         (cilium/cilium `.github/workflows/k8s-kind-network-e2e.yaml` at 006fd5fe, v1.20 branch), \
         and their result here.\n\n| Spec | Cilium skips it for | Here |\n|---|---|---|\n",
    );
    let mut any = false;
    for outcome in results.iter().flat_map(|(_, o)| o) {
        let reasons: Vec<String> = CILIUM_SKIPS
            .iter()
            .filter(|(pattern, _)| matches(pattern, &outcome.name))
            .map(|(pattern, why)| format!("`{pattern}` ({why})"))
            .collect();
        if reasons.is_empty() {
            continue;
        }
        any = true;
        let here = match outcome.status {
            Status::Passed => "passed",
            Status::Failed => "**failed**",
            Status::Skipped => "skipped",
        };
        let _ = writeln!(
            text,
            "| {} | {} | {here} |",
            outcome.name.replace('|', "\\|"),
            reasons.join(", ")
        );
    }
    if !any {
        text.push_str("| (none of this run's specs) | | |\n");
    }
    text
}

/// Whether an alternative of a ginkgo skip regexp (literal text, `.` any
/// character, `\` escaping the next) matches somewhere in `name`.
fn matches(pattern: &str, name: &str) -> bool {
    let mut tokens = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        tokens.push(match c {
            '\\' => chars.next().map(Some).unwrap_or(None),
            '.' => None,
            other => Some(other),
        });
    }
    let name: Vec<char> = name.chars().collect();
    (0..=name.len().saturating_sub(tokens.len())).any(|start| {
        name.len() >= tokens.len()
            && tokens.iter().zip(&name[start..]).all(|(t, c)| t.is_none_or(|t| t == *c))
    })
}

/// With forwarder, every spec must pass or skip itself; without it, some
/// must fail (else the run proves nothing about forwarder).
pub fn verdict(results: &[(&Suite, Vec<Outcome>)], options: &Options) -> anyhow::Result<()> {
    let all: Vec<&Outcome> = results.iter().flat_map(|(_, o)| o).collect();
    let count = |s| all.iter().filter(|o| o.status == s).count();
    let (passed, failed, skipped) =
        (count(Status::Passed), count(Status::Failed), count(Status::Skipped));
    for outcome in all.iter().filter(|o| o.status == Status::Failed) {
        println!("conformance: FAILED {}: {}", outcome.name, outcome.message);
    }
    println!("conformance: {passed} passed, {failed} failed, {skipped} skipped themselves");
    match (options.forwarder, failed) {
        (true, 0) if passed > 0 => Ok(()),
        (true, 0) => bail!("conformance: no spec ran"),
        (true, _) => bail!("conformance: {failed} specs failed"),
        (false, 0) => {
            bail!("conformance: every spec passed without a Service proxy: proves nothing")
        }
        (false, _) => {
            println!("conformance: without forwarder {failed} specs failed, as they must");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn cilium_patterns_match_as_ginkgo_reads_them() {
        let name =
            "[sig-network] Networking IPerf2 [Feature:Networking-Performance] should run iperf2";
        assert!(matches(
            r"Networking.IPerf2.\[Feature:Networking\-Performance\].should.run.iperf2",
            name
        ));
        assert!(matches("IPerf2", name));
        assert!(!matches("Services.should", name));
        assert!(matches(
            "rejected",
            "[sig-network] Services should be rejected when no endpoints exist"
        ));
        assert!(!matches("rejected", "rejecte"));
    }
}
