//! The mesh: what a cluster is (cluster.toml), which node serves which layers (placement, pure
//! data that can change at run time), the cluster's certificate authority, and the mutually
//! authenticated QUIC control plane between nodes.

pub mod config;
pub mod control;
pub mod pki;
pub mod placement;
pub mod stage_service;
pub mod stage_wire;
