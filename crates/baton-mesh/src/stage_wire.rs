//! Messages between a pipeline head and its stages (as UCX active messages on the tensor plane,
//! or over the control plane's QUIC streams): a step's batch layout and input (token ids or
//! hidden states) in, hidden states or sampled tokens out.

use baton_engine::{BatchLayout, Sampled, SamplingParams, SeqChunk};

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireChunk {
    pub start_pos: u32,
    pub len: u32,
    pub block_table: Vec<u32>,
    pub wants_logits: bool,
}

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireSampling {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
    pub max_tokens: u32,
    pub min_tokens: u32,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub logprobs: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireNewSequence {
    pub id: u64,
    pub params: WireSampling,
    pub prompt: Vec<u32>,
    pub eos: Vec<u32>,
    /// Tokens the sequence produced before it reached this stage (it continues after a
    /// failover): the sampler resumes where it was.
    pub generated: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WireInput {
    Tokens(Vec<u32>),
    Hidden(Vec<f32>),
    /// `len` bytes of little-endian f32 hidden states the head put at the start of this stage's
    /// RMA window (and flushed) before sending the step.
    Window { len: u64 },
}

/// A stage's RMA window, as the head needs it to put hidden states there.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireWindow {
    pub base: u64,
    pub len: u64,
    pub rkey: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum StageRequest {
    /// The pipeline head's liveness probe, answered by `Pong` (it renews the head's lease).
    Ping { nonce: u64 },
    /// Load layers `first_layer..end_layer` and allocate the KV cache the head's block ids refer
    /// to, for plan `epoch`; answered by `Ready`. From then on the stage serves steps of that
    /// epoch only. `head` names the pipeline head that sends it: a stage serves one head at a
    /// time, and takes another's `Init` only once its head has been silent for the lease.
    Init { block_size: u32, num_blocks: u32, first_layer: u32, end_layer: u32, epoch: u64, head: String },
    /// The head's tensor-plane address (its UCX worker), if it has one, and how large an RMA
    /// window it would like for hidden states; answered by `Attached`.
    Attach { tensor_address: Option<Vec<u8>>, window_bytes: u64 },
    /// A planned plan change moves layers: the K/V contents of `blocks` for layers
    /// `first_layer..end_layer`, from the stage as plan `epoch` (the one it runs) left them;
    /// answered by `Kv`.
    ExportKv { epoch: u64, first_layer: u32, end_layer: u32, blocks: Vec<u32> },
    /// Writes what an `ExportKv` gave into the stage, initialised for plan `epoch`; answered
    /// by `Ack`.
    ImportKv { epoch: u64, first_layer: u32, end_layer: u32, blocks: Vec<u32>, data: Vec<f32> },
    /// Leave gracefully (`baton node --drain`, or SIGUSR1 at the node): the node says so in its
    /// pongs, the head moves its layers, then sends `Release`. Answered by `Ack`.
    Drain,
    /// The head no longer needs this (draining) node: it may stop. Answered by `Ack`.
    Release,
    Step {
        /// The plan the head runs; a stage initialised for another one refuses the step.
        epoch: u64,
        chunks: Vec<WireChunk>,
        input: WireInput,
        /// Only for the last stage, which samples.
        new_sequences: Vec<WireNewSequence>,
        released: Vec<u64>,
        /// Ids of the sequences in `chunks` (sampling order on the last stage).
        ids: Vec<u64>,
    },
    /// An observer's ping (`baton status`, a node looking for its replica's head): answered as
    /// a `Ping` is, but it is not the head's word, so it renews no head's lease (an operator
    /// watching the cluster must not keep a dead head's stages waiting for it).
    Query { nonce: u64 },
    /// A step sent down the pipeline's chain (stage-to-stage links): the stage runs it and,
    /// while `route` names further stages, sends it on to the first of them with its hidden
    /// states and the rest of the route; the last stage samples. Answered by `Chained` with the
    /// sampled tokens (passed back up the chain), or `Broken` naming the stage that failed.
    /// `head`: the pipeline head whose step it is (the stage's lease holder, or refused).
    Chain {
        head: String,
        route: Vec<WireHop>,
        epoch: u64,
        chunks: Vec<WireChunk>,
        input: WireInput,
        new_sequences: Vec<WireNewSequence>,
        released: Vec<u64>,
        ids: Vec<u64>,
    },
}

/// A stage further down a chain: its name and control-plane address.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireHop {
    pub name: String,
    pub control: String,
}

/// What broke a chain, in `StageReply::Broken`.
pub const BROKEN_LOST: u8 = 0;
pub const BROKEN_ERROR: u8 = 1;
pub const BROKEN_REFUSED: u8 = 2;

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireSampled {
    pub id: u64,
    pub token: u32,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
    /// 0: none, 1: stop, 2: length.
    pub finish: u8,
}

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum StageReply {
    /// `loaded`: whether the head has initialised the stage (layers and epoch: what it serves).
    /// `generation`: identifies the node's process (a restart changes it).
    /// `ucx_steps`: steps that arrived over UCX; `window_steps`: of those, steps whose hidden
    /// states came by RMA into the stage's window.
    /// `draining`: the node asked to leave.
    /// `chained_steps`: steps that came down a chain (`Chain`, from the head or the stage before).
    /// `busy_us`: the node's device time in steps since its shard started (a head's too), so
    /// a reader sampling it twice has the stage's busy share between.
    Pong { nonce: u64, generation: u64, first_layer: u32, end_layer: u32, epoch: u64, loaded: bool, draining: bool, tensor_plane: String, ucx_steps: u64, window_steps: u64, chained_steps: u64, busy_us: u64, head: String, loading_mib_done: u32, loading_mib_total: u32 },
    Ack,
    /// The stage's UCX worker address and RMA window, when both ends have UCX.
    Attached { tensor_address: Option<Vec<u8>>, window: Option<WireWindow> },
    /// `kept`: the stage kept the layers it held with their KV (retained in place), rather than
    /// loading afresh; a head moving KV checks it for every stage it expects to keep its own.
    Ready { first_layer: u32, end_layer: u32, epoch: u64, kept: bool },
    /// `compute_us`: the stage's own time on the step (forward, and sampling on the last stage),
    /// so the head can tell transfer time from compute.
    Hidden { hidden: Vec<f32>, compute_us: u64 },
    Sampled { tokens: Vec<WireSampled>, compute_us: u64 },
    Kv { data: Vec<f32> },
    /// The stage's engine failed the request (an engine error, a panic, a failed load): a head
    /// that keeps getting these from a stage treats it as lost.
    Error(String),
    /// Work this stage does not take (another plan epoch, a stage not yet loaded, another
    /// head's, a node that heads a pipeline itself): no fault of its engine.
    Refused(String),
    /// The last stage's tokens for a `Chain` step, and each stage's timing in chain order:
    /// (its compute, the wall time of its call to the next stage (0 on the last), the time the
    /// step waited there while the device ran other steps), µs. That wait is the pipeline's
    /// normal queueing behind other micro-batches, not a stall of the stage.
    Chained { tokens: Vec<WireSampled>, hops: Vec<(u64, u64, u64)> },
    /// A `Chain` step failed at `stage`: its link broke (`BROKEN_LOST`), its engine failed
    /// (`BROKEN_ERROR`) or it refused the work (`BROKEN_REFUSED`).
    Broken { stage: String, kind: u8, detail: String },
}

pub fn layout_to_wire(l: &BatchLayout) -> Vec<WireChunk> {
    l.chunks
        .iter()
        .map(|c| WireChunk { start_pos: c.start_pos as u32, len: c.len as u32, block_table: c.block_table.clone(), wants_logits: c.wants_logits })
        .collect()
}

pub fn layout_from_wire(chunks: &[WireChunk]) -> BatchLayout {
    BatchLayout {
        chunks: chunks
            .iter()
            .map(|c| SeqChunk { start_pos: c.start_pos as usize, len: c.len as usize, block_table: c.block_table.clone(), wants_logits: c.wants_logits })
            .collect(),
    }
}

pub fn sampling_to_wire(p: &SamplingParams) -> WireSampling {
    WireSampling {
        temperature: p.temperature,
        top_k: p.top_k as u32,
        top_p: p.top_p,
        min_p: p.min_p,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        repetition_penalty: p.repetition_penalty,
        seed: p.seed,
        max_tokens: p.max_tokens as u32,
        min_tokens: p.min_tokens as u32,
        stop_token_ids: p.stop_token_ids.clone(),
        ignore_eos: p.ignore_eos,
        logprobs: p.logprobs.map(|n| n as u32),
    }
}

pub fn sampling_from_wire(w: &WireSampling) -> SamplingParams {
    SamplingParams {
        temperature: w.temperature,
        top_k: w.top_k as usize,
        top_p: w.top_p,
        min_p: w.min_p,
        presence_penalty: w.presence_penalty,
        frequency_penalty: w.frequency_penalty,
        repetition_penalty: w.repetition_penalty,
        seed: w.seed,
        max_tokens: w.max_tokens as usize,
        min_tokens: w.min_tokens as usize,
        stop_token_ids: w.stop_token_ids.clone(),
        ignore_eos: w.ignore_eos,
        logprobs: w.logprobs.map(|n| n as usize),
    }
}

pub fn sampled_to_wire(id: u64, s: &Sampled, finish: Option<baton_engine::FinishReason>) -> WireSampled {
    WireSampled {
        id,
        token: s.token,
        logprob: s.logprob,
        top_logprobs: s.top_logprobs.clone(),
        finish: match finish {
            None => 0,
            Some(baton_engine::FinishReason::Stop) => 1,
            Some(baton_engine::FinishReason::Length) => 2,
        },
    }
}

/// The inverse of [`sampled_to_wire`].
pub fn sampled_from_wire(w: WireSampled) -> (u64, Sampled, Option<baton_engine::FinishReason>) {
    let finish = match w.finish {
        1 => Some(baton_engine::FinishReason::Stop),
        2 => Some(baton_engine::FinishReason::Length),
        _ => None,
    };
    (w.id, Sampled { token: w.token, logprob: w.logprob, top_logprobs: w.top_logprobs }, finish)
}
