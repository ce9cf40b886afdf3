//! Builds the eBPF programs with the nightly pinned in
//! `forwarder-ebpf/rust-toolchain.toml`; the objects land in `OUT_DIR` and
//! are embedded by `src/dataplane.rs`.
use std::path::Path;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../forwarder-ebpf");
    let toolchain_file = root.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let text = std::fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {}", toolchain_file.display()))?;
    let channel = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel"))
        .and_then(|rest| rest.split('"').nth(1))
        .context("no channel in forwarder-ebpf/rust-toolchain.toml")?;
    let root = root.to_str().context("non-UTF-8 workspace path")?;
    aya_build::build_ebpf(
        [Package { name: "forwarder-ebpf", root_dir: root, ..Default::default() }],
        Toolchain::Custom(channel),
    )
}
