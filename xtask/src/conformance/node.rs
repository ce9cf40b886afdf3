//! A node: containerd, runc, the CNI plugins and kubelet in the node's own
//! network namespace, and in mount and UTS namespaces of its own. The
//! mount namespace keeps what they write to fixed paths (`/run/containerd`,
//! `/var/lib/kubelet`, `/var/lib/cni`, `/var/log/pods`, pod volumes, the
//! pins in the node's bpffs) off the host and apart from the other nodes,
//! and gives kubelet the shared mount propagation a real node has (the
//! host's `/` is private here). The UTS namespace gives the node its own
//! hostname, which hostNetwork pods report, as on a real node.
use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::{
    build::Binaries,
    control_plane::{self, CLUSTER_DNS},
    images,
    pki::{self, Identity, Pki},
    process::{Daemon, Place, output, wait_for},
};

/// Where every node's cgroups live, in every hierarchy: kubelet's
/// `cgroupRoot` is `<CGROUP_PARENT>/<node>`.
pub const CGROUP_PARENT: &str = "forwarder-conformance";

/// Host directories each node gets a fresh tmpfs over, in its mount
/// namespace only.
const PRIVATE_DIRS: [&str; 4] = ["/run", "/var/lib", "/var/log", "/opt"];

pub struct NodeSpec {
    pub name: String,
    pub netns: String,
    pub address: Ipv4Addr,
    /// This node's pod addresses (host-local IPAM hands them out).
    pub pod_cidr: String,
    pub zone: String,
}

pub struct Node {
    /// containerd, kubelet, and last the process holding the mount namespace.
    pub daemons: Vec<Daemon>,
}

impl Node {
    /// Starts the node's runtime and kubelet, imports `archives`, and waits
    /// until containerd answers (not for the Node to be Ready).
    pub fn start(
        spec: NodeSpec,
        dir: &Path,
        binaries: &Binaries,
        pki: &Pki,
        identity: &Identity,
        archives: &[PathBuf],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("logs"))?;
        let logs = dir.join("logs");
        let cgroups = create_cgroups(&spec.name)?;
        let mut holder = Place { cgroups, ..Place::default() }
            .command("unshare")
            .args(["--mount", "--uts", "--propagation", "private", "--", "sh", "-ec"])
            .arg(format!(
                "for d in {}; do mount -t tmpfs -o mode=0755 forwarder-node \"$d\"; done
                 mount -t bpf bpf /sys/fs/bpf
                 mount --make-rshared /
                 hostname {}
                 echo ready
                 exec sleep infinity",
                PRIVATE_DIRS.join(" "),
                spec.name,
            ))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("unshare --mount --uts")?;
        let stdout = holder.stdout.take().expect("piped");
        let holder = Daemon::adopt("node-namespaces", &logs, holder);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("the node's namespaces were not set up (said {line:?})");
        }
        let place = Place {
            netns: Some(spec.netns.clone()),
            node_of: Some(holder.pid()),
            cgroups: holder_cgroups(&spec.name),
        };
        let containerd_socket = dir.join("containerd.sock");
        let config = dir.join("containerd.toml");
        std::fs::write(&config, containerd_config(dir, &binaries.runtime, &containerd_socket))?;
        write_cni_config(&dir.join("cni"), &spec.pod_cidr)?;
        let mut containerd = Daemon::spawn(
            "containerd",
            &logs,
            place
                .command(binaries.runtime.join("containerd"))
                .arg(format!("--config={}", config.display()))
                // The shim is found on PATH.
                .env("PATH", path_with(&binaries.runtime)),
        )?;
        let ctr = |args: &[&str]| {
            output(
                Command::new(binaries.runtime.join("ctr"))
                    .arg(format!("--address={}", containerd_socket.display()))
                    .args(["--namespace=k8s.io"])
                    .args(args),
            )
        };
        wait_for("containerd", Duration::from_secs(60), &mut [&mut containerd], || {
            Ok(ctr(&["version"]).is_ok())
        })?;
        for archive in archives {
            let path = archive.display().to_string();
            ctr(&["images", "import", &path])
                .with_context(|| format!("importing {path} on {}", spec.name))?;
        }
        let kubeconfig = dir.join("kubelet.kubeconfig");
        pki::kubeconfig(pki, &control_plane::server(), identity, &kubeconfig)?;
        let kubelet_config = dir.join("kubelet.yaml");
        std::fs::write(&kubelet_config, kubelet_config_text(&spec, dir, &containerd_socket))?;
        let kubelet = Daemon::spawn(
            "kubelet",
            &logs,
            place
                .command(binaries.kubernetes.join("kubelet"))
                .arg(format!("--config={}", kubelet_config.display()))
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg(format!("--hostname-override={}", spec.name))
                .arg(format!("--node-ip={}", spec.address))
                // Zones for the topology (trafficDistribution) specs.
                .arg(format!("--node-labels=topology.kubernetes.io/zone={}", spec.zone))
                .arg("--v=1")
                .env("PATH", path_with(&binaries.runtime)),
        )?;
        Ok(Self { daemons: vec![kubelet, containerd, holder] })
    }
}

/// `<hierarchy>/forwarder-conformance/<node>` in every cgroup hierarchy
/// (kubelet checks its cgroupRoot exists in each), with the node's own
/// processes in `<node>/runtime` of the unified one (where every process
/// has a cgroup, whichever controllers it has): teardown finds them all
/// there, the containers (which runc puts under `<node>/kubepods`) too.
fn create_cgroups(node: &str) -> anyhow::Result<Vec<PathBuf>> {
    for hierarchy in hierarchies() {
        for dir in [hierarchy.join(CGROUP_PARENT), hierarchy.join(CGROUP_PARENT).join(node)] {
            if !dir.exists() {
                std::fs::create_dir(&dir).with_context(|| format!("{}", dir.display()))?;
                // A v1 cpuset starts empty, and a task cannot join it so.
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    let parent = dir.parent().expect("nested").join(file);
                    if let Ok(value) = std::fs::read_to_string(&parent) {
                        std::fs::write(dir.join(file), value.trim())?;
                    }
                }
            }
        }
    }
    let runtime = unified().join(CGROUP_PARENT).join(node).join("runtime");
    std::fs::create_dir_all(&runtime)?;
    Ok(holder_cgroups(node))
}

fn holder_cgroups(node: &str) -> Vec<PathBuf> {
    vec![unified().join(CGROUP_PARENT).join(node).join("runtime/cgroup.procs")]
}

/// The cgroup2 hierarchy (`/sys/fs/cgroup/unified` on this machine's
/// hybrid layout, `/sys/fs/cgroup` on a pure cgroup2 host).
fn unified() -> PathBuf {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains(" - cgroup2 "))
        .and_then(|l| l.split(' ').nth(4))
        .map_or_else(|| PathBuf::from("/sys/fs/cgroup/unified"), PathBuf::from)
}

/// Every mounted cgroup hierarchy (v1 controllers and the unified one).
pub fn hierarchies() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" - cgroup ") || l.contains(" - cgroup2 "))
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .collect()
}

/// Every node's cgroups, including those of a node that failed to start
/// or of an earlier run: see `remove_cgroups`.
pub fn remove_all_cgroups() -> anyhow::Result<()> {
    let nodes: std::collections::BTreeSet<String> = hierarchies()
        .iter()
        .flat_map(|h| subdirs(&h.join(CGROUP_PARENT)))
        .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
        .collect();
    nodes.iter().try_for_each(|node| remove_cgroups(node))
}

/// Kills every process in the node's cgroups (the runtime, kubelet, shims,
/// containers) until none is left, then removes the cgroups.
pub fn remove_cgroups(node: &str) -> anyhow::Result<()> {
    let root = unified().join(CGROUP_PARENT).join(node);
    for _ in 0..100 {
        let pids = procs_below(&root);
        if pids.is_empty() {
            break;
        }
        // The whole subtree at once, no pid read then reused (kernel 5.14+);
        // one by one where there is no cgroup.kill.
        if std::fs::write(root.join("cgroup.kill"), "1").is_ok() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for hierarchy in hierarchies() {
        let parent = hierarchy.join(CGROUP_PARENT);
        remove_tree(&parent.join(node))?;
        // The last node out removes the parent.
        if parent.exists() && subdirs(&parent).is_empty() {
            std::fs::remove_dir(&parent).with_context(|| format!("{}", parent.display()))?;
        }
    }
    Ok(())
}

fn procs_below(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for sub in subdirs(dir) {
        pids.extend(procs_below(&sub));
    }
    pids
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|e| e.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default()
}

/// Removes a cgroup and its children (rmdir, deepest first; a cgroup with
/// a process in it cannot go, and says so).
fn remove_tree(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for sub in subdirs(dir) {
        remove_tree(&sub)?;
    }
    let mut last = None;
    // An exiting task can hold a cgroup for a moment.
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last.expect("tried")).with_context(|| format!("removing cgroup {}", dir.display()))
}

fn path_with(dir: &Path) -> String {
    format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default())
}

/// containerd's configuration (v3): state under the node's directory,
/// kubelet's cgroupfs driver, the locally imported pause image, and
/// `restrict_oom_score_adj`: root here lacks CAP_SYS_RESOURCE, so runc
/// could not set the negative scores kubelet asks for, and every sandbox
/// would fail to start.
fn containerd_config(dir: &Path, runtime: &Path, socket: &Path) -> String {
    format!(
        r#"version = 3
root = "{root}"
state = "/run/containerd"

[grpc]
  address = "{socket}"

[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.internal.v1.opt"]
  path = "/opt/containerd"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause}"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{runc}"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{runtime}"]
    conf_dir = "{cni}"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
"#,
        root = dir.join("containerd").display(),
        socket = socket.display(),
        pause = images::pause(),
        runc = runtime.join("runc").display(),
        runtime = runtime.display(),
        cni = dir.join("cni").display(),
    )
}

/// The pod network: a bridge with this node's pod range (hairpin on, so a
/// pod reaches itself through a Service), the default route through it,
/// no masquerade (forwarder masquerades where Kubernetes says so), and
/// portmap for hostPorts.
fn write_cni_config(dir: &Path, pod_cidr: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let config = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "pods",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": pod_cidr }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                },
            },
            { "type": "portmap", "capabilities": { "portMappings": true } },
        ],
    });
    std::fs::write(dir.join("10-pods.conflist"), serde_json::to_string_pretty(&config)?)?;
    Ok(())
}

/// kubelet on this host: cgroup v1 (allowed again by `failCgroupV1`), the
/// cgroupfs driver (no systemd), images never collected (none can be
/// pulled again), the cluster's DNS, and anonymous AlwaysAllow on its own
/// API (the apiserver's exec and logs reach it without a client cert).
fn kubelet_config_text(spec: &NodeSpec, dir: &Path, socket: &Path) -> String {
    format!(
        "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
cgroupRoot: /{CGROUP_PARENT}/{name}
containerRuntimeEndpoint: unix://{socket}
address: {address}
readOnlyPort: 0
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
clusterDNS: [{CLUSTER_DNS}]
clusterDomain: cluster.local
resolvConf: \"\"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
serializeImagePulls: false
# Off its host default, /usr/libexec/kubernetes, which it would create.
volumePluginDir: {plugins}
",
        plugins = dir.join("volume-plugins").display(),
        name = spec.name,
        address = spec.address,
        socket = socket.display(),
    )
}
