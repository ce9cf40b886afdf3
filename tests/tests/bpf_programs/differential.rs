//! Randomized differential test: random and mutated packets (truncated,
//! odd flags, bad headers, IP options, fragments in any order, ICMP errors
//! quoting random flows) through the ingress programs and, for replies and
//! errors about known flows, the egress program, each outcome checked
//! against a plain-Rust model of what the datapath must do:
//!
//! - a packet to a frontend comes out translated to its backend (bytes
//!   exact but for a source port a clash may move; checksums from scratch),
//!   rejected, or dropped; never passed with the frontend address;
//! - anything else comes out unchanged;
//! - every drop is counted, by exactly one counter.
//!
//! Brief by default; `FORWARDER_DIFFERENTIAL_PACKETS` sets the count
//! (`cargo xtask bench` runs millions), `FORWARDER_DIFFERENTIAL_SEED` the
//! seed (printed; the node's hash seed still differs per run), and
//! `FORWARDER_DIFFERENTIAL_TRACE` prints every Service flow's packets.
#[allow(clippy::wildcard_imports, reason = "the shared test vocabulary")]
use crate::harness::*;
use forwarder_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use forwarder_tests::packet::icmp_error;
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// xorshift64*: reproducible from the seed printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }
}

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 10, 1);
const CIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_CIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);

/// The frontends of `default_services`: (address, port, protocol) ->
/// backend port (all on `BACKEND`).
fn backend_port(dst: Ipv4Addr, dport: u16, proto: u8) -> Option<u16> {
    match (dst, dport, proto) {
        (NODE, 30080, PROTO_TCP) | (CIP, 80, PROTO_TCP) => Some(8080),
        (NODE, 30080, PROTO_UDP) | (CIP, 53, PROTO_UDP) => Some(5353),
        _ => None,
    }
}

fn is_cluster_ip(addr: Ipv4Addr) -> bool {
    addr == CIP || addr == EMPTY_CIP
}

/// The header fields the model reads, parsed independently of the datapath.
#[derive(Clone, Copy, Debug)]
enum View {
    /// Not IPv4 TCP/UDP/SCTP with complete headers: passes untouched.
    Opaque,
    Flow {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        sport: u16,
        dport: u16,
        proto: u8,
        options: bool,
        first_fragment: bool,
        id: u16,
    },
    LaterFragment {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: u8,
        id: u16,
    },
    /// A first fragment cut inside its L4 header: dropped (RFC 1858).
    TinyFragment,
}

fn view(frame: &[u8]) -> View {
    let Some(ip) = frame.get(14..) else { return View::Opaque };
    if frame[12..14] != [8, 0] || ip.len() < 20 || ip[0] >> 4 != 4 {
        return View::Opaque;
    }
    let ihl = usize::from(ip[0] & 15) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let (frag, proto) = (u16::from_be_bytes([ip[6], ip[7]]), ip[9]);
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let id = u16::from_be_bytes([ip[4], ip[5]]);
    if ihl < 20 || total < ihl || ![PROTO_TCP, PROTO_UDP, PROTO_SCTP].contains(&proto) {
        return View::Opaque;
    }
    if frag & 0x1fff != 0 {
        return View::LaterFragment { src, dst, proto, id };
    }
    let header = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => 12,
    };
    if total < ihl + header && frag & 0x2000 != 0 {
        return View::TinyFragment;
    }
    if total < ihl + header || ip.len() < ihl + header {
        return View::Opaque;
    }
    let l4 = &ip[ihl..];
    View::Flow {
        src,
        dst,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        proto,
        options: ihl > 20,
        first_fragment: frag & 0x2000 != 0,
        id,
    }
}

type FlowKey = (Ipv4Addr, u16, Ipv4Addr, u16, u8);
/// A datagram: source, destination, protocol, IP id.
type FragKey = (Ipv4Addr, Ipv4Addr, u8, u16);

/// First fragments after which an earlier one's entry is surely still in
/// the fragment map (a quarter of its size: LRU eviction is per CPU list).
const FRAGMENTS_SURELY_KEPT: usize = forwarder_common::FRAGMENTS_MAX as usize / 4;

#[derive(Default)]
struct Model {
    /// Destination-side first fragments: their new address (None: left
    /// alone), and how many first fragments had been remembered before.
    fragments: HashMap<FragKey, (Option<Ipv4Addr>, usize)>,
    /// First fragments remembered so far.
    first_fragments: usize,
    /// Service flows seen: the source port each has after DNAT, and when
    /// its last packet went (the datapath's clock is real time: a flow
    /// closed more than the close timeout ago gives its tuple up).
    flows: HashMap<FlowKey, (u16, Instant)>,
    /// The flows by their tuple after DNAT (client, source port after
    /// DNAT, protocol, backend port), so a clash is found without a scan.
    holders: HashMap<(Ipv4Addr, u16, u8, Option<u16>), Vec<FlowKey>>,
    /// Flows in the order of their packets, for picking recent ones.
    recent: Vec<FlowKey>,
}

impl Model {
    fn holder_key(key: FlowKey, new_sport: u16) -> (Ipv4Addr, u16, u8, Option<u16>) {
        let (src, _, dst, dport, proto) = key;
        (src, new_sport, proto, backend_port(dst, dport, proto))
    }

    /// Records a Service flow's packet and its source port after DNAT.
    fn record(&mut self, key: FlowKey, new_sport: u16) {
        if let Some((old, _)) = self.flows.insert(key, (new_sport, Instant::now()))
            && let Some(holders) = self.holders.get_mut(&Self::holder_key(key, old))
        {
            holders.retain(|k| *k != key);
        }
        self.holders.entry(Self::holder_key(key, new_sport)).or_default().push(key);
        self.recent.push(key);
    }

    /// Whether another flow holds this one's tuple after DNAT: from the
    /// same client address, to the same backend, with this one's source
    /// port after its own DNAT (its own, or one a clash moved it to). The
    /// second flow's source port may then be moved.
    fn may_clash(&self, key: FlowKey) -> bool {
        let (_, sport, ..) = key;
        self.holders
            .get(&Self::holder_key(key, sport))
            .is_some_and(|holders| holders.iter().any(|k| *k != key))
    }
}

fn counters(harness: &Harness) -> HashMap<&'static str, u64> {
    harness.stats().into_iter().collect()
}

/// Which counters moved between two readings.
fn moved(
    before: &HashMap<&str, u64>,
    after: &HashMap<&'static str, u64>,
) -> Vec<(&'static str, u64)> {
    let mut moved: Vec<_> = after
        .iter()
        .filter_map(|(name, n)| {
            let was = before.get(name).copied().unwrap_or(0);
            (*n != was).then_some((*name, n - was))
        })
        .collect();
    moved.sort();
    moved
}

/// A random packet, from a small set of clients and ports (so flows recur
/// and clash), to frontends and everything around them.
fn random_packet(rng: &mut Rng, from_pod: bool) -> Packet {
    let proto = rng.pick(&[PROTO_TCP, PROTO_TCP, PROTO_UDP, PROTO_UDP, PROTO_SCTP]);
    let dst = match rng.below(8) {
        0 | 1 => (NODE, 30080),
        2 => (CIP, 80),
        3 => (CIP, 53),
        4 => (CIP, rng.below(65536) as u16),
        5 => (EMPTY_CIP, rng.pick(&[80, 81])),
        6 => (NODE, rng.pick(&[22, 30081, 61000])),
        _ => (Ipv4Addr::from(rng.next() as u32), rng.below(65536) as u16),
    };
    let src = if from_pod {
        Ipv4Addr::new(10, 244, 1, 9)
    } else {
        rng.pick(&[Ipv4Addr::new(192, 168, 10, 2), Ipv4Addr::new(192, 168, 10, 3)])
    };
    let any = rng.next();
    let sport = rng.pick(&[40000, 40001, 1024, any as u16]);
    let mut packet = Packet::tcp(&format!("{src}:{sport}"), &format!("{}:{}", dst.0, dst.1));
    packet.proto = proto;
    packet.tcp_flags = rng.pick(&[SYN, ACK, 0x18, FIN | ACK, RST, (any >> 16) as u8]);
    packet.sctp_chunk = rng.pick(&[0, 1, 6, (any >> 24) as u8]);
    packet.payload = (0..rng.below(48)).map(|_| rng.next() as u8).collect();
    packet.ip_id = rng.pick(&[0x1234, 0x1235, (any >> 32) as u16]);
    if rng.percent(8) {
        packet.ip_options = vec![0x94, 0x04, 0, 0];
    }
    packet.frag = match rng.below(10) {
        0 => 0x2000,
        1 => rng.pick(&[0x2000, 0]) | (1 + rng.below(8) as u16),
        _ => 0,
    };
    packet
}

/// Mutations a wire delivers: cut short (to no less than `min_len`), odd
/// header fields.
fn mutate(rng: &mut Rng, mut frame: Vec<u8>, min_len: usize) -> Vec<u8> {
    match rng.below(12) {
        0 => frame.truncate(min_len + rng.below(frame.len() - min_len)),
        1 => frame[14] = 0x40 | rng.below(16) as u8,
        2 => {
            let total = rng.below(80) as u16;
            frame[16..18].copy_from_slice(&total.to_be_bytes());
        }
        3 => frame[14] = (rng.below(16) as u8) << 4 | (frame[14] & 15),
        _ => {}
    }
    frame
}

/// Runs the destination-side program on `frame` and checks the outcome.
fn check_ingress(harness: &Harness, model: &mut Model, prog: Prog, frame: &[u8], what: &str) {
    let before = counters(harness);
    let (verdict, out) = harness.run(prog, frame);
    let moved = moved(&before, &counters(harness));
    let drops: u64 = moved.iter().filter(|(n, _)| n.starts_with("drop_")).map(|(_, n)| n).sum();
    let (pass, drop) = match prog {
        Prog::Xdp => (XDP_PASS, XDP_DROP),
        _ => (TC_ACT_OK, TC_ACT_SHOT),
    };
    let context = || {
        format!(
            "{what} {prog:?}\n in:  {frame:02x?}\n out: {out:02x?}\n verdict {verdict}, counters {moved:?}"
        )
    };
    if verdict == drop {
        assert_eq!(drops, 1, "a drop is counted once: {}", context());
    } else {
        assert_eq!(drops, 0, "no drop counted on a {verdict}: {}", context());
    }
    match view(frame) {
        View::Opaque => {
            assert_eq!((verdict, &out[..]), (pass, frame), "untouched: {}", context());
        }
        View::TinyFragment => assert_eq!(verdict, drop, "a tiny fragment: {}", context()),
        View::LaterFragment { src, dst, proto, id } => {
            // The fragment map is an LRU: a datagram whose first fragment
            // came thousands of datagrams ago may have left it (a real
            // datagram's fragments come within milliseconds of each other).
            let entry = model.fragments.get(&(src, dst, proto, id)).copied();
            let fresh = |seq: usize| model.first_fragments - seq < FRAGMENTS_SURELY_KEPT;
            let unknown = || {
                if is_cluster_ip(dst) {
                    verdict == drop
                } else {
                    verdict == pass && out[..] == frame[..]
                }
            };
            match entry.filter(|(_, seq)| fresh(*seq) || !unknown()).map(|(addr, _)| addr) {
                Some(Some(addr)) => {
                    let mut expected = frame.to_vec();
                    expected[30..34].copy_from_slice(&addr.octets());
                    readdress_ip_checksum(&mut expected, frame);
                    assert_eq!((verdict, &out), (pass, &expected), "later fragment: {}", context());
                }
                Some(None) => assert_eq!((verdict, &out[..]), (pass, frame), "{}", context()),
                None if is_cluster_ip(dst) => assert_eq!(verdict, drop, "{}", context()),
                None => assert_eq!((verdict, &out[..]), (pass, frame), "{}", context()),
            }
        }
        View::Flow { src, dst, sport, dport, proto, options, first_fragment, id, .. } => {
            let key = (src, sport, dst, dport, proto);
            let remember = |model: &mut Model, addr| {
                if first_fragment {
                    model.fragments.insert((src, dst, proto, id), (addr, model.first_fragments));
                    model.first_fragments += 1;
                }
            };
            if let Some(port) = backend_port(dst, dport, proto) {
                assert_eq!(verdict, pass, "a frontend's packet is translated: {}", context());
                let mut expected = frame.to_vec();
                let l4 = 14 + usize::from(frame[14] & 15) * 4;
                expected[30..34].copy_from_slice(&BACKEND.octets());
                expected[l4 + 2..l4 + 4].copy_from_slice(&port.to_be_bytes());
                let new_sport = u16::from_be_bytes([out[l4], out[l4 + 1]]);
                if new_sport != sport {
                    assert!(
                        model.may_clash(key) && new_sport >= 1024,
                        "port moved without a clash: {}",
                        context()
                    );
                    expected[l4..l4 + 2].copy_from_slice(&new_sport.to_be_bytes());
                }
                assert_eq!(
                    strip_checksums(&out, l4, proto),
                    strip_checksums(&expected, l4, proto),
                    "{}",
                    context()
                );
                let complete =
                    out.len() - 14 == usize::from(u16::from_be_bytes([out[16], out[17]]));
                if complete && !first_fragment {
                    verify_checksums(&out).unwrap_or_else(|e| panic!("{e}: {}", context()));
                }
                if std::env::var_os("FORWARDER_DIFFERENTIAL_TRACE").is_some() {
                    eprintln!(
                        "TRACE {key:?} -> {new_sport} flags {:02x} {what}",
                        frame.get(l4 + 13).copied().unwrap_or(0)
                    );
                }
                model.record(key, new_sport);
                remember(model, Some(BACKEND));
            } else if is_cluster_ip(dst) {
                // No endpoints, or a port no Service declares: rejected
                // (XDP hands it to TC), or dropped when over the rate or
                // unquotable.
                let rejected = moved.iter().any(|(n, _)| n.starts_with("reject_"));
                let handed =
                    matches!(prog, Prog::Xdp) && verdict == pass && out.len() == frame.len() + 4;
                assert!(rejected || handed || verdict == drop, "rejected: {}", context());
                if options {
                    assert_eq!(verdict, drop, "an unquotable reject is dropped: {}", context());
                }
            } else {
                assert_eq!(
                    (verdict, &out[..]),
                    (pass, frame),
                    "not a Service packet: {}",
                    context()
                );
                remember(model, None);
            }
        }
    }
}

/// The frame with the IP header checksum and the L4 checksum zeroed, to
/// compare the rest exactly (checksums are verified from scratch apart).
fn strip_checksums(frame: &[u8], l4: usize, proto: u8) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[24..26].copy_from_slice(&[0, 0]);
    let at = l4
        + match proto {
            PROTO_TCP => 16,
            PROTO_UDP => 6,
            _ => 8,
        };
    for byte in frame.iter_mut().skip(at).take(if proto == PROTO_SCTP { 4 } else { 2 }) {
        *byte = 0;
    }
    frame
}

/// The IP header checksum of `frame`, readdressed from `original`: from
/// scratch when the original's was right, else moved by the same
/// difference (a wrong checksum stays wrong, as the receiver must see it).
fn readdress_ip_checksum(frame: &mut [u8], original: &[u8]) {
    let ihl = usize::from(frame[14] & 15) * 4;
    let valid = original.len() >= 14 + ihl
        && forwarder_common::csum::compute(&original[14..14 + ihl], 0) == 0;
    if valid {
        frame[24..26].copy_from_slice(&[0, 0]);
        let check = forwarder_common::csum::compute(&frame[14..14 + ihl], 0);
        frame[24..26].copy_from_slice(&check.to_be_bytes());
    } else {
        let word = |f: &[u8]| u32::from_ne_bytes([f[30], f[31], f[32], f[33]]);
        let old = u16::from_ne_bytes([frame[24], frame[25]]);
        let new = forwarder_common::csum::replace4(old, word(original), word(frame));
        frame[24..26].copy_from_slice(&new.to_ne_bytes());
    }
}

/// Replies and ICMP errors about the flows the model knows, through the
/// egress program: exact bytes from scratch.
fn check_egress(harness: &Harness, model: &Model, rng: &mut Rng) {
    // One of the latest flows, recent enough that it cannot have expired
    // (the shortest timeout is the close timeout's 10 s).
    let latest = &model.recent[model.recent.len().saturating_sub(256)..];
    if latest.is_empty() {
        return;
    }
    let key = rng.pick(latest);
    let Some(&(new_sport, seen)) = model.flows.get(&key) else { return };
    if seen.elapsed() >= Duration::from_secs(5) {
        return;
    }
    let (client, sport, frontend, fport, proto) = key;
    let port = backend_port(frontend, fport, proto).unwrap();
    let make = |src: String, dst: String| {
        let mut p = Packet::tcp(&src, &dst);
        p.proto = proto;
        p
    };
    let reply = make(format!("{BACKEND}:{port}"), format!("{client}:{new_sport}"));
    let restored = make(format!("{frontend}:{fport}"), format!("{client}:{sport}"));
    let what = format!("reply {reply:?}");
    let (verdict, out) = harness.run(Prog::TcEgress, &reply.bytes());
    assert_eq!((verdict, out), (TC_ACT_OK, restored.bytes()), "{what}");

    let request = make(format!("{client}:{new_sport}"), format!("{BACKEND}:{port}"));
    let sent = make(format!("{client}:{sport}"), format!("{frontend}:{fport}"));
    let error =
        rng.pick(&[(3, 3, [0; 4]), (3, 4, [0, 0, 5, 0]), (11, 0, [0; 4]), (12, 0, [4, 0, 0, 0])]);
    let quoted = rng.pick(&[8, 548]);
    let input =
        icmp_error(error, &BACKEND.to_string(), &client.to_string(), &request.bytes(), quoted);
    let expected =
        icmp_error(error, &frontend.to_string(), &client.to_string(), &sent.bytes(), quoted);
    let (verdict, out) = harness.run(Prog::TcEgress, &input);
    assert_eq!((verdict, out), (TC_ACT_OK, expected), "ICMP error about {request:?}");

    // The other way: the client (or a router before it) errs about a reply
    // as it saw it; the ingress program it arrives by restores the backend.
    let ingress = if client.octets()[..2] == [10, 244] { Prog::Tc } else { Prog::Xdp };
    let pass = if matches!(ingress, Prog::Xdp) { XDP_PASS } else { TC_ACT_OK };
    let input =
        icmp_error(error, &client.to_string(), &frontend.to_string(), &restored.bytes(), quoted);
    let expected =
        icmp_error(error, &client.to_string(), &BACKEND.to_string(), &reply.bytes(), quoted);
    let (verdict, out) = harness.run(ingress, &input);
    assert_eq!((verdict, out), (pass, expected), "ICMP error about {restored:?}");

    // An error about a flow nobody has passes untouched.
    let mut stranger = restored.clone();
    stranger.dport = stranger.dport.wrapping_add(1 + rng.below(1000) as u16);
    let input =
        icmp_error(error, &client.to_string(), &frontend.to_string(), &stranger.bytes(), quoted);
    let unknown = !model.flows.contains_key(&(client, stranger.dport, frontend, fport, proto));
    if unknown {
        assert_eq!(
            harness.run(ingress, &input),
            (pass, input.clone()),
            "ICMP error about {stranger:?}"
        );
    }
}

#[test]
fn random_packets_match_the_model() {
    let count: usize = std::env::var("FORWARDER_DIFFERENTIAL_PACKETS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let seed = std::env::var("FORWARDER_DIFFERENTIAL_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            now.map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("differential: {count} packets, seed {seed} (FORWARDER_DIFFERENTIAL_SEED)");
    let mut rng = Rng(seed.max(1));
    let harness = Harness::new();
    let mut model = Model::default();
    for i in 0..count {
        let from_pod = rng.percent(30);
        let packet = random_packet(&mut rng, from_pod);
        let prog = if from_pod { Prog::Tc } else { Prog::Xdp };
        // No frame shorter than its Ethernet header reaches a program, and
        // a test run of TC takes no IPv4 frame without an IPv4 header.
        let min_len = if from_pod { 14 + 20 } else { 14 };
        let frame = if rng.percent(20) {
            mutate(&mut rng, packet.bytes(), min_len)
        } else {
            packet.bytes()
        };
        check_ingress(&harness, &mut model, prog, &frame, &format!("packet {i} (seed {seed})"));
        if rng.percent(20) {
            check_egress(&harness, &model, &mut rng);
        }
    }
}
