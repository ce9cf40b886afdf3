//! PID 1 of the `cargo xtask vm` guests: mounts the kernel filesystems,
//! loads the kernel modules the tests need, runs the tests listed in
//! `/tests.list`, prints one result line per test and a final
//! `vm-init: success|failure` line that the xtask parses, then powers off.
use std::{fs, io::Write, os::fd::AsFd, process::Command};

use nix::{
    kmod::{ModuleInitFlags, finit_module},
    mount::{MsFlags, mount},
    sys::reboot::{RebootMode, reboot},
};

fn mount_fs(fstype: &str, target: &str) {
    let _ = fs::create_dir_all(target);
    if let Err(e) = mount(Some(fstype), target, Some(fstype), MsFlags::empty(), None::<&str>) {
        println!("vm-init: mount {fstype} on {target}: {e}");
    }
}

fn load_modules() {
    let Ok(order) = fs::read_to_string("/modules.order") else {
        return;
    };
    for path in order.lines().filter(|l| !l.is_empty()) {
        let file = match fs::File::open(path) {
            Ok(file) => file,
            Err(e) => {
                println!("vm-init: module {path}: {e}");
                continue;
            }
        };
        match finit_module(file.as_fd(), c"", ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::Error::EEXIST) => println!("vm-init: module {path} loaded"),
            Err(e) => println!("vm-init: module {path}: {e}"),
        }
    }
}

/// Runs one `name<TAB>command args...` line; true when it passed.
fn run_test(line: &str) -> bool {
    let Some((name, command)) = line.split_once('\t') else {
        println!("vm-init: malformed test line {line:?}");
        return false;
    };
    let mut words = command.split_whitespace();
    let Some(program) = words.next() else {
        return false;
    };
    println!("vm-test: {name}: running {command}");
    let _ = std::io::stdout().flush();
    let status = Command::new(program)
        .args(words)
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("FORWARDER_BIN", "/usr/bin/forwarder")
        .env("FORWARDER_DEMO_MANIFEST", "/etc/forwarder/demo.yaml")
        // Distribution kernels have SCTP; tests must not skip it here.
        .env("FORWARDER_REQUIRE_SCTP", "1")
        .env("RUST_BACKTRACE", "1")
        .env("HOME", "/root")
        .status();
    let passed = status.as_ref().is_ok_and(|s| s.success());
    match status {
        Ok(s) if s.success() => println!("vm-test: {name}: pass"),
        Ok(s) => println!("vm-test: {name}: fail ({s})"),
        Err(e) => println!("vm-test: {name}: fail (cannot run: {e})"),
    }
    passed
}

fn main() {
    mount_fs("proc", "/proc");
    mount_fs("sysfs", "/sys");
    mount_fs("devtmpfs", "/dev");
    mount_fs("tmpfs", "/run");
    mount_fs("bpf", "/sys/fs/bpf");
    mount_fs("cgroup2", "/sys/fs/cgroup");
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("vm-init: started on kernel {}", release.trim());
    load_modules();
    let tests = fs::read_to_string("/tests.list").unwrap_or_default();
    let mut all_passed = !tests.trim().is_empty();
    for line in tests.lines().filter(|l| !l.trim().is_empty()) {
        all_passed &= run_test(line);
    }
    println!("vm-init: {}", if all_passed { "success" } else { "failure" });
    let _ = std::io::stdout().flush();
    nix::unistd::sync();
    let _ = reboot(RebootMode::RB_POWER_OFF);
}
