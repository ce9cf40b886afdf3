//! The node's own connected UDP sockets, through the kernel's socket
//! diagnostics (`NETLINK_SOCK_DIAG`): listed, and destroyed when the
//! backend the socket programs connected them to left its Service. A
//! connected UDP socket is never balanced again by itself (the socket
//! programs act at `connect`), so a client on a fixed socket (a resolver,
//! a metrics agent) would keep sending to a pod that no longer serves;
//! destroyed, it gets ECONNABORTED and connects anew, as Cilium does.
//! Needs `CONFIG_INET_DIAG_DESTROY` (Debian's kernels have it).
use std::{io, mem::size_of, net::SocketAddrV4};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `TCP_ESTABLISHED`, which a connected UDP socket reports.
const CONNECTED: u32 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`: ports and addresses in network order.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [[u8; 4]; 4],
    dst: [[u8; 4]; 4],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// The head of `struct inet_diag_msg`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Reply {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
}

/// A connected UDP socket of this network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSocket {
    pub cookie: u64,
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
    id: SockId,
}

struct Netlink(std::os::fd::OwnedFd);

impl Netlink {
    fn open() -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the descriptor is owned from here on.
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let netlink = Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        // The sync loop waits on the answers: never for long.
        let timeout = libc::timeval { tv_sec: 2, tv_usec: 0 };
        // SAFETY: setsockopt(2) with a value of the size given.
        let set = unsafe {
            use std::os::fd::AsRawFd;
            libc::setsockopt(
                netlink.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        if set != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(netlink)
    }

    fn send(&self, kind: u16, flags: u16, request: &Request) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let len = size_of::<NlMsgHdr>() + size_of::<Request>();
        let header = NlMsgHdr { len: len as u32, kind, flags, seq: 1, pid: 0 };
        let mut message = Vec::with_capacity(len);
        message.extend_from_slice(bytes_of(&header));
        message.extend_from_slice(bytes_of(request));
        // SAFETY: sending our own buffer to the kernel (address 0).
        let sent = unsafe { libc::send(self.0.as_raw_fd(), message.as_ptr().cast(), len, 0) };
        if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Reads messages until the kernel's DONE or ERROR, handing each
    /// payload of `kind` to `each`; an ERROR with a code is returned as it.
    fn receive(&self, mut each: impl FnMut(&[u8])) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: reading into our own buffer.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= size_of::<NlMsgHdr>() {
                let header: NlMsgHdr = read(rest);
                // A dump the kernel interrupted (sockets came and went) is
                // incomplete: the next sync lists again.
                if header.flags & NLM_F_DUMP_INTR != 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::Interrupted,
                        "socket dump interrupted",
                    ));
                }
                let len = (header.len as usize).clamp(size_of::<NlMsgHdr>(), rest.len());
                let payload = &rest[size_of::<NlMsgHdr>()..len];
                match header.kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = if payload.len() >= 4 { read::<i32>(payload) } else { 0 };
                        return match code {
                            0 => Ok(()),
                            code => Err(io::Error::from_raw_os_error(-code)),
                        };
                    }
                    _ => each(payload),
                }
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            }
        }
    }
}

fn bytes_of<T: Copy>(value: &T) -> &[u8] {
    // SAFETY: `T` is a plain repr(C) value without padding reads that matter
    // (every field is initialized, the padding is never interpreted).
    unsafe { std::slice::from_raw_parts((value as *const T).cast(), size_of::<T>()) }
}

fn read<T: Copy + Default>(bytes: &[u8]) -> T {
    let mut value = T::default();
    let len = size_of::<T>().min(bytes.len());
    // SAFETY: copies at most `size_of::<T>()` bytes into a plain value.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut value as *mut T).cast(), len) };
    value
}

fn request(states: u32, id: SockId) -> Request {
    Request {
        family: libc::AF_INET as u8,
        protocol: libc::IPPROTO_UDP as u8,
        states,
        id,
        ..Request::default()
    }
}

/// Every connected IPv4 UDP socket of this network namespace.
pub fn connected_udp_sockets() -> io::Result<Vec<UdpSocket>> {
    let netlink = Netlink::open()?;
    netlink.send(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        &request(CONNECTED, SockId::default()),
    )?;
    let mut sockets = Vec::new();
    netlink.receive(|payload| {
        let reply: Reply = read(payload);
        if payload.len() < size_of::<Reply>() || reply.family != libc::AF_INET as u8 {
            return;
        }
        let id = reply.id;
        let addr = |a: [u8; 4], p: [u8; 2]| SocketAddrV4::new(a.into(), u16::from_be_bytes(p));
        sockets.push(UdpSocket {
            cookie: u64::from(id.cookie[1]) << 32 | u64::from(id.cookie[0]),
            local: addr(id.src[0], id.sport),
            remote: addr(id.dst[0], id.dport),
            id,
        });
    })?;
    Ok(sockets)
}

/// Destroys `socket`: its owner's next call fails with ECONNABORTED.
/// Gone meanwhile is not an error.
pub fn destroy(socket: &UdpSocket) -> io::Result<()> {
    let netlink = Netlink::open()?;
    netlink.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &request(CONNECTED, socket.id))?;
    match netlink.receive(|_| {}) {
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        result => result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lists a connected socket of this process with its addresses and the
    /// cookie the socket programs key it by; destroying it aborts it.
    #[test]
    fn lists_and_destroys_a_connected_socket() {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(receiver.local_addr().unwrap()).unwrap();
        let local = match socket.local_addr().unwrap() {
            std::net::SocketAddr::V4(v4) => v4,
            other => panic!("{other}"),
        };
        let listed = match connected_udp_sockets() {
            Ok(listed) => listed,
            // Without socket diagnostics (not root, or no UDP diag) there
            // is nothing to test here.
            Err(error) => return eprintln!("skipped: {error}"),
        };
        let found = listed.iter().find(|s| s.local == local).expect("the socket is listed");
        assert_eq!(found.remote.to_string(), receiver.local_addr().unwrap().to_string());
        assert_ne!(found.cookie, 0);
        destroy(found).expect("destroyed");
        socket.set_read_timeout(Some(std::time::Duration::from_secs(1))).unwrap();
        let error = socket.recv(&mut [0u8; 16]).expect_err("aborted");
        assert_eq!(error.raw_os_error(), Some(libc::ECONNABORTED), "{error}");
    }
}
