//! forwarder's userspace: loads the programs, translates Kubernetes objects
//! into map entries and keeps the maps in sync.
pub mod addresses;
pub mod agent;
pub mod attach;
pub mod cidr;
pub mod cluster;
pub mod conntrack;
pub mod dataplane;
pub mod healthz;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod pins;
pub mod sock_diag;
pub mod source;
pub mod stale;
pub mod sync;
pub mod translate;
