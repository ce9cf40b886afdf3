//! `cargo xtask test`: the whole suite, as CI runs it.
use std::process::Command;

use crate::{
    bench, k8s,
    setup::{self, check, workspace_root},
    vm,
};

/// Unit, BPF fixture and end-to-end tests on this kernel, then the focused
/// set on each kernel of the VM matrix.
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
    vm::run()?;
    println!("xtask test: all tests passed");
    Ok(())
}
