//! What flows between the fronts (HTTP, QUIC), the router and the scheduler: a parsed request,
//! and the events streamed back for it.

use baton_engine::{FinishReason, SamplingParams};

use crate::error::ServeError;

/// The prompt as the client gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
    Chat(Vec<ChatMessage>),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A request after parsing, before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    pub model: Option<String>,
    pub prompt: PromptInput,
    pub params: SamplingParams,
    /// None: the endpoint's default (16 for completions, the rest of the context for chat).
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub return_token_ids: bool,
    /// Tokens another head already generated for this request (and the client has): they are
    /// computed with the prompt and generation goes on after them (`resume_token_ids`, what an
    /// entry node sends when the head it forwarded to died mid-stream).
    pub resume_token_ids: Vec<u32>,
}

/// A request ready for the scheduler.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    /// Tokens already generated elsewhere (see [`ApiRequest::resume_token_ids`]).
    pub resumed: Vec<u32>,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub token: u32,
    /// The text this token completes (may be empty while a character is incomplete).
    pub text: String,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Why a request ended, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
    Abort,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Abort => "abort",
        }
    }
}

impl From<FinishReason> for Finish {
    fn from(r: FinishReason) -> Self {
        match r {
            FinishReason::Stop => Finish::Stop,
            FinishReason::Length => Finish::Length,
        }
    }
}

/// Everything the scheduler sends back for one request, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The request was admitted; its prompt's token ids.
    Started { prompt_token_ids: Vec<u32> },
    Token(TokenEvent),
    /// The last event of a successful request.
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens the prefix cache supplied (`None`: prefix caching is off).
        cached_tokens: Option<usize>,
        /// Text held back by the detokenizer or cut at a stop string, already final.
        tail: String,
    },
    /// The last event of a failed request.
    Error(ServeError),
}
