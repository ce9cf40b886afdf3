//! Prometheus metrics on `--metrics-bind-address` (`/metrics`, text format
//! 0.0.4), named after kube-proxy's where the meaning is the same:
//! `forwarder_sync_proxy_rules_duration_seconds`,
//! `forwarder_network_programming_duration_seconds` (from an EndpointSlice's
//! `endpoints.kubernetes.io/last-change-trigger-time` to the change being in
//! the maps), `forwarder_sync_proxy_rules_last_timestamp_seconds`, map
//! entries and capacities, and the datapath's packet counters by reason.
use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    path::Path,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::maps::{Map, MapData, MapError, PerCpuArray};
use forwarder_common::stat;
use k8s_openapi::{api::discovery::v1::EndpointSlice, jiff::Timestamp};

use crate::healthz::Respond;

/// The annotation the EndpointSlice controller sets to the time of the
/// change (a Pod or Service update) that caused the slice's last update.
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Upper bounds in seconds: 1 ms doubling to about 16 s, as kube-proxy's.
const BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, count) in BUCKETS.iter().zip(&mut self.counts) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Debug, Default)]
struct State {
    sync_duration: Histogram,
    programming: Histogram,
    last_sync: f64,
    sync_errors: u64,
    /// Map name -> (entries written by the agent, if known; capacity).
    maps: BTreeMap<&'static str, (Option<usize>, u32)>,
    packets: Vec<(&'static str, u64)>,
    /// The trigger time last seen per slice (`namespace/name`).
    triggers: HashMap<String, String>,
}

#[derive(Default)]
pub struct Metrics {
    state: Mutex<State>,
    /// The datapath's counters, read at each scrape through their pin.
    stats: Option<PerCpuArray<MapData, u64>>,
}

impl Metrics {
    /// Metrics that read the packet counters from the pinned `STATS_V3`.
    pub fn with_stats_pin(path: &Path) -> Result<Self, MapError> {
        let map = MapData::from_pin(path)?;
        let stats = PerCpuArray::try_from(Map::PerCpuArray(map))?;
        Ok(Self { state: Mutex::default(), stats: Some(stats) })
    }

    fn packets(&self) -> Vec<(&'static str, u64)> {
        let Some(stats) = &self.stats else {
            return self.state().packets.clone();
        };
        (0..stat::COUNT)
            .filter_map(|i| Some((stat::NAMES[i as usize], stats.get(&i, 0).ok()?.iter().sum())))
            .collect()
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl Metrics {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a sync that took `took` and had `errors` failed writes.
    pub fn synced(&self, took: Duration, errors: usize) {
        let mut state = self.state();
        state.sync_duration.observe(took.as_secs_f64());
        if errors == 0 {
            state.last_sync = unix_now();
        } else {
            state.sync_errors += errors as u64;
        }
    }

    /// After a successful sync of `slices`: the time from each new trigger
    /// time to now. `count` false records the times without observing
    /// them (the first sync: they are changes made before the agent ran).
    pub fn programmed(&self, slices: &[impl std::borrow::Borrow<EndpointSlice>], count: bool) {
        let now = Timestamp::now();
        let mut state = self.state();
        // Only slices that still exist are remembered.
        let mut seen = HashMap::with_capacity(slices.len());
        for slice in slices.iter().map(std::borrow::Borrow::borrow) {
            let Some(trigger) =
                slice.metadata.annotations.as_ref().and_then(|a| a.get(TRIGGER_TIME))
            else {
                continue;
            };
            let key = format!(
                "{}/{}",
                slice.metadata.namespace.as_deref().unwrap_or_default(),
                slice.metadata.name.as_deref().unwrap_or_default()
            );
            let new = state.triggers.get(&key) != Some(trigger);
            seen.insert(key, trigger.clone());
            if let (true, true, Ok(at)) = (new, count, trigger.parse::<Timestamp>()) {
                let seconds = now.duration_since(at).as_secs_f64();
                if seconds >= 0.0 {
                    state.programming.observe(seconds);
                }
            }
        }
        state.triggers = seen;
    }

    pub fn set_map(&self, name: &'static str, entries: Option<usize>, capacity: u32) {
        self.state().maps.insert(name, (entries, capacity));
    }

    pub fn set_packets(&self, counters: Vec<(&'static str, u64)>) {
        self.state().packets = counters;
    }

    pub fn render(&self) -> String {
        let packets = self.packets();
        let state = self.state();
        let mut out = String::new();
        state.sync_duration.render(
            &mut out,
            "forwarder_sync_proxy_rules_duration_seconds",
            "Time to bring the maps to the desired state.",
        );
        state.programming.render(
            &mut out,
            "forwarder_network_programming_duration_seconds",
            "Time from an EndpointSlice's last-change-trigger-time to its change being in the maps.",
        );
        let _ = writeln!(
            out,
            "# HELP forwarder_sync_proxy_rules_last_timestamp_seconds Unix time of the last sync without errors.\n\
             # TYPE forwarder_sync_proxy_rules_last_timestamp_seconds gauge\n\
             forwarder_sync_proxy_rules_last_timestamp_seconds {}",
            state.last_sync
        );
        let _ = writeln!(
            out,
            "# HELP forwarder_sync_write_errors_total Map writes that failed (the previous entry stayed).\n\
             # TYPE forwarder_sync_write_errors_total counter\n\
             forwarder_sync_write_errors_total {}",
            state.sync_errors
        );
        let _ = writeln!(
            out,
            "# HELP forwarder_map_entries Entries the agent keeps in a map.\n# TYPE forwarder_map_entries gauge"
        );
        for (name, (entries, _)) in &state.maps {
            if let Some(entries) = entries {
                let _ = writeln!(out, "forwarder_map_entries{{map=\"{name}\"}} {entries}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP forwarder_map_capacity Maximum entries of a map.\n# TYPE forwarder_map_capacity gauge"
        );
        for (name, (_, capacity)) in &state.maps {
            let _ = writeln!(out, "forwarder_map_capacity{{map=\"{name}\"}} {capacity}");
        }
        let _ = writeln!(
            out,
            "# HELP forwarder_packets_total Packets the programs translated, rejected or dropped, by reason.\n\
             # TYPE forwarder_packets_total counter"
        );
        for (reason, count) in &packets {
            let _ = writeln!(out, "forwarder_packets_total{{reason=\"{reason}\"}} {count}");
        }
        out
    }
}

impl Respond for Metrics {
    fn respond(&self, path: &str) -> (u16, String) {
        match path {
            "/metrics" => (200, self.render()),
            _ => (404, "404 page not found".into()),
        }
    }

    fn content_type(&self) -> &'static str {
        "text/plain; version=0.0.4"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, trigger: &str) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "demo", "annotations": {TRIGGER_TIME: trigger}},
            "addressType": "IPv4", "endpoints": []
        }))
        .expect("slice")
    }

    #[test]
    fn programming_latency_counts_each_new_trigger_time_once() {
        let metrics = Metrics::default();
        let old = (Timestamp::now() - std::time::Duration::from_secs(3600)).to_string();
        metrics.programmed(&[slice("a", &old)], false);
        let recent = (Timestamp::now() - std::time::Duration::from_millis(20)).to_string();
        metrics.programmed(&[slice("a", &recent), slice("b", &old)], true);
        metrics.programmed(&[slice("a", &recent)], true);
        let text = metrics.render();
        // "a" changed (20 ms ago) and "b" is new (an hour ago); "a" again is no change.
        assert!(text.contains("forwarder_network_programming_duration_seconds_count 2"), "{text}");
        assert!(
            text.contains("forwarder_network_programming_duration_seconds_bucket{le=\"0.032\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn sync_metrics_render_in_prometheus_text() {
        let metrics = Metrics::default();
        metrics.synced(Duration::from_millis(3), 0);
        metrics.synced(Duration::from_millis(3), 2);
        metrics.set_map("SVC4_V1", Some(12), 65_536);
        metrics.set_map("CT4_V2", None, 262_144);
        metrics.set_packets(vec![("dnat", 7)]);
        let text = metrics.render();
        for line in [
            "forwarder_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 2",
            "forwarder_sync_write_errors_total 2",
            "forwarder_map_entries{map=\"SVC4_V1\"} 12",
            "forwarder_map_capacity{map=\"CT4_V2\"} 262144",
            "forwarder_packets_total{reason=\"dnat\"} 7",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(!text.contains("forwarder_map_entries{map=\"CT4_V2\"}"));
    }
}
