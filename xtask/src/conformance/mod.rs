//! `cargo xtask conformance`: a real Kubernetes cluster on this machine,
//! with forwarder as its only Service proxy, and Kubernetes' own Service
//! conformance tests run against it. Built so far: its binaries (`build`)
//! and images (`images`).
pub mod build;
pub mod image;
pub mod images;

use crate::setup::{build_agent, workspace_root};

#[derive(clap::Subcommand)]
pub enum Action {
    /// Build the cluster's binaries (cached: a no-op while the pins are unchanged).
    Build,
    /// Build them and write the cluster's image archives to target/conformance/images.
    Images,
}

pub fn run(action: Action) -> anyhow::Result<()> {
    let binaries = build::all()?;
    println!(
        "conformance: binaries in {} and {}",
        binaries.kubernetes.display(),
        binaries.runtime.display()
    );
    match action {
        Action::Build => Ok(()),
        Action::Images => {
            build_agent(true)?;
            let root = workspace_root();
            let out = root.join("target/conformance/images");
            for archive in images::all(&binaries, &root.join("target/release/forwarder"), &out)? {
                println!("conformance: image {}", archive.display());
            }
            Ok(())
        }
    }
}
