use std::collections::{BTreeSet, HashMap};

use forwarder_common::{
    CT_BACKEND_CLOSING, CT_CLIENT_CLOSING, CT_ESTABLISHED, CT_FORWARD, CT_MASQUERADE, CT_REPLY,
    CT_RESET, CT_SNAT, CT_SNAT_REPLY, CtKey, CtTimeouts, CtValue, PROTO_TCP, PROTO_UDP,
};

use super::expired_keys;

const CLIENT: u32 = u32::from_ne_bytes([10, 244, 1, 9]);
const FRONTEND: u32 = u32::from_ne_bytes([10, 96, 0, 10]);
const BACKEND: u32 = u32::from_ne_bytes([10, 244, 2, 2]);
const NODE: u32 = u32::from_ne_bytes([192, 168, 10, 1]);
const NOW: u32 = 100_000;

fn key(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8, dir: u8) -> CtKey {
    CtKey { saddr, daddr, sport: sport.to_be(), dport: dport.to_be(), proto, dir, _pad: [0; 2] }
}

fn value(addr: u32, port: u16, client_port: u16, flags: u16, age: u32) -> CtValue {
    CtValue {
        flags,
        last_seen: NOW - age,
        client_port: client_port.to_be(),
        ..CtValue::new(addr, port.to_be(), 7)
    }
}

/// A flow's two entries, each with its flags and age.
fn flow(proto: u8, forward: (u16, u32), reply: (u16, u32)) -> Vec<(CtKey, CtValue)> {
    vec![
        (
            key(CLIENT, FRONTEND, 41000, 80, proto, CT_FORWARD),
            value(BACKEND, 8080, 41000, forward.0, forward.1),
        ),
        (
            key(BACKEND, CLIENT, 8080, 41000, proto, CT_REPLY),
            value(FRONTEND, 80, 41000, reply.0, reply.1),
        ),
    ]
}

fn doomed(entries: Vec<(CtKey, CtValue)>) -> BTreeSet<u8> {
    let map: HashMap<_, _> = entries.into_iter().collect();
    expired_keys(&map, &CtTimeouts::DEFAULT, NOW).iter().map(|k| k.dir).collect()
}

const EST: u16 = CT_ESTABLISHED;

/// Name, protocol, (flags, idle seconds) of the forward and the reply
/// entry, and which entries go.
type Case<'a> = (&'a str, u8, (u16, u32), (u16, u32), &'a BTreeSet<u8>);

#[test]
fn flows_expire_by_the_state_of_both_directions() {
    let t = CtTimeouts::DEFAULT;
    let both = BTreeSet::from([CT_FORWARD, CT_REPLY]);
    let none = BTreeSet::new();
    #[rustfmt::skip]
    let cases: [Case; 12] = [
        ("a handshake within the SYN timeout", PROTO_TCP, (0, t.tcp_syn), (0, t.tcp_syn), &none),
        ("a handshake past it", PROTO_TCP, (0, t.tcp_syn + 1), (0, t.tcp_syn + 1), &both),
        ("established, idle a day less a second", PROTO_TCP, (EST, t.tcp_established - 1), (EST, t.tcp_established), &none),
        ("established, idle past it", PROTO_TCP, (EST, t.tcp_established + 1), (EST, t.tcp_established + 5), &both),
        ("the freshest direction counts", PROTO_TCP, (EST, t.tcp_established + 9), (EST, 1), &none),
        ("the client closed: close-wait", PROTO_TCP, (EST | CT_CLIENT_CLOSING, t.tcp_close + 1), (EST, t.tcp_close + 1), &none),
        ("past close-wait", PROTO_TCP, (EST | CT_CLIENT_CLOSING, t.tcp_close_wait + 1), (EST, t.tcp_close_wait + 1), &both),
        ("both closed, within the close timeout", PROTO_TCP, (EST | CT_CLIENT_CLOSING, t.tcp_close), (EST | CT_BACKEND_CLOSING, t.tcp_close), &none),
        ("both closed, past it", PROTO_TCP, (EST | CT_CLIENT_CLOSING, t.tcp_close + 1), (EST | CT_BACKEND_CLOSING, t.tcp_close + 1), &both),
        ("a reset from the backend", PROTO_TCP, (EST, t.tcp_close + 1), (CT_RESET, t.tcp_close + 1), &both),
        ("UDP within its timeout", PROTO_UDP, (0, t.udp), (0, t.udp + 100), &none),
        ("UDP past it", PROTO_UDP, (0, t.udp + 1), (0, t.udp + 1), &both),
    ];
    for (name, proto, forward, reply, expected) in cases {
        assert_eq!(&doomed(flow(proto, forward, reply)), expected, "{name}");
    }
}

#[test]
fn entries_without_their_pair_go_by_their_own_state() {
    let entries = flow(PROTO_TCP, (EST, 10), (EST, CtTimeouts::DEFAULT.tcp_established + 1));
    assert_eq!(doomed(vec![entries[1]]), BTreeSet::from([CT_REPLY]), "an expired orphan reply");
    let entries = flow(PROTO_TCP, (EST, 10), (EST, 10));
    assert!(doomed(vec![entries[1]]).is_empty(), "a fresh orphan reply stays");
    // A reply entry that restores another flow (the tuple moved on) is not
    // this forward entry's: each goes by its own time.
    let mut entries = flow(PROTO_UDP, (0, 61), (0, 1));
    entries[1].1.nat_port = 81u16.to_be();
    assert_eq!(doomed(entries), BTreeSet::from([CT_FORWARD]));
}

#[test]
fn masquerade_ports_are_released_when_their_holder_expires() {
    let t = CtTimeouts::DEFAULT;
    let snat_reply = |flags, age| {
        (
            key(BACKEND, NODE, 8080, 61001, PROTO_TCP, CT_SNAT_REPLY),
            value(CLIENT, 41000, 0, flags, age),
        )
    };
    let snat = |age| {
        (
            key(CLIENT, BACKEND, 41000, 8080, PROTO_TCP, CT_SNAT),
            value(NODE, 61001, 0, CT_MASQUERADE, age),
        )
    };
    let closed = EST | CT_CLIENT_CLOSING | CT_BACKEND_CLOSING;
    assert!(doomed(vec![snat_reply(closed, t.tcp_close), snat(100)]).is_empty());
    assert!(
        doomed(vec![snat_reply(EST | CT_CLIENT_CLOSING, t.tcp_close + 1), snat(100)]).is_empty(),
        "one side closed: the port is held"
    );
    assert_eq!(
        doomed(vec![snat_reply(closed, t.tcp_close + 1), snat(100)]),
        BTreeSet::from([CT_SNAT, CT_SNAT_REPLY]),
        "both closed and past the close timeout: the port is free"
    );
    assert!(doomed(vec![snat(t.tcp_syn)]).is_empty(), "a new flow's pending allocation stays");
    assert_eq!(doomed(vec![snat(t.tcp_syn + 1)]), BTreeSet::from([CT_SNAT]));
}
