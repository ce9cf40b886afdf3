//! Kubernetes' own e2e tests (`e2e.test` of the pinned release) against
//! the cluster, run from the control plane's network namespace, and what
//! its JUnit report says.
use std::path::Path;

use anyhow::Context as _;

use super::cluster::Cluster;

/// A set of e2e specs: a ginkgo focus, less what an earlier suite ran.
pub struct Suite {
    pub name: &'static str,
    pub focus: &'static str,
    /// Specs of the focus another suite runs (not run twice).
    pub exclude: Option<&'static str>,
}

/// The Services conformance tests: what a Service proxy must pass.
pub const CONFORMANCE: Suite = Suite {
    name: "Services conformance",
    focus: r"\[sig-network\] Services.*\[Conformance\]",
    exclude: None,
};

/// `--all`: the conformance tests, every other Services spec, the
/// trafficDistribution specs, and the DNS specs (every lookup goes through
/// the kube-dns Service), then the other Service-traffic specs Cilium's
/// list names.
pub const ALL: [Suite; 5] = [
    CONFORMANCE,
    Suite {
        name: "Services",
        focus: r"\[sig-network\] Services",
        exclude: Some(r"\[Conformance\]"),
    },
    Suite {
        name: "Traffic Distribution",
        focus: r"\[sig-network\] Traffic Distribution",
        exclude: None,
    },
    Suite { name: "DNS", focus: r"\[sig-network\] DNS", exclude: None },
    Suite {
        name: "Service traffic",
        focus: r"\[sig-network\] (Conntrack|Networking Granular Checks: Services)",
        exclude: None,
    },
];

/// Specs no suite runs here: they stop or restart the cluster's own
/// components (nodes, kubelet, the apiserver), which this harness does not
/// support mid-run. Every other spec that cannot run here skips itself and
/// says why (a cloud load balancer, more nodes): the report lists those.
pub const NEVER: &str = r"\[Disruptive\]";

/// Specs that need what this cluster or machine lacks (the report names
/// them).
pub struct NotHere {
    /// A ginkgo regexp.
    pub specs: &'static str,
    pub why: &'static str,
    /// Whether this machine lacks it.
    lacking: fn() -> bool,
}

pub const NOT_HERE: [NotHere; 3] = [
    NotHere {
        specs: r"\[Feature:OffByDefault\]",
        why: "a feature gate that is off by default in this release (in these suites, the \
              alpha Service names starting with a digit); the cluster runs the release's \
              defaults",
        lacking: || true,
    },
    NotHere {
        specs: r"\[Feature:SCTPConnectivity\]",
        why: "SCTP traffic: the host kernel has no SCTP (neither built in, loaded, nor \
              a module it could load). forwarder's SCTP path runs end to end in the VM \
              guests (`cargo xtask vm`)",
        lacking: || !kernel_has_sctp(),
    },
    NotHere {
        specs: r"DNS configMap nameserver Forward PTR lookup",
        why: "first resolves 8.8.8.8's PTR record (dns.google) through the cluster's \
              upstream DNS: that needs the Internet, which no traffic here reaches",
        lacking: || true,
    },
];

/// The specs of `NOT_HERE` that cannot run on this machine.
pub fn not_here() -> impl Iterator<Item = &'static NotHere> {
    NOT_HERE.iter().filter(|spec| (spec.lacking)())
}

/// Without opening an SCTP socket, which would load the module: the host
/// is to be left as found.
fn kernel_has_sctp() -> bool {
    let registered = ["/proc/net/sctp", "/sys/module/sctp"].iter().any(|p| Path::new(p).exists());
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let listed = ["modules.builtin", "modules.dep"].iter().any(|list| {
        std::fs::read_to_string(Path::new("/lib/modules").join(release.trim()).join(list))
            .is_ok_and(|text| text.lines().any(|l| l.contains("/sctp.ko")))
    });
    registered || listed
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Passed,
    Failed,
    /// Skipped by the spec itself at run time (it said why).
    Skipped,
}

#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    pub status: Status,
    /// Why it failed or skipped (the first line).
    pub message: String,
    pub seconds: f64,
}

/// Runs `suite` (or a ginkgo focus given by hand) and returns every spec
/// that ran or skipped itself; specs the focus and skip filter out are
/// not listed.
pub fn run(cluster: &Cluster, suite: &Suite) -> anyhow::Result<Vec<Outcome>> {
    let slug = suite.name.to_lowercase().replace(' ', "-");
    let report = cluster.dir.join(format!("report-{slug}"));
    let _ = std::fs::remove_dir_all(&report);
    let kubectl = cluster.binaries.kubernetes.join("kubectl");
    let skip: Vec<&str> =
        [NEVER].into_iter().chain(not_here().map(|spec| spec.specs)).chain(suite.exclude).collect();
    let log = cluster.dir.join(format!("e2e-{slug}.log"));
    let mut cmd = cluster.client("e2e.test");
    cmd.arg(format!("--kubeconfig={}", cluster.kubeconfig.display()))
        .arg(format!("--kubectl-path={}", kubectl.display()))
        .arg("--provider=skeleton")
        .arg(format!("--report-dir={}", report.display()))
        .arg(format!("--ginkgo.focus={}", suite.focus))
        .arg(format!("--ginkgo.skip={}", skip.join("|")))
        .arg("--ginkgo.no-color")
        .arg("--ginkgo.timeout=3h")
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(cluster.dir.join(format!("e2e-{slug}.stderr.log")))?);
    println!("conformance: running {} (log: {})", suite.name, log.display());
    // Failing specs make it exit non-zero: the report says which.
    let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    let junit = report.join("junit_01.xml");
    let text = std::fs::read_to_string(&junit)
        .with_context(|| format!("e2e.test ({status}) wrote no {}", junit.display()))?;
    Ok(parse_junit(&text))
}

/// The specs of a ginkgo JUnit report that ran or skipped themselves.
pub fn parse_junit(xml: &str) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for case in xml.split("<testcase ").skip(1) {
        let body = case.split("</testcase>").next().unwrap_or(case);
        let (Some(name), Some(status)) = (attribute(body, "name"), attribute(body, "status"))
        else {
            continue;
        };
        let seconds = attribute(body, "time").and_then(|t| t.parse().ok()).unwrap_or(0.0);
        let (status, message) = match status.as_str() {
            "passed" => (Status::Passed, String::new()),
            // Filtered out by focus or skip, the message is only "skipped";
            // a spec that skipped itself says why after it.
            "skipped" => {
                match body.split("<skipped").nth(1).and_then(|s| attribute(s, "message")) {
                    Some(message) if message.starts_with("skipped - ") => {
                        (Status::Skipped, message.trim_start_matches("skipped - ").to_owned())
                    }
                    _ => continue,
                }
            }
            _ => {
                // The framework leaves the attribute empty: the reason is
                // the element's text, after "[FAILED]".
                let text = body
                    .split("<failure")
                    .nth(1)
                    .and_then(|s| s.split_once('>'))
                    .map(|(_, rest)| unescape(rest.split("</failure>").next().unwrap_or(rest)))
                    .unwrap_or_default();
                let reason = text
                    .lines()
                    .map(str::trim)
                    .find_map(|l| l.strip_prefix("[FAILED]").filter(|r| !r.trim().is_empty()))
                    .unwrap_or(&status)
                    .trim()
                    .to_owned();
                (Status::Failed, reason)
            }
        };
        // Suite set-up and tear-down nodes are not specs.
        if !name.starts_with("[It]") {
            if status == Status::Failed {
                outcomes.push(Outcome { name, status, message, seconds });
            }
            continue;
        }
        let name = name.trim_start_matches("[It] ").to_owned();
        let message = message.lines().next().unwrap_or("").trim().to_owned();
        outcomes.push(Outcome { name, status, message, seconds });
    }
    outcomes.sort_by(|a, b| (a.status, &a.name).cmp(&(b.status, &b.name)));
    outcomes
}

/// An XML attribute's unescaped value, from the element's start.
fn attribute(element: &str, key: &str) -> Option<String> {
    let head = element.split('>').next()?;
    let start = head
        .find(&format!(" {key}=\""))
        .map(|i| i + key.len() + 3)
        .or_else(|| head.starts_with(&format!("{key}=\"")).then_some(key.len() + 2))?;
    let value = &head[start..head[start..].find('"')? + start];
    Some(unescape(value))
}

/// XML character references and entities as Go's encoder writes them.
fn unescape(value: &str) -> String {
    value
        .replace("&#34;", "\"")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#xA;", "\n")
        .replace("&#10;", "\n")
        .replace("&#x9;", "\t")
        .replace("&#xD;", "\r")
        .replace("&amp;", "&")
}

/// Counts of each status.
pub fn counts(outcomes: &[Outcome]) -> (usize, usize, usize) {
    let count = |s| outcomes.iter().filter(|o| o.status == s).count();
    (count(Status::Passed), count(Status::Failed), count(Status::Skipped))
}

/// A Markdown table of `outcomes`.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut text = String::from("| Spec | Result | Why |\n|---|---|---|\n");
    for o in outcomes {
        let result = match o.status {
            Status::Passed => format!("passed ({:.0} s)", o.seconds),
            Status::Failed => "**failed**".to_owned(),
            Status::Skipped => "skipped".to_owned(),
        };
        let why = o.message.replace('|', "\\|");
        text.push_str(&format!("| {} | {result} | {why} |\n", o.name.replace('|', "\\|")));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_lists_specs_that_ran_or_skipped_themselves() {
        let xml = r#"<testsuites><testsuite>
<testcase name="[SynchronizedBeforeSuite]" classname="s" status="passed" time="1"></testcase>
<testcase name="[It] [sig-network] Services should a &#34;b&#34;" classname="s" status="passed" time="12.5"><system-err>x</system-err></testcase>
<testcase name="[It] [sig-network] Services filtered" classname="s" status="skipped" time="0"><skipped message="skipped"></skipped></testcase>
<testcase name="[It] [sig-network] Services two nodes" classname="s" status="skipped" time="0.1"><skipped message="skipped - Requires at least 2 nodes (not 1)"></skipped></testcase>
<testcase name="[It] [sig-network] Services broken" classname="s" status="failed" time="30"><failure message="" type="failed">[FAILED] service verification failed for: 10.96.1.2&#xA;expected [a]&#xA;In [It] at: service.go:1178</failure></testcase>
</testsuite></testsuites>"#;
        let outcomes = parse_junit(xml);
        let got: Vec<(&str, Status, &str)> =
            outcomes.iter().map(|o| (o.name.as_str(), o.status, o.message.as_str())).collect();
        assert_eq!(
            got,
            [
                ("[sig-network] Services should a \"b\"", Status::Passed, ""),
                (
                    "[sig-network] Services broken",
                    Status::Failed,
                    "service verification failed for: 10.96.1.2"
                ),
                (
                    "[sig-network] Services two nodes",
                    Status::Skipped,
                    "Requires at least 2 nodes (not 1)"
                ),
            ]
        );
        assert_eq!(outcomes[0].seconds, 12.5);
        assert_eq!(counts(&outcomes), (1, 1, 1));
    }
}
