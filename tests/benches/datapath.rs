//! Per-packet cost of the kernel programs through BPF_PROG_TEST_RUN, next
//! to do-nothing programs measured in the same run. Prints JSON lines;
//! `cargo xtask bench` turns them into the committed results.
//!
//! Without live frames the kernel reruns a program on the same buffer, so a
//! rewrite would change what later repeats see. Two ways around it:
//! - "batch" paths use a Service whose backend is its own frontend, so the
//!   rewrite writes back the same bytes and every repeat takes the same path;
//! - a new flow must miss conntrack every time, so each run is its own
//!   packet (another source port) with repeat=1; the bare program is then
//!   measured the same way.
use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use forwarder_common::program_names;
use forwarder_tests::packet::Packet;
use forwarder_user::{
    dataplane::{CALIBRATION_OBJECT, Capacity, Maps, load_object},
    model::{DesiredState, Endpoint, Frontend, Proto},
    sync::Syncer,
};

const BATCH_REPEAT: u32 = 200_000;
const SINGLE_RUNS: u16 = 20_000;
const ROUNDS: usize = 5;

/// The Service the measured packets hit, mapped onto itself.
const SELF_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const NODE_IP: &str = "192.168.10.1";

fn services(count: u32) -> DesiredState {
    let mut state = DesiredState::default();
    let self_frontend = Frontend::new(Some(SELF_IP), 80, Proto::Tcp);
    state.services.insert(self_frontend, vec![Endpoint { addr: SELF_IP, port: 80 }]);
    // A NodePort with an endpoint on this node, and one whose endpoint is on
    // another node (its new flows are masqueraded too).
    let local: Ipv4Addr = "10.244.1.2".parse().unwrap();
    state.local_endpoints.extend([local, SELF_IP]);
    state
        .services
        .insert(Frontend::new(None, 30080, Proto::Tcp), vec![Endpoint { addr: local, port: 8080 }]);
    state.services.insert(
        Frontend::new(None, 30081, Proto::Tcp),
        vec![Endpoint { addr: "10.244.2.2".parse().unwrap(), port: 8080 }],
    );
    for i in 2..count {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i);
        let backend = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + i);
        state.services.insert(
            Frontend::new(Some(ip), 80, Proto::Tcp),
            vec![Endpoint { addr: backend, port: 8080 }],
        );
    }
    state
}

struct Bench {
    ebpf: Ebpf,
    calibration: Ebpf,
    _maps: Maps,
}

impl Bench {
    fn new(count: u32) -> Self {
        let capacity = Capacity {
            services: (count * 2 + 1024).max(forwarder_common::SERVICES_MAX),
            backends: (count + 1024).max(forwarder_common::BACKENDS_MAX),
            // Room for every flow the rounds open in the one CPU's share of
            // the per-CPU LRU lists: eviction would be measured too.
            conntrack: (1 << 20) * aya::util::nr_cpus().expect("possible CPUs") as u32,
            nat: forwarder_common::NAT_MAX,
        };
        let mut ebpf = load_object(capacity, forwarder_user::dataplane::Tuning::default(), 0, None)
            .expect("load forwarder programs");
        let mut maps = Maps::take(&mut ebpf).expect("maps");
        let mut syncer = Syncer::new(capacity.services as usize, capacity.backends as usize);
        let report = syncer.apply(&services(count), &mut maps);
        assert!(report.errors.is_empty(), "{:?}", report.errors.first());
        syncer.apply_node_ips(&[NODE_IP.parse().unwrap()].into(), &mut maps);
        let mut calibration = Ebpf::load(CALIBRATION_OBJECT).expect("load calibration");
        let p: &mut Xdp = calibration.program_mut("bare_xdp_pass").unwrap().try_into().unwrap();
        p.load().unwrap();
        let p: &mut SchedClassifier =
            calibration.program_mut("bare_tc_ok").unwrap().try_into().unwrap();
        p.load().unwrap();
        Self { ebpf, calibration, _maps: maps }
    }

    fn xdp<'a>(ebpf: &'a Ebpf, name: &str) -> &'a Xdp {
        ebpf.program(name).unwrap().try_into().unwrap()
    }

    fn tc<'a>(ebpf: &'a Ebpf, name: &str) -> &'a SchedClassifier {
        ebpf.program(name).unwrap().try_into().unwrap()
    }
}

/// Mean ns per run over `repeat` runs of the same packet.
fn batch(
    prog: &impl TestRun<Opts<'static> = TestRunOptions<'static>, Result = aya::TestRunResult>,
    input: &'static [u8],
) -> f64 {
    let opts =
        TestRunOptions { data_in: Some(input), repeat: BATCH_REPEAT, ..TestRunOptions::default() };
    let result = prog.test_run(opts).expect("test_run");
    result.duration.as_nanos() as f64
}

/// Median kernel-measured ns of single runs over distinct packets.
fn single(prog: &Xdp, packets: &[Vec<u8>]) -> f64 {
    let mut times: Vec<f64> = packets
        .iter()
        .map(|p| {
            let opts = TestRunOptions { data_in: Some(p), repeat: 1, ..TestRunOptions::default() };
            prog.test_run(opts).expect("test_run").duration.as_nanos() as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn leak(bytes: Vec<u8>) -> &'static [u8] {
    Box::leak(bytes.into_boxed_slice())
}

fn main() {
    let no_match = leak(Packet::tcp("192.168.10.2:40000", "192.168.10.1:22").bytes());
    let established = leak(Packet::tcp("192.168.10.2:40000", "10.96.0.1:80").bytes());
    let reply = leak(Packet::tcp("10.96.0.1:80", "192.168.10.2:40000").bytes());
    for count in [10u32, 100_000] {
        let bench = Bench::new(count);
        let xdp = Bench::xdp(&bench.ebpf, program_names::XDP_NODE);
        let rnat = Bench::tc(&bench.ebpf, program_names::TC_REVERSE_NAT);
        let bare_xdp = Bench::xdp(&bench.calibration, "bare_xdp_pass");
        let bare_tc = Bench::tc(&bench.calibration, "bare_tc_ok");
        // Creates the conntrack entries the established and reply paths hit.
        batch(xdp, established);
        for round in 0..ROUNDS {
            let base = 1000 + (round as u16) * SINGLE_RUNS;
            let new_flows = |port: u16| -> Vec<Vec<u8>> {
                (0..SINGLE_RUNS)
                    .map(|i| {
                        let client = format!("192.168.11.{}:{}", round + 1, base.wrapping_add(i));
                        Packet::tcp(&client, &format!("192.168.10.1:{port}")).bytes()
                    })
                    .collect()
            };
            let (local_flows, remote_flows) = (new_flows(30080), new_flows(30081));
            let measurements = [
                ("bare_xdp_pass", "batch", batch(bare_xdp, no_match)),
                ("no_match", "batch", batch(xdp, no_match)),
                ("established", "batch", batch(xdp, established)),
                ("bare_tc_ok", "batch", batch(bare_tc, reply)),
                ("reply", "batch", batch(rnat, reply)),
                ("bare_xdp_pass", "single", single(bare_xdp, &local_flows)),
                ("new_flow", "single", single(xdp, &local_flows)),
                ("new_flow_masquerade", "single", single(xdp, &remote_flows)),
            ];
            for (path, mode, ns) in measurements {
                println!(
                    r#"{{"services": {count}, "round": {round}, "path": "{path}", "mode": "{mode}", "ns": {ns:.2}}}"#
                );
            }
        }
    }
}
