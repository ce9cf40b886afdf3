//! `cargo xtask demo`: forwarder on the embedded demo Services, with real
//! traffic from an external client (NodePort) and from a pod (ClusterIP).
//! Everything lives in network namespaces removed on exit, Ctrl-C included.
use std::{
    collections::BTreeSet,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::bail;
use forwarder_tests::{
    echo::{EchoServer, tcp_once, udp_once},
    forwarder::Forwarder,
    netns::NetNs,
    topology::{NODE_IFACE, NODE_IP, NODE_NAME, Topology},
};
use nix::sys::signal::{SigSet, Signal};

use crate::setup::{self, check, workspace_root};

/// Requests per frontend; more are sent, up to `MAX_REQUESTS`, until both
/// pods have answered (the choice is random).
const REQUESTS: usize = 8;
const MAX_REQUESTS: usize = 40;
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Turns SIGINT/SIGTERM into a flag the demo checks between requests, so
/// it returns normally and every guard cleans up.
fn catch_signals() -> anyhow::Result<()> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    // Blocked here, before any thread starts, so every thread inherits it.
    signals.thread_block()?;
    std::thread::spawn(move || {
        if signals.wait().is_ok() {
            INTERRUPTED.store(true, Ordering::Relaxed);
            eprintln!("\ninterrupted: cleaning up");
        }
    });
    Ok(())
}

pub fn run() -> anyhow::Result<()> {
    setup::run()?;
    let root = workspace_root();
    check(Command::new("cargo").current_dir(&root).args(["build", "--package", "forwarder-user"]))?;
    catch_signals()?;

    println!("demo: creating namespaces: client, node ({NODE_NAME}), pod-a, pod-b, pod-c");
    let topology = Topology::new("demo");
    let _servers: Vec<EchoServer> = ["pod-a", "pod-b"]
        .iter()
        .map(|name| EchoServer::start(&topology.pod(name).ns, name))
        .collect();
    let manifest = root.join("deploy/examples/demo.yaml");
    println!("demo: starting forwarder in {NODE_NAME} with {}", manifest.display());
    let mut forwarder = Forwarder::start(&topology.node, &manifest, NODE_NAME, NODE_IFACE);
    println!("demo: forwarder healthy (log: {})\n", forwarder.log.display());

    let client = &topology.client;
    let pod_c = &topology.pod("pod-c").ns;
    let external = ("external client 192.168.10.2", client);
    let pod = ("pod-c 10.244.1.9", pod_c);
    let cases: [(&str, (&str, &NetNs), String, bool); 4] = [
        ("NodePort  TCP", external, format!("{NODE_IP}:30080"), true),
        ("NodePort  UDP", external, format!("{NODE_IP}:30053"), false),
        ("ClusterIP TCP", pod, "10.96.0.10:80".to_owned(), true),
        ("ClusterIP UDP", pod, "10.96.0.10:53".to_owned(), false),
    ];
    let mut failures = Vec::new();
    for (label, (who, from), frontend, tcp) in &cases {
        println!("{label}: {who} -> {frontend}");
        let mut answered = BTreeSet::new();
        for i in 1..=MAX_REQUESTS {
            if i > REQUESTS && answered.len() == 2 {
                break;
            }
            if INTERRUPTED.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            let answer = if *tcp {
                tcp_once(from, frontend).map(|pod| (pod, frontend.clone()))
            } else {
                udp_once(from, frontend).map(|(pod, peer)| (pod, peer.to_string()))
            };
            match answer {
                Ok((pod, peer)) => {
                    println!("  request {i}: answered by {pod} (reply from {peer})");
                    answered.insert(pod);
                }
                Err(error) => println!("  request {i}: FAILED: {error}"),
            }
        }
        if answered.len() != 2 {
            failures.push(format!("{label} reached {answered:?}, not both pods"));
        }
    }
    let status = forwarder.stop();
    forwarder.cleanup();
    println!(
        "\ndemo: forwarder stopped ({status}), its programs and pins removed (forwarder cleanup); removing namespaces"
    );
    drop(topology);
    if !failures.is_empty() {
        bail!("demo failed: {}", failures.join("; "));
    }
    println!("demo: both pods answered on every frontend");
    Ok(())
}
