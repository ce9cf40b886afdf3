//! forwarder's kernel programs.
//!
//! - `fwd_xdp_node` (XDP, node interfaces): DNAT of packets for a Service
//!   frontend to a backend.
//! - `fwd_tc_pod` (TC ingress, pod-facing interfaces): the same DNAT for pod
//!   clients.
//! - `fwd_tc_node` (TC ingress, node interfaces): the rejects XDP hands over.
//! - `fwd_tc_rnat` (TC egress, node and pod-facing interfaces): reverse NAT
//!   of backend replies, and masquerading.
//! - `fwd_sock_connect4`, `fwd_sock_peername4` (cgroup): socket-level
//!   translation of the node's own connections.
#![no_std]
#![no_main]

mod conntrack;
mod frag;
mod icmp;
mod icmp_error;
mod lb;
mod maps;
mod nat;
mod parse;
mod sctp;
mod service;
mod sock;
mod tc;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
