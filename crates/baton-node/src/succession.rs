//! A stage node watching its pipeline head: when the head has been silent past the stages'
//! lease and does not answer when asked, the survivor holding the lowest layers (the head's
//! neighbour) takes its place, with the plan `baton_mesh::elastic::succession` gives from what
//! the gossip says every stage serves. The other stages wait for the new head's `Init`.

use std::sync::Arc;
use std::time::Duration;

use baton_mesh::elastic::{describe_move, succession, Member, Plan};
use baton_mesh::gossip::Gossip;
use baton_mesh::stage_service::{StageService, HEAD_LEASE};

/// How long the head must have been silent before its neighbour asks whether it is alive:
/// past every stage's lease, so the other stages take the new head's `Init`.
pub const SUCCEED_AFTER: Duration = Duration::from_millis(1500);

/// Resolves with the plan this node starts heading when its head is gone and this node is its
/// successor; never resolves otherwise.
pub async fn await_head_loss(svc: &StageService, gossip: &Arc<Gossip>, layer_bytes: u64, num_layers: usize) -> Plan {
    const _: () = assert!(SUCCEED_AFTER.as_millis() > HEAD_LEASE.as_millis());
    let client = reqwest::Client::new();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some((head, silent)) = svc.head() else { continue };
        if silent < SUCCEED_AFTER {
            continue;
        }
        let Some(serving) = svc.shard().serving() else { continue };
        let me = gossip.mine();
        let members = gossip.members();
        let replica: Vec<_> = members.iter().filter(|i| i.replica == me.replica).collect();
        let mut stages = vec![(me.name.clone(), serving.layers.clone())];
        for i in replica.iter().filter(|i| i.name != me.name && i.name != head) {
            if let Some(s) = i.serving.filter(|s| s.epoch == serving.epoch) {
                stages.push((i.name.clone(), s.first as usize..s.end as usize));
            }
        }
        let roster: Vec<Member> = replica
            .iter()
            .map(|i| Member { name: i.name.clone(), capacity: i.memory_bytes as f64, max_layers: (i.memory_bytes / layer_bytes.max(1)) as usize })
            .collect();
        let Some(plan) = succession(&me.name, serving.epoch, &stages, &roster, num_layers) else { continue };
        // Ask before accusing: a head slow to probe this node (busy, or a slow link to it
        // alone) still answers its HTTP API.
        if let Some(http) = members.iter().find(|i| i.name == head).and_then(|i| i.http) {
            let asked = client.get(format!("http://{http}/health")).timeout(Duration::from_millis(700)).send().await;
            if asked.is_ok() {
                tracing::info!(%head, silent_ms = silent.as_millis() as u64, "the head is slow to probe this stage but answers");
                continue;
            }
        }
        eprintln!(
            "baton: the pipeline head {head} has been silent for {:.1} s and does not answer: this node heads the pipeline now (epoch {}: {})",
            silent.as_secs_f64(),
            plan.epoch,
            describe_move(&stages, &plan.stages)
        );
        return plan;
    }
}
