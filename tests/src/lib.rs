//! Test support shared by the integration tests and `cargo xtask demo`:
//! packet builders, network namespaces with cleanup guards, a topology of
//! one node with pods, echo servers and the forwarder process.
pub mod api_cluster;
pub mod bpf_stats;
pub mod cluster;
pub mod echo;
pub mod forwarder;
pub mod k8s;
pub mod kube_proxy;
pub mod manifest;
pub mod netns;
pub mod packet;
pub mod sctp;
pub mod topology;
pub mod xdp_pass;
