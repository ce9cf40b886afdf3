//! The dataplanes compared. One is active at a time; before each starts,
//! the harness checks that nothing translates Service traffic any more
//! (no program attached, no kube-proxy rule, the frontends refuse).
use std::{process::Command, time::Duration};

use forwarder_tests::{
    forwarder::{Forwarder, attachments},
    kube_proxy::{KubeProxy, ProxyMode, leftovers, nat_rules},
    topology::{NODE_IFACE, NODE_NAME},
};
use serde_json::{Value, json};

pub use crate::dataplane::{Active, Mode};
use crate::topology::{Bench, CLUSTER_CIDR, Path};

/// The node's pod-facing interfaces (forwarder attaches to `veth*`).
const POD_IFACES: [&str; 3] = ["veth-a", "veth-b", "veth-c"];

/// Starts `mode` and waits until the last Service answers on every path.
pub fn start(mode: Mode, bench: &Bench) -> Active {
    assert_clean(bench, "before starting");
    let node = bench.node();
    let active = match mode {
        Mode::Direct => return Active::Nothing,
        Mode::Hooks => return Active::hooks(node, NODE_IFACE, &POD_IFACES),
        Mode::Forwarder => {
            let map_max = lb_map_max(bench.services.len()).to_string();
            Active::Forwarder(Forwarder::start_cluster_with(
                node,
                &bench.plane.kubeconfig,
                NODE_NAME,
                NODE_IFACE,
                &["--bpf-lb-map-max", &map_max],
            ))
        }
        Mode::KubeProxy(proxy_mode) => {
            let proxy = KubeProxy::start(
                node,
                &bench.plane.kubeconfig,
                NODE_NAME,
                proxy_mode,
                None,
                CLUSTER_CIDR,
            );
            proxy.wait_synced(node, Duration::from_secs(300));
            Active::KubeProxy(proxy)
        }
    };
    for path in Path::ALL {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !bench.frontend_answers(path) {
            assert!(
                std::time::Instant::now() < deadline,
                "{}: the last Service never answered on {}",
                mode.name(),
                path.name()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    active
}

/// Ends the dataplane (forwarder's and kube-proxy's own clean-ups) and
/// checks it left nothing behind; returns what the clean-up itself left
/// (and the harness removed).
pub fn stop(active: Active, bench: &Bench) -> Vec<String> {
    let left = match active {
        Active::Nothing => Vec::new(),
        // Closing the links detaches them.
        hooks @ Active::Hooks { .. } => {
            drop(hooks);
            Vec::new()
        }
        // Dropping stops the agent and runs `forwarder cleanup`.
        Active::Forwarder(forwarder) => {
            drop(forwarder);
            Vec::new()
        }
        Active::KubeProxy(mut proxy) => proxy.stop(),
    };
    flush_conntrack(bench);
    assert_clean(bench, "after stopping");
    left
}

/// What the results record of the mode: its flags, and where the last
/// Service's rules sit in kube-proxy's iptables chains.
pub fn describe(mode: Mode, active: &Active, bench: &Bench) -> Value {
    let mut info = json!({"mode": mode.name(), "services": bench.services.len()});
    match active {
        Active::Nothing | Active::Hooks { .. } => {}
        Active::Forwarder(_) => {
            info["flags"] = json!(["--bpf-lb-map-max", lb_map_max(bench.services.len())]);
        }
        Active::KubeProxy(proxy) => {
            info["flags"] = json!(proxy.flags);
            if let Mode::KubeProxy(proxy_mode @ (ProxyMode::Iptables | ProxyMode::IptablesLegacy)) =
                mode
            {
                info["iptables_backend"] = json!(proxy_mode.iptables_backend());
                info["last_service_rule"] = last_service_rules(bench, proxy_mode);
            }
        }
    }
    info
}

/// Every new flow starts with an empty table, whatever the runs before.
pub fn flush_conntrack(bench: &Bench) {
    // Fails harmlessly when no netfilter conntrack was ever loaded.
    let _ =
        Command::new("ip").args(["netns", "exec", &bench.node().name, "conntrack", "-F"]).output();
}

/// Entries of the services and backends maps: a frontend and one per
/// endpoint, for two ports on a ClusterIP and a NodePort each.
fn lb_map_max(services: usize) -> usize {
    (services * 2 * 2 * 5 + 4096).next_power_of_two().max(65_536)
}

fn assert_clean(bench: &Bench, when: &str) {
    let node = bench.node();
    let programs = attachments(node);
    assert!(programs.is_empty(), "{when}: programs still attached: {programs:?}");
    let rules = leftovers(node);
    assert!(rules.is_empty(), "{when}: kube-proxy rules left: {rules:#?}");
    for path in Path::ALL {
        assert!(!bench.frontend_answers(path), "{when}: {} still translated", path.name());
    }
}

/// The last Service's rule's position in `KUBE-SERVICES` (ClusterIP) and
/// `KUBE-NODEPORTS`, which is jumped to after all of `KUBE-SERVICES`.
fn last_service_rules(bench: &Bench, mode: ProxyMode) -> Value {
    let nat = nat_rules(bench.node(), mode);
    let last = bench.last();
    let position = |chain: &str, needle: &str| {
        let rules: Vec<&str> = nat.lines().filter(|l| l.starts_with(chain)).collect();
        let at = rules.iter().position(|l| l.contains(needle) && l.contains("--dport"));
        json!({"position": at.map(|i| i + 1), "rules": rules.len()})
    };
    json!({
        "KUBE-SERVICES": position("-A KUBE-SERVICES ", &format!("-d {}/32", last.cluster_ip)),
        "KUBE-NODEPORTS": position(
            "-A KUBE-NODEPORTS ",
            &format!("--dport {} ", last.tcp_node_port)
        ),
    })
}
