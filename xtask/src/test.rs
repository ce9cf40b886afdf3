//! `cargo xtask test`: the whole suite, as CI runs it.
use std::process::Command;

use crate::{
    bench, conformance, k8s,
    setup::{self, check, workspace_root},
    vm,
};

/// Unit, BPF fixture and end-to-end tests on this kernel, the Services
/// conformance tests on a real cluster, then the focused set on each
/// kernel of the VM matrix.
pub fn run() -> anyhow::Result<()> {
    setup::run()?;
    // The API tests run a real kube-apiserver (built once, then cached).
    k8s::build()?;
    let root = workspace_root();
    // The end-to-end tests run the real binary; the upgrade test moves from
    // the debug build to the release one.
    setup::build_agent(false)?;
    setup::build_agent(true)?;
    check(
        Command::new("cargo")
            .current_dir(&root)
            .args(["test", "--workspace"])
            .env("FORWARDER_BIN", root.join("target/debug/forwarder"))
            .env("FORWARDER_OTHER_BIN", root.join("target/release/forwarder")),
    )?;
    // Every benchmark mode still produces numbers (not what they are).
    bench::smoke()?;
    // A real cluster, forwarder as its DaemonSet, Kubernetes' own Services
    // conformance tests.
    conformance::run(conformance::Args::default())?;
    vm::run()?;
    println!("xtask test: all tests passed");
    Ok(())
}
