//! Empty on purpose: the programs live in the `forwarder` binary target. This
//! library target lets forwarder-user take a build-dependency on the crate, so
//! cargo rebuilds the programs when their sources change.
#![no_std]
