//! The whole cluster on this machine: a network namespace for the control
//! plane with a bridge every node's `eth0` is plugged into (the nodes'
//! "physical" network), the nodes, forwarder as the DaemonSet of
//! `deploy/forwarder.yaml`, and CoreDNS. Torn down on drop; `down` also
//! proves the host is as it was.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use anyhow::{Context as _, bail};
use forwarder_tests::{netns::NetNs, xdp_pass::XdpPass};

use super::{
    build::Binaries,
    control_plane::{self, APISERVER, APISERVER_PORT, CLUSTER_DNS, ControlPlane},
    host::{self, HostState},
    node::{self, Node, NodeSpec},
    pki::Identity,
    process::{Place, output, wait_for},
};

/// Every network namespace of a run starts so (a crashed run's are
/// removed by the next).
pub const NETNS_PREFIX: &str = "fwdk8s-";
const BRIDGE: &str = "k8s0";

/// Held by whoever tears the cluster down: the run itself, or the
/// interrupt handler's thread, which exits the process still holding it, so
/// the two never tear down at once.
static TEARDOWN: Mutex<()> = Mutex::new(());

pub fn teardown_lock() -> MutexGuard<'static, ()> {
    TEARDOWN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub struct Options {
    pub nodes: usize,
    /// Deploy forwarder (off: the proof that the tests fail without it).
    pub forwarder: bool,
}

pub struct Cluster {
    pub dir: PathBuf,
    pub binaries: Binaries,
    /// The control plane's network namespace: clients (kubectl, e2e.test)
    /// run there.
    pub cp: Place,
    pub kubeconfig: PathBuf,
    before: HostState,
    control_plane: Option<ControlPlane>,
    pub nodes: Vec<Node>,
    /// Deleted (with everything in them) when dropped.
    netns: Vec<NetNs>,
    /// On the bridge's side of every node link: frames forwarder's XDP
    /// program sends back out (`XDP_TX`) are dropped by a veth whose peer
    /// runs no XDP program.
    xdp: Vec<XdpPass>,
    torn_down: bool,
}

pub fn node_address(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, 10 + index as u8)
}

fn pod_cidr(index: usize) -> String {
    format!("10.244.{index}.0/24")
}

impl Cluster {
    pub fn up(
        dir: &Path,
        binaries: Binaries,
        images: &[PathBuf],
        options: &Options,
    ) -> anyhow::Result<Self> {
        remove_leftovers()?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let before = HostState::record()?;
        before.save_sysctls(&saved_sysctls())?;
        let cp_ns = format!("{NETNS_PREFIX}cp");
        let mut cluster = Self {
            dir: dir.to_owned(),
            binaries,
            cp: Place { netns: Some(cp_ns.clone()), ..Place::default() },
            kubeconfig: dir.join("control-plane/admin.kubeconfig"),
            before,
            control_plane: None,
            nodes: Vec::new(),
            netns: Vec::new(),
            xdp: Vec::new(),
            torn_down: false,
        };
        cluster.wire(options.nodes)?;
        let identities: Vec<Identity> =
            (1..=options.nodes).map(|i| Identity::node(&node_name(i))).collect();
        println!("conformance: starting the control plane");
        cluster.control_plane = Some(ControlPlane::start(
            &dir.join("control-plane"),
            &cluster.cp,
            &cluster.binaries.kubernetes,
            &identities.iter().collect::<Vec<_>>(),
        )?);
        for (i, identity) in (1..=options.nodes).zip(&identities) {
            println!("conformance: starting {} (containerd, kubelet)", node_name(i));
            let spec = NodeSpec {
                name: node_name(i),
                netns: format!("{NETNS_PREFIX}{}", node_name(i)),
                address: node_address(i),
                pod_cidr: pod_cidr(i),
                zone: zone(i),
            };
            let pki = &cluster.control_plane.as_ref().expect("started").pki;
            let node = Node::start(
                spec,
                &dir.join(node_name(i)),
                &cluster.binaries,
                pki,
                identity,
                images,
            )?;
            cluster.nodes.push(node);
        }
        cluster.wait_nodes_ready()?;
        // kubelet sets these host-wide at every start: put them back.
        cluster.before.restore_sysctls()?;
        if options.forwarder {
            println!("conformance: deploying forwarder (deploy/forwarder.yaml)");
            cluster.apply(&forwarder_manifest()?)?;
            cluster.wait_rolled_out("daemonset/forwarder")?;
            println!("conformance: deploying CoreDNS");
            cluster.apply(&coredns_manifest()?)?;
            cluster.wait_rolled_out("deployment/coredns")?;
        } else {
            // Without a Service proxy CoreDNS cannot reach the apiserver
            // (10.96.0.1) and never gets ready, and e2e.test would fail its
            // whole suite waiting for kube-system: no DNS, every spec runs.
            println!("conformance: no CoreDNS either (it needs a Service proxy)");
        }
        Ok(cluster)
    }

    /// The network namespaces, the bridge, the node links and the routes
    /// between the nodes' pod ranges.
    fn wire(&mut self, nodes: usize) -> anyhow::Result<()> {
        let cp = self.cp.netns.clone().expect("named");
        self.netns.push(NetNs::new(cp.clone()));
        let ip = |ns: &str, args: &str| -> anyhow::Result<()> {
            let mut cmd = std::process::Command::new("ip");
            cmd.args(["-n", ns]).args(args.split_whitespace());
            output(&mut cmd).map(drop)
        };
        ip(&cp, &format!("link add {BRIDGE} type bridge"))?;
        ip(&cp, &format!("addr add {APISERVER}/24 dev {BRIDGE}"))?;
        ip(&cp, &format!("link set {BRIDGE} up"))?;
        for i in 1..=nodes {
            let ns = format!("{NETNS_PREFIX}{}", node_name(i));
            self.netns.push(NetNs::new(ns.clone()));
            let port = node_name(i);
            ip(&cp, &format!("link add {port} type veth peer name eth0 netns {ns}"))?;
            ip(&cp, &format!("link set {port} master {BRIDGE} up"))?;
            // What forwarder asks of a virtual node interface's peer: full
            // checksums (XDP rewrites them incrementally).
            output(self.cp.command("ethtool").args(["-K", &port, "tx", "off"]))?;
            ip(&ns, &format!("addr add {}/24 dev eth0", node_address(i)))?;
            ip(&ns, "link set eth0 up")?;
            // Nothing leaves the cluster's namespaces; a ClusterIP no
            // proxy answered is refused at once rather than lost.
            ip(&ns, &format!("route add unreachable {}", control_plane::SERVICE_CIDR))?;
            ip(&cp, &format!("route add {} via {}", pod_cidr(i), node_address(i)))?;
            for j in (1..=nodes).filter(|j| *j != i) {
                ip(&ns, &format!("route add {} via {}", pod_cidr(j), node_address(j)))?;
            }
            self.xdp.push(XdpPass::attach(&self.netns[0], &port));
        }
        Ok(())
    }

    fn wait_nodes_ready(&mut self) -> anyhow::Result<()> {
        let expected = self.nodes.len();
        let (cp, bin, dir) = (self.cp.clone(), self.binaries.kubernetes.clone(), self.dir.clone());
        let kubeconfig = format!("--kubeconfig={}", self.kubeconfig.display());
        let mut daemons: Vec<_> =
            self.nodes.iter_mut().flat_map(|n| n.daemons.iter_mut()).collect();
        wait_for("the nodes", Duration::from_secs(180), &mut daemons, || {
            let said = output(
                client(&cp, &bin, &dir, "kubectl")
                    .arg(&kubeconfig)
                    .args(["get", "nodes", "-o"])
                    .arg("jsonpath={range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}"),
            )?;
            Ok(said.lines().filter(|l| l.trim() == "True").count() == expected)
        })
    }

    /// `kubectl` as the admin, from the control plane's namespace.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        output(
            self.client("kubectl")
                .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
                .args(args),
        )
    }

    /// A Kubernetes client binary (kubectl, e2e.test) in the control
    /// plane's namespace, its discovery cache in the run directory rather
    /// than ~/.kube.
    pub fn client(&self, name: &str) -> std::process::Command {
        client(&self.cp, &self.binaries.kubernetes, &self.dir, name)
    }

    /// Waits until every pod of a kube-system workload runs the latest spec.
    fn wait_rolled_out(&self, workload: &str) -> anyhow::Result<()> {
        self.kubectl(&["-n", "kube-system", "rollout", "status", workload, "--timeout=180s"])
            .map(drop)
    }

    fn apply(&self, manifest: &str) -> anyhow::Result<()> {
        let file = self.dir.join(format!("manifest-{}.yaml", build_id(manifest)));
        std::fs::write(&file, manifest)?;
        self.kubectl(&["apply", "-f", &file.display().to_string()]).map(drop)
    }

    /// Stops everything, removes what the run made, and fails unless the
    /// host is as before it.
    pub fn down(mut self) -> anyhow::Result<()> {
        self.teardown()?;
        HostState::check_unchanged(&self.before)
    }

    fn teardown(&mut self) -> anyhow::Result<()> {
        if self.torn_down {
            return Ok(());
        }
        let _only_teardown = teardown_lock();
        self.torn_down = true;
        let mut errors = Vec::new();
        // The runtime and kubelet first; then whatever is left in any
        // node's cgroups (shims, containers, a node that failed to start).
        self.nodes.clear();
        if let Err(e) = node::remove_all_cgroups() {
            errors.push(format!("{e:#}"));
        }
        self.control_plane = None;
        self.xdp.clear();
        for ns in self.netns.drain(..).rev() {
            // A process left inside would keep the namespace, unnamed.
            if let Err(e) = kill_processes_in(&ns.name) {
                errors.push(format!("{e:#}"));
            }
        }
        if let Err(e) = self.before.restore_sysctls() {
            errors.push(format!("{e:#}"));
        }
        let _ = std::fs::remove_file(saved_sysctls());
        if !errors.is_empty() {
            bail!("teardown: {}", errors.join("; "));
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("conformance: {e:#}");
        }
    }
}

fn client(cp: &Place, bin: &Path, dir: &Path, name: &str) -> std::process::Command {
    let mut cmd = cp.command(bin.join(name));
    cmd.env("KUBECACHEDIR", dir.join("kube-cache"));
    cmd
}

/// Three zones, the most the Traffic Distribution specs ask for: a node
/// each up to three nodes, then round again (six nodes: two per zone, for
/// the specs that want that).
fn zone(index: usize) -> String {
    format!("zone-{}", (index - 1) % 3 + 1)
}

pub fn node_name(index: usize) -> String {
    format!("node{index}")
}

/// What a run killed before its teardown (or interrupted) left: the
/// processes in its network namespaces (the control plane, e2e.test), its
/// nodes' cgroups with every process in them (the runtime, kubelet,
/// containers), then the namespaces themselves.
pub fn remove_leftovers() -> anyhow::Result<()> {
    node::remove_all_cgroups()?;
    let listed = output(std::process::Command::new("ip").args(["netns", "list"]))?;
    let ours: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| ns.starts_with(NETNS_PREFIX))
        .collect();
    for ns in ours {
        println!("conformance: removing {ns}, left by an earlier run");
        kill_processes_in(ns)?;
        let deleted = output(std::process::Command::new("ip").args(["netns", "del", ns]));
        // Gone already is fine: a teardown may race an interrupt.
        if let Err(e) = deleted
            && Path::new("/run/netns").join(ns).exists()
        {
            return Err(e);
        }
    }
    host::restore_saved_sysctls(&saved_sysctls())
}

/// The host's sysctls as a run found them, kept beside the run directory.
fn saved_sysctls() -> PathBuf {
    crate::setup::workspace_root().join("target/conformance/host-sysctls")
}

/// SIGKILLs every process in network namespace `ns` (by the namespace's
/// inode), until none is left.
fn kill_processes_in(ns: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(namespace) = std::fs::metadata(format!("/run/netns/{ns}")) else {
        // Already deleted (by a teardown racing an interrupt).
        return Ok(());
    };
    let inode = namespace.ino();
    for _ in 0..50 {
        let pids: Vec<i32> = std::fs::read_dir("/proc")?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|pid: &i32| {
                std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == inode)
            })
            .collect();
        if pids.is_empty() {
            return Ok(());
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("processes in network namespace {ns} survive SIGKILL")
}

fn build_id(text: &str) -> String {
    format!("{:08x}", super::build::fnv1a(text.as_bytes()) as u32)
}

/// `deploy/forwarder.yaml` as a user of this cluster would apply it: the
/// API server's address (how the agent reaches it without the Service it
/// provides itself) filled in; nothing else changed.
fn forwarder_manifest() -> anyhow::Result<String> {
    let path = crate::setup::workspace_root().join("deploy/forwarder.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let mut filled = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            let key = line.trim_start().split(':').next().unwrap_or("");
            let value = match key {
                "KUBERNETES_SERVICE_HOST" => APISERVER.to_string(),
                "KUBERNETES_SERVICE_PORT" => APISERVER_PORT.to_string(),
                _ => return line.to_owned(),
            };
            filled += 1;
            format!("  {key}: \"{value}\"")
        })
        .collect();
    if filled != 2 {
        bail!("{}: no KUBERNETES_SERVICE_HOST/PORT in its ConfigMap to fill in", path.display());
    }
    Ok(lines.join("\n"))
}

/// The release's CoreDNS add-on manifest, filled in as the cluster's
/// set-up scripts do, without the upstream resolver (nothing outside the
/// cluster is reachable).
fn coredns_manifest() -> anyhow::Result<String> {
    let module = std::process::Command::new("go")
        .current_dir(forwarder_tests::k8s::go_module_dir())
        .args(["list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"])
        .env("GOTOOLCHAIN", "local")
        .output()?;
    let dir = PathBuf::from(String::from_utf8_lossy(&module.stdout).trim());
    let path = dir.join("cluster/addons/dns/coredns/coredns.yaml.base");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let mut out = Vec::new();
    let mut skipping = false;
    for line in text.lines() {
        if line.trim_start().starts_with("forward . ") {
            skipping = true;
        }
        if !skipping {
            out.push(
                line.replace("__DNS__DOMAIN__", "cluster.local")
                    .replace("__DNS__SERVER__", &CLUSTER_DNS.to_string())
                    .replace("__DNS__MEMORY__LIMIT__", "170Mi"),
            );
        }
        if skipping && line.trim() == "}" {
            skipping = false;
        }
    }
    if out.iter().any(|l| l.contains("__DNS__")) {
        bail!("{}: a placeholder left unfilled", path.display());
    }
    Ok(out.join("\n"))
}
