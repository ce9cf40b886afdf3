//! The workloads, each a fixed number of clients for a fixed time against a
//! list of targets (taken in turn), with the machine's softirq and system
//! CPU over the run:
//!
//! - connection rate: connect, one request and response, close (netperf's
//!   TCP_CRR: every transaction is a new flow, so a dataplane that pays
//!   per rule pays it every time);
//! - request latency: persistent connections sent requests on a fixed
//!   schedule (open loop), each latency counted from the time it was due,
//!   not from when it was sent, so a stall is not hidden (no coordinated
//!   omission);
//! - UDP rate: request and response on one flow per client, closed loop.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::mpsc,
    time::{Duration, Instant},
};

use forwarder_tests::netns::NetNs;
use nix::{sched::CpuSet, unistd::Pid};
use serde_json::{Value, json};

/// Bytes of every request and response.
pub const MESSAGE: usize = 64;
/// Clients run on this CPU, servers on the other one, in every mode.
pub const CLIENT_CPU: usize = 0;
pub const SERVER_CPU: usize = 1;
const IO_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    ConnectionRate,
    RequestLatency,
    UdpRate,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Self::ConnectionRate => "connection_rate",
            Self::RequestLatency => "request_latency",
            Self::UdpRate => "udp_rate",
        }
    }

    pub fn protocol(self) -> Protocol {
        match self {
            Self::UdpRate => Protocol::Udp,
            _ => Protocol::Tcp,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// How hard and how long each workload runs.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub duration: Duration,
    /// Concurrent clients of the rate workloads.
    pub clients: usize,
    /// Persistent connections of the latency workload, and their total rate.
    pub connections: usize,
    pub requests_per_second: u32,
}

/// One run's outcome.
#[derive(Debug, Default)]
pub struct Measured {
    pub ok: u64,
    pub failed: u64,
    pub seconds: f64,
    /// Transactions (or requests) per second that succeeded.
    pub rate: f64,
    /// Of each transaction (rates) or request (latency), in microseconds.
    pub latencies_us: Vec<u32>,
    pub cpu: CpuUse,
}

impl Measured {
    pub fn json(&self) -> Value {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        json!({
            "ok": self.ok,
            "failed": self.failed,
            "seconds": self.seconds,
            "rate": self.rate,
            "p50_us": percentile(&sorted, 0.50),
            "p99_us": percentile(&sorted, 0.99),
            "p999_us": percentile(&sorted, 0.999),
            "softirq_pct": self.cpu.softirq_pct,
            "system_pct": self.cpu.system_pct,
            "kernel_cpu_us_per_op": self.cpu.kernel_us / self.ok.max(1) as f64,
        })
    }
}

fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    let rank = (sorted.len() as f64 * p).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

pub fn run(workload: Workload, ns: &NetNs, targets: &[SocketAddr], load: &Load) -> Measured {
    let cpu = CpuTimes::read();
    let started = Instant::now();
    let (ok, failed, latencies_us) = match workload {
        Workload::ConnectionRate => connection_clients(ns, load, targets),
        Workload::UdpRate => udp_clients(ns, load, targets),
        Workload::RequestLatency => open_loop(ns, load, targets),
    };
    let seconds = started.elapsed().as_secs_f64();
    Measured {
        ok,
        failed,
        seconds,
        rate: ok as f64 / seconds,
        latencies_us,
        cpu: CpuTimes::read().since(&cpu),
    }
}

type Tally = (u64, u64, Vec<u32>);

/// `load.clients` threads in `ns`, each doing the transaction `make` gives
/// it (made in the thread, so its sockets are the namespace's) until the
/// time is up.
fn clients<T: FnMut() -> std::io::Result<()>>(
    ns: &NetNs,
    load: &Load,
    make: impl Fn(usize) -> T + Sync,
) -> Tally {
    let deadline = Instant::now() + load.duration;
    let make = &make;
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..load.clients)
            .map(|client| {
                s.spawn(move || {
                    ns.enter();
                    pin_to_cpu(CLIENT_CPU);
                    let mut transact = make(client);
                    let (mut ok, mut failed, mut latencies) = (0, 0, Vec::new());
                    while Instant::now() < deadline {
                        let begun = Instant::now();
                        match transact() {
                            Ok(()) => {
                                ok += 1;
                                latencies.push(micros(begun.elapsed()));
                            }
                            Err(_) => failed += 1,
                        }
                    }
                    (ok, failed, latencies)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client thread")).collect()
    });
    merge(tallies)
}

fn merge(tallies: Vec<Tally>) -> Tally {
    tallies.into_iter().fold((0, 0, Vec::new()), |(ok, failed, mut all), (o, f, l)| {
        all.extend(l);
        (ok + o, failed + f, all)
    })
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// New connections to the targets in turn, each client from its own start.
fn connection_clients(ns: &NetNs, load: &Load, targets: &[SocketAddr]) -> Tally {
    clients(ns, load, |client| {
        let mut next = client;
        move || {
            next += 1;
            new_connection(targets[(next - 1) % targets.len()])
        }
    })
}

/// Connect, one request and its response, close (the client closes first).
fn new_connection(target: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(&[0x5a; MESSAGE])?;
    let mut buf = [0u8; MESSAGE];
    stream.read_exact(&mut buf)
}

/// One connected UDP socket per client, kept for the whole run: one flow.
fn udp_clients(ns: &NetNs, load: &Load, targets: &[SocketAddr]) -> Tally {
    clients(ns, load, |client| {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("UDP client socket");
        socket.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        socket.connect(targets[client % targets.len()]).expect("UDP connect");
        let mut buf = [0u8; MESSAGE];
        move || {
            socket.send(&[0x5a; MESSAGE])?;
            socket.recv(&mut buf).map(drop)
        }
    })
}

/// `load.connections` persistent connections, each with a sender on a
/// fixed schedule and a receiver that times every answer from the moment
/// its request was due.
fn open_loop(ns: &NetNs, load: &Load, targets: &[SocketAddr]) -> Tally {
    let per_connection = f64::from(load.requests_per_second) / load.connections as f64;
    let interval = Duration::from_secs_f64(1.0 / per_connection);
    let count = (load.duration.as_secs_f64() * per_connection) as u64;
    let streams: Vec<std::io::Result<TcpStream>> = ns.run(|| {
        (0..load.connections)
            .map(|c| TcpStream::connect_timeout(&targets[c % targets.len()], IO_TIMEOUT))
            .collect()
    });
    let start = Instant::now() + Duration::from_millis(20);
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let handles: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(c, stream)| {
                // Connections take turns: the requests are spread evenly.
                let first = start + interval.mul_f64(c as f64 / load.connections as f64);
                s.spawn(move || match stream {
                    Ok(stream) => scheduled(stream, first, interval, count),
                    Err(_) => (0, count, Vec::new()),
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("connection thread")).collect()
    });
    merge(tallies)
}

fn scheduled(stream: TcpStream, first: Instant, interval: Duration, count: u64) -> Tally {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let (due_tx, due_rx) = mpsc::channel::<Instant>();
    let mut writer = stream.try_clone().expect("stream clone");
    std::thread::scope(|s| {
        s.spawn(move || {
            pin_to_cpu(CLIENT_CPU);
            fine_timer_slack();
            for i in 0..count {
                let due = first + interval.mul_f64(i as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                // Announced before it is sent: the answer may come at once.
                if due_tx.send(due).is_err() || writer.write_all(&[0x5a; MESSAGE]).is_err() {
                    return;
                }
            }
        });
        pin_to_cpu(CLIENT_CPU);
        let mut reader = stream;
        let (mut ok, mut latencies) = (0, Vec::with_capacity(count as usize));
        let mut buf = [0u8; MESSAGE];
        for due in due_rx.iter() {
            if reader.read_exact(&mut buf).is_err() {
                break;
            }
            ok += 1;
            latencies.push(micros(due.elapsed()));
        }
        (ok, count - ok, latencies)
    })
}

/// Binds the calling thread to `cpu` (modulo the CPUs there are).
pub fn pin_to_cpu(cpu: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mut set = CpuSet::new();
    if set.set(cpu % cpus).is_ok() {
        let _ = nix::sched::sched_setaffinity(Pid::from_raw(0), &set);
    }
}

/// Sleeps end within a microsecond of their time, not the default 50.
fn fine_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and only
    // affects the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}

/// The machine's CPU over a run, from `/proc/stat`.
#[derive(Debug, Default)]
pub struct CpuUse {
    /// Shares of all CPUs' time.
    pub softirq_pct: f64,
    pub system_pct: f64,
    /// System, interrupt and softirq time, in microseconds.
    pub kernel_us: f64,
}

struct CpuTimes {
    system: u64,
    irq: u64,
    softirq: u64,
    total: u64,
}

impl CpuTimes {
    fn read() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let field = |i: usize| fields.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal
        Self { system: field(2), irq: field(5), softirq: field(6), total: (0..8).map(field).sum() }
    }

    fn since(&self, before: &Self) -> CpuUse {
        let total = (self.total - before.total).max(1) as f64;
        // SAFETY: sysconf has no preconditions.
        let tick_us = 1e6 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let (system, softirq) = (self.system - before.system, self.softirq - before.softirq);
        CpuUse {
            softirq_pct: softirq as f64 / total * 100.0,
            system_pct: system as f64 / total * 100.0,
            kernel_us: (system + softirq + self.irq - before.irq) as f64 * tick_us,
        }
    }
}
