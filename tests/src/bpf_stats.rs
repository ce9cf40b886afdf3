//! The kernel's live statistics of BPF programs (run count and run time,
//! what `kernel.bpf_stats_enabled=1` turns on and `bpftool prog show`
//! reports): the per-packet cost users pay, cold caches and all, where
//! `BPF_PROG_TEST_RUN` measures a warm loop.
use std::{collections::BTreeMap, os::fd::OwnedFd};

use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};
use serde_json::{Value, json};

/// Program names counted: forwarder's (`fwd_*`) and the do-nothing hooks'
/// (`pass_*`, from `xdp_pass`).
const PREFIXES: [&str; 2] = ["fwd_", "pass_"];

/// Statistics are collected while this lives. `BPF_ENABLE_STATS` turns on
/// the same kernel switch as the sysctl, but is released with its file
/// descriptor, so a crashed benchmark cannot leave it on (it costs every
/// program on the machine two clock reads per run).
pub struct Collecting {
    _enabled: OwnedFd,
}

impl Collecting {
    pub fn start() -> Self {
        Self { _enabled: enable_stats(Stats::RunTime).expect("BPF_ENABLE_STATS (run time)") }
    }
}

/// Each counted program's totals at one moment, by program id.
pub struct Snapshot(BTreeMap<u32, (String, u64, u64)>);

/// Runs and nanoseconds of the programs of one name between two snapshots
/// (a name loaded more than once, or attached to many interfaces, summed).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProgramUse {
    pub runs: u64,
    pub nanos: u64,
}

impl ProgramUse {
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.nanos as f64 / self.runs as f64)
    }
}

impl Snapshot {
    pub fn take() -> Self {
        let mut programs = BTreeMap::new();
        for info in loaded_programs().flatten() {
            let Some(name) = info.name_as_str() else { continue };
            if PREFIXES.iter().any(|p| name.starts_with(p)) {
                let totals = (name.to_owned(), info.run_count(), info.run_time().as_nanos() as u64);
                programs.insert(info.id(), totals);
            }
        }
        Self(programs)
    }

    /// What each program name ran since `before` (programs loaded in
    /// between counted from zero), names that did not run left out.
    pub fn since(&self, before: &Self) -> BTreeMap<String, ProgramUse> {
        let mut used: BTreeMap<String, ProgramUse> = BTreeMap::new();
        for (id, (name, runs, nanos)) in &self.0 {
            let (runs0, nanos0) = before.0.get(id).map_or((0, 0), |(_, r, n)| (*r, *n));
            let runs = runs.saturating_sub(runs0);
            if runs > 0 {
                let entry = used.entry(name.clone()).or_default();
                entry.runs += runs;
                entry.nanos += nanos.saturating_sub(nanos0);
            }
        }
        used
    }
}

/// `{"fwd_xdp_node": {"runs": ..., "ns_per_run": ...}, ...}` for results.
pub fn json(used: &BTreeMap<String, ProgramUse>) -> Value {
    let entries = used
        .iter()
        .map(|(name, u)| (name.clone(), json!({"runs": u.runs, "ns_per_run": u.ns_per_run()})));
    Value::Object(entries.collect())
}
