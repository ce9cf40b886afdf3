//! A real Kubernetes control plane on loopback for the tests: etcd and
//! kube-apiserver, built from the release pinned in `tests/k8s/go.mod` (by
//! `cargo xtask k8s build`, cached per go.mod/go.sum content). No
//! controller-manager or kubelet: tests create Services (the apiserver
//! allocates ClusterIPs and NodePorts), EndpointSlices and Nodes themselves.
use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The admin's bearer token (group system:masters) in the token file.
pub const ADMIN_TOKEN: &str = "forwarder-test-admin";
/// The Service CIDR the apiserver allocates ClusterIPs from.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// What the tests and the benchmark build from `tests/k8s`.
pub const BINARIES: [&str; 3] = ["etcd", "kube-apiserver", "kube-proxy"];

/// kube-apiserver's own default `--service-node-port-range`.
pub const DEFAULT_NODE_PORTS: &str = "30000-32767";

const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// `tests/k8s` in this checkout: the Go module the binaries come from.
pub fn go_module_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s")
}

/// Where the binaries of the pinned release live: `$FORWARDER_K8S_BIN`, or
/// a cache directory named after the module's go.mod and go.sum, so a new
/// pin is a new build and an unchanged one is never rebuilt.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FORWARDER_K8S_BIN") {
        return dir.into();
    }
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for file in ["go.mod", "go.sum"] {
        let bytes = std::fs::read(go_module_dir().join(file)).unwrap_or_default();
        for byte in bytes {
            // FNV-1a: stable across Rust releases, unlike std's hasher.
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let cache = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    cache.join(".cache/forwarder/k8s").join(format!("{hash:016x}"))
}

/// A free TCP port on loopback (released again; good enough for tests).
fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("free port: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| format!("free port: {e}"))
}

/// etcd and kube-apiserver, stopped (and their state removed) on drop.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub server: String,
    /// The network namespace both run in (and are reached from), if not ours.
    netns: Option<String>,
    /// The apiserver's address; etcd listens on loopback.
    address: String,
    secure_port: u16,
    etcd_port: u16,
    /// `--service-node-port-range`.
    node_ports: String,
    etcd: Option<Child>,
    apiserver: Option<Child>,
}

/// `program`, run in network namespace `netns` when given.
fn command_in(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

impl ControlPlane {
    /// Starts both in `dir` (created, and removed on drop), listening on
    /// loopback of network namespace `netns` (ours when `None`: a node
    /// namespace's processes reach its own loopback only), and waits until
    /// the apiserver reports ready.
    pub fn start(dir: &Path, netns: Option<&str>) -> Result<Self, String> {
        Self::start_at(dir, netns, "127.0.0.1")
    }

    /// As `start`, the apiserver serving on `address` of `netns` (also in
    /// its certificate), for clients in other namespaces.
    pub fn start_at(dir: &Path, netns: Option<&str>, address: &str) -> Result<Self, String> {
        Self::start_with_node_ports(dir, netns, address, DEFAULT_NODE_PORTS)
    }

    /// As `start_at`, allocating NodePorts from `node_ports` (`first-last`):
    /// the default range holds 2,768, fewer than a large benchmark needs.
    pub fn start_with_node_ports(
        dir: &Path,
        netns: Option<&str>,
        address: &str,
        node_ports: &str,
    ) -> Result<Self, String> {
        let bin = bin_dir();
        for name in BINARIES {
            if !bin.join(name).exists() {
                return Err(format!(
                    "{} missing: run `cargo xtask k8s build` first",
                    bin.join(name).display()
                ));
            }
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("certs"))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text).map_err(|e| format!("{name}: {e}"))
        };
        write("tokens.csv", format!("{ADMIN_TOKEN},admin,admin,system:masters\n"))?;
        let key = dir.join("service-account.key");
        let status = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("openssl: {e}"))?;
        if !status.success() {
            return Err(format!("openssl genrsa failed: {status}"));
        }

        let (client, peer, secure) = (free_port()?, free_port()?, free_port()?);
        let log =
            |name: &str| std::fs::File::create(dir.join(name)).map_err(|e| format!("{name}: {e}"));
        let etcd = command_in(netns, &bin.join("etcd"))
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-cluster=test=http://127.0.0.1:{peer}"))
            // Test data: durability buys nothing and costs seconds.
            .arg("--unsafe-no-fsync")
            .stdout(Stdio::null())
            .stderr(log("etcd.log")?)
            .spawn()
            .map_err(|e| format!("etcd: {e}"))?;
        let mut plane = Self {
            dir: dir.to_owned(),
            kubeconfig: dir.join("kubeconfig"),
            server: format!("https://{address}:{secure}"),
            netns: netns.map(str::to_owned),
            address: address.to_owned(),
            secure_port: secure,
            etcd_port: client,
            node_ports: node_ports.to_owned(),
            etcd: Some(etcd),
            apiserver: None,
        };
        plane.spawn_apiserver()?;
        plane.wait_ready()?;
        plane.write_kubeconfig(&plane.kubeconfig, ADMIN_TOKEN)?;
        Ok(plane)
    }

    fn spawn_apiserver(&mut self) -> Result<(), String> {
        let dir = &self.dir;
        let key = dir.join("service-account.key");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("kube-apiserver.log"))
            .map_err(|e| format!("kube-apiserver.log: {e}"))?;
        let apiserver = command_in(self.netns.as_deref(), &bin_dir().join("kube-apiserver"))
            .arg(format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port))
            .arg(format!("--bind-address={}", self.address))
            .arg(format!("--advertise-address={}", self.address))
            .arg(format!("--secure-port={}", self.secure_port))
            .arg(format!("--cert-dir={}", dir.join("certs").display()))
            .arg(format!("--token-auth-file={}", dir.join("tokens.csv").display()))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", key.display()))
            .arg(format!("--service-account-signing-key-file={}", key.display()))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg(format!("--service-node-port-range={}", self.node_ports))
            // Nothing runs at the address for the `kubernetes` Service to point at.
            .arg("--endpoint-reconciler-type=none")
            // As kubeadm clusters do: node agents' init containers may be.
            .arg("--allow-privileged=true")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("kube-apiserver: {e}"))?;
        self.apiserver = Some(apiserver);
        Ok(())
    }

    /// Stops the apiserver (its clients' connections break).
    pub fn stop_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the apiserver again, on the same etcd and port; its watch
    /// cache starts at etcd's current revision.
    pub fn start_apiserver(&mut self) -> Result<(), String> {
        self.spawn_apiserver()?;
        self.wait_ready()
    }

    /// Runs `f` against another apiserver instance on the same etcd, as in
    /// an HA control plane, e.g. while this one is stopped.
    pub fn via_another_apiserver<T>(&mut self, f: impl FnOnce(&Self) -> T) -> Result<T, String> {
        let (port, server) = (self.secure_port, self.server.clone());
        let first = self.apiserver.take();
        self.secure_port = free_port()?;
        self.server = format!("https://{}:{}", self.address, self.secure_port);
        let result = self.spawn_apiserver().and_then(|()| self.wait_ready()).map(|()| f(self));
        self.stop_apiserver();
        (self.secure_port, self.server, self.apiserver) = (port, server, first);
        result
    }

    /// Compacts etcd's history up to now: watches resuming from an older
    /// resource version get `410 Gone`.
    pub fn compact_etcd(&self) -> Result<(), String> {
        let etcd = format!("http://127.0.0.1:{}", self.etcd_port);
        let post = |path: &str, body: &str| -> Result<String, String> {
            let out = command_in(self.netns.as_deref(), Path::new("curl"))
                .args(["-sSf", "--max-time", "10", "-X", "POST", "--data-binary", body])
                .arg(format!("{etcd}{path}"))
                .output()
                .map_err(|e| format!("curl: {e}"))?;
            match out.status.success() {
                true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
                false => Err(format!("{path}: {}", String::from_utf8_lossy(&out.stderr))),
            }
        };
        let status = post("/v3/maintenance/status", "{}")?;
        let revision = status
            .split("\"revision\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .ok_or_else(|| format!("no revision in {status}"))?;
        post("/v3/kv/compaction", &format!("{{\"revision\":\"{revision}\",\"physical\":true}}"))
            .map(drop)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.get("/readyz").is_ok_and(|body| body.trim() == "ok") {
                return Ok(());
            }
            for (name, child) in [("etcd", &mut self.etcd), ("kube-apiserver", &mut self.apiserver)]
            {
                if let Some(Ok(Some(status))) = child.as_mut().map(Child::try_wait) {
                    let log = log_tail(&self.dir, name);
                    return Err(format!("{name} exited ({status}):\n{log}"));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "kube-apiserver not ready after {READY_TIMEOUT:?}:\n{}",
                    self.log_tail("kube-apiserver")
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// GET `path` as the admin; the body on a 2xx answer.
    pub fn get(&self, path: &str) -> Result<String, String> {
        self.request("GET", path, None)
    }

    /// A request as the admin with an optional JSON body (`PATCH` sends a
    /// merge patch); the answer's body on 2xx, else the error and body.
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<String, String> {
        self.request_as(ADMIN_TOKEN, method, path, body)
    }

    /// As `request`, with another bearer token.
    pub fn request_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<String, String> {
        let content_type = match method {
            "PATCH" => "application/merge-patch+json",
            _ => "application/json",
        };
        let mut cmd = command_in(self.netns.as_deref(), Path::new("curl"));
        cmd.args(["-sSk", "--max-time", "10", "-w", "\n%{http_code}", "-X", method, "-H"])
            .arg(format!("Authorization: Bearer {token}"))
            .args(["-H", &format!("Content-Type: {content_type}")])
            .arg(format!("{}{path}", self.server));
        if let Some(body) = body {
            cmd.args(["--data-binary", body]);
        }
        let out = cmd.output().map_err(|e| format!("curl: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        match code.trim().parse::<u16>() {
            Ok(200..=299) => Ok(body.to_owned()),
            _ => Err(format!(
                "{method} {path}: HTTP {code} {body} {}",
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }

    /// A kubeconfig at `path` that authenticates with `token`. The
    /// apiserver's serving certificate is self-signed into `--cert-dir`;
    /// the kubeconfig trusts exactly that.
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> Result<(), String> {
        let ca = self.dir.join("certs/apiserver.crt");
        let text = kubeconfig_text(&self.server, &ca, token);
        std::fs::write(path, text).map_err(|e| format!("kubeconfig: {e}"))
    }

    /// The last lines of a component's log, for failure messages.
    pub fn log_tail(&self, name: &str) -> String {
        log_tail(&self.dir, name)
    }

    /// Leaves both processes running (for `cargo xtask k8s up`); returns
    /// their pids.
    pub fn detach(mut self) -> Vec<u32> {
        let children = [self.etcd.take(), self.apiserver.take()];
        let pids = children.iter().flatten().map(Child::id).collect();
        // Nothing to stop or remove on drop any more.
        self.dir = PathBuf::new();
        pids
    }
}

/// A kubeconfig for `server`, trusting the certificate authority file `ca`
/// and authenticating with bearer `token`.
pub fn kubeconfig_text(server: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: cluster
  cluster: {{server: \"{server}\", certificate-authority: \"{ca}\"}}
users:
- name: user
  user: {{token: \"{token}\"}}
contexts:
- name: cluster
  context: {{cluster: cluster, user: user}}
current-context: cluster
",
        ca = ca.display(),
    )
}

fn log_tail(dir: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for child in [self.apiserver.take(), self.etcd.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
