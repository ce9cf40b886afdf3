//! A do-nothing XDP program for the far end of a test veth. veth delivers
//! XDP_TX frames (forwarder's ICMP rejects) promptly only to a peer that
//! runs XDP itself; a NIC needs nothing. Loaded from two raw instructions,
//! so the test library needs no eBPF build; detached when dropped.
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
        ns.run(|| {
            let insns: [u64; 2] = [
                u64::from_le_bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]), // mov r0, 2
                u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]), // exit
            ];
            let license = c"GPL";
            let mut attr = [0u64; 16];
            attr[0] = u64::from(BPF_PROG_TYPE_XDP) | (2u64 << 32);
            attr[1] = insns.as_ptr() as u64;
            attr[2] = license.as_ptr() as u64;
            let prog = bpf(BPF_PROG_LOAD, &mut attr).expect("load the XDP_PASS program");

            let name = std::ffi::CString::new(iface).unwrap();
            // SAFETY: a valid C string.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(ifindex, 0, "no interface {iface} in {}", ns.name);
            let mut attr = [0u64; 16];
            use std::os::fd::AsRawFd;
            attr[0] = u64::from(prog.as_raw_fd() as u32) | (u64::from(ifindex) << 32);
            attr[1] = u64::from(BPF_XDP);
            let link = bpf(BPF_LINK_CREATE, &mut attr).expect("attach the XDP_PASS program");
            Self { _link: link, _prog: prog }
        })
    }
}
