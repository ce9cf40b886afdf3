//! The pods' server: echoes fixed-size requests over TCP (any number per
//! connection) and UDP. Blocking sockets and a fixed pool of threads, so
//! no thread is spawned per connection and the server costs the same
//! under every mode.
use std::{
    io::{IoSlice, IoSliceMut, Read as _, Write as _},
    net::{TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use forwarder_tests::netns::NetNs;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, sendmsg, setsockopt,
    sockopt,
};

use crate::workloads::{MESSAGE, pin_to_cpu};

pub const TCP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 5353;
/// Each serves one connection at a time: enough for every concurrent
/// client of a workload to be served at once.
const TCP_THREADS: usize = 16;
const UDP_THREADS: usize = 2;

pub struct Server {
    stop: Arc<AtomicBool>,
    listener: TcpListener,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Serves in `ns` on every address the pod holds, its threads on `cpu`.
    pub fn start(ns: &NetNs, cpu: usize) -> Self {
        let (listener, udp) = ns.run(|| {
            let tcp = TcpListener::bind(("0.0.0.0", TCP_PORT)).expect("bind TCP");
            let udp = UdpSocket::bind(("0.0.0.0", UDP_PORT)).expect("bind UDP");
            (tcp, udp)
        });
        udp.set_read_timeout(Some(Duration::from_millis(100))).expect("UDP timeout");
        setsockopt(&udp, sockopt::Ipv4PacketInfo, &true).expect("IP_PKTINFO");
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for _ in 0..TCP_THREADS {
            let (listener, stop) = (listener.try_clone().expect("listener"), stop.clone());
            threads.push(std::thread::spawn(move || {
                pin_to_cpu(cpu);
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => echo_tcp(stream),
                        // Woken by the shutdown in `drop`, or a transient error.
                        Err(_) => continue,
                    }
                }
            }));
        }
        for _ in 0..UDP_THREADS {
            let (udp, stop) = (udp.try_clone().expect("UDP socket"), stop.clone());
            threads.push(std::thread::spawn(move || {
                pin_to_cpu(cpu);
                while !stop.load(Ordering::Relaxed) {
                    echo_udp(&udp);
                }
            }));
        }
        Self { stop, listener, threads }
    }
}

/// Answers each request until the client closes.
fn echo_tcp(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    // A client that vanished must not hold a thread for long.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; MESSAGE];
    while stream.read_exact(&mut buf).is_ok() {
        if stream.write_all(&buf).is_err() {
            return;
        }
    }
}

/// Answers one datagram from the address it was sent to: the pod holds a
/// whole block of endpoint addresses, and a reply from any other one would
/// not be the client's flow.
fn echo_udp(udp: &UdpSocket) {
    let mut buf = [0u8; 2048];
    let mut control = nix::cmsg_space!(libc::in_pktinfo);
    let (len, peer, to) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let Ok(msg) =
            recvmsg::<SockaddrIn>(udp.as_raw_fd(), &mut iov, Some(&mut control), MsgFlags::empty())
        else {
            return;
        };
        let to = msg.cmsgs().ok().and_then(|mut cmsgs| {
            cmsgs.find_map(|c| match c {
                ControlMessageOwned::Ipv4PacketInfo(info) => Some(info.ipi_addr),
                _ => None,
            })
        });
        (msg.bytes, msg.address, to)
    };
    let (Some(peer), Some(to)) = (peer, to) else { return };
    // SAFETY: in_pktinfo is plain data; all zeros is a valid value.
    let mut info: libc::in_pktinfo = unsafe { std::mem::zeroed() };
    info.ipi_spec_dst = to;
    let _ = sendmsg(
        udp.as_raw_fd(),
        &[IoSlice::new(&buf[..len])],
        &[ControlMessage::Ipv4PacketInfo(&info)],
        MsgFlags::empty(),
        Some(&peer),
    );
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes every thread blocked in accept().
        // SAFETY: the descriptor is the listener's own and still open.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
