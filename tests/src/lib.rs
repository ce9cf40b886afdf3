//! Test support shared by the integration tests and `cargo xtask demo`:
//! packet builders, network namespaces with cleanup guards, echo servers.
pub mod packet;
