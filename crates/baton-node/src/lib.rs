//! A Baton node as a library: `node::run` composes the mesh (the mTLS control plane, gossip,
//! the membership driver and the stage service, from baton-mesh) and the serving layer (router,
//! scheduler and shard actors, from baton-serve) into a pipeline head or a stage node. The
//! `baton node` command and in-process tests both start nodes through it.

pub mod dashboard;
pub mod forward;
pub mod node;
pub mod quic_relay;
pub mod resume;
pub mod succession;
