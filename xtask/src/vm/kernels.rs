//! The kernel matrix: distribution kernel packages, fetched with apt as
//! `.deb` files into a cache and unpacked there, never installed.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::setup::check;

/// Where packages come from: the host's own apt sources (Debian 12), or a
/// private source list for another release, which never touches the
/// system's configuration.
#[derive(Clone, Copy)]
pub enum Source {
    Host,
    Private { suite: &'static str },
}

pub struct Kernel {
    /// Short name for the table and the log file.
    pub name: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    pub source: Source,
}

/// Pinned: the oldest kernel forwarder supports (Debian 12's 6.1) and a
/// current 6.12-series distribution kernel (Debian 13's).
pub const MATRIX: [Kernel; 2] = [
    Kernel {
        name: "debian12-6.1",
        package: "linux-image-6.1.0-56-amd64",
        version: "6.1.192-2",
        source: Source::Host,
    },
    Kernel {
        name: "debian13-6.12",
        package: "linux-image-6.12.117+deb13-amd64",
        version: "6.12.117-1",
        source: Source::Private { suite: "trixie" },
    },
];

/// A kernel unpacked in the cache.
pub struct Unpacked {
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

pub fn cache_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/forwarder"))
}

fn apt_options(cache: &Path, source: Source) -> anyhow::Result<Vec<String>> {
    let Source::Private { suite } = source else {
        return Ok(vec!["-o".into(), "APT::Sandbox::User=root".into()]);
    };
    let dir = cache.join(format!("apt-{suite}"));
    std::fs::create_dir_all(dir.join("lists/partial"))?;
    std::fs::create_dir_all(dir.join("archives/partial"))?;
    let list = dir.join("sources.list");
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    std::fs::write(
        &list,
        format!(
            "deb [signed-by={keyring}] http://deb.debian.org/debian {suite} main\n\
             deb [signed-by={keyring}] http://deb.debian.org/debian-security {suite}-security main\n"
        ),
    )?;
    let o = |k: &str, v: &Path| ["-o".to_owned(), format!("{k}={}", v.display())];
    let mut options: Vec<String> = Vec::new();
    options.extend(o("Dir::Etc::sourcelist", &list));
    options.extend(["-o".into(), "Dir::Etc::sourceparts=-".into()]);
    options.extend(o("Dir::State::Lists", &dir.join("lists")));
    options.extend(o("Dir::Cache", &dir));
    options.extend(["-o".into(), "APT::Sandbox::User=root".into()]);
    Ok(options)
}

/// Downloads (once) and unpacks (once) the kernel package.
pub fn fetch(kernel: &Kernel) -> anyhow::Result<Unpacked> {
    let cache = cache_dir()?.join("kernels");
    let tree = cache.join(format!("{}_{}", kernel.package, kernel.version));
    if !tree.join("boot").exists() {
        std::fs::create_dir_all(&cache)?;
        let options = apt_options(&cache_dir()?, kernel.source)?;
        let deb = download(kernel, &cache, &options)?;
        let staging = tree.with_extension("partial");
        let _ = std::fs::remove_dir_all(&staging);
        check(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&staging))?;
        std::fs::rename(&staging, &tree)?;
    }
    let boot = std::fs::read_dir(tree.join("boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .with_context(|| format!("no vmlinuz in {}", tree.display()))?;
    let release =
        boot.file_name().unwrap().to_string_lossy().trim_start_matches("vmlinuz-").to_owned();
    if !tree.join("lib").exists() && tree.join("usr/lib").exists() {
        // Merged-/usr packages (Debian 13) ship usr/lib/modules; depmod -b
        // looks in lib/modules.
        std::os::unix::fs::symlink("usr/lib", tree.join("lib"))?;
    }
    let modules = tree.join("lib/modules").join(&release);
    if !modules.join("modules.dep").exists() {
        // The package leaves dependency data to depmod at install time.
        check(Command::new("depmod").arg("-b").arg(&tree).arg(&release))?;
    }
    Ok(Unpacked { vmlinuz: boot, modules })
}

fn download(kernel: &Kernel, cache: &Path, options: &[String]) -> anyhow::Result<PathBuf> {
    let prefix = format!("{}_{}", kernel.package, kernel.version.replace(':', "%3a"));
    let existing = |cache: &Path| {
        std::fs::read_dir(cache).ok()?.filter_map(Result::ok).map(|e| e.path()).find(|p| {
            p.extension().is_some_and(|e| e == "deb")
                && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
    };
    if let Some(deb) = existing(cache) {
        return Ok(deb);
    }
    println!("vm: downloading {}={}", kernel.package, kernel.version);
    if matches!(kernel.source, Source::Private { .. }) {
        check(Command::new("apt-get").args(options).arg("update"))?;
    }
    let spec = format!("{}={}", kernel.package, kernel.version);
    let status = Command::new("apt-get")
        .args(options)
        .arg("download")
        .arg(&spec)
        .current_dir(cache)
        .status()?;
    if !status.success() {
        bail!(
            "apt-get download {spec} failed: the pinned kernel is no longer in the archive; \
             pick the current version (apt-cache policy {}) and update xtask/src/vm/kernels.rs",
            kernel.package
        );
    }
    existing(cache)
        .with_context(|| format!("{spec} downloaded but not found in {}", cache.display()))
}
