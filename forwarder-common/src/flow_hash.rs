//! The hash that picks a new flow's backend. Every packet of a flow hashes
//! alike, so a flow whose conntrack entries were lost (evicted from the
//! LRU, or gone with a map an upgrade replaced) goes to the same backend
//! again while the Service's endpoints are unchanged, instead of to a
//! random one that would reset it. Client ports differ from connection to
//! connection, so new flows still spread evenly.

/// murmur3's 32-bit finalizer: each input bit flips each output bit with
/// probability about one half.
#[inline(always)]
const fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Arguments as they sit in the packet (network order). `seed` is the
/// node's own (`HASH_SEED_V1`): without it a client could compute which
/// source ports reach which backend and aim all its flows at one.
#[inline(always)]
pub const fn flow_hash(
    seed: u32,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
) -> u32 {
    let ports = ((sport as u32) << 16) | dport as u32;
    let h = fmix(saddr ^ seed ^ 0x9e37_79b9);
    let h = fmix(h ^ daddr);
    let h = fmix(h ^ ports);
    fmix(h ^ proto as u32)
}

#[cfg(test)]
mod tests {
    use super::flow_hash;

    const CLIENT: u32 = u32::from_ne_bytes([192, 168, 10, 2]);
    const FRONTEND: u32 = u32::from_ne_bytes([10, 96, 0, 10]);

    #[test]
    fn every_field_changes_the_hash() {
        let base = flow_hash(0, CLIENT, FRONTEND, 40000u16.to_be(), 80u16.to_be(), 6);
        assert_eq!(base, flow_hash(0, CLIENT, FRONTEND, 40000u16.to_be(), 80u16.to_be(), 6));
        let others = [
            flow_hash(0, CLIENT + 1, FRONTEND, 40000u16.to_be(), 80u16.to_be(), 6),
            flow_hash(0, CLIENT, FRONTEND + 1, 40000u16.to_be(), 80u16.to_be(), 6),
            flow_hash(0, CLIENT, FRONTEND, 40001u16.to_be(), 80u16.to_be(), 6),
            flow_hash(0, CLIENT, FRONTEND, 40000u16.to_be(), 81u16.to_be(), 6),
            flow_hash(0, CLIENT, FRONTEND, 40000u16.to_be(), 80u16.to_be(), 17),
        ];
        assert!(others.iter().all(|h| *h != base), "{base:#x} in {others:x?}");
    }

    /// Another node's seed sends the same flows elsewhere.
    #[test]
    fn the_seed_changes_every_pick() {
        let picks = |seed| {
            (0..64u16)
                .map(|p| {
                    flow_hash(seed, CLIENT, FRONTEND, (40000 + p).to_be(), 80u16.to_be(), 6) % 2
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(picks(7), picks(7));
        assert_ne!(picks(7), picks(8));
    }

    /// Consecutive client ports, as an ephemeral range hands them out,
    /// spread evenly over the slot counts Services have.
    #[test]
    fn client_ports_spread_evenly_over_backends() {
        for backends in [2u32, 3, 4, 7, 10] {
            let mut hits = vec![0u32; backends as usize];
            let flows = 10_000u32;
            for port in 32768..32768 + flows as u16 {
                let h = flow_hash(0, CLIENT, FRONTEND, port.to_be(), 80u16.to_be(), 6);
                hits[(h % backends) as usize] += 1;
            }
            let fair = flows / backends;
            // ±10% of a fair share is ≥ 4.5 standard deviations here.
            assert!(
                hits.iter().all(|h| h.abs_diff(fair) <= fair / 10),
                "{backends} backends: {hits:?}"
            );
        }
    }
}
