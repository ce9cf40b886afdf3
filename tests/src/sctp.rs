//! The echo service over SCTP (one-to-one style sockets, which std lacks):
//! each request is answered with the pod's name and the client address it
//! sees, as the TCP and UDP echo do.
use std::{
    fs::File,
    io::{ErrorKind, Read, Write},
    net::SocketAddrV4,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use nix::sys::{
    socket::{
        AddressFamily, Backlog, SockFlag, SockProtocol, SockType, SockaddrIn, accept, bind,
        connect, getpeername, listen, setsockopt, socket,
        sockopt::{ReceiveTimeout, SendTimeout},
    },
    time::TimeVal,
};

use crate::netns::NetNs;

pub const SCTP_PORT: u16 = 3868;

fn sctp_socket(timeout: Duration) -> std::io::Result<OwnedFd> {
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::empty(), SockProtocol::Sctp)?;
    let timeout = TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
    setsockopt(&fd, ReceiveTimeout, &timeout)?;
    setsockopt(&fd, SendTimeout, &timeout)?;
    Ok(fd)
}

/// Whether this kernel has SCTP sockets (CONFIG_IP_SCTP); many container
/// and CI kernels do not.
pub fn available() -> bool {
    !matches!(sctp_socket(Duration::from_secs(1)), Err(e) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT))
}

/// Serves SCTP on `SCTP_PORT` in `ns` until dropped.
pub struct SctpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SctpEcho {
    pub fn start(ns: &NetNs, name: &str) -> std::io::Result<Self> {
        let listener = ns.run(|| -> std::io::Result<OwnedFd> {
            let fd = sctp_socket(Duration::from_millis(100))?;
            bind(fd.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, SCTP_PORT))?;
            listen(&fd, Backlog::new(64).expect("backlog"))?;
            Ok(fd)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let (name, flag) = (name.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                // Times out every 100 ms (the socket's receive timeout).
                let Ok(fd) = accept(listener.as_raw_fd()) else { continue };
                // SAFETY: accept returned a new descriptor that nothing else owns.
                let conn = unsafe { OwnedFd::from_raw_fd(fd) };
                let peer = getpeername::<SockaddrIn>(conn.as_raw_fd())
                    .map_or_else(|_| "?".into(), |a| SocketAddrV4::from(a).to_string());
                let (reply, stop) = (format!("{name} {peer}\n"), flag.clone());
                std::thread::spawn(move || serve(File::from(conn), &reply, &stop));
            }
        });
        Ok(Self { stop, thread: Some(thread) })
    }
}

fn serve(mut conn: File, reply: &str, stop: &AtomicBool) {
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {
                if conn.write_all(reply.as_bytes()).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Drop for SctpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One request on a new association: the pod that answered and the client
/// address it saw.
pub fn sctp_once(ns: &NetNs, addr: &str) -> std::io::Result<(String, String)> {
    let addr: SocketAddrV4 = addr.parse().expect("IPv4 socket address");
    let mut conn = ns.run(|| -> std::io::Result<File> {
        let fd = sctp_socket(Duration::from_secs(2))?;
        connect(fd.as_raw_fd(), &SockaddrIn::from(addr))?;
        Ok(File::from(fd))
    })?;
    conn.write_all(b"who\n")?;
    let mut buf = [0u8; 256];
    let n = conn.read(&mut buf)?;
    let answer = String::from_utf8_lossy(&buf[..n]);
    let mut words = answer.split_whitespace();
    let name = words.next().ok_or(ErrorKind::UnexpectedEof)?.to_owned();
    Ok((name, words.next().unwrap_or_default().to_owned()))
}
