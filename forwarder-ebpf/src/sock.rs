//! Socket-level translation for traffic the node itself originates
//! (host-network processes: kubelet probes, DNS lookups). `connect()` and
//! `sendto()` to a frontend go to a backend instead, so no packet carries
//! the frontend address; replies (`recvfrom`) and `getpeername()` still show
//! the frontend, as resolvers check. Attached to the root cgroup, the
//! programs act only on sockets of the node's network namespace.
use aya_ebpf::{
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use forwarder_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP, SockKey, SockNat, stat};

use crate::{
    maps::{SOCKET_NAT, count},
    service,
};

/// The node's network namespace cookie, set at load time.
#[unsafe(no_mangle)]
static NODE_NETNS_COOKIE: u64 = 0;

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[inline(always)]
fn on_node(ctx: &SockAddrContext) -> bool {
    // SAFETY: a volatile read of a load-time constant; a helper on our context.
    unsafe {
        let node = core::ptr::read_volatile(&NODE_NETNS_COOKIE);
        node != 0 && bpf_get_netns_cookie(ctx.sock_addr.cast()) == node
    }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: helper on our context.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

#[inline(always)]
fn sock_key(ctx: &SockAddrContext, backend_addr: u32, backend_port: u16) -> SockKey {
    SockKey { cookie: cookie(ctx), backend_addr, backend_port, _pad: [0; 2] }
}

/// Sends a socket that names a frontend to a backend. A drop decision
/// (a `Local` policy without endpoint here) denies the call rather than
/// let the frontend address leak onto the wire; a reject also reports
/// "connection refused", as the ICMP answer does for other clients.
#[inline(always)]
fn translate(ctx: &SockAddrContext) -> i32 {
    if !on_node(ctx) {
        return ALLOW;
    }
    // SAFETY: the context's pointer is valid for the program's run.
    let addr: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    let proto = match addr.protocol {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        132 => PROTO_SCTP,
        _ => return ALLOW,
    };
    let (daddr, dport) = (addr.user_ip4, addr.user_port as u16);
    match service::socket_backend(daddr, dport, proto) {
        Ok(Some(backend)) => {
            let nat = SockNat {
                frontend_addr: daddr,
                backend_addr: backend.addr,
                frontend_port: dport,
                backend_port: backend.port,
            };
            // Best effort: without it replies show the backend.
            let key = sock_key(ctx, backend.addr, backend.port);
            let _ = SOCKET_NAT.insert(&key, &nat, u64::from(BPF_ANY));
            addr.user_ip4 = backend.addr;
            addr.user_port = u32::from(backend.port);
            count(stat::SOCKET_CONNECT);
            ALLOW
        }
        // Not talking to a frontend.
        Ok(None) => ALLOW,
        Err(reason) => {
            count(reason);
            if stat::is_reject(reason) {
                // SAFETY: plain helper call.
                unsafe { bpf_set_retval(-ECONNREFUSED) };
            }
            DENY
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn fwd_sock_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

/// `sendto()` on an unconnected UDP socket.
#[cgroup_sock_addr(sendmsg4)]
pub fn fwd_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

/// Shows the frontend instead of the backend the socket was sent to.
#[inline(always)]
fn restore(ctx: &SockAddrContext) -> i32 {
    if !on_node(ctx) {
        return ALLOW;
    }
    // SAFETY: the context's pointer is valid for the program's run.
    let addr: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    let key = sock_key(ctx, addr.user_ip4, addr.user_port as u16);
    // SAFETY: copied out immediately.
    if let Some(nat) = unsafe { SOCKET_NAT.get(&key) }.copied() {
        addr.user_ip4 = nat.frontend_addr;
        addr.user_port = u32::from(nat.frontend_port);
    }
    ALLOW
}

/// The source of a received datagram (`recvfrom`).
#[cgroup_sock_addr(recvmsg4)]
pub fn fwd_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn fwd_sock_peername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx)
}
