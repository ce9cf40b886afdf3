//! The cluster's long-running processes: each spawned into a network
//! namespace (and for a node's, its mount namespace and cgroup) with its
//! log in the run directory, and stopped on drop.
use std::{
    ffi::CString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Where a process runs.
#[derive(Clone, Default)]
pub struct Place {
    /// A named network namespace (`/run/netns/<name>`).
    pub netns: Option<String>,
    /// The pid of a process whose mount and UTS namespaces to join (a
    /// node's own filesystem view and hostname).
    pub node_of: Option<u32>,
    /// `cgroup.procs` files to join before exec (so the process and all it
    /// starts are found again at teardown).
    pub cgroups: Vec<PathBuf>,
}

impl Place {
    /// `program` as a command in this place: `nsenter` into the namespaces.
    pub fn command(&self, program: impl AsRef<Path>) -> Command {
        let mut cmd = Command::new("nsenter");
        if let Some(netns) = &self.netns {
            cmd.arg(format!("--net=/run/netns/{netns}"));
        }
        if let Some(pid) = self.node_of {
            cmd.arg(format!("--mount=/proc/{pid}/ns/mnt"));
            cmd.arg(format!("--uts=/proc/{pid}/ns/uts"));
        }
        cmd.arg("--").arg(program.as_ref());
        let procs: Vec<CString> = self
            .cgroups
            .iter()
            .filter_map(|p| CString::new(p.as_os_str().as_encoded_bytes()).ok())
            .collect();
        if !procs.is_empty() {
            // SAFETY: the closure calls only open, write and close (async-
            // signal-safe) on strings made before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    for path in &procs {
                        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                        if fd < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        // "0": the writing process itself.
                        let written = libc::write(fd, c"0".as_ptr().cast(), 1);
                        libc::close(fd);
                        if written < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        cmd
    }
}

/// Runs `cmd`; its stdout, or an error naming it with its stderr.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A running process, killed (and reaped) on drop.
pub struct Daemon {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Daemon {
    /// Starts `cmd`, its stdout and stderr to `<logs>/<name>.log`.
    pub fn spawn(name: &str, logs: &Path, cmd: &mut Command) -> anyhow::Result<Self> {
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let child = cmd
            // Its own process group: a Ctrl-C at the terminal reaches only
            // xtask, which tears the cluster down in order.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        Ok(Self { name: name.to_owned(), log, child })
    }

    /// A process already started (its output elsewhere).
    pub fn adopt(name: &str, logs: &Path, child: Child) -> Self {
        Self { name: name.to_owned(), log: logs.join(format!("{name}.log")), child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error with the log's tail if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", self.name, self.log_tail(40));
        }
        Ok(())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `ready` every half second until it holds, failing after `timeout`
/// (with what it last said) or as soon as one of `daemons` exits.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    daemons: &mut [&mut Daemon],
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match ready() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = format!("{e:#}"),
        }
        for daemon in daemons.iter_mut() {
            daemon.check_alive()?;
        }
        if Instant::now() > deadline {
            bail!("{what}: not ready after {timeout:?}. {last}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
