//! Kernel decisions as fixture tables run through BPF_PROG_TEST_RUN: input
//! frame, seeded maps, expected verdict and expected output bytes.
mod conntrack;
mod differential;
mod fixtures;
mod flows;
mod fragments;
mod harness;
mod icmp_errors;
mod masquerade;
mod policies;
mod sctp;
