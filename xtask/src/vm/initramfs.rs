//! The guest's initramfs: vm-init as /init, the test binaries, forwarder,
//! the tools the tests run with their shared libraries, and the kernel
//! modules the tests need, uncompressed and listed in load order.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::{cpio::Cpio, kernels::Unpacked};

/// Tools the end-to-end tests call.
const TOOLS: [&str; 4] = ["ip", "tc", "sysctl", "ethtool"];
/// veth for the topology; clsact and cls_bpf for TC before TCX (kernel < 6.6);
/// SCTP, with the CRC32c implementation its library asks the crypto API for
/// (without modprobe in the guest, nothing would load it on demand).
const MODULES: [&str; 5] = ["veth", "sch_ingress", "cls_bpf", "crc32c_generic", "sctp"];

pub struct TestRun {
    pub name: String,
    pub binary: PathBuf,
    pub args: Vec<String>,
}

pub struct Payload {
    pub init: PathBuf,
    pub forwarder: PathBuf,
    pub tests: Vec<TestRun>,
    pub demo_manifest: PathBuf,
}

/// Shared libraries of an ELF binary, by absolute path, per `ldd`.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().context("ldd")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn which(tool: &str) -> anyhow::Result<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
        .with_context(|| format!("{tool} is not installed"))
}

fn stripped(source: &Path, stage: &Path) -> anyhow::Result<Vec<u8>> {
    let dest = stage.join(source.file_name().context("file name")?);
    let status =
        Command::new("strip").arg("--strip-debug").arg("-o").arg(&dest).arg(source).status()?;
    if !status.success() {
        bail!("strip {} failed", source.display());
    }
    Ok(std::fs::read(&dest)?)
}

/// Module files for `MODULES` and their dependencies, dependencies first.
/// Built-in modules need nothing.
fn module_files(modules: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let dep = std::fs::read_to_string(modules.join("modules.dep")).context("modules.dep")?;
    let builtin = std::fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    let name_of = |path: &str| {
        let file = path.rsplit('/').next().unwrap_or(path);
        file.split(".ko").next().unwrap_or(file).replace('-', "_")
    };
    let deps: BTreeMap<String, (String, Vec<String>)> = dep
        .lines()
        .filter_map(|l| {
            let (module, deps) = l.split_once(':')?;
            Some((
                name_of(module),
                (module.to_owned(), deps.split_whitespace().map(str::to_owned).collect()),
            ))
        })
        .collect();
    let builtin: BTreeSet<String> = builtin.lines().map(name_of).collect();
    let mut ordered = Vec::new();
    fn visit(name: &str, deps: &BTreeMap<String, (String, Vec<String>)>, out: &mut Vec<String>) {
        let Some((path, needs)) = deps.get(name) else { return };
        for need in needs {
            let need_name = need
                .rsplit('/')
                .next()
                .unwrap_or(need)
                .split(".ko")
                .next()
                .unwrap_or(need)
                .replace('-', "_");
            visit(&need_name, deps, out);
        }
        if !out.contains(path) {
            out.push(path.clone());
        }
    }
    for module in MODULES {
        if builtin.contains(module) {
            continue;
        }
        if !deps.contains_key(module) {
            bail!("module {module} is neither built in nor in {}", modules.display());
        }
        visit(module, &deps, &mut ordered);
    }
    Ok(ordered.into_iter().map(|p| modules.join(p)).collect())
}

fn decompressed(module: &Path) -> anyhow::Result<Vec<u8>> {
    let tool = match module.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return Ok(std::fs::read(module)?),
    };
    let out = Command::new(tool).arg("-dc").arg(module).output()?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed", module.display());
    }
    Ok(out.stdout)
}

pub fn build(payload: &Payload, kernel: &Unpacked, stage: &Path, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(stage)?;
    // Destination path -> (contents, executable).
    let mut files: BTreeMap<String, (Vec<u8>, bool)> = BTreeMap::new();
    let mut elves: Vec<(String, PathBuf)> = vec![
        ("/init".into(), payload.init.clone()),
        ("/usr/bin/forwarder".into(), payload.forwarder.clone()),
    ];
    for test in &payload.tests {
        elves.push((format!("/usr/bin/{}", test.name), test.binary.clone()));
    }
    for tool in TOOLS {
        let path = which(tool)?;
        elves.push((path.display().to_string(), path));
    }
    let mut libraries = BTreeSet::new();
    for (dest, source) in &elves {
        libraries.extend(shared_libraries(source)?);
        files.insert(dest.clone(), (stripped(source, stage)?, true));
    }
    for library in libraries {
        files.insert(library.display().to_string(), (std::fs::read(&library)?, true));
    }
    let mut order = String::new();
    for module in module_files(&kernel.modules)? {
        let name =
            module.file_name().unwrap().to_string_lossy().split(".ko").next().unwrap().to_owned();
        let dest = format!("/lib/modules/{name}.ko");
        order.push_str(&dest);
        order.push('\n');
        files.insert(dest, (decompressed(&module)?, false));
    }
    files.insert("/modules.order".into(), (order.into_bytes(), false));
    let tests: String = payload
        .tests
        .iter()
        .map(|t| format!("{}\t/usr/bin/{} {}\n", t.name, t.name, t.args.join(" ")))
        .collect();
    files.insert("/tests.list".into(), (tests.into_bytes(), false));
    files
        .insert("/etc/forwarder/demo.yaml".into(), (std::fs::read(&payload.demo_manifest)?, false));

    let mut dirs: BTreeSet<String> = ["/proc", "/sys", "/dev", "/run", "/tmp", "/root", "/var"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    for path in files.keys() {
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| *p != Path::new("/")) {
            dirs.insert(p.display().to_string());
            parent = p.parent();
        }
    }
    let file = std::fs::File::create(out)?;
    let mut cpio = Cpio::new(std::io::BufWriter::new(file));
    for dir in &dirs {
        cpio.dir(dir)?;
    }
    // iproute2 keeps named namespaces under /var/run/netns.
    cpio.symlink("/var/run", "/run")?;
    for (path, (data, executable)) in &files {
        cpio.file(path, data, *executable)?;
    }
    cpio.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_come_after_their_dependencies_and_builtins_are_skipped() {
        let dir = std::env::temp_dir().join(format!("fwd-modules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("modules.dep"),
            "kernel/net/sched/cls_bpf.ko.xz: kernel/net/sched/sch-helper.ko.xz
             kernel/net/sched/sch-helper.ko.xz:
             kernel/drivers/net/veth.ko.xz:
             kernel/net/sctp/sctp.ko.xz: kernel/net/ipv4/udp_tunnel.ko.xz kernel/lib/libcrc32c.ko.xz
             kernel/net/ipv4/udp_tunnel.ko.xz:
             kernel/lib/libcrc32c.ko.xz:
",
        )
        .unwrap();
        std::fs::write(
            dir.join("modules.builtin"),
            "kernel/net/sched/sch_ingress.ko
             kernel/crypto/crc32c_generic.ko
",
        )
        .unwrap();
        let files = module_files(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let names: Vec<String> =
            files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(
            names,
            [
                "veth.ko.xz",
                "sch-helper.ko.xz",
                "cls_bpf.ko.xz",
                "udp_tunnel.ko.xz",
                "libcrc32c.ko.xz",
                "sctp.ko.xz"
            ]
        );
    }
}
