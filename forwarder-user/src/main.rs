use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use forwarder_user::{
    agent::{self, SourceConfig},
    attach,
    cidr::Cidr,
    dataplane::Capacity,
    pins::{self, PinDir},
};
use tracing_subscriber::EnvFilter;

/// Kubernetes Service dataplane on XDP/TC: a kube-proxy replacement.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the programs and keep the maps in sync with the Services.
    Run(Box<RunArgs>),
    /// Mount a bpffs where `--bpffs-root` needs one, if the host has none
    /// (the agent does it too, but without CAP_SYS_ADMIN it cannot: the
    /// DaemonSet's privileged init container runs this).
    MountBpffs(MountBpffsArgs),
    /// Remove every attachment, pin and map forwarder made for a node, in
    /// this network namespace (kube-proxy's --cleanup).
    Cleanup(CleanupArgs),
}

#[derive(clap::Args)]
struct CleanupArgs {
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    #[arg(long, env = "FORWARDER_BPFFS_ROOT", default_value = pins::DEFAULT_ROOT)]
    bpffs_root: PathBuf,
}

#[derive(clap::Args)]
struct MountBpffsArgs {
    #[arg(long, env = "FORWARDER_BPFFS_ROOT", default_value = pins::DEFAULT_ROOT)]
    bpffs_root: PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    /// A YAML/JSON file, or a directory of them, holding v1 Service,
    /// discovery.k8s.io/v1 EndpointSlice and v1 Node objects, watched:
    /// runs without a cluster. Without it, the API server is watched.
    #[arg(long, env = "FORWARDER_MANIFESTS", conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// The API server's kubeconfig (kube-proxy's flag). Default: in-cluster
    /// config, else $KUBECONFIG or ~/.kube/config.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name (endpoint locality, this node's Node object).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Node interface to serve NodePorts and ClusterIPs on with XDP.
    /// Repeatable, or comma-separated.
    #[arg(long = "iface", env = "FORWARDER_IFACES", value_delimiter = ',', required = true)]
    ifaces: Vec<String>,
    /// Glob for pod-facing interfaces, which get the TC program.
    /// Repeatable, or comma-separated.
    #[arg(
        long = "pod-iface",
        env = "FORWARDER_POD_IFACES",
        value_delimiter = ',',
        default_values = ["veth*", "cali*", "lxc*", "cni*"]
    )]
    pod_ifaces: Vec<String>,
    /// Where /healthz and /livez are served, as with kube-proxy.
    #[arg(long, env = "FORWARDER_HEALTHZ_BIND_ADDRESS", default_value = "0.0.0.0:10256")]
    healthz_bind_address: SocketAddr,
    /// Comma-separated CIDRs: only node addresses within them serve
    /// NodePorts (kube-proxy's flag). Default: every local address.
    #[arg(long, env = "FORWARDER_NODEPORT_ADDRESSES", value_delimiter = ',', value_parser = cidr_or_empty)]
    nodeport_addresses: Vec<Option<Cidr>>,
    /// cgroup v2 directory whose processes' connections to Services are
    /// translated at the socket (default: the hierarchy's root, every
    /// process of this node's network namespace).
    #[arg(long)]
    cgroup_path: Option<PathBuf>,
    /// Where Prometheus metrics are served (`/metrics`), as with kube-proxy.
    #[arg(long, env = "FORWARDER_METRICS_BIND_ADDRESS", default_value = "0.0.0.0:10249")]
    metrics_bind_address: SocketAddr,
    /// The whole state is synced at least this often (`30s`, `500ms`, `1m`);
    /// /healthz fails when no sync succeeded for twice as long.
    #[arg(long, env = "FORWARDER_SYNC_PERIOD", default_value = "30s", value_parser = duration)]
    sync_period: std::time::Duration,
    /// Entries of the services map (a frontend plus one per endpoint) and
    /// of the backends map (Cilium's flag). Sized when the maps are first
    /// created; pinned maps keep their size until `forwarder cleanup`.
    #[arg(long, env = "FORWARDER_BPF_LB_MAP_MAX", default_value_t = forwarder_common::SERVICES_MAX)]
    bpf_lb_map_max: u32,
    /// Conntrack entries (an LRU: the coldest flow makes room).
    #[arg(long, env = "FORWARDER_BPF_CT_MAP_MAX", default_value_t = forwarder_common::CONNTRACK_MAX)]
    bpf_ct_map_max: u32,
    /// Masquerade entries, two per masqueraded flow (Cilium's
    /// --bpf-nat-global-max; an LRU).
    #[arg(long, env = "FORWARDER_BPF_NAT_MAP_MAX", default_value_t = forwarder_common::NAT_MAX)]
    bpf_nat_map_max: u32,
    /// bpffs directory under which each node's maps and links are pinned
    /// (`<root>/<node name>/`), so they outlive the agent.
    #[arg(long, env = "FORWARDER_BPFFS_ROOT", default_value = pins::DEFAULT_ROOT)]
    bpffs_root: PathBuf,
    /// Idle timeout of an established TCP connection (kube-proxy's flag
    /// and default).
    #[arg(long, env = "FORWARDER_CONNTRACK_TCP_TIMEOUT_ESTABLISHED", default_value = "24h", value_parser = seconds)]
    conntrack_tcp_timeout_established: u32,
    /// Idle timeout of a TCP connection one side of which sent its FIN
    /// (kube-proxy's flag and default).
    #[arg(long, env = "FORWARDER_CONNTRACK_TCP_TIMEOUT_CLOSE_WAIT", default_value = "1h", value_parser = seconds)]
    conntrack_tcp_timeout_close_wait: u32,
    /// Timeout of a TCP connection whose handshake did not complete.
    #[arg(long, env = "FORWARDER_CONNTRACK_TCP_TIMEOUT_SYN", default_value = "60s", value_parser = seconds)]
    conntrack_tcp_timeout_syn: u32,
    /// How long a TCP connection closed on both sides (or reset) keeps its
    /// entries: stray packets still find them, a masquerade port is free after.
    #[arg(long, env = "FORWARDER_CONNTRACK_TCP_TIMEOUT_CLOSE", default_value = "10s", value_parser = seconds)]
    conntrack_tcp_timeout_close: u32,
    /// Idle timeout of a UDP flow (kube-proxy's flag; its default leaves
    /// the kernel's 30 s, or 120 s once replied; Cilium's is 60 s).
    #[arg(long, env = "FORWARDER_CONNTRACK_UDP_TIMEOUT", default_value = "60s", value_parser = seconds)]
    conntrack_udp_timeout: u32,
    /// ICMP port unreachable answers (rejects) each CPU may send per
    /// second, in bursts of a twentieth of that; more are dropped and
    /// counted (`drop_reject_rate`). 0: no limit.
    #[arg(long, env = "FORWARDER_ICMP_REJECT_RATE", default_value_t = forwarder_common::REJECT_RATE_DEFAULT)]
    icmp_reject_rate: u32,
    /// How often expired conntrack entries are removed.
    #[arg(long, env = "FORWARDER_CONNTRACK_GC_INTERVAL", default_value = "10s", value_parser = duration)]
    conntrack_gc_interval: std::time::Duration,
}

/// `30s`, `500ms`, `1m` (kube-proxy's duration flags); positive.
fn duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?}: expected e.g. 30s"))?;
    let millis = match unit {
        "ms" => number,
        "s" | "" => number * 1000,
        "m" => number * 60_000,
        "h" => number * 3_600_000,
        _ => return Err(format!("{text:?}: the unit is ms, s, m or h")),
    };
    match millis {
        0 => Err("the duration must be positive".into()),
        ms => Ok(std::time::Duration::from_millis(ms)),
    }
}

/// A duration flag in whole seconds, as the datapath keeps them.
fn seconds(text: &str) -> Result<u32, String> {
    let duration = duration(text)?;
    match u32::try_from(duration.as_secs()) {
        Ok(0) => Err(format!("{text:?}: at least 1s")),
        Ok(secs) => Ok(secs),
        Err(_) => Err(format!("{text:?}: too long")),
    }
}

/// An empty list item (an empty environment variable from a ConfigMap)
/// means no CIDR rather than a bad one.
fn cidr_or_empty(text: &str) -> Result<Option<Cidr>, String> {
    match text.trim() {
        "" => Ok(None),
        cidr => cidr.parse().map(Some).map_err(|e| format!("{e}")),
    }
}

/// A parent may have blocked SIGINT/SIGTERM (the mask survives exec); we
/// must see them to detach cleanly.
fn unblock_stop_signals() {
    // SAFETY: plain libc calls on a local, initialised signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

fn main() -> anyhow::Result<()> {
    // Before the runtime starts its threads, which inherit the mask.
    unblock_stop_signals();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: a pod's log is a file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = match Cli::parse().command {
        Command::Run(args) => *args,
        Command::MountBpffs(args) => {
            return pins::ensure_bpffs(&args.bpffs_root)
                .with_context(|| format!("preparing {}", args.bpffs_root.display()));
        }
        Command::Cleanup(args) => {
            let pins = PinDir::new(&args.bpffs_root, &args.node_name);
            let removed = attach::cleanup(&pins)
                .with_context(|| format!("cleaning up {}", pins.path().display()))?;
            tracing::info!(pins = removed, node = %args.node_name, "cleaned up");
            return Ok(());
        }
    };
    let source = match args.manifests {
        Some(path) => SourceConfig::Manifests(path),
        None => SourceConfig::Cluster { kubeconfig: args.kubeconfig },
    };
    agent::run(agent::Config {
        source,
        node_name: args.node_name,
        ifaces: args.ifaces,
        pod_iface_globs: args.pod_ifaces,
        healthz_bind_address: args.healthz_bind_address,
        nodeport_addresses: args.nodeport_addresses.into_iter().flatten().collect(),
        cgroup_path: args.cgroup_path,
        bpffs_root: args.bpffs_root,
        metrics_bind_address: args.metrics_bind_address,
        sync_period: args.sync_period,
        capacity: Capacity {
            services: args.bpf_lb_map_max,
            backends: args.bpf_lb_map_max,
            conntrack: args.bpf_ct_map_max,
            nat: args.bpf_nat_map_max,
        },
        timeouts: forwarder_common::CtTimeouts {
            tcp_syn: args.conntrack_tcp_timeout_syn,
            tcp_established: args.conntrack_tcp_timeout_established,
            tcp_close_wait: args.conntrack_tcp_timeout_close_wait,
            tcp_close: args.conntrack_tcp_timeout_close,
            udp: args.conntrack_udp_timeout,
        },
        conntrack_gc_interval: args.conntrack_gc_interval,
        icmp_reject_rate: args.icmp_reject_rate,
    })
    .await
}
