//! The mesh: what a cluster is (cluster.toml), which node serves which layers (placement, pure
//! data that can change at run time), the cluster's certificate authority, and the mutually
//! authenticated QUIC control plane between nodes, and the tensor plane (UCX, or QUIC) that
//! carries a pipeline's activations.

pub mod autoscale;
pub mod config;
pub mod control;
pub mod elastic;
pub mod gossip;
pub mod membership;
pub mod pki;
pub mod placement;
pub mod routing;
pub mod stage_service;
pub mod stage_wire;
pub mod tensor_plane;
