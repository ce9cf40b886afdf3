//! The demo manifest, and private copies of it that a test may edit.
use std::path::{Path, PathBuf};

use crate::topology::Topology;

/// `$FORWARDER_DEMO_MANIFEST` (set in the VM guests), or the repository's.
pub fn demo_manifest() -> PathBuf {
    std::env::var_os("FORWARDER_DEMO_MANIFEST").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/demo.yaml"),
        PathBuf::from,
    )
}

/// A private copy of the demo manifest that a test may edit.
pub struct ManifestCopy(pub PathBuf);

impl ManifestCopy {
    pub fn new(topology: &Topology) -> Self {
        let demo = std::fs::read_to_string(demo_manifest()).expect("demo manifest");
        Self::with_text(topology, &demo)
    }

    pub fn with_text(topology: &Topology, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}-manifest.yaml", topology.node.name));
        std::fs::write(&path, text).expect("write manifest");
        Self(path)
    }

    pub fn edit(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.0).unwrap();
        assert!(text.contains(from), "manifest lacks {from:?}");
        std::fs::write(&self.0, text.replacen(from, to, 1)).unwrap();
    }
}

impl Drop for ManifestCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
