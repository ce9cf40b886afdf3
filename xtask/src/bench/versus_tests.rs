//! The smoke check and the statistics of the side-by-side report.
use super::*;

/// One sample line as the harness prints it.
fn sample(mode: &str, path: &str, (workload, targets): (&str, &str), ok: u64) -> Value {
    json!({"kind": "sample", "services": 10, "mode": mode, "path": path,
           "workload": workload, "targets": targets, "repeat": 0,
           "result": {"ok": ok, "failed": 0, "rate": ok as f64, "p50_us": 100, "p99_us": 200, "p999_us": 300}})
}

fn every_sample() -> Vec<Value> {
    let mut lines = Vec::new();
    for (mode, ..) in MODES {
        for (path, _) in PATHS {
            for case in CASES {
                lines.push(sample(mode, path, case, 1000));
            }
        }
    }
    lines
}

#[test]
fn complete_results_pass_the_smoke_check() {
    Results::new(&every_sample()).check_complete().expect("complete");
}

#[test]
fn a_mode_without_numbers_fails_the_smoke_check() {
    let mut lines = every_sample();
    lines.retain(|l| !(l["mode"] == "kube-proxy-nftables" && l["path"] == "clusterip"));
    let error = Results::new(&lines).check_complete().expect_err("incomplete").to_string();
    assert!(error.contains("kube-proxy-nftables clusterip"), "{error}");
}

#[test]
fn a_mode_whose_every_transaction_failed_fails_the_smoke_check() {
    let mut lines = every_sample();
    lines[7] = sample("direct", "clusterip", CASES[3], 0);
    assert!(Results::new(&lines).check_complete().is_err());
}

#[test]
fn medians_come_with_min_and_max() {
    let mut lines = every_sample();
    for ok in [900, 1100] {
        lines.push(sample("forwarder", "nodeport", CASES[0], ok));
    }
    let r = Results::new(&lines);
    assert_eq!(
        r.stat(10, "forwarder", "nodeport", CASES[0], "rate"),
        Some((1000.0, 900.0, 1100.0))
    );
}
