//! `cargo xtask conformance`: a real Kubernetes cluster on this machine,
//! with forwarder as its only Service proxy, and Kubernetes' own Service
//! conformance tests run against it.
pub mod build;
mod cluster;
mod control_plane;
mod e2e;
mod host;
pub mod image;
pub mod images;
mod node;
mod pki;
mod process;
mod report;

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use crate::setup::{build_agent, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Option<Action>,
    /// Also the rest of the Services specs, Traffic Distribution, DNS and
    /// the other Service-traffic specs; writes conformance/results.md.
    #[arg(long)]
    all: bool,
    /// Nodes to run, each a network namespace, in three zones round robin
    /// (default: 2; with --all, 3, as the Traffic Distribution specs need
    /// three zones; 3 of them need 6 nodes, two per zone).
    #[arg(long)]
    nodes: Option<usize>,
    /// Run without forwarder, so without any Service proxy: the specs that
    /// need one must fail (proof that forwarder is what passes them);
    /// writes conformance/without-forwarder.md.
    #[arg(long)]
    without_forwarder: bool,
    /// Only the specs this ginkgo focus regexp selects.
    #[arg(long, conflicts_with = "all")]
    focus: Option<String>,
}

/// Two: Service traffic crosses nodes, and the multi-node specs run.
const DEFAULT_NODES: usize = 2;
const ALL_NODES: usize = 3;

/// What `cargo xtask conformance` runs without flags.
impl Default for Args {
    fn default() -> Self {
        Self { action: None, all: false, nodes: None, without_forwarder: false, focus: None }
    }
}

#[derive(clap::Subcommand)]
enum Action {
    /// Build the cluster's binaries (cached: a no-op while the pins are unchanged).
    Build,
    /// Build them and write the cluster's image archives to target/conformance/images.
    Images,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let binaries = build::all()?;
    println!(
        "conformance: binaries in {} and {}",
        binaries.kubernetes.display(),
        binaries.runtime.display()
    );
    match args.action {
        Some(Action::Build) => return Ok(()),
        Some(Action::Images) => return images(&binaries).map(drop),
        None => {}
    }
    let archives = images(&binaries)?;
    let _interrupt = TearDownOnInterrupt::install()?;
    let dir = workspace_root().join("target/conformance/run");
    let nodes = args.nodes.unwrap_or(if args.all { ALL_NODES } else { DEFAULT_NODES });
    let options = cluster::Options { nodes, forwarder: !args.without_forwarder };
    let started = std::time::Instant::now();
    let cluster = cluster::Cluster::up(&dir, binaries, &archives, &options)?;
    println!("conformance: the cluster is up ({nodes} nodes) in {:.0?}", started.elapsed());
    let custom;
    let suites: Vec<&e2e::Suite> = match &args.focus {
        Some(focus) => {
            custom = e2e::Suite { name: "focus", focus: focus.clone().leak(), exclude: None };
            vec![&custom]
        }
        None if args.all => e2e::ALL.iter().collect(),
        None => vec![&e2e::CONFORMANCE],
    };
    let mut results = Vec::new();
    let mut failure = None;
    for suite in suites {
        match e2e::run(&cluster, suite) {
            Ok(outcomes) => results.push((suite, outcomes)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    cluster.down()?;
    // Ctrl-C during the teardown: the specs were cut short, so no report
    // (the handler's thread exits once it has the teardown lock).
    if INTERRUPTED.load(Ordering::SeqCst) {
        anyhow::bail!("interrupted");
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let report = report::markdown(&results, &options);
    std::fs::write(dir.with_file_name("report.md"), &report)?;
    // The committed reports: the full run, and the proof without forwarder.
    let committed = match (args.all, args.without_forwarder, &args.focus) {
        (true, false, _) => Some("conformance/results.md"),
        (false, true, None) => Some("conformance/without-forwarder.md"),
        _ => None,
    };
    if let Some(committed) = committed {
        let committed = workspace_root().join(committed);
        std::fs::create_dir_all(committed.parent().expect("in a directory"))?;
        std::fs::write(committed, &report)?;
    }
    report::verdict(&results, &options)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static FINISHED: AtomicBool = AtomicBool::new(false);

extern "C" fn note_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// While alive, Ctrl-C or SIGTERM tears the cluster down (as a later run
/// would find it) and exits, rather than leaving it running; dropped, the
/// default handling is back (for the rest of `cargo xtask test`).
struct TearDownOnInterrupt;

impl TearDownOnInterrupt {
    fn install() -> anyhow::Result<Self> {
        FINISHED.store(false, Ordering::SeqCst);
        set_handlers(SigHandler::Handler(note_interrupt))?;
        std::thread::spawn(|| {
            while !INTERRUPTED.load(Ordering::SeqCst) {
                if FINISHED.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            eprintln!("conformance: interrupted: tearing the cluster down");
            // Held until the exit: a teardown of the run's own waits for this
            // one to finish, or this one for it.
            let _only_teardown = cluster::teardown_lock();
            if let Err(e) = cluster::remove_leftovers() {
                eprintln!("conformance: {e:#}");
            }
            std::process::exit(130);
        });
        Ok(Self)
    }
}

impl Drop for TearDownOnInterrupt {
    fn drop(&mut self) {
        FINISHED.store(true, Ordering::SeqCst);
        let _ = set_handlers(SigHandler::SigDfl);
    }
}

fn set_handlers(handler: SigHandler) -> anyhow::Result<()> {
    let action = SigAction::new(handler, SaFlags::empty(), SigSet::empty());
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(signal, &action) }?;
    }
    Ok(())
}

/// Every image archive, the agent's release build in forwarder's.
fn images(binaries: &build::Binaries) -> anyhow::Result<Vec<std::path::PathBuf>> {
    build_agent(true)?;
    let root = workspace_root();
    let out = root.join("target/conformance/images");
    let archives = images::all(binaries, &root.join("target/release/forwarder"), &out)?;
    for archive in &archives {
        println!("conformance: image {}", archive.display());
    }
    Ok(archives)
}
