//! The binaries of a real cluster, from pinned sources, each set cached in
//! a directory named after what pins it (a new pin is a new build, an
//! unchanged one is never rebuilt):
//! - the Kubernetes node and control-plane components, kubectl, agnhost and
//!   the e2e test binary, from the module in `tests/k8s` (its go.mod and
//!   go.sum pin the release, as for the test control plane);
//! - containerd, runc, CoreDNS and the CNI plugins from their own modules at
//!   the versions below, and pause from the Kubernetes release's source.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use forwarder_tests::{k8s, kube_proxy::pinned_release};

use crate::setup::check;

/// Built from the `tests/k8s` module: the node and control-plane
/// components, the e2e binary and the test images' programs (agnhost, and
/// the server of the conntrack-invalid spec).
pub const KUBERNETES: [&str; 7] = [
    "kubelet",
    "kubectl",
    "kube-controller-manager",
    "kube-scheduler",
    "agnhost",
    "regression-issue-74839",
    "e2e.test",
];

/// The agnhost version the pinned e2e framework asks for (its image tag,
/// `test/utils/image/manifest.go`).
pub const AGNHOST_VERSION: &str = "2.59";
/// The pause version kubelet and containerd of these releases ask for.
pub const PAUSE_VERSION: &str = "3.10.1";

pub const COREDNS: &str = "github.com/coredns/coredns@v1.13.1";

/// The other Go programs: module@version and the packages built from it,
/// with the cgo setting and build tags each needs. containerd 2.x: Debian
/// 12's 1.6 is too old for kubelet 1.35; runc at the version containerd
/// 2.2.9 pins (cgo, for seccomp); CoreDNS at the version the release's
/// addon manifest names.
const GO_PROGRAMS: [GoProgram; 4] = [
    GoProgram {
        module: "github.com/containerd/containerd/v2@v2.2.9",
        packages: &["cmd/containerd", "cmd/containerd-shim-runc-v2", "cmd/ctr"],
        cgo: false,
        tags: "no_btrfs,urfave_cli_no_docs",
    },
    GoProgram {
        module: "github.com/opencontainers/runc@v1.3.6",
        packages: &[""],
        cgo: true,
        tags: "seccomp",
    },
    GoProgram { module: COREDNS, packages: &[""], cgo: false, tags: "" },
    GoProgram {
        module: "github.com/containernetworking/plugins@v1.9.1",
        packages: &[
            "plugins/main/bridge",
            "plugins/main/loopback",
            "plugins/ipam/host-local",
            "plugins/meta/portmap",
        ],
        cgo: false,
        tags: "",
    },
];

struct GoProgram {
    module: &'static str,
    /// Relative to the module root; "" is the root package.
    packages: &'static [&'static str],
    cgo: bool,
    tags: &'static str,
}

/// Every binary of the cluster: the Kubernetes set and the runtime set.
pub struct Binaries {
    pub kubernetes: PathBuf,
    pub runtime: PathBuf,
}

pub fn all() -> anyhow::Result<Binaries> {
    Ok(Binaries { kubernetes: kubernetes()?, runtime: runtime()? })
}

/// The Kubernetes binaries, built unless all are there.
pub fn kubernetes() -> anyhow::Result<PathBuf> {
    // Beside the test control plane's directory (which `k8s build` makes
    // whole, by a rename), under the same pins.
    let dir = k8s::bin_dir().with_extension("cluster");
    if KUBERNETES.iter().all(|name| dir.join(name).exists()) {
        return Ok(dir);
    }
    let module = k8s::go_module_dir();
    let component_version = crate::k8s::version_ldflags();
    let staging = staging(&dir)?;
    for name in KUBERNETES {
        println!("conformance: building {name} (minutes the first time; cached after)");
        let mut go = go(&module);
        match name {
            "e2e.test" => {
                go.args(["test", "-c", "-trimpath", "-ldflags", &component_version, "-o"])
                    .arg(staging.join(name))
                    .arg("k8s.io/kubernetes/test/e2e");
            }
            "agnhost" => {
                go.args(["build", "-trimpath", "-ldflags"])
                    .arg(format!("-X main.Version={AGNHOST_VERSION}"))
                    .arg("-o")
                    .arg(staging.join(name))
                    .arg("k8s.io/kubernetes/test/images/agnhost");
            }
            "regression-issue-74839" => {
                go.args(["build", "-trimpath", "-o"])
                    .arg(staging.join(name))
                    .arg(format!("k8s.io/kubernetes/test/images/{name}"));
            }
            _ => {
                go.args(["build", "-trimpath", "-ldflags", &component_version, "-o"])
                    .arg(staging.join(name))
                    .arg(format!("k8s.io/kubernetes/cmd/{name}"));
            }
        }
        check(go.env("CGO_ENABLED", "0"))?;
    }
    finish(&staging, &dir)?;
    Ok(dir)
}

/// containerd, runc, CoreDNS, the CNI plugins and pause, built unless
/// their directory (named after every pin) is there.
pub fn runtime() -> anyhow::Result<PathBuf> {
    // Everything that shapes a build: module, packages, cgo, tags.
    let pins: Vec<String> = GO_PROGRAMS
        .iter()
        .map(|p| format!("{}:{}:cgo={}:tags={}", p.module, p.packages.join(","), p.cgo, p.tags))
        .collect();
    let key = format!("{} pause-{PAUSE_VERSION} {}", pins.join(" "), pinned_release());
    let dir = cache_root().join("runtime").join(format!("{:016x}", fnv1a(key.as_bytes())));
    if dir.join("done").exists() {
        return Ok(dir);
    }
    let staging = staging(&dir)?;
    let scratch = staging.join("tmp");
    std::fs::create_dir_all(&scratch)?;
    for program in &GO_PROGRAMS {
        let (path, version) = program.module.split_once('@').expect("module@version");
        println!("conformance: building {} (minutes the first time; cached after)", program.module);
        // `go install module@version` builds with the module's own go.mod.
        let mut go = go(&scratch);
        go.args(["install", "-trimpath"]);
        if !program.tags.is_empty() {
            go.args(["-tags", program.tags]);
        }
        for package in program.packages {
            let package =
                if package.is_empty() { path.to_owned() } else { format!("{path}/{package}") };
            go.arg(format!("{package}@{version}"));
        }
        check(go.env("GOBIN", &staging).env("CGO_ENABLED", if program.cgo { "1" } else { "0" }))?;
    }
    pause(&staging)?;
    std::fs::remove_dir_all(&scratch)?;
    std::fs::write(staging.join("done"), key)?;
    finish(&staging, &dir)?;
    Ok(dir)
}

/// The pinned Kubernetes release's source tree (in Go's module cache).
pub fn kubernetes_source() -> anyhow::Result<PathBuf> {
    let listed = go(&k8s::go_module_dir())
        .args(["list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"])
        .output()
        .context("go list")?;
    if !listed.status.success() {
        bail!("go list -m k8s.io/kubernetes: {}", String::from_utf8_lossy(&listed.stderr));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&listed.stdout).trim()))
}

/// pause, from the Kubernetes release's own source, linked statically.
fn pause(out: &Path) -> anyhow::Result<()> {
    let source = kubernetes_source()?.join("build/pause/linux/pause.c");
    println!("conformance: building pause {PAUSE_VERSION}");
    check(
        Command::new("gcc")
            .args(["-Os", "-Wall", "-Werror", "-static"])
            .arg(format!("-DVERSION=v{PAUSE_VERSION}"))
            .arg("-o")
            .arg(out.join("pause"))
            .arg(&source),
    )
}

fn go(dir: &Path) -> Command {
    let mut go = Command::new("go");
    // The pins decide; never fetch another toolchain.
    go.current_dir(dir).env("GOTOOLCHAIN", "local");
    go
}

pub fn cache_root() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/forwarder")
}

fn staging(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut staging = dir.as_os_str().to_owned();
    staging.push(".partial");
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("{}", staging.display()))?;
    Ok(staging)
}

/// Complete or absent: a build cut short never looks finished.
fn finish(staging: &Path, dir: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(staging, dir).with_context(|| format!("{}", dir.display()))
}

/// FNV-1a: stable across Rust releases, unlike std's hasher.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
