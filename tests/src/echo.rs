//! A tiny TCP/UDP server that answers every request with its pod's name
//! and the client address it sees (`pod-a 192.168.10.100:40000`).
use std::{
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::NetNs;

pub const TCP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 5353;

/// Serves TCP (a line per request) and UDP (a datagram per request) until dropped.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &NetNs, name: &str) -> Self {
        let (tcp, udp) = ns.run(|| {
            let tcp = TcpListener::bind(("0.0.0.0", TCP_PORT)).expect("bind echo TCP");
            let udp = UdpSocket::bind(("0.0.0.0", UDP_PORT)).expect("bind echo UDP");
            (tcp, udp)
        });
        let stop = Arc::new(AtomicBool::new(false));
        let threads = vec![
            spawn_tcp(tcp, name.to_owned(), stop.clone()),
            spawn_udp(udp, name.to_owned(), stop.clone()),
        ];
        Self { stop, threads }
    }
}

fn spawn_tcp(listener: TcpListener, name: String, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    listener.set_nonblocking(true).expect("nonblocking listener");
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let (reply, stop) = (format!("{name} {peer}\n"), stop.clone());
                    std::thread::spawn(move || serve_connection(stream, &reply, &stop));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
    })
}

fn serve_connection(stream: TcpStream, reply: &str, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer.write_all(reply.as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

fn spawn_udp(socket: UdpSocket, name: String, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    socket.set_read_timeout(Some(Duration::from_millis(100))).expect("UDP timeout");
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                let answer = format!("{name} {peer}\n");
                // A large request is answered as large, carrying its bytes
                // back after the answer line (see `udp_large`).
                let reply = if n > answer.len() {
                    buf[..answer.len()].copy_from_slice(answer.as_bytes());
                    &buf[..n]
                } else {
                    answer.as_bytes()
                };
                let _ = socket.send_to(reply, peer);
            }
        }
    })
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A persistent TCP client: one request line, one answer line.
pub struct EchoConn {
    reader: BufReader<TcpStream>,
}

impl EchoConn {
    pub fn connect(ns: &NetNs, addr: &str) -> std::io::Result<Self> {
        let addr: std::net::SocketAddr = addr.parse().expect("socket address");
        let stream = ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(Self { reader: BufReader::new(stream) })
    }

    /// As `connect`, from the fixed local `port` (SO_REUSEADDR, so several
    /// connections to different peers may share it, as clients behind a
    /// NAT or with a small port range do).
    pub fn connect_from(ns: &NetNs, port: u16, addr: &str) -> std::io::Result<Self> {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket,
            sockopt::ReuseAddr,
        };
        let peer: std::net::SocketAddrV4 = addr.parse().expect("IPv4 socket address");
        let fd =
            ns.run(|| socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None))?;
        setsockopt(&fd, ReuseAddr, &true)?;
        let local = std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port);
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(local))?;
        let stream = TcpStream::from(fd);
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        // Blocking connect: a SYN that gets no answer fails after the
        // kernel's retries; the tests want an answer well before.
        connect(std::os::fd::AsRawFd::as_raw_fd(&stream), &SockaddrIn::from(peer))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(Self { reader: BufReader::new(stream) })
    }

    /// The peer address the socket reports (getpeername).
    pub fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.reader.get_ref().peer_addr()
    }

    /// The name of the pod that answered.
    pub fn ask(&mut self) -> std::io::Result<String> {
        Ok(self.ask_seen()?.0)
    }

    /// The pod that answered and the client address it saw.
    pub fn ask_seen(&mut self) -> std::io::Result<(String, String)> {
        self.reader.get_mut().write_all(b"who\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        Ok(split_answer(&line))
    }
}

fn split_answer(line: &str) -> (String, String) {
    let mut words = line.split_whitespace();
    let name = words.next().unwrap_or_default().to_owned();
    (name, words.next().unwrap_or_default().to_owned())
}

/// One TCP request on a new connection: the pod that answered.
pub fn tcp_once(ns: &NetNs, addr: &str) -> std::io::Result<String> {
    let mut conn = EchoConn::connect(ns, addr)?;
    conn.ask()
}

/// Sends a request line of `size` bytes over a new connection and waits
/// for its answer: the pod that answered, or an error if the bytes do not
/// all get through within `within` (a path MTU black hole stalls them).
pub fn tcp_upload(
    ns: &NetNs,
    addr: &str,
    size: usize,
    within: Duration,
) -> std::io::Result<String> {
    let mut conn = EchoConn::connect(ns, addr)?;
    let stream = conn.reader.get_mut();
    stream.set_write_timeout(Some(within))?;
    stream.set_read_timeout(Some(within))?;
    let mut request = vec![b'x'; size.saturating_sub(1)];
    request.push(b'\n');
    stream.write_all(&request)?;
    let mut line = String::new();
    if conn.reader.read_line(&mut line)? == 0 {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    Ok(split_answer(&line).0)
}

/// One TCP request: the pod that answered and the client address it saw
/// (the address after masquerading, if any).
pub fn tcp_once_seen(ns: &NetNs, addr: &str) -> std::io::Result<(String, String)> {
    let mut conn = EchoConn::connect(ns, addr)?;
    conn.ask_seen()
}

/// A UDP client on one fixed source port: one flow, as a DNS resolver's.
pub struct UdpClient {
    socket: UdpSocket,
}

impl UdpClient {
    pub fn bind(ns: &NetNs) -> std::io::Result<Self> {
        let socket = ns.run(|| UdpSocket::bind("0.0.0.0:0"))?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok(Self { socket })
    }

    /// One request; who answered and the source address of the reply (the
    /// socket is not connected, so a reply from any address arrives).
    pub fn ask(&self, addr: &str) -> std::io::Result<(String, std::net::SocketAddr)> {
        self.socket.send_to(b"who", addr)?;
        let mut buf = [0u8; 256];
        let (n, from) = self.socket.recv_from(&mut buf)?;
        Ok((split_answer(&String::from_utf8_lossy(&buf[..n])).0, from))
    }
}

/// One UDP request from a new source port.
pub fn udp_once(ns: &NetNs, addr: &str) -> std::io::Result<(String, std::net::SocketAddr)> {
    UdpClient::bind(ns)?.ask(addr)
}

/// One UDP datagram of `size` bytes from a new source port, answered by one
/// of the same size: both cross the path in IP fragments when larger than
/// the MTU. Who answered and the reply's source; an error unless the reply
/// brought every byte of the request after its answer line back.
pub fn udp_large(
    ns: &NetNs,
    addr: &str,
    size: usize,
) -> std::io::Result<(String, std::net::SocketAddr)> {
    let socket = ns.run(|| UdpSocket::bind("0.0.0.0:0"))?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    let request: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    socket.send_to(&request, addr)?;
    let mut buf = vec![0u8; 65_536];
    let (n, from) = socket.recv_from(&mut buf)?;
    let reply = &buf[..n];
    let line_end = reply.iter().position(|&b| b == b'\n').map_or(n, |at| at + 1);
    if n != size || reply[line_end..] != request[line_end..] {
        let error = format!("{size}-byte datagram came back as {n} bytes, or altered");
        return Err(std::io::Error::new(ErrorKind::InvalidData, error));
    }
    Ok((split_answer(&String::from_utf8_lossy(&reply[..line_end])).0, from))
}

/// How a connection attempt ended, and how long it took.
pub fn tcp_connect_error(ns: &NetNs, addr: &str) -> (std::io::ErrorKind, Duration) {
    let addr: std::net::SocketAddr = addr.parse().expect("socket address");
    let started = std::time::Instant::now();
    let result = ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(3)));
    let kind = result.err().map_or(ErrorKind::Other, |e| e.kind());
    (kind, started.elapsed())
}

/// One UDP request on a connected socket: who answered, and the source of
/// the reply as `recvfrom` reports it.
pub fn udp_once_connected(
    ns: &NetNs,
    addr: &str,
) -> std::io::Result<(String, std::net::SocketAddr)> {
    let socket = ns.run(|| UdpSocket::bind("0.0.0.0:0"))?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    ns.run(|| socket.connect(addr))?;
    socket.send(b"who")?;
    let mut buf = [0u8; 256];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok((split_answer(&String::from_utf8_lossy(&buf[..n])).0, from))
}

/// A UDP request on a connected socket, which reports ICMP errors.
pub fn udp_connected_error(ns: &NetNs, addr: &str) -> Option<std::io::ErrorKind> {
    let socket = ns.run(|| UdpSocket::bind("0.0.0.0:0")).ok()?;
    socket.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    socket.connect(addr).ok()?;
    socket.send(b"who").ok()?;
    let mut buf = [0u8; 64];
    socket.recv(&mut buf).err().map(|e| e.kind())
}

/// Runs `during` while new connections to `frontend` go on in the
/// background, `pause` apart; returns how many were tried and the errors of
/// those that failed.
pub fn under_traffic(
    client: &NetNs,
    frontend: &str,
    pause: Duration,
    during: impl FnOnce(),
) -> (usize, Vec<String>) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let (mut sent, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                sent += 1;
                if let Err(error) = tcp_once(client, frontend) {
                    failures.push(error.to_string());
                }
                std::thread::sleep(pause);
            }
            (sent, failures)
        });
        // Stops the traffic also when `during` panics: the scope would
        // otherwise wait for it forever.
        let stopping = StopOnDrop(&stop);
        during();
        drop(stopping);
        traffic.join().expect("traffic thread")
    })
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
