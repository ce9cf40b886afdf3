//! State that outlives the agent, pinned in bpffs under
//! `<bpffs root>/<node name>/`: every map (by its versioned name, so a new
//! layout never opens an old map) and, in `links/`, every BPF link that
//! attaches a program. A restarted agent reuses the maps and swaps its new
//! programs into the links atomically, so forwarding never stops; `forwarder
//! cleanup` removes it all.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

/// The default `--bpffs-root`.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/forwarder";

/// One node's pin directory.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
    dir: PathBuf,
}

impl PinDir {
    pub fn new(root: &Path, node_name: &str) -> Self {
        Self { root: root.to_owned(), dir: root.join(node_name) }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The link attaching something at `target` (`xdp-eth0`, `tc-in-veth1`,
    /// `sock-fwd_sock_connect4`).
    pub fn link(&self, target: &str) -> PathBuf {
        self.dir.join("links").join(target)
    }

    /// Creates the directories, mounting a bpffs at the root first when
    /// the root is not on one (pins only live on a bpffs).
    pub fn create(&self) -> io::Result<()> {
        ensure_bpffs(&self.root)?;
        std::fs::create_dir_all(self.dir.join("links"))
    }

    /// Pinned maps whose names are not in `known`: left by builds with
    /// other layouts.
    pub fn unknown_maps(&self, known: &[&str]) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter(|e| !known.iter().any(|k| e.file_name() == *k))
            .map(|e| e.path())
            .collect()
    }

    /// Pinned links, by file name.
    pub fn links(&self) -> Vec<(String, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("links")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect()
    }

    /// Removes every pin (detaching what only the pins kept attached) and
    /// the directories. Returns how many pins went.
    pub fn remove_all(&self) -> io::Result<usize> {
        let mut removed = 0;
        for dir in [self.dir.join("links"), self.dir.clone()] {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_file()) {
                    std::fs::remove_file(entry.path())?;
                    removed += 1;
                }
            }
        }
        for dir in [self.dir.join("links"), self.dir.clone()] {
            match std::fs::remove_dir(&dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(removed)
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a valid C string and a zeroed statfs buffer for the call to fill.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

/// Where a bpffs belongs by convention, and where Cilium's agent and
/// bpftool mount one when the host has none.
const CONVENTIONAL_MOUNT: &str = "/sys/fs/bpf";

/// Makes `dir` a directory on a bpffs, mounting one where none holds it:
/// at /sys/fs/bpf when `dir` lies under it (a directory of sysfs, where
/// nothing else can be created), else at `dir` itself.
pub fn ensure_bpffs(dir: &Path) -> io::Result<()> {
    let nearest = dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
    if !is_bpffs(nearest)? {
        let conventional = Path::new(CONVENTIONAL_MOUNT);
        let target = if dir.starts_with(conventional) && nearest.starts_with(conventional) {
            conventional
        } else {
            std::fs::create_dir_all(dir)?;
            dir
        };
        mount_bpffs(target)?;
    }
    std::fs::create_dir_all(dir)
}

fn mount_bpffs(target: &Path) -> io::Result<()> {
    // The mount lives as long as this mount namespace: a private one (as
    // `ip netns exec` makes) takes the pins with it when it goes, so
    // state then survives a restart only if the namespace does.
    tracing::warn!(
        dir = %target.display(),
        "no bpffs here: mounting one; pins outlive the agent only as long as this mount namespace"
    );
    let c_target = CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: valid C strings; no mount data.
    let rc = unsafe {
        libc::mount(c"bpf".as_ptr(), c_target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        let error = io::Error::last_os_error();
        return Err(io::Error::new(
            error.kind(),
            format!("mounting a bpffs at {}: {error}", target.display()),
        ));
    }
    Ok(())
}

// The two bpf(2) commands aya 0.14 does not offer for every link type.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a properly laid out prefix of `union bpf_attr` for
    // `cmd`, passed with its size; the kernel zero-extends the rest.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_ref(attr), size_of::<T>() as u32)
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// Points the pinned link at `path` to `program`, atomically: packets see
/// the old program or the new one, never none. Fails when the link's target
/// is gone (an interface deleted meanwhile).
pub fn replace_program(path: &Path, program: BorrowedFd<'_>) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let get = ObjGetAttr { pathname: c_path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    let fd = bpf(BPF_OBJ_GET, &get)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that we own.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let update = LinkUpdateAttr {
        link_fd: link.as_fd().as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &update).map(drop)
}
