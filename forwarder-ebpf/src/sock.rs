//! Socket-level translation for traffic the node itself originates
//! (host-network processes, kubelet probes): `connect()` to a frontend is
//! turned into a connection to a backend, so no packet ever carries the
//! frontend address; `getpeername()` still shows it. Attached to the root
//! cgroup, it acts only on sockets of the node's network namespace.
use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use forwarder_common::{CtValue, PROTO_TCP, PROTO_UDP, stat};

use crate::{
    lb,
    maps::{SOCKET_FRONTENDS, count},
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

#[cgroup_sock_addr(connect4)]
pub fn fwd_sock_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(verdict) => verdict,
        // No usable endpoint: "connection refused", as the ICMP reject
        // gives other clients.
        Err(reason) if stat::is_reject(reason) => {
            count(reason);
            // SAFETY: plain helper call.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            DENY
        }
        // Any other failure leaves the socket alone: the packet path still
        // sees the frontend address.
        Err(reason) => {
            count(reason);
            ALLOW
        }
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, u32> {
    if !on_node(ctx) {
        return Ok(ALLOW);
    }
    // SAFETY: the context's pointer is valid for the program's run.
    let addr = unsafe { &mut *ctx.sock_addr };
    let proto = match addr.protocol {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        _ => return Ok(ALLOW),
    };
    let (daddr, dport) = (addr.user_ip4, addr.user_port as u16);
    let Some(backend) = lb::socket_backend(daddr, dport, proto)? else {
        return Ok(ALLOW);
    };
    // SAFETY: helper on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let frontend = CtValue { nat_addr: daddr, nat_port: dport, _pad: 0, backend_id: 0 };
    // Best effort: without it getpeername shows the backend.
    let _ = SOCKET_FRONTENDS.insert(&cookie, &frontend, u64::from(BPF_ANY));
    addr.user_ip4 = backend.addr;
    addr.user_port = u32::from(backend.port);
    count(stat::SOCKET_CONNECT);
    Ok(ALLOW)
}

#[cgroup_sock_addr(getpeername4)]
pub fn fwd_sock_peername4(ctx: SockAddrContext) -> i32 {
    if on_node(&ctx) {
        // SAFETY: helper on our context; the pointer is valid for the run.
        unsafe {
            let cookie = bpf_get_socket_cookie(ctx.sock_addr.cast());
            if let Some(frontend) = SOCKET_FRONTENDS.get(&cookie) {
                (*ctx.sock_addr).user_ip4 = frontend.nat_addr;
                (*ctx.sock_addr).user_port = u32::from(frontend.nat_port);
            }
        }
    }
    ALLOW
}
