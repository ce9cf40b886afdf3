//! The images the cluster's pods run, built here, as no registry is
//! reachable: pause, the e2e framework's test images (agnhost, with the
//! tools its tests exec, and the others the Service and DNS specs run),
//! CoreDNS and forwarder, each a docker archive (`image`) to import into
//! containerd under the name pods ask for.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

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

pub fn coredns() -> String {
    let version = build::COREDNS.split_once('@').map_or("", |(_, v)| v);
    format!("registry.k8s.io/coredns/coredns:{version}")
}

const E2E_REGISTRY: &str = "registry.k8s.io/e2e-test-images";

/// The e2e framework's test images: `(its identifier in the framework's
/// image manifest, name, the tag here)`. A pin bump that changes a tag
/// fails the build (`check_tags`) rather than leaving pods waiting on a
/// pull.
const E2E_IMAGES: [(&str, &str, &str); 4] = [
    ("Agnhost", "agnhost", AGNHOST_VERSION),
    // Upstream: Debian with dnsutils (and /coredns, kept here too); the
    // DNS specs' second querier ("jessie": dig, getent, sh).
    ("JessieDnsutils", "jessie-dnsutils", "1.7"),
    // Upstream: busybox; the specs run sh, sleep and nc in it, which the
    // Debian base has.
    ("BusyBox", "busybox", "1.37.0-1"),
    // The server of the conntrack-invalid spec.
    ("RegressionIssue74839", "regression-issue-74839", "1.4"),
];

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
    check_tags(&build::kubernetes_source()?.join("test/utils/image/manifest.go"))?;
    std::fs::create_dir_all(out)?;
    let base = base_layer()?;
    let (pause_bin, coredns_bin) =
        (binaries.runtime.join("pause"), binaries.runtime.join("coredns"));
    let agnhost_bin = binaries.kubernetes.join("agnhost");
    let regression_bin = binaries.kubernetes.join("regression-issue-74839");
    let (pause, coredns) = (pause(), coredns());
    let [agnhost, jessie, busybox, regression] =
        E2E_IMAGES.map(|(_, name, tag)| format!("{E2E_REGISTRY}/{name}:{tag}"));
    let images: [(Image, Option<&Path>, &image::Files); 7] = [
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
            Image { name: &jessie, entrypoint: &[], cmd: &["bash"] },
            Some(&base),
            &[("coredns", &coredns_bin, 0o755)],
        ),
        (Image { name: &busybox, entrypoint: &[], cmd: &["sh"] }, Some(&base), &[]),
        (
            Image { name: &regression, entrypoint: &["/regression-issue-74839"], cmd: &[] },
            None,
            &[("regression-issue-74839", &regression_bin, 0o755)],
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
        let mut layers = Vec::new();
        layers.extend(base);
        if !files.is_empty() {
            image::write_layer(files, &layer)?;
            layers.push(layer.as_path());
        }
        let archive = out.join(format!("{stem}.tar"));
        image::write_archive(&image, &layers, &archive)?;
        let _ = std::fs::remove_file(&layer);
        written.push(archive);
    }
    Ok(written)
}

/// Fails unless every test image's tag here is the one the pinned e2e
/// framework asks for (its `test/utils/image/manifest.go`).
fn check_tags(manifest: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(manifest).with_context(|| format!("{}", manifest.display()))?;
    for (id, name, tag) in E2E_IMAGES {
        let wanted = manifest_entry(&text, id);
        if wanted != Some((name, tag)) {
            let (wanted_name, wanted_tag) = wanted.unwrap_or(("(not listed)", ""));
            bail!(
                "{}: the e2e framework's {id} is {wanted_name}:{wanted_tag}, the harness builds \
                 {name}:{tag}",
                manifest.display(),
            );
        }
    }
    Ok(())
}

/// The name and tag of `configs[id] = Config{registry, "name", "tag"}`.
fn manifest_entry<'a>(manifest: &'a str, id: &str) -> Option<(&'a str, &'a str)> {
    let line =
        manifest.lines().find(|l| l.trim_start().starts_with(&format!("configs[{id}] =")))?;
    let mut quoted = line.split('"').skip(1).step_by(2);
    Some((quoted.next()?, quoted.next()?))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tags_as_the_manifest_writes_them() {
        let manifest = r#"
	configs[AgnhostPrev] = Config{list.PromoterE2eRegistry, "agnhost", "2.55"}
	configs[Agnhost] = Config{list.PromoterE2eRegistry, "agnhost", "2.59"}
	configs[BusyBox] = Config{list.PromoterE2eRegistry, "busybox", "1.37.0-1"}
"#;
        assert_eq!(manifest_entry(manifest, "Agnhost"), Some(("agnhost", "2.59")));
        assert_eq!(manifest_entry(manifest, "BusyBox"), Some(("busybox", "1.37.0-1")));
        assert_eq!(manifest_entry(manifest, "JessieDnsutils"), None);
    }
}
