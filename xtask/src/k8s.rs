//! `cargo xtask k8s build|up|down|env`: the test control plane (etcd,
//! kube-apiserver) and kube-proxy, built from the release pinned in
//! `tests/k8s/go.mod`, and a control plane on loopback to point clients at.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use forwarder_tests::k8s::{self, ControlPlane};
use nix::{sys::signal, unistd::Pid};

use crate::setup::{check, workspace_root};

/// The oldest Go the pinned k8s.io/kubernetes release builds with.
const GO_MINOR_MIN: u32 = 25;

#[derive(clap::Subcommand)]
pub enum Action {
    /// Build the binaries (cached: a no-op while go.mod and go.sum are unchanged).
    Build,
    /// Start etcd and kube-apiserver on loopback, in the background.
    Up,
    /// Stop them and remove their state.
    Down,
    /// Print `export KUBECONFIG=...` for the running control plane.
    Env,
}

pub fn run(action: Action) -> anyhow::Result<()> {
    match action {
        Action::Build => build().map(|dir| println!("k8s: binaries in {}", dir.display())),
        Action::Up => up(),
        Action::Down => down(),
        Action::Env => {
            let kubeconfig = state_dir().join("kubeconfig");
            if !kubeconfig.exists() {
                bail!("no control plane is up: run `cargo xtask k8s up`");
            }
            println!("export KUBECONFIG={}", kubeconfig.display());
            Ok(())
        }
    }
}

/// Builds the binaries into their cache directory unless all are there.
pub fn build() -> anyhow::Result<PathBuf> {
    let dir = k8s::bin_dir();
    if k8s::BINARIES.iter().all(|name| dir.join(name).exists()) {
        return Ok(dir);
    }
    check_go()?;
    let module = k8s::go_module_dir();
    let staging = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("{}", staging.display()))?;
    let packages = [
        ("etcd", "./etcd"),
        ("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
        ("kube-proxy", "k8s.io/kubernetes/cmd/kube-proxy"),
    ];
    for (name, package) in packages {
        println!("k8s: building {name} (minutes the first time; cached after)");
        check(
            Command::new("go")
                .current_dir(&module)
                .args(["build", "-trimpath", "-ldflags", &version_ldflags(), "-o"])
                .arg(staging.join(name))
                .arg(package)
                // The pinned go.mod decides; never fetch another toolchain.
                .env("GOTOOLCHAIN", "local")
                .env("CGO_ENABLED", "0"),
        )?;
    }
    // Complete or absent: a build cut short never looks finished.
    std::fs::rename(&staging, &dir).with_context(|| format!("{}", dir.display()))?;
    Ok(dir)
}

/// The version the Kubernetes components report (`kubectl version`,
/// `/version`): the pinned release, where a build outside its git tree
/// says v0.0.0 (and e2e would skip tests by it).
pub fn version_ldflags() -> String {
    let version = forwarder_tests::kube_proxy::pinned_release();
    let mut parts = version.trim_start_matches('v').split('.');
    let (major, minor) = (parts.next().unwrap_or("0"), parts.next().unwrap_or("0"));
    ["gitVersion", "gitMajor", "gitMinor", "gitTreeState"]
        .iter()
        .zip([version.as_str(), major, minor, "clean"])
        .map(|(var, value)| format!("-X k8s.io/component-base/version.{var}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn check_go() -> anyhow::Result<()> {
    let out = Command::new("go").arg("version").output().context(
        "Go is needed to build the test control plane (kube-apiserver, etcd, kube-proxy)",
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let minor = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("go1."))
        .and_then(|v| v.split('.').next()?.parse::<u32>().ok());
    match minor {
        Some(minor) if minor >= GO_MINOR_MIN => Ok(()),
        _ => bail!(
            "`go version` says {text:?}; building k8s.io/kubernetes needs go1.{GO_MINOR_MIN} or newer"
        ),
    }
}

fn state_dir() -> PathBuf {
    workspace_root().join("target/k8s")
}

fn up() -> anyhow::Result<()> {
    build()?;
    if state_dir().join("pids").exists() {
        bail!("a control plane is already up (cargo xtask k8s down first)");
    }
    let plane = ControlPlane::start(&state_dir(), None).map_err(anyhow::Error::msg)?;
    let (kubeconfig, server) = (plane.kubeconfig.clone(), plane.server.clone());
    let pids = plane.detach();
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    std::fs::write(state_dir().join("pids"), list.join("\n"))?;
    println!("k8s: kube-apiserver ready at {server}");
    println!("export KUBECONFIG={}", kubeconfig.display());
    Ok(())
}

fn down() -> anyhow::Result<()> {
    let dir = state_dir();
    let pids: Vec<Pid> = std::fs::read_to_string(dir.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok().map(Pid::from_raw))
        .collect();
    // Already gone is fine: down must work after a crash too.
    for pid in &pids {
        let _ = signal::kill(*pid, signal::Signal::SIGTERM);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pids.iter().any(|pid| signal::kill(*pid, None).is_ok()) {
        if std::time::Instant::now() > deadline {
            for pid in &pids {
                let _ = signal::kill(*pid, signal::Signal::SIGKILL);
            }
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
    }
    println!("k8s: down");
    Ok(())
}
