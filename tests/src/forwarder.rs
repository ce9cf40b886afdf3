//! The `forwarder` binary running in a node namespace, stopped on drop.
use std::{
    ffi::{OsStr, OsString},
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};

use crate::netns::NetNs;

/// `$FORWARDER_BIN`, or the debug build in the workspace target directory.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FORWARDER_BIN") {
        return path.into();
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/forwarder");
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo xtask test does) or set FORWARDER_BIN",
        path.display()
    );
    path
}

/// Where the tests' forwarders pin their state: a bpffs mounted (once) in
/// the host's mount namespace, which the private ones `ip netns exec`
/// makes inherit, so pins outlive each agent as they would on a node.
fn bpffs_root(node: &NetNs) -> PathBuf {
    let mount = Path::new("/run/forwarder-tests/bpffs");
    mount_bpffs_once(mount);
    mount.join(&node.name)
}

/// A fresh directory on the tests' bpffs, for pins a test makes itself.
pub fn bpffs_dir(name: &str) -> PathBuf {
    let mount = Path::new("/run/forwarder-tests/bpffs");
    mount_bpffs_once(mount);
    let dir = mount.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bpffs directory");
    dir
}

/// Mounts a bpffs at `dir` unless one is there; once per test process, so
/// parallel tests never stack two mounts.
fn mount_bpffs_once(dir: &Path) {
    static MOUNTED: std::sync::Once = std::sync::Once::new();
    MOUNTED.call_once(|| mount_bpffs(dir));
}

fn mount_bpffs(dir: &Path) {
    std::fs::create_dir_all(dir).expect("bpffs mount point");
    let on_bpffs = nix::sys::statfs::statfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
    if !on_bpffs {
        let _ = nix::mount::mount(
            Some("bpf"),
            dir,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
}

/// Another build of the agent, to upgrade to: `$FORWARDER_OTHER_BIN`, or
/// the workspace's release build (`cargo xtask test` builds it).
pub fn other_build() -> PathBuf {
    let path = std::env::var_os("FORWARDER_OTHER_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/forwarder"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: cargo build --release -p forwarder-user (cargo xtask test does)",
        path.display()
    );
    path
}

pub struct Forwarder {
    child: Option<Child>,
    /// The build this agent runs.
    binary: PathBuf,
    pub log: PathBuf,
    node_ns: String,
    node_name: String,
    /// The `--bpffs-root` of this node's agent; `None` for the default,
    /// which the agent mounts in its own mount namespace.
    pub bpffs_root: Option<PathBuf>,
    args: Vec<OsString>,
}

impl Forwarder {
    /// Starts `forwarder run` in `node` and waits until /healthz says the
    /// first sync is applied.
    pub fn start(node: &NetNs, manifests: &Path, node_name: &str, iface: &str) -> Self {
        Self::start_with(node, &["--manifests".as_ref(), manifests.as_os_str()], node_name, iface)
    }

    /// As `start`, watching the API server of `kubeconfig`.
    pub fn start_cluster(node: &NetNs, kubeconfig: &Path, node_name: &str, iface: &str) -> Self {
        Self::start_with(node, &["--kubeconfig".as_ref(), kubeconfig.as_os_str()], node_name, iface)
    }

    /// As `start_cluster`, with more flags.
    pub fn start_cluster_with(
        node: &NetNs,
        kubeconfig: &Path,
        node_name: &str,
        iface: &str,
        extra: &[&str],
    ) -> Self {
        let mut source: Vec<&OsStr> = vec!["--kubeconfig".as_ref(), kubeconfig.as_os_str()];
        source.extend(extra.iter().map(OsStr::new));
        Self::start_with(node, &source, node_name, iface)
    }

    /// Exactly as the README tells a user: `forwarder run --manifests DIR
    /// --node-name N --iface IF` under `ip netns exec`, every other flag at
    /// its default (no bpffs prepared, healthz on 0.0.0.0:10256).
    pub fn start_as_readme(node: &NetNs, manifests: &Path, node_name: &str, iface: &str) -> Self {
        let mut args: Vec<OsString> = vec!["run".into(), "--manifests".into(), manifests.into()];
        for arg in ["--node-name", node_name, "--iface", iface] {
            args.push(arg.into());
        }
        Self::spawn_healthy(node, node_name, None, args)
    }

    fn start_with(node: &NetNs, source: &[&OsStr], node_name: &str, iface: &str) -> Self {
        let bpffs_root = bpffs_root(node);
        let mut args: Vec<OsString> = vec!["run".into()];
        args.extend(source.iter().map(|a| a.to_os_string()));
        for arg in ["--node-name", node_name, "--iface", iface] {
            args.push(arg.into());
        }
        args.extend(["--healthz-bind-address".into(), "127.0.0.1:10256".into()]);
        args.extend(["--bpffs-root".into(), bpffs_root.clone().into_os_string()]);
        Self::spawn_healthy(node, node_name, Some(bpffs_root), args)
    }

    fn spawn_healthy(
        node: &NetNs,
        node_name: &str,
        bpffs_root: Option<PathBuf>,
        args: Vec<OsString>,
    ) -> Self {
        let log = std::env::temp_dir().join(format!("{}-forwarder.log", node.name));
        let _ = std::fs::remove_file(&log);
        let mut forwarder = Self {
            child: None,
            binary: binary(),
            log,
            node_ns: node.name.clone(),
            node_name: node_name.to_owned(),
            bpffs_root,
            args,
        };
        forwarder.spawn();
        forwarder.wait_healthy(node);
        forwarder
    }

    /// Starts the agent (again), appending to its log.
    fn spawn(&mut self) {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.node_ns])
            .arg(&self.binary)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn forwarder");
        self.child = Some(child);
    }

    /// Starts a new agent on the state the previous one left, and waits
    /// until it is healthy.
    pub fn restart(&mut self, node: &NetNs) {
        assert!(self.child.is_none(), "the previous agent is still running");
        self.spawn();
        self.wait_healthy(node);
    }

    /// As `restart`, with another build (an upgrade).
    pub fn upgrade(&mut self, node: &NetNs, build: PathBuf) {
        self.binary = build;
        self.restart(node);
    }

    /// SIGKILL: the agent gets no chance to tidy up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_healthy(&mut self, node: &NetNs) {
        // Generous: a large cluster's first lists take a while to arrive.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if healthz(node) == Some(200) {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("forwarder exited ({status}) before it was healthy:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "forwarder never became healthy:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    /// The programs and maps stay.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.terminate().expect("forwarder was running")
    }

    /// `forwarder cleanup` for this node; panics with its output on failure.
    pub fn cleanup(&self) {
        let out = self.cleanup_command().output().expect("run forwarder cleanup");
        assert!(
            out.status.success(),
            "forwarder cleanup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn cleanup_command(&self) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node_ns]).arg(binary()).args([
            "cleanup",
            "--node-name",
            &self.node_name,
        ]);
        if let Some(root) = &self.bpffs_root {
            cmd.arg("--bpffs-root").arg(root);
        }
        cmd
    }

    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // `ip netns exec` execs the binary, so the pid is forwarder's.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let status = child.wait().ok();
        panic!("forwarder in {} ignored SIGTERM ({status:?}):\n{}", self.node_ns, self.log_text());
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        // Keep the log of a failed test for reading; drop it otherwise.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Leave nothing behind: pins would keep links and maps alive.
        let _ = self.cleanup_command().output();
        if let Some(root) = &self.bpffs_root {
            let _ = std::fs::remove_dir(root);
        }
    }
}

/// Status code of GET /healthz on 127.0.0.1:10256 inside `node`.
pub fn healthz(node: &NetNs) -> Option<u16> {
    http_get(node, "127.0.0.1:10256", "/healthz").map(|(status, _)| status)
}

/// Status code and body of `GET path` on `addr`, from inside `ns`.
pub fn http_get(ns: &NetNs, addr: &str, path: &str) -> Option<(u16, String)> {
    let addr: std::net::SocketAddr = addr.parse().expect("socket address");
    ns.run(|| {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        stream
            // Servers that keep connections alive (kube-proxy's) close this one.
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: forwarder\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Some((status, body))
    })
}

/// Programs attached in `node`, one `"<hook> <iface> <program>"` per
/// attachment, hook being `xdp`, `ingress` or `egress`: XDP from iproute2,
/// TC from both TCX (kernel >= 6.6, BPF_PROG_QUERY) and netlink filters
/// (older kernels, `tc filter show`).
pub fn attachments(node: &NetNs) -> Vec<String> {
    let links = node.ip(&["-o", "-d", "link", "show"]);
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&links.stdout).lines() {
        let Some(iface) =
            line.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n).to_owned())
        else {
            continue;
        };
        if let Some(rest) = line.split("prog/xdp ").nth(1) {
            found.push(format!("xdp {iface} {}", word_after(rest, "name").unwrap_or("?")));
        }
        for (hook, attach_type) in
            [("ingress", TcAttachType::Ingress), ("egress", TcAttachType::Egress)]
        {
            let programs = node.run(|| SchedClassifier::query_tcx(&iface, attach_type));
            for program in programs.map(|(_, p)| p).unwrap_or_default() {
                found.push(format!("{hook} {iface} {}", program.name_as_str().unwrap_or("?")));
            }
            let filters = node.exec(&["tc", "filter", "show", "dev", &iface, hook]);
            for filter in
                String::from_utf8_lossy(&filters.stdout).lines().filter(|l| l.contains(" bpf "))
            {
                if let Some(name) =
                    filter.split(" id ").nth(1).and_then(|rest| word_after(rest, "name"))
                {
                    found.push(format!("{hook} {iface} {name}"));
                }
            }
        }
    }
    found
}

fn word_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_whitespace().skip_while(|w| *w != key).nth(1)
}

/// The agent's packet counters by reason, from its `/metrics` in `node`
/// (empty when it does not answer).
pub fn packet_counters(node: &NetNs) -> serde_json::Map<String, serde_json::Value> {
    let mut counters = serde_json::Map::new();
    let metrics = http_get(node, "127.0.0.1:10249", "/metrics");
    for line in metrics.map(|(_, body)| body).unwrap_or_default().lines() {
        let sample = line.strip_prefix("forwarder_packets_total{reason=\"");
        if let Some((reason, value)) = sample.and_then(|s| s.split_once("\"} ")) {
            counters.insert(reason.into(), serde_json::json!(value.trim().parse::<f64>().ok()));
        }
    }
    counters
}
