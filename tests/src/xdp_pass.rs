//! Do-nothing XDP and TC programs, with which the benchmark prices
//! forwarder's hooks apart from the work in them. Loaded from two raw
//! instructions, so the test library needs no eBPF build; detached when
//! dropped.
use std::os::fd::{FromRawFd, OwnedFd};

use crate::netns::NetNs;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;

/// Holds the program and its link; closing them detaches it.
pub struct XdpPass {
    _link: OwnedFd,
    _prog: OwnedFd,
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a zeroed, large enough bpf_attr; the kernel reads
    // only the fields of `cmd`.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl XdpPass {
    /// Attaches `r0 = XDP_PASS; exit` to `iface` in `ns`.
    pub fn attach(ns: &NetNs, iface: &str) -> Self {
        let (link, prog) = attach_bare(ns, iface, BPF_PROG_TYPE_XDP, 2, BPF_XDP, "pass_xdp");
        Self { _link: link, _prog: prog }
    }
}

const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// A do-nothing TC program (`TC_ACT_OK`) on a TCX hook (kernel 6.6+): with
/// `XdpPass`, what the benchmark uses to price the hooks alone.
pub struct TcPass {
    _link: OwnedFd,
    _prog: OwnedFd,
}

impl TcPass {
    pub fn attach(ns: &NetNs, iface: &str, egress: bool) -> Self {
        let (hook, name) = if egress {
            (BPF_TCX_EGRESS, "pass_tc_egress")
        } else {
            (BPF_TCX_INGRESS, "pass_tc_ingress")
        };
        let (link, prog) = attach_bare(ns, iface, BPF_PROG_TYPE_SCHED_CLS, 0, hook, name);
        Self { _link: link, _prog: prog }
    }
}

/// Loads `r0 = verdict; exit` as `prog_type` named `name` (as the live
/// statistics list it, `bpf_stats`) and links it to `iface`'s
/// `attach_type` hook.
fn attach_bare(
    ns: &NetNs,
    iface: &str,
    prog_type: u32,
    verdict: u8,
    attach_type: u32,
    name: &str,
) -> (OwnedFd, OwnedFd) {
    ns.run(|| {
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0, 0, 0, verdict, 0, 0, 0]), // mov r0, verdict
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),       // exit
        ];
        let license = c"GPL";
        let mut attr = [0u64; 16];
        attr[0] = u64::from(prog_type) | (2u64 << 32);
        attr[1] = insns.as_ptr() as u64;
        attr[2] = license.as_ptr() as u64;
        // prog_name, at byte 48: at most 15 bytes and a NUL.
        let mut prog_name = [0u8; 16];
        prog_name[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
        attr[6] = u64::from_le_bytes(prog_name[..8].try_into().unwrap());
        attr[7] = u64::from_le_bytes(prog_name[8..].try_into().unwrap());
        let prog = bpf(BPF_PROG_LOAD, &mut attr).expect("load the do-nothing program");

        let name = std::ffi::CString::new(iface).unwrap();
        // SAFETY: a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {iface} in {}", ns.name);
        let mut attr = [0u64; 16];
        use std::os::fd::AsRawFd;
        attr[0] = u64::from(prog.as_raw_fd() as u32) | (u64::from(ifindex) << 32);
        attr[1] = u64::from(attach_type);
        let link = bpf(BPF_LINK_CREATE, &mut attr).expect("attach the do-nothing program");
        (link, prog)
    })
}
