//! `cargo xtask vm`: the BPF program tests and focused end-to-end tests on
//! each kernel of the matrix under qemu, and on the host kernel as the
//! baseline; prints a pass/fail table per kernel.
mod cpio;
mod initramfs;
mod kernels;
mod qemu;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use self::{
    initramfs::{Payload, TestRun},
    qemu::{Accel, Boot, Outcome},
};
use crate::setup::{self, check, workspace_root};

/// A guest that has not reached init by then under TCG is broken; under
/// KVM this is also the probe that falls back to TCG (this machine's
/// /dev/kvm hangs with stock kernels).
const KVM_START_DEADLINE: Duration = Duration::from_secs(20);
const TCG_START_DEADLINE: Duration = Duration::from_secs(120);
const KERNEL_DEADLINE: Duration = Duration::from_secs(20 * 60);

/// The in-VM set: every BPF fixture, one NodePort and one ClusterIP
/// end-to-end test (each sends TCP and UDP), the rejects (XDP hands them to
/// TC through metadata, which each kernel's veth must carry), and the
/// detach-on-SIGTERM test, which matters most where TC filters are netlink
/// objects (kernel < 6.6).
fn test_runs(binaries: &[(String, PathBuf)]) -> anyhow::Result<Vec<TestRun>> {
    let find = |name: &str| {
        binaries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .with_context(|| format!("test binary {name} not built"))
    };
    Ok(vec![
        TestRun { name: "bpf_programs".into(), binary: find("bpf_programs")?, args: vec![] },
        TestRun {
            name: "e2e".into(),
            binary: find("e2e")?,
            args: [
                "nodeport_from_external_client_reaches_both_pods",
                "cluster_ip_from_a_pod_reaches_both_pods",
                "no_endpoints_and_unknown_ports_refuse_at_once",
                "sigterm_leaves_the_datapath_forwarding_and_cleanup_removes_it",
                "sctp_reaches_both_pods_through_nodeport_and_cluster_ip",
                "--exact",
            ]
            .map(str::to_owned)
            .to_vec(),
        },
        // Pinned links, and before TCX netlink filters replaced in place.
        TestRun {
            name: "restart".into(),
            binary: find("restart")?,
            // The API-server variant needs the control plane, not in the guests.
            args: [
                "sigkill_and_restart_lose_no_connection",
                "sigterm_and_restart_lose_no_connection",
                "changes_made_while_no_agent_ran_apply_on_start",
                "--exact",
            ]
            .map(str::to_owned)
            .to_vec(),
        },
    ])
}

/// Builds forwarder, vm-init and the test binaries; returns test binaries by name.
fn build(root: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    crate::setup::build_agent(false)?;
    check(Command::new("cargo").current_dir(root).args([
        "build",
        "--package",
        "forwarder-tests",
        "--bin",
        "vm-init",
    ]))?;
    let out = Command::new("cargo")
        .current_dir(root)
        .args(["test", "--package", "forwarder-tests", "--no-run", "--message-format=json"])
        .output()?;
    if !out.status.success() {
        bail!("building the tests failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["kind"][0] == "test")
        .filter_map(|m| {
            Some((
                m["target"]["name"].as_str()?.to_owned(),
                PathBuf::from(m["executable"].as_str()?),
            ))
        })
        .collect())
}

struct Row {
    kernel: String,
    accel: &'static str,
    passed: bool,
    detail: String,
    seconds: u64,
}

/// The same set, run directly on the host kernel.
fn host_baseline(root: &Path, runs: &[TestRun]) -> Row {
    let started = Instant::now();
    let mut failed = Vec::new();
    for run in runs {
        let ok = Command::new(&run.binary)
            .args(&run.args)
            .env("FORWARDER_BIN", root.join("target/debug/forwarder"))
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            failed.push(run.name.clone());
        }
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Row {
        kernel: format!("host {} (baseline)", release.trim()),
        accel: "-",
        passed: failed.is_empty(),
        detail: if failed.is_empty() {
            "all passed".into()
        } else {
            format!("failed: {}", failed.join(", "))
        },
        seconds: started.elapsed().as_secs(),
    }
}

fn describe(outcome: &Outcome) -> (bool, String) {
    match outcome {
        Outcome::Finished { success, tests } => {
            let failed: Vec<&str> =
                tests.iter().filter(|(_, ok)| !ok).map(|(n, _)| n.as_str()).collect();
            let detail = if *success {
                format!("{} test binaries passed", tests.len())
            } else if failed.is_empty() {
                "guest failed before its tests ran".into()
            } else {
                format!("failed: {}", failed.join(", "))
            };
            (*success, detail)
        }
        Outcome::NoStart => (false, "guest never reached init".into()),
        Outcome::TimedOut => (false, format!("timed out after {} s", KERNEL_DEADLINE.as_secs())),
    }
}

pub fn run() -> anyhow::Result<()> {
    setup::run()?;
    if Command::new("qemu-system-x86_64").arg("--version").output().is_err() {
        bail!("qemu-system-x86_64 is not available (cargo xtask setup installs qemu-system-x86)");
    }
    let root = workspace_root();
    let binaries = build(&root)?;
    let runs = test_runs(&binaries)?;
    let vm_dir = root.join("target/vm");
    std::fs::create_dir_all(vm_dir.join("logs"))?;

    let mut rows = vec![host_baseline(&root, &runs)];
    let mut kvm_usable = Path::new("/dev/kvm").exists();
    for kernel in &kernels::MATRIX {
        let unpacked = kernels::fetch(kernel)?;
        let initramfs = vm_dir.join(format!("{}.cpio", kernel.name));
        let payload = Payload {
            init: root.join("target/debug/vm-init"),
            forwarder: root.join("target/debug/forwarder"),
            tests: runs
                .iter()
                .map(|r| TestRun {
                    name: r.name.clone(),
                    binary: r.binary.clone(),
                    args: r.args.clone(),
                })
                .collect(),
            demo_manifest: root.join("deploy/examples/demo.yaml"),
        };
        initramfs::build(&payload, &unpacked, &vm_dir.join("stage"), &initramfs)?;
        let log = vm_dir.join("logs").join(format!("{}.log", kernel.name));
        let started = Instant::now();
        let boot = |accel, start_deadline| {
            qemu::boot(&Boot {
                vmlinuz: &unpacked.vmlinuz,
                initramfs: &initramfs,
                log: &log,
                accel,
                start_deadline,
                deadline: KERNEL_DEADLINE,
            })
        };
        let mut accel = if kvm_usable { Accel::Kvm } else { Accel::Tcg };
        println!(
            "vm: {} ({}) under {}; console: {}",
            kernel.name,
            kernel.version,
            accel.as_str(),
            log.display()
        );
        let mut outcome =
            boot(accel, if kvm_usable { KVM_START_DEADLINE } else { TCG_START_DEADLINE })?;
        if accel == Accel::Kvm && matches!(outcome, Outcome::NoStart) {
            let console = std::fs::read_to_string(&log).unwrap_or_default();
            let last = console.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
            println!("vm: KVM did not start the guest ({}); using TCG from now on", last.trim());
            kvm_usable = false;
            accel = Accel::Tcg;
            outcome = boot(accel, TCG_START_DEADLINE)?;
        }
        let (passed, detail) = describe(&outcome);
        rows.push(Row {
            kernel: format!("{} {}", kernel.name, kernel.version),
            accel: accel.as_str(),
            passed,
            detail,
            seconds: started.elapsed().as_secs(),
        });
    }

    println!("\n{:<36} {:<5} {:<6} {:>6}  detail", "kernel", "accel", "result", "time");
    for row in &rows {
        let result = if row.passed { "PASS" } else { "FAIL" };
        println!(
            "{:<36} {:<5} {:<6} {:>5}s  {}",
            row.kernel, row.accel, result, row.seconds, row.detail
        );
    }
    if rows.iter().any(|r| !r.passed) {
        bail!("vm: some kernels failed; logs in {}", vm_dir.join("logs").display());
    }
    Ok(())
}
