//! The real kube-proxy (built from the release pinned in `tests/k8s`) in a
//! node namespace, for the smoke test and the side-by-side benchmarks:
//! started with kube-proxy's own defaults except where a test namespace
//! needs otherwise, stopped and `--cleanup`ed on drop.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{forwarder::http_get, k8s::bin_dir, netns::NetNs};

/// Where kube-proxy serves its metrics in the node namespace (its default port).
pub const METRICS_ADDRESS: &str = "127.0.0.1:10249";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// iptables mode, the `iptables` commands on the PATH (Debian 12: the
    /// nf_tables backend of iptables 1.8.9).
    Iptables,
    /// iptables mode on iptables' legacy backend (`iptables-legacy*` put
    /// first on kube-proxy's PATH). The nf_tables backend's
    /// `iptables-restore --noflush` grows worse than quadratically with
    /// the chains already there: at 10,000 Services its first sync did not
    /// end within 5 minutes here.
    IptablesLegacy,
    Nftables,
}

impl ProxyMode {
    /// kube-proxy's `--proxy-mode`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Iptables | Self::IptablesLegacy => "iptables",
            Self::Nftables => "nftables",
        }
    }

    /// The iptables commands the mode runs (and its rules are read with).
    pub fn iptables_backend(self) -> &'static str {
        match self {
            Self::IptablesLegacy => "legacy",
            _ => "nft",
        }
    }
}

/// A directory whose `iptables*` and `ip6tables*` commands are the legacy
/// backend's, for the front of kube-proxy's PATH.
fn legacy_iptables_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("forwarder-iptables-legacy");
    let _ = std::fs::create_dir_all(&dir);
    for family in ["iptables", "ip6tables"] {
        for suffix in ["", "-save", "-restore"] {
            let link = dir.join(format!("{family}{suffix}"));
            let _ = std::fs::remove_file(&link);
            let target = format!("/usr/sbin/{family}-legacy{suffix}");
            let _ = std::os::unix::fs::symlink(target, &link);
        }
    }
    dir
}

/// `kube-proxy` run in `netns` with `mode`'s iptables commands.
fn kube_proxy_command(netns: &str, mode: ProxyMode) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]).arg(bin_dir().join("kube-proxy"));
    if mode == ProxyMode::IptablesLegacy {
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("{}:{path}", legacy_iptables_dir().display()));
    }
    cmd
}

pub struct KubeProxy {
    child: Option<Child>,
    node_ns: String,
    mode: ProxyMode,
    pub log: PathBuf,
    /// Every flag it was started with, for the results.
    pub flags: Vec<String>,
    /// When it was started (wall clock, seconds since the epoch).
    pub started_unix: f64,
}

/// The kubernetes release pinned in `tests/k8s/go.mod` (a binary built from
/// the module reports `v0.0.0-master`).
pub fn pinned_release() -> String {
    let go_mod = std::fs::read_to_string(crate::k8s::go_module_dir().join("go.mod"));
    go_mod
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.trim().strip_prefix("k8s.io/kubernetes ")?.split_whitespace().next())
        .unwrap_or("unknown")
        .to_owned()
}

/// Wall-clock seconds since the epoch, as kube-proxy's timestamp metrics.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl KubeProxy {
    /// Starts kube-proxy in `mode` for Node `node_name`; `min_sync_period`
    /// `None` keeps kube-proxy's default (1s).
    pub fn start(
        node: &NetNs,
        kubeconfig: &Path,
        node_name: &str,
        mode: ProxyMode,
        min_sync_period: Option<&str>,
        cluster_cidr: &str,
    ) -> Self {
        let mut flags = vec![
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--proxy-mode={}", mode.name()),
            format!("--hostname-override={node_name}"),
            format!("--cluster-cidr={cluster_cidr}"),
            // nf_conntrack_max is global: a test namespace must not change it.
            "--conntrack-max-per-core=0".into(),
            format!("--metrics-bind-address={METRICS_ADDRESS}"),
            "--healthz-bind-address=127.0.0.1:10256".into(),
        ];
        if let Some(period) = min_sync_period {
            // kube-proxy's one flag for it in every mode but IPVS.
            flags.push(format!("--iptables-min-sync-period={period}"));
        }
        let log = std::env::temp_dir().join(format!("{}-kube-proxy.log", node.name));
        let child = kube_proxy_command(&node.name, mode)
            .args(&flags)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("kube-proxy log"))
            .spawn()
            .expect("kube-proxy starts");
        Self {
            child: Some(child),
            node_ns: node.name.clone(),
            mode,
            log,
            flags,
            started_unix: unix_now(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its Prometheus metrics, when it answers.
    pub fn metrics(&self, node: &NetNs) -> Option<String> {
        http_get(node, METRICS_ADDRESS, "/metrics").map(|(_, body)| body)
    }

    /// Waits for its first complete sync (it syncs only once every initial
    /// list is in); returns `kubeproxy_sync_proxy_rules_last_timestamp_seconds`.
    pub fn wait_synced(&self, node: &NetNs, limit: Duration) -> f64 {
        let deadline = Instant::now() + limit;
        loop {
            let synced = self
                .metrics(node)
                .and_then(|m| metric(&m, "kubeproxy_sync_proxy_rules_last_timestamp_seconds"))
                .filter(|t| *t > 0.0);
            if let Some(at) = synced {
                return at;
            }
            assert!(
                Instant::now() < deadline,
                "kube-proxy did not sync within {limit:?}:\n{}",
                tail(&self.log_text())
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills it and removes its rules with `kube-proxy --cleanup`; returns
    /// what that left, which is then removed too: 1.35's clean-up keeps
    /// `KUBE-FIREWALL` (a drop of non-loopback sources to 127.0.0.0/8, no
    /// Service translation), which the next dataplane must not inherit.
    pub fn stop(&mut self) -> Vec<String> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let out = kube_proxy_command(&self.node_ns, self.mode)
            .arg("--cleanup")
            .output()
            .expect("kube-proxy --cleanup runs");
        assert!(
            out.status.success(),
            "kube-proxy --cleanup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let left = leftovers_in(&self.node_ns);
        if left.iter().any(|l| l.contains("KUBE-FIREWALL")) {
            let iptables = format!("iptables-{}", self.mode.iptables_backend());
            for args in [
                &["-D", "INPUT", "-j", "KUBE-FIREWALL"][..],
                &["-D", "OUTPUT", "-j", "KUBE-FIREWALL"],
                &["-F", "KUBE-FIREWALL"],
                &["-X", "KUBE-FIREWALL"],
            ] {
                let _ = Command::new("ip")
                    .args(["netns", "exec", &self.node_ns, &iptables])
                    .args(args)
                    .output();
            }
        }
        left
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        if self.child.is_some() && !std::thread::panicking() {
            self.stop();
        } else if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// netfilter conntrack's statistics in `node`, summed over CPUs
/// (`conntrack -S`).
pub fn conntrack_stats(node: &NetNs) -> serde_json::Map<String, serde_json::Value> {
    let mut counters = serde_json::Map::new();
    let stats = node.exec(&["conntrack", "-S"]);
    for pair in String::from_utf8_lossy(&stats.stdout).split_whitespace() {
        if let Some((key, value)) = pair.split_once('=')
            && let Ok(value) = value.parse::<f64>()
            && key != "cpu"
        {
            let total = counters.entry(key).or_insert(serde_json::json!(0.0));
            *total = serde_json::json!(total.as_f64().unwrap_or(0.0) + value);
        }
    }
    counters
}

/// The nat table as `mode` wrote it (`iptables-save -t nat` of its backend).
pub fn nat_rules(node: &NetNs, mode: ProxyMode) -> String {
    let save = format!("iptables-{}-save", mode.iptables_backend());
    String::from_utf8_lossy(&node.exec(&[&save, "-t", "nat"]).stdout).into_owned()
}

/// kube-proxy's rules left in `node`: iptables chains and rules named
/// `KUBE-*` in any table of either backend, and its nftables tables.
pub fn leftovers(node: &NetNs) -> Vec<String> {
    leftovers_in(&node.name)
}

fn leftovers_in(netns: &str) -> Vec<String> {
    let output = |args: &[&str]| {
        let out = Command::new("ip").args(["netns", "exec", netns]).args(args).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    };
    let iptables = output(&["iptables-nft-save"]) + &output(&["iptables-legacy-save"]);
    let tables = output(&["nft", "list", "tables"]);
    let iptables = iptables.lines().filter(|l| l.contains("KUBE-") && !l.starts_with('#'));
    let tables = tables.lines().filter(|l| l.contains("kube-proxy"));
    iptables.chain(tables).map(str::to_owned).collect()
}

/// The sample of `name` in Prometheus text: kube-proxy's IPv4 one where it
/// labels them by `ip_family` (its IPv6 proxier syncs long before the IPv4
/// one at scale, and must not pass for it), else the first.
pub fn metric(body: &str, name: &str) -> Option<f64> {
    let ipv4 = format!("{name}{{ip_family=\"IPv4\"}} ");
    let labelled = body.lines().find_map(|l| l.strip_prefix(&ipv4)?.trim().parse().ok());
    if labelled.is_some() || body.contains(&format!("{name}{{ip_family=")) {
        return labelled;
    }
    body.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let value = match rest.strip_prefix('{') {
            Some(labelled) => labelled.split_once("} ")?.1,
            None => rest.strip_prefix(' ')?,
        };
        value.trim().parse().ok()
    })
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::metric;

    #[test]
    fn kube_proxys_ipv6_sync_does_not_pass_for_the_ipv4_one() {
        let name = "kubeproxy_sync_proxy_rules_last_timestamp_seconds";
        let only_ipv6 = format!("# TYPE {name} gauge\n{name}{{ip_family=\"IPv6\"}} 1.7e+09\n");
        assert_eq!(metric(&only_ipv6, name), None);
        let both =
            format!("{name}{{ip_family=\"IPv4\"}} 1.8e+09\n{name}{{ip_family=\"IPv6\"}} 1.7e+09\n");
        assert_eq!(metric(&both, name), Some(1.8e9));
        assert_eq!(metric("forwarder_x 3\n", "forwarder_x"), Some(3.0));
        assert_eq!(metric("forwarder_x_count 3\n", "forwarder_x"), None);
    }
}
