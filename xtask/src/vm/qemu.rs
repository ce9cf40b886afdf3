//! Boots one kernel with the initramfs under qemu and collects the guest's
//! result lines; the console goes to a log file.
use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Context as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

#[derive(Debug)]
pub enum Outcome {
    /// The guest printed `vm-init: success|failure`; per-test lines.
    Finished {
        success: bool,
        tests: Vec<(String, bool)>,
    },
    /// The guest never reached init within the start-up deadline.
    NoStart,
    TimedOut,
}

pub struct Boot<'a> {
    pub vmlinuz: &'a Path,
    pub initramfs: &'a Path,
    pub log: &'a Path,
    pub accel: Accel,
    /// Give up when init has not printed its first line by then.
    pub start_deadline: Duration,
    pub deadline: Duration,
}

pub fn boot(b: &Boot<'_>) -> anyhow::Result<Outcome> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", b.accel.as_str(), "-m", "2048", "-smp", "2"])
        .args(["-cpu", if b.accel == Accel::Kvm { "host" } else { "max" }])
        .args(["-nographic", "-no-reboot", "-serial", "mon:stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(b.vmlinuz)
        .arg("-initrd")
        .arg(b.initramfs)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel::<String>();
    let tx_err = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx_err.send(format!("qemu: {line}"));
        }
    });
    let mut log = std::fs::File::create(b.log)?;
    let started_at = Instant::now();
    let mut started = false;
    let mut tests = Vec::new();
    let outcome = loop {
        let limit = if started { b.deadline } else { b.start_deadline };
        let Some(left) = limit.checked_sub(started_at.elapsed()) else {
            break if started { Outcome::TimedOut } else { Outcome::NoStart };
        };
        match rx.recv_timeout(left) {
            Ok(line) => {
                writeln!(log, "{line}")?;
                let line = line.trim_end_matches('\r');
                if line.contains("vm-init: started") {
                    started = true;
                }
                if let Some(rest) = line.strip_prefix("vm-test: ") {
                    if let Some(name) = rest.strip_suffix(": pass") {
                        tests.push((name.to_owned(), true));
                    } else if let Some((name, _)) = rest.split_once(": fail") {
                        tests.push((name.to_owned(), false));
                    }
                }
                match line {
                    "vm-init: success" => break Outcome::Finished { success: true, tests },
                    "vm-init: failure" => break Outcome::Finished { success: false, tests },
                    _ => {}
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break if started {
                    Outcome::Finished { success: false, tests }
                } else {
                    Outcome::NoStart
                };
            }
        }
    };
    // The guest powers off by itself; make sure qemu is gone in every case.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(outcome)
}
