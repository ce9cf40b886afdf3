//! What a cluster run may change on the host, recorded before it and
//! compared after: the run must leave the host as it found it. kubelet
//! writes some of it on purpose (host sysctls at every start, fixed paths
//! under /var and /run); the rest would be a leak of ours.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::bail;

/// Host-wide sysctls kubelet sets at start (`setupKernelTunables`); not
/// per network namespace, so a node in a namespace still changes them.
pub const KUBELET_SYSCTLS: [&str; 6] = [
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// Directories whose entries the cluster's components would add to at
/// their default paths (kubelet, containerd, runc, CNI, kubectl's cache):
/// compared entry by entry. The nodes' own mount namespaces hide them;
/// this proves it.
const WATCHED_DIRS: [&str; 9] = [
    "/run",
    "/run/netns",
    "/var/lib",
    "/var/log",
    "/opt",
    "/etc",
    "/usr/libexec",
    "/sys/fs/bpf",
    "/root",
];

#[derive(Debug, PartialEq, Eq)]
pub struct HostState {
    sysctls: Vec<(String, String)>,
    /// Mount points of our mount namespace.
    mounts: BTreeSet<String>,
    /// Top-level cgroups of every hierarchy (`memory/foo`, `unified/bar`).
    cgroups: BTreeSet<String>,
    /// Entries of `WATCHED_DIRS`.
    entries: BTreeSet<PathBuf>,
    /// Links, rules and routes of the host's own network namespace.
    links: String,
    iptables: String,
    nftables: String,
}

impl HostState {
    pub fn record() -> anyhow::Result<Self> {
        let sysctls = KUBELET_SYSCTLS
            .iter()
            .map(|key| Ok(((*key).to_owned(), read_sysctl(key)?)))
            .collect::<anyhow::Result<_>>()?;
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?
            .lines()
            .filter_map(|line| line.split(' ').nth(4).map(str::to_owned))
            .filter(|m| is_ours_or_not_netns(Path::new(m)))
            .collect();
        let mut cgroups = BTreeSet::new();
        for hierarchy in list("/sys/fs/cgroup") {
            for child in list(&hierarchy).into_iter().filter(|p| p.is_dir()) {
                if let Ok(rel) = child.strip_prefix("/sys/fs/cgroup") {
                    cgroups.insert(rel.display().to_string());
                }
            }
        }
        let entries =
            WATCHED_DIRS.iter().flat_map(list).filter(|p| is_ours_or_not_netns(p)).collect();
        Ok(Self {
            sysctls,
            mounts,
            cgroups,
            entries,
            // Names only: flags and states of unrelated links move on
            // their own.
            links: command(&["ip", "-o", "link", "show"])
                .lines()
                .filter_map(|l| l.split(": ").nth(1))
                .collect::<Vec<_>>()
                .join("\n"),
            iptables: rules("iptables-save"),
            // Stateless: without counters.
            nftables: command(&["nft", "-s", "list", "ruleset"]),
        })
    }

    /// What differs from `before`, as readable lines; empty when nothing.
    pub fn differences(&self, before: &Self) -> Vec<String> {
        let mut found = Vec::new();
        for ((key, now), (_, then)) in self.sysctls.iter().zip(&before.sysctls) {
            if now != then {
                found.push(format!("sysctl {key} is {now}, was {then}"));
            }
        }
        set_diff(&mut found, "mount", &before.mounts, &self.mounts);
        set_diff(&mut found, "cgroup", &before.cgroups, &self.cgroups);
        let (old, new): (BTreeSet<String>, BTreeSet<String>) = (
            before.entries.iter().map(|p| p.display().to_string()).collect(),
            self.entries.iter().map(|p| p.display().to_string()).collect(),
        );
        set_diff(&mut found, "path", &old, &new);
        for (what, now, then) in [
            ("links", &self.links, &before.links),
            ("iptables rules", &self.iptables, &before.iptables),
            ("nftables ruleset", &self.nftables, &before.nftables),
        ] {
            if now != then {
                found.push(format!("host {what} changed:\n--- before\n{then}\n--- after\n{now}"));
            }
        }
        found
    }

    /// Puts back the sysctls kubelet changes at start.
    pub fn restore_sysctls(&self) -> anyhow::Result<()> {
        write_sysctls(&self.sysctls)
    }

    /// Keeps the sysctls in `file` too, for a later run to put back should
    /// this one be killed before its teardown.
    pub fn save_sysctls(&self, file: &Path) -> anyhow::Result<()> {
        let text: String = self.sysctls.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
        std::fs::write(file, text)?;
        Ok(())
    }

    /// Fails, listing every difference, unless the host is as `before`.
    pub fn check_unchanged(before: &Self) -> anyhow::Result<()> {
        let found = Self::record()?.differences(before);
        if !found.is_empty() {
            bail!("the run left the host changed:\n{}", found.join("\n"));
        }
        Ok(())
    }
}

/// Puts back sysctls `save_sysctls` kept in `file` (if there), and
/// removes it.
pub fn restore_saved_sysctls(file: &Path) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Ok(());
    };
    let saved: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(key, _)| KUBELET_SYSCTLS.contains(key))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    write_sysctls(&saved)?;
    std::fs::remove_file(file)?;
    Ok(())
}

fn write_sysctls(values: &[(String, String)]) -> anyhow::Result<()> {
    for (key, value) in values {
        if read_sysctl(key)? != *value {
            let path = Path::new("/proc/sys").join(key);
            std::fs::write(&path, value).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
    }
    Ok(())
}

/// Outside /run/netns, everything; inside, the run's own namespaces and
/// the pod namespaces a node's runtime would leave there if its mount
/// namespace did not hide them (other tests' come and go).
fn is_ours_or_not_netns(path: &Path) -> bool {
    let Ok(name) = path.strip_prefix("/run/netns") else {
        return true;
    };
    let name = name.to_string_lossy();
    name.is_empty() || name.starts_with(super::cluster::NETNS_PREFIX) || name.starts_with("cni-")
}

fn read_sysctl(key: &str) -> anyhow::Result<String> {
    let path = Path::new("/proc/sys").join(key);
    Ok(std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        .trim()
        .to_owned())
}

fn list(dir: impl AsRef<Path>) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn set_diff(
    found: &mut Vec<String>,
    what: &str,
    before: &BTreeSet<String>,
    now: &BTreeSet<String>,
) {
    for added in now.difference(before) {
        found.push(format!("{what} added: {added}"));
    }
    for removed in before.difference(now) {
        found.push(format!("{what} removed: {removed}"));
    }
}

fn command(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// iptables-save without its timestamps and counters.
fn rules(program: &str) -> String {
    command(&[program])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| if l.starts_with(':') { l.split(" [").next().unwrap_or(l) } else { l })
        .collect::<Vec<_>>()
        .join("\n")
}
