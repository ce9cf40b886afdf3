//! The images the cluster's pods run, built here, as no registry is
//! reachable: pause, agnhost (the e2e framework's test image, with the
//! tools its tests exec), CoreDNS and forwarder, each a docker archive
//! (`image`) to import into containerd under the name pods ask for.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use super::{
    build::{self, AGNHOST_VERSION, Binaries, PAUSE_VERSION},
    image::{self, Image},
};
use crate::setup::check;

/// What the DaemonSet's `forwarder:latest` means to containerd.
pub const FORWARDER: &str = "docker.io/library/forwarder:latest";

/// The names kubelet and the e2e framework ask for.
pub fn pause() -> String {
    format!("registry.k8s.io/pause:{PAUSE_VERSION}")
}

pub fn agnhost() -> String {
    format!("registry.k8s.io/e2e-test-images/agnhost:{AGNHOST_VERSION}")
}

pub fn coredns() -> String {
    let version = build::COREDNS.split_once('@').map_or("", |(_, v)| v);
    format!("registry.k8s.io/coredns/coredns:{version}")
}

/// The Debian release and packages under agnhost and forwarder: the tools
/// the e2e tests exec in agnhost pods (a shell, OpenBSD's nc, whose flags
/// they use, curl, wget, nslookup and dig, ip, iperf; upstream's image is
/// Alpine with the same tools and busybox's wget), and the C library
/// forwarder links.
const SUITE: &str = "bookworm";
const TOOLS: [&str; 7] =
    ["curl", "wget", "netcat-openbsd", "bind9-dnsutils", "iproute2", "iperf", "ca-certificates"];

/// Every image archive, written into `out`; the base layer is cached.
pub fn all(binaries: &Binaries, forwarder: &Path, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)?;
    let base = base_layer()?;
    let (pause_bin, coredns_bin) =
        (binaries.runtime.join("pause"), binaries.runtime.join("coredns"));
    let agnhost_bin = binaries.kubernetes.join("agnhost");
    let (pause, coredns, agnhost) = (pause(), coredns(), agnhost());
    let images: [(Image, Option<&Path>, &image::Files); 4] = [
        (
            Image { name: &pause, entrypoint: &["/pause"], cmd: &[] },
            None,
            &[("pause", &pause_bin, 0o755)],
        ),
        (
            Image { name: &coredns, entrypoint: &["/coredns"], cmd: &[] },
            None,
            &[("coredns", &coredns_bin, 0o755)],
        ),
        (
            Image { name: &agnhost, entrypoint: &["/agnhost"], cmd: &["pause"] },
            Some(&base),
            // /coredns too, as upstream's image has: the DNS specs run it
            // as the upstream server their Corefiles forward to.
            &[("agnhost", &agnhost_bin, 0o755), ("coredns", &coredns_bin, 0o755)],
        ),
        (
            Image { name: FORWARDER, entrypoint: &[], cmd: &["forwarder"] },
            Some(&base),
            &[("usr/local/bin/forwarder", forwarder, 0o755)],
        ),
    ];
    let mut written = Vec::new();
    for (image, base, files) in images {
        let stem = image.name.rsplit('/').next().unwrap_or(image.name).replace(':', "_");
        let layer = out.join(format!("{stem}.layer.tar"));
        image::write_layer(files, &layer)?;
        let mut layers = Vec::new();
        layers.extend(base);
        layers.push(layer.as_path());
        let archive = out.join(format!("{stem}.tar"));
        image::write_archive(&image, &layers, &archive)?;
        std::fs::remove_file(&layer)?;
        written.push(archive);
    }
    Ok(written)
}

/// The Debian root filesystem (a tar, made by mmdebstrap), cached by the
/// release and package list.
fn base_layer() -> anyhow::Result<PathBuf> {
    let key = format!("{SUITE} {}", TOOLS.join(","));
    let dir = build::cache_root().join("rootfs");
    let tar = dir.join(format!("{:016x}.tar", build::fnv1a(key.as_bytes())));
    if tar.exists() {
        return Ok(tar);
    }
    std::fs::create_dir_all(&dir)?;
    let partial = tar.with_extension("partial");
    println!("conformance: building the Debian {SUITE} base layer ({})", TOOLS.join(", "));
    check(
        Command::new("mmdebstrap")
            .args(["--variant=minbase", "--quiet", "--format=tar"])
            .arg(format!("--include={}", TOOLS.join(",")))
            .arg(SUITE)
            .arg(&partial),
    )?;
    std::fs::rename(&partial, &tar).with_context(|| format!("{}", tar.display()))?;
    Ok(tar)
}
