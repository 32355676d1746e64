//! Test fixtures for splitvmm: lanes that boot real guests and report what they saw.

pub mod bench;
pub mod faultfs;
pub mod lane;
pub mod owned_child;
pub mod vhost;
