//! Garbage collection of the conntrack map: entries whose time is up, by
//! the rules the datapath applies (`CtTimeouts`), judged on both directions
//! of a flow together (a FIN each way closes it, which neither entry knows
//! alone). The datapath already treats an expired entry as gone; removing
//! it gives its room (and a masquerade port) back before the LRU would.
//!
//! The datapath may refresh an entry between our read and our delete: each
//! entry is read again just before it goes and kept if it moved, which
//! leaves a window of one syscall. Losing a live entry there costs what an
//! LRU eviction costs (the flow is recreated on its backend, see the
//! README), never a wrong translation.
use std::collections::HashMap as StdHashMap;

use aya::maps::{HashMap, MapData, MapError};
use forwarder_common::{CT_FORWARD, CT_REPLY, CT_SNAT, CT_SNAT_REPLY, CtKey, CtTimeouts, CtValue};

/// What one collection did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub examined: usize,
    pub removed: usize,
}

/// The clock of `CtValue::last_seen`: `coarse_seconds` of
/// CLOCK_MONOTONIC_COARSE, which is `bpf_ktime_get_coarse_ns`.
pub fn now_seconds() -> u32 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    forwarder_common::coarse_seconds(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// The reply entry a forward entry's flow owns, if it is there and still
/// restores this flow.
fn reply_of<'a>(
    entries: &'a StdHashMap<CtKey, CtValue>,
    key: &CtKey,
    value: &CtValue,
) -> Option<(CtKey, &'a CtValue)> {
    let reply_key = key.reply_of(value);
    let reply = entries.get(&reply_key)?;
    let restores = reply.nat_addr == key.daddr
        && reply.nat_port == key.dport
        && reply.client_port == key.sport;
    restores.then_some((reply_key, reply))
}

/// The keys whose entries are done with at `now`. Pure: the map's contents
/// in, the keys to delete out.
pub fn expired_keys(
    entries: &StdHashMap<CtKey, CtValue>,
    timeouts: &CtTimeouts,
    now: u32,
) -> Vec<CtKey> {
    let mut doomed = Vec::new();
    let mut owned_replies = std::collections::HashSet::new();
    let mut held_snat = std::collections::HashSet::new();
    for (key, value) in entries {
        match key.dir {
            CT_FORWARD => {
                let dead = match reply_of(entries, key, value) {
                    Some((reply_key, reply)) => {
                        owned_replies.insert(reply_key);
                        let lifetime = timeouts.flow_lifetime(key.proto, value.flags, reply.flags);
                        let dead = value.idle(now).min(reply.idle(now)) > lifetime;
                        if dead {
                            doomed.push(reply_key);
                        }
                        dead
                    }
                    None => value.idle(now) > timeouts.lifetime(key.proto, value.flags),
                };
                if dead {
                    doomed.push(*key);
                }
            }
            CT_SNAT_REPLY => {
                // The masquerade port's holder: both directions touch it.
                let snat = CtKey {
                    saddr: value.nat_addr,
                    daddr: key.saddr,
                    sport: value.nat_port,
                    dport: key.sport,
                    dir: CT_SNAT,
                    ..*key
                };
                if value.idle(now) > timeouts.lifetime(key.proto, value.flags) {
                    doomed.push(*key);
                } else {
                    held_snat.insert(snat);
                }
            }
            _ => {}
        }
    }
    for (key, value) in entries {
        let orphan = match key.dir {
            // A reply entry no live forward entry owns goes when its own
            // direction's time is up.
            CT_REPLY => {
                !owned_replies.contains(key)
                    && value.idle(now) > timeouts.lifetime(key.proto, value.flags)
            }
            // A port allocation whose holder is gone (a flow still alive
            // asks for one again with its next packet), once older than a
            // handshake: a new flow's stays until its first packet leaves.
            CT_SNAT => {
                !held_snat.contains(key) && value.idle(now) > timeouts.lifetime(key.proto, 0)
            }
            _ => false,
        };
        if orphan {
            doomed.push(*key);
        }
    }
    doomed
}

/// One collection over `map`: reads it whole, decides, and deletes what
/// is done with (each entry read again first; one refreshed meanwhile
/// stays).
pub fn collect(
    map: &mut HashMap<MapData, CtKey, CtValue>,
    timeouts: &CtTimeouts,
    now: u32,
) -> Result<GcReport, MapError> {
    let mut entries = StdHashMap::new();
    for entry in map.iter() {
        match entry {
            Ok((key, value)) => {
                entries.insert(key, value);
            }
            // Evicted or deleted while we walked: nothing to collect.
            Err(MapError::KeyNotFound) => {}
            Err(error) => return Err(error),
        }
    }
    let mut report = GcReport { examined: entries.len(), removed: 0 };
    for key in expired_keys(&entries, timeouts, now) {
        let unchanged =
            map.get(&key, 0).is_ok_and(|now_value| Some(&now_value) == entries.get(&key));
        if unchanged && map.remove(&key).is_ok() {
            report.removed += 1;
        }
    }
    Ok(report)
}

/// The conntrack map's name and value before entries had lifetimes.
pub const V1_NAME: &str = "CT4_V1";

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CtValueV1 {
    pub nat_addr: u32,
    pub nat_port: u16,
    pub flags: u16,
    pub backend_id: u32,
    pub last_seen: u32,
}

// SAFETY: repr(C), Copy, no implicit padding (4 + 2 + 2 + 4 + 4 bytes).
unsafe impl aya::Pod for CtValueV1 {}

/// Copies the flows of a conntrack map an earlier build pinned at `pin`
/// (`CT4_V1`) into `map`, then unpins it: an upgrade keeps its flows, and
/// their masquerade ports, instead of starting empty. Their state is not
/// known: TCP and SCTP flows count as established (the long timeout), a
/// port marked closing as closed by its client, and each entry's time
/// starts now. Returns how many entries moved.
pub fn migrate_v1(
    pin: &std::path::Path,
    maps: &mut crate::dataplane::Maps,
    now: u32,
) -> Result<usize, MapError> {
    use forwarder_common::{CT_CLIENT_CLOSING, CT_ESTABLISHED, CT_MASQUERADE, PROTO_UDP};
    if !pin.exists() {
        return Ok(0);
    }
    let old: HashMap<MapData, CtKey, CtValueV1> =
        HashMap::try_from(aya::maps::Map::LruHashMap(MapData::from_pin(pin)?))?;
    let mut moved = 0;
    for entry in old.iter() {
        let Ok((key, value)) = entry else { continue };
        let client_port = match key.dir {
            CT_FORWARD => key.sport,
            CT_REPLY => key.dport,
            _ => 0,
        };
        let mut flags = value.flags & CT_MASQUERADE;
        // V1's closing flag (2) sat on masquerade reply entries only.
        if key.dir == CT_SNAT_REPLY && value.flags & 2 != 0 {
            flags |= CT_CLIENT_CLOSING;
        }
        if key.proto != PROTO_UDP {
            flags |= CT_ESTABLISHED;
        }
        let migrated = CtValue {
            flags,
            last_seen: now,
            client_port,
            ..CtValue::new(value.nat_addr, value.nat_port, value.backend_id)
        };
        // Masquerade entries have a map of their own now.
        let map = match key.dir {
            CT_SNAT | CT_SNAT_REPLY => maps.nat(),
            _ => maps.conntrack(),
        };
        if map.insert(key, migrated, 0).is_ok() {
            moved += 1;
        }
    }
    std::fs::remove_file(pin).map_err(|error| {
        MapError::SyscallError(aya::sys::SyscallError { call: "unlink", io_error: error })
    })?;
    Ok(moved)
}

/// Collects the conntrack and masquerade maps pinned at `pins` every
/// `interval`, on a thread of its own (a walk of a full map takes a while
/// and must not hold up a sync), for as long as the process runs.
pub fn spawn_collector(
    pins: [std::path::PathBuf; 2],
    timeouts: CtTimeouts,
    interval: std::time::Duration,
) {
    let open = |pin: &std::path::Path| -> Result<HashMap<MapData, CtKey, CtValue>, MapError> {
        HashMap::try_from(aya::maps::Map::LruHashMap(MapData::from_pin(pin)?))
    };
    let mut maps = Vec::new();
    for pin in &pins {
        match open(pin) {
            Ok(map) => maps.push((pin.display().to_string(), map)),
            Err(error) => tracing::warn!(
                map = %pin.display(),
                %error,
                "garbage collection off: expired entries wait for the LRU"
            ),
        }
    }
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(interval);
            for (name, map) in &mut maps {
                let started = std::time::Instant::now();
                match collect(map, &timeouts, now_seconds()) {
                    Ok(report) => tracing::debug!(
                        map = %name,
                        examined = report.examined,
                        removed = report.removed,
                        took = ?started.elapsed(),
                        "expired entries collected"
                    ),
                    Err(error) => tracing::warn!(map = %name, %error, "collection failed"),
                }
            }
        }
    });
}

#[cfg(test)]
mod tests;
