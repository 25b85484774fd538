//! Gossip membership over the authenticated control plane. foca (SWIM with suspicion and
//! dissemination; sans-IO) decides; this shell carries its packets as QUIC uni streams on the
//! mutually authenticated control connections, never as plaintext UDP. A packet whose SWIM
//! header names a sender other than the certificate of the connection it came on is dropped.
//! Each node publishes a `NodeInfo` (addresses, memory, replica, state, layers, generation) as a
//! versioned custom broadcast; a newer (generation, version) of a node replaces the older
//! everywhere. Nodes join by announcing themselves to the seeds (cluster.toml's nodes).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{AccumulatingRuntime, BroadcastHandler, Codec, Config, Foca, Identity, Invalidates, OwnedNotification, PostcardCodec, Timer};
use rand::SeedableRng;
use tokio::sync::watch;

use crate::control::{ControlNode, DropKind, PeerLink};

/// The largest gossip packet accepted.
pub const MAX_GOSSIP_PACKET: usize = 64 << 10;

/// A member's identity in the gossip: its certificate name, its process generation and where
/// its control plane listens.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeId {
    pub name: String,
    pub generation: u64,
    pub control: SocketAddr,
}

impl Identity for NodeId {
    type Addr = String;

    /// Declared down while alive (a partition healed): rejoin under a newer generation.
    fn renew(&self) -> Option<Self> {
        Some(NodeId { generation: self.generation + 1, ..self.clone() })
    }

    fn addr(&self) -> String {
        self.name.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// What the serving state of a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NodeState {
    /// Serving, or ready to take layers.
    Ready,
    /// Leaving: its layers should move elsewhere before it stops.
    Draining,
}

/// What a node publishes: what the planner and the routers need to know of it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub generation: u64,
    /// Bumped on every change this node makes to its own info.
    pub version: u64,
    pub control: SocketAddr,
    pub http: Option<SocketAddr>,
    pub quic: Option<SocketAddr>,
    pub memory_bytes: u64,
    pub replica: u32,
    pub state: NodeState,
    /// It heads its replica's pipeline: it serves the client APIs at `http` / `quic`, and entry
    /// nodes spread requests over it.
    pub head: bool,
    /// The layers its GPU shard serves now and the plan epoch they are for (`None`: none).
    pub serving: Option<ServedLayers>,
    /// Its measured speed: µs per layer per token in its transformer layers (`None` until it
    /// has run a step).
    pub us_per_layer_token: Option<f32>,
    /// Its load: the share of the last few seconds its device spent computing, per mille.
    pub busy_permille: u16,
    /// The pipeline it heads (`None` unless `head`): two heads of one replica (a partition
    /// healed) compare these, and the lesser steps down (see [`HeadedPipeline::outranks`]).
    pub pipeline: Option<HeadedPipeline>,
    /// Its device, as it describes it (`cpu (2 threads)`, `mock:h100`, ...), for dashboards.
    pub device: String,
}

/// What a head says of the pipeline it heads: its plan's epoch and how many nodes serve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeadedPipeline {
    pub epoch: u64,
    pub stages: u32,
}

impl HeadedPipeline {
    /// Whether head `name` with `self` outranks head `other_name` with `other` of the same
    /// replica: the newer plan, then the larger pipeline, then the cluster.toml head
    /// (`is_static`), then the lower name. A total order, so two heads that see each other
    /// agree on which one steps down.
    pub fn outranks(&self, name: &str, other: &HeadedPipeline, other_name: &str, is_static: impl Fn(&str) -> bool) -> bool {
        let key = |p: &HeadedPipeline, n: &str| (p.epoch, p.stages, is_static(n), std::cmp::Reverse(n.to_string()));
        key(self, name) > key(other, other_name)
    }
}

/// A layer range a node serves, under a plan epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServedLayers {
    pub first: u32,
    pub end: u32,
    pub epoch: u64,
}

/// The key of a `NodeInfo` broadcast: a newer one of the same node replaces the older.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoKey {
    name: String,
    stamp: (u64, u64),
}

impl Invalidates for InfoKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.name == other.name && self.stamp >= other.stamp
    }
}

#[derive(Debug, thiserror::Error)]
#[error("malformed node info: {0}")]
pub struct InfoError(String);

/// Every node's latest info, as the gossip brought it; `fresh` is set when one changed.
#[derive(Debug, Default, Clone)]
struct Infos(Arc<Mutex<HashMap<String, NodeInfo>>>, Arc<std::sync::atomic::AtomicBool>, Arc<crate::control::Drops>);

impl Infos {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeInfo>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BroadcastHandler<NodeId> for Infos {
    type Key = InfoKey;
    type Error = InfoError;

    fn receive_item(&mut self, data: &[u8], _sender: Option<&NodeId>) -> Result<Option<InfoKey>, InfoError> {
        let info: NodeInfo = postcard::from_bytes(data).map_err(|e| InfoError(e.to_string()))?;
        let stamp = (info.generation, info.version);
        let mut map = self.lock();
        if let Some(old) = map.get(&info.name) {
            if old.generation > info.generation {
                // An older process's info arriving after its successor's: a replay.
                tracing::warn!(node = %info.name, generation = info.generation, known = old.generation, "dropping a node's info of an older generation");
                self.2.count(crate::control::DropKind::ReplayedGeneration);
                return Ok(None);
            }
            if (old.generation, old.version) >= stamp {
                // Gossip brings the same broadcast more than once: nothing new.
                return Ok(None);
            }
        }
        let key = InfoKey { name: info.name.clone(), stamp };
        map.insert(info.name.clone(), info);
        self.1.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(key))
    }
}

type Swim = Foca<NodeId, PostcardCodec, rand::rngs::SmallRng, Infos>;

/// A node's gossip agent.
pub struct Gossip {
    me: NodeId,
    node: Arc<ControlNode>,
    swim: Mutex<Swim>,
    infos: Infos,
    mine: Mutex<NodeInfo>,
    links: Mutex<HashMap<String, PeerLink>>,
    /// Bumped whenever membership or a node's info changes.
    changes: watch::Sender<u64>,
}

/// Foca's settings for this mesh: a LAN profile probing every 500 ms.
fn config() -> Config {
    let mut c = Config::new_lan(std::num::NonZeroU32::new(32).unwrap_or(std::num::NonZeroU32::MIN));
    c.probe_period = Duration::from_millis(500);
    c.probe_rtt = Duration::from_millis(250);
    c.max_packet_size = std::num::NonZeroUsize::new(MAX_GOSSIP_PACKET).unwrap_or(std::num::NonZeroUsize::MIN);
    // Down members are asked again every second: when a cut link heals, the two sides find
    // each other within a second or two (the LAN profile waits 65 s), and each side renews
    // the identity the other declared down.
    c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(1),
        num_members: std::num::NonZeroUsize::new(3).unwrap_or(std::num::NonZeroUsize::MIN),
    });
    c
}

impl Gossip {
    /// Starts the agent for `info` (this node) and announces it to every seed.
    pub fn start(node: Arc<ControlNode>, info: NodeInfo, seeds: Vec<(String, SocketAddr)>) -> Arc<Gossip> {
        let me = NodeId { name: info.name.clone(), generation: info.generation, control: info.control };
        let infos = Infos(Arc::default(), Arc::default(), node.drops().clone());
        let rng = rand::rngs::SmallRng::seed_from_u64(info.generation ^ 0x9e37_79b9_7f4a_7c15);
        let swim = Foca::with_custom_broadcast(me.clone(), config(), rng, PostcardCodec, infos.clone());
        let (changes, _) = watch::channel(0);
        let g = Arc::new(Gossip {
            me,
            node,
            swim: Mutex::new(swim),
            infos,
            mine: Mutex::new(info.clone()),
            links: Mutex::new(HashMap::new()),
            changes,
        });
        g.publish(info);
        for (name, control) in seeds.into_iter().filter(|(n, _)| *n != g.me.name) {
            let seed = NodeId { name, generation: 0, control };
            g.with_swim(|swim, rt| swim.announce(seed, rt));
        }
        // Re-announce to the seeds until some member knows us (seeds may start later).
        g
    }

    /// Announces this node to `seed` again (the node's start-up loop calls this until a member
    /// answers).
    pub fn announce(self: &Arc<Self>, name: &str, control: SocketAddr) {
        if name != self.me.name {
            let seed = NodeId { name: name.to_string(), generation: 0, control };
            self.with_swim(|swim, rt| swim.announce(seed, rt));
        }
    }

    pub fn name(&self) -> &str {
        &self.me.name
    }

    /// Changes whenever a member comes or goes or a node's info changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The names SWIM holds as live members (whether or not their info has arrived).
    pub fn alive(&self) -> Vec<String> {
        self.swim.lock().unwrap_or_else(|p| p.into_inner()).iter_members().map(|m| m.id().name.clone()).collect()
    }

    /// Every live member's latest info (this node's too).
    pub fn members(&self) -> Vec<NodeInfo> {
        let alive: Vec<String> = self.swim.lock().unwrap_or_else(|p| p.into_inner()).iter_members().map(|m| m.id().name.clone()).collect();
        let infos = self.infos.lock();
        let mut out: Vec<NodeInfo> = alive.iter().filter_map(|n| infos.get(n).cloned()).collect();
        out.push(self.mine.lock().unwrap_or_else(|p| p.into_inner()).clone());
        out
    }

    /// This node's published info.
    pub fn mine(&self) -> NodeInfo {
        self.mine.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes this node's published info (state, ...).
    pub fn update(self: &Arc<Self>, f: impl FnOnce(&mut NodeInfo)) {
        let info = {
            let mut mine = self.mine.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut mine);
            mine.version += 1;
            mine.clone()
        };
        self.publish(info);
    }

    fn publish(self: &Arc<Self>, info: NodeInfo) {
        match add_info(&mut self.swim.lock().unwrap_or_else(|p| p.into_inner()), &info) {
            Ok(true) => {}
            Ok(false) => tracing::warn!("this node's info was not newer than the one published"),
            Err(e) => tracing::warn!(error = %e, "cannot publish this node's info"),
        }
        self.changes.send_modify(|n| *n += 1);
    }

    /// A gossip packet that arrived on the control connection of `peer` (its certificate name).
    pub fn receive(self: &Arc<Self>, peer: &str, data: &[u8]) {
        let mut rt = AccumulatingRuntime::new();
        let taken = take_packet(&mut self.swim.lock().unwrap_or_else(|p| p.into_inner()), peer, data, &mut rt);
        self.drain(rt);
        if let Err(kind) = taken {
            tracing::warn!(%peer, why = kind.as_str(), "dropping a gossip packet");
            self.node.drops().count(kind);
        }
    }

    /// Leaves the cluster (a draining node, at the end).
    pub fn leave(self: &Arc<Self>) {
        self.with_swim(|swim, rt| swim.leave_cluster(rt));
    }

    fn with_swim(self: &Arc<Self>, f: impl FnOnce(&mut Swim, &mut AccumulatingRuntime<NodeId>) -> Result<(), foca::Error>) {
        let mut rt = AccumulatingRuntime::new();
        {
            let mut swim = self.swim.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = f(&mut swim, &mut rt) {
                tracing::debug!(error = %e, "gossip");
            }
        }
        self.drain(rt);
    }

    /// Carries out what foca asked for: packets to send, timers, notifications.
    fn drain(self: &Arc<Self>, mut rt: AccumulatingRuntime<NodeId>) {
        while let Some((to, data)) = rt.to_send() {
            let g = Arc::clone(self);
            tokio::spawn(async move { g.send(to, data.to_vec()).await });
        }
        while let Some((after, timer)) = rt.to_schedule() {
            let g = Arc::clone(self);
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                g.timer(timer);
            });
        }
        let mut changed = self.infos.1.swap(false, std::sync::atomic::Ordering::Relaxed);
        let mut newcomer = false;
        while let Some(n) = rt.to_notify() {
            changed = true;
            match n {
                OwnedNotification::MemberUp(id) => {
                    tracing::info!(member = %id.name, generation = id.generation, "gossip: member up");
                    newcomer = true;
                }
                OwnedNotification::MemberDown(id) => tracing::info!(member = %id.name, "gossip: member down"),
                OwnedNotification::Rename(a, b) => {
                    tracing::info!(member = %b.name, from = a.generation, to = b.generation, "gossip: member renamed");
                    newcomer = true;
                }
                other => tracing::debug!(?other, "gossip"),
            }
        }
        if newcomer {
            // Broadcasts are sent a bounded number of times: a member that arrives later
            // learns this node's info only from a new one.
            self.update(|_| {});
        } else if changed {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    fn timer(self: &Arc<Self>, timer: Timer<NodeId>) {
        self.with_swim(|swim, rt| swim.handle_timer(timer, rt));
    }

    async fn send(&self, to: NodeId, data: Vec<u8>) {
        let cached = self.links.lock().unwrap_or_else(|p| p.into_inner()).get(&to.name).filter(|l| l.connection.close_reason().is_none()).cloned();
        let link = match cached {
            Some(l) => l,
            None => match tokio::time::timeout(Duration::from_secs(1), self.node.connect(to.control, &to.name)).await {
                Ok(Ok(l)) => {
                    self.links.lock().unwrap_or_else(|p| p.into_inner()).insert(to.name.clone(), l.clone());
                    l
                }
                _ => return,
            },
        };
        let sent = async {
            let mut s = link.connection.open_uni().await.ok()?;
            // One length-prefixed frame per stream (as baton-proto reads them).
            let mut frame = Vec::with_capacity(4 + data.len());
            frame.extend_from_slice(&(data.len() as u32).to_le_bytes());
            frame.extend_from_slice(&data);
            s.write_all(&frame).await.ok()?;
            s.finish().ok()
        };
        if tokio::time::timeout(Duration::from_secs(1), sent).await.ok().flatten().is_none() {
            self.links.lock().unwrap_or_else(|p| p.into_inner()).remove(&to.name);
        }
    }
}

/// Broadcasts `info` from `swim` (foca hands it to `Infos::receive_item`, which stores it and
/// has it sent on); `false` when it is not newer than the one published.
fn add_info(swim: &mut Swim, info: &NodeInfo) -> Result<bool, InfoError> {
    let bytes = postcard::to_allocvec(info).map_err(|e| InfoError(e.to_string()))?;
    swim.add_broadcast(&bytes).map_err(|e| InfoError(e.to_string()))
}

/// What a gossip packet from `peer` (the connection's certificate name) does to `swim`, or why
/// it is dropped: its SWIM header must name `peer` as the sender, and SWIM must read it (a
/// node's info inside is checked by `Infos`). No I/O: what SWIM wants sent comes out in `rt`.
fn take_packet(swim: &mut Swim, peer: &str, data: &[u8], rt: &mut AccumulatingRuntime<NodeId>) -> Result<(), DropKind> {
    let claimed = Codec::<NodeId>::decode_header(&mut PostcardCodec, data).map_err(|_| DropKind::MalformedGossip)?.src;
    if claimed.name != peer {
        return Err(DropKind::ForgedGossip);
    }
    match swim.handle_data(data, rt) {
        Err(foca::Error::MalformedPacket | foca::Error::Decode(_) | foca::Error::CustomBroadcast(_) | foca::Error::DataTooBig) => Err(DropKind::MalformedGossip),
        Err(e) => {
            tracing::debug!(error = %e, "gossip");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// The receiving half of a node's gossip with no node around it: a SWIM agent that reads
/// packets and keeps what they say, and sends nothing (what the fuzz targets feed bytes to).
pub struct PacketReader(Swim);

impl PacketReader {
    /// An agent for node `name`.
    pub fn new(name: &str) -> Self {
        let me = NodeId { name: name.to_string(), generation: 1, control: SocketAddr::from(([127, 0, 0, 1], 9)) };
        let rng = rand::rngs::SmallRng::seed_from_u64(1);
        PacketReader(Foca::with_custom_broadcast(me, config(), rng, PostcardCodec, Infos::default()))
    }

    /// Reads a packet that came on `peer`'s connection: taken, with the packets SWIM answers
    /// with (receiver, bytes), or dropped and why.
    pub fn read(&mut self, peer: &str, data: &[u8]) -> Result<Vec<(NodeId, Vec<u8>)>, DropKind> {
        let mut rt = AccumulatingRuntime::new();
        take_packet(&mut self.0, peer, data, &mut rt)?;
        Ok(sent(rt))
    }

    /// The members it knows of now.
    pub fn members(&self) -> usize {
        self.0.iter_members().count()
    }

    /// Publishes `info` (as a node publishes its own) for the packets it makes from now on.
    pub fn publish(&mut self, info: &NodeInfo) -> Result<(), InfoError> {
        add_info(&mut self.0, info).map(|_| ())
    }

    /// The packets this agent sends to announce itself to `to` (receiver, bytes).
    pub fn announce(&mut self, to: NodeId) -> Vec<(NodeId, Vec<u8>)> {
        let mut rt = AccumulatingRuntime::new();
        let _ = self.0.announce(to, &mut rt);
        sent(rt)
    }
}

fn sent(mut rt: AccumulatingRuntime<NodeId>) -> Vec<(NodeId, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((to, data)) = rt.to_send() {
        out.push((to, data.to_vec()));
    }
    out
}

/// Reads gossip packets from the uni streams of one authenticated control connection.
pub async fn serve_connection(gossip: Arc<Gossip>, link: PeerLink) {
    loop {
        let mut recv = tokio::select! {
            r = link.connection.accept_uni() => match r {
                Ok(r) => r,
                Err(_) => return,
            },
            () = gossip.node.until_revoked(&link) => return,
        };
        let gossip = gossip.clone();
        let peer = link.peer.clone();
        tokio::spawn(async move {
            match baton_proto::read_frame_limited(&mut recv, MAX_GOSSIP_PACKET).await {
                Ok(Some(body)) => gossip.receive(&peer, &body),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "dropping an unreadable gossip packet");
                    let kind = match e {
                        baton_proto::FrameError::TooLarge(_) => Some(DropKind::OversizedGossip),
                        baton_proto::FrameError::Malformed(_) => Some(DropKind::MalformedGossip),
                        _ => None,
                    };
                    gossip.node.drops().count_if(kind);
                }
            }
        });
    }
}


#[cfg(test)]
mod tests {
    use super::{HeadedPipeline, Infos, NodeInfo, NodeState};
    use crate::control::DropKind;
    use foca::BroadcastHandler;

    fn info(generation: u64, version: u64) -> Vec<u8> {
        let info = NodeInfo {
            name: "node-b".into(),
            generation,
            version,
            control: "127.0.0.1:9".parse().unwrap(),
            http: None,
            quic: None,
            memory_bytes: 1 << 30,
            replica: 0,
            state: NodeState::Ready,
            head: false,
            serving: None,
            us_per_layer_token: None,
            busy_permille: 0,
            pipeline: None, device: "cpu".into(),
        };
        postcard::to_allocvec(&info).unwrap()
    }

    /// The gossip's receiving half with no I/O: two agents learn of each other from the packets
    /// they make; the same packet on another peer's connection is forged.
    #[test]
    fn two_packet_readers_learn_of_each_other_from_their_packets() {
        let (mut a, mut b) = (super::PacketReader::new("node-a"), super::PacketReader::new("node-b"));
        let to_a = b.announce(super::NodeId { name: "node-a".into(), generation: 1, control: "127.0.0.1:9".parse().unwrap() });
        assert_eq!(to_a.len(), 1);
        let replies = a.read("node-b", &to_a[0].1).unwrap();
        assert_eq!(a.members(), 1);
        assert!(!replies.is_empty());
        for (_, p) in replies {
            b.read("node-a", &p).unwrap();
        }
        assert_eq!(b.members(), 1);
        assert_eq!(a.read("node-c", &to_a[0].1).err(), Some(DropKind::ForgedGossip));
        assert_eq!(a.read("node-b", b"not swim").err(), Some(DropKind::MalformedGossip));
    }

    /// A node's info from an older process (a replayed generation) is dropped and counted; a
    /// repeat of the current one is ignored without counting; a newer one is taken; bytes that
    /// are no node info are an error (the gossip drops the packet).
    #[test]
    fn a_replayed_generation_is_dropped_and_counted() {
        let mut infos = Infos::default();
        assert!(infos.receive_item(&info(5, 1), None).unwrap().is_some());
        assert!(infos.receive_item(&info(4, 9), None).unwrap().is_none(), "an older generation was taken");
        assert_eq!(infos.2.get(DropKind::ReplayedGeneration), 1);
        assert!(infos.receive_item(&info(5, 1), None).unwrap().is_none());
        assert_eq!(infos.2.get(DropKind::ReplayedGeneration), 1, "a duplicate counted as a replay");
        assert!(infos.receive_item(&info(5, 2), None).unwrap().is_some());
        assert!(infos.receive_item(&info(6, 0), None).unwrap().is_some());
        assert_eq!(infos.lock()["node-b"].generation, 6);
        assert!(infos.receive_item(&[0xff; 12], None).is_err());
        assert_eq!(infos.2.snapshot().iter().map(|(_, n)| n).sum::<u64>(), 1);
    }

    /// Two heads of one replica agree on which one steps down: exactly one outranks the other,
    /// by epoch, then size, then the cluster.toml head, then the lower name.
    #[test]
    fn exactly_one_of_two_heads_outranks_the_other() {
        let p = |epoch, stages| HeadedPipeline { epoch, stages };
        let is_static = |n: &str| n == "node-a";
        let cases = [
            ((p(3, 1), "node-c"), (p(2, 3), "node-a"), true),
            ((p(2, 2), "node-a"), (p(2, 1), "node-c"), true),
            ((p(2, 1), "node-a"), (p(2, 1), "node-c"), true),
            ((p(2, 1), "node-b"), (p(2, 1), "node-c"), true),
            ((p(2, 0), "node-a"), (p(2, 1), "node-c"), false),
        ];
        for ((x, xn), (y, yn), x_wins) in cases {
            assert_eq!(x.outranks(xn, &y, yn, is_static), x_wins, "{xn} {x:?} vs {yn} {y:?}");
            assert_eq!(y.outranks(yn, &x, xn, is_static), !x_wins, "{yn} {y:?} vs {xn} {x:?}");
        }
    }
}
