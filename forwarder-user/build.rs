//! Builds the eBPF programs with the pinned nightly; the object lands in
//! `OUT_DIR/forwarder` and is embedded by `src/ebpf.rs`.
use aya_build::{Package, Toolchain};

/// Keep in step with `xtask/src/toolchain.rs`.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../forwarder-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [Package { name: "forwarder-ebpf", root_dir: root, ..Default::default() }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
