//! Idempotent set-up of everything the build and the tests need. Each step
//! checks first and does nothing when its result is already in place.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// bpf-linker, built against the eBPF nightly's own LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_FEATURE: &str = "llvm-22";
const LIBLLVM: &str = "libLLVM.so.22.1-rust-1.97.0-nightly";
/// Debian packages the build and the tests need (the distribution's release
/// pins their versions): a C compiler for bpf-linker's build, `ip`, `sysctl`
/// and `ethtool` for the test topology, and for the VM tests qemu, `strip`,
/// `dpkg-deb`, `depmod`, the archive keyring and module decompressors; for
/// the test control plane `openssl` (its service-account key) and `curl`
/// (its readiness probe and API calls); what kube-proxy runs: `iptables`,
/// `nft`, `conntrack`; the benchmark plots' font; for the conformance
/// cluster, runc's seccomp build, a static pause and the images' Debian
/// base.
const APT_PACKAGES: &[&str] = &[
    "gcc",
    "iproute2",
    "procps",
    "ethtool",
    "qemu-system-x86",
    "binutils",
    "dpkg",
    "kmod",
    "debian-archive-keyring",
    "xz-utils",
    "zstd",
    "openssl",
    "curl",
    "iptables",
    "nftables",
    "conntrack",
    "fonts-dejavu-core",
    "libseccomp-dev",
    "pkg-config",
    "libc6-dev",
    "mmdebstrap",
];

pub fn run() -> anyhow::Result<()> {
    apt_packages()?;
    let toolchain = ebpf_toolchain()?;
    nightly(&toolchain)?;
    bpf_linker(&toolchain)?;
    println!("setup: done");
    Ok(())
}

/// The channel pinned in `forwarder-ebpf/rust-toolchain.toml`.
fn ebpf_toolchain() -> anyhow::Result<String> {
    let path = workspace_root().join("forwarder-ebpf/rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("channel"))
        .and_then(|rest| rest.split('"').nth(1))
        .map(str::to_owned)
        .with_context(|| format!("no channel in {}", path.display()))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace").to_owned()
}

/// Builds the agent (`target/debug/forwarder`, or the release one).
pub fn build_agent(release: bool) -> anyhow::Result<()> {
    let mut cargo = Command::new("cargo");
    cargo.current_dir(workspace_root()).args(["build", "--package", "forwarder-user"]);
    if release {
        cargo.arg("--release");
    }
    check(&mut cargo)
}

/// Runs a command, failing with its name when it does not succeed.
pub fn check(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Debian packages {missing:?}");
    let install = |missing: &[&str]| {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install(&missing) {
        check(Command::new("apt-get").arg("update"))?;
        if !install(&missing) {
            bail!("apt-get install {missing:?} failed");
        }
    }
    Ok(())
}

fn nightly(toolchain: &str) -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]));
    if installed.is_some_and(|c| c.lines().any(|l| l.starts_with("rust-src"))) {
        return Ok(());
    }
    println!("setup: installing {toolchain} with rust-src");
    check(Command::new("rustup").args([
        "toolchain",
        "install",
        toolchain,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

/// bpf-linker links against the nightly's own libLLVM through a small
/// prefix of symlinks, so no LLVM has to be downloaded or built.
fn bpf_linker(toolchain: &str) -> anyhow::Result<()> {
    let version = output(Command::new("bpf-linker").arg("--version"));
    if version.is_some_and(|v| v.trim() == format!("bpf-linker {BPF_LINKER_VERSION}")) {
        return Ok(());
    }
    let sysroot =
        output(Command::new("rustc").arg(format!("+{toolchain}")).args(["--print", "sysroot"]))
            .context("the nightly's sysroot")?;
    let libllvm = Path::new(sysroot.trim()).join("lib").join(LIBLLVM);
    if !libllvm.exists() {
        bail!("{} is missing: the pinned nightly changed its LLVM", libllvm.display());
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let prefix = home.join("forwarder-llvm").join(toolchain);
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    for name in ["libLLVM.so", LIBLLVM] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("symlink {}", link.display()))?;
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against {}", libllvm.display());
    check(
        Command::new("cargo")
            .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked"])
            .args(["--no-default-features", "--features", LLVM_FEATURE])
            .env("LLVM_PREFIX", &prefix),
    )
}
