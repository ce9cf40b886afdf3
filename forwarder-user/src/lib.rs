//! forwarder's userspace: loads the programs, translates Kubernetes objects
//! into map entries and keeps the maps in sync.
pub mod model;
pub mod translate;
pub mod sync;
pub mod dataplane;
pub mod manifests;
pub mod netlink;
pub mod healthz;
pub mod agent;
