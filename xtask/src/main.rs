//! Project tasks: `cargo xtask setup | demo | test | bench | vm | k8s |
//! conformance`.
mod bench;
mod conformance;
mod demo;
mod k8s;
mod setup;
mod test;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the pinned eBPF toolchain and the packages the tests need (idempotent).
    Setup,
    /// Run forwarder on the embedded demo: NodePort and ClusterIP traffic to two pods.
    Demo,
    /// Run every test: unit, BPF program fixtures, network-namespace end-to-end.
    Test,
    /// Measure the datapath and forwarder against kube-proxy; writes bench/results/.
    Bench {
        /// Only the side-by-side benchmarks, at 10 Services, one short run
        /// each; fails unless every mode produced numbers.
        #[arg(long)]
        smoke: bool,
        /// Tables and plots again from bench/results/*.json, measuring nothing.
        #[arg(long, conflicts_with = "smoke")]
        report: bool,
        /// Only these benchmarks (default: all).
        #[arg(long, value_enum)]
        only: Vec<bench::Part>,
    },
    /// Run the BPF and focused end-to-end tests on distribution kernels under qemu.
    Vm,
    /// The test control plane: build, start, stop, or print its KUBECONFIG.
    K8s {
        #[command(subcommand)]
        action: k8s::Action,
    },
    /// A real cluster with forwarder as its Service proxy, for Kubernetes'
    /// own conformance tests.
    Conformance(conformance::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Demo => demo::run(),
        Task::Test => test::run(),
        Task::Bench { smoke, report, only } => bench::run(smoke, report, &only),
        Task::Vm => vm::run(),
        Task::K8s { action } => k8s::run(action),
        Task::Conformance(args) => conformance::run(args),
    }
}
