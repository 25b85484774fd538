//! The router actor: takes parsed requests from the fronts, renders chat templates and
//! tokenizes off the async runtime (in blocking workers), validates against the model, and
//! hands requests to the scheduler. Admission is bounded here: beyond `max_pending` requests in
//! tokenization the router answers "overloaded" (HTTP 429) instead of queueing without limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use baton_engine::TextTokenizer;
use baton_scheduler::SeqId;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;

use crate::error::ServeError;
use crate::request::{ApiRequest, ChatMessage, Event, GenerateRequest, PromptInput};
use crate::scheduler::SchedulerMsg;

/// An admitted request: its id (for cancellation) and its event stream.
#[derive(Debug)]
pub struct Admitted {
    pub id: SeqId,
    pub events: mpsc::UnboundedReceiver<Event>,
}

pub enum RouterMsg {
    Submit {
        request: ApiRequest,
        request_id: String,
        reply: RpcReplyPort<Result<Admitted, ServeError>>,
    },
}

/// What the router knows about the model it serves.
pub struct RouterArgs {
    pub model_name: String,
    pub tokenizer: Arc<TextTokenizer>,
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub scheduler: ActorRef<SchedulerMsg>,
    pub max_pending: usize,
}

pub struct RouterState {
    shared: Arc<Shared>,
}

struct Shared {
    model_name: String,
    tokenizer: Arc<TextTokenizer>,
    template: Option<minijinja::Environment<'static>>,
    max_model_len: usize,
    vocab_size: usize,
    scheduler: ActorRef<SchedulerMsg>,
    pending: AtomicUsize,
    max_pending: usize,
}

pub struct Router;

impl Shared {
    /// Renders the chat template and tokenizes (CPU work: runs in a blocking worker).
    fn tokenize(&self, prompt: &PromptInput) -> Result<Vec<u32>, ServeError> {
        let ids = match prompt {
            PromptInput::Tokens(ids) => ids.clone(),
            PromptInput::Text(text) => self.tokenizer.encode(text).map_err(|e| ServeError::bad(e.to_string(), "prompt"))?,
            PromptInput::Chat(messages) => {
                let text = self.render(messages)?;
                self.tokenizer
                    .encode_templated(&text)
                    .map_err(|e| ServeError::bad(e.to_string(), "messages"))?
            }
        };
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(ServeError::bad(format!("token id {bad} is outside the vocabulary of {}", self.vocab_size), "prompt"));
        }
        Ok(ids)
    }

    fn render(&self, messages: &[ChatMessage]) -> Result<String, ServeError> {
        let env = self
            .template
            .as_ref()
            .ok_or_else(|| ServeError::bad("this model has no chat template; use /v1/completions", "messages"))?;
        let tpl = env.get_template("chat").map_err(|e| ServeError::Internal(e.to_string()))?;
        tpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.tokenizer.bos_token.clone().unwrap_or_default(),
            eos_token => self.tokenizer.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| ServeError::bad(format!("the chat template failed: {e}"), "messages"))
    }

    async fn admit(self: Arc<Self>, request: ApiRequest, request_id: String) -> Result<Admitted, ServeError> {
        if let Some(model) = &request.model {
            if model != &self.model_name {
                return Err(ServeError::ModelNotFound(model.clone()));
            }
        }
        let is_chat = matches!(request.prompt, PromptInput::Chat(_));
        let me = self.clone();
        let prompt = request.prompt.clone();
        let ids = tokio::task::spawn_blocking(move || me.tokenize(&prompt))
            .await
            .map_err(|e| ServeError::Internal(format!("tokenizer worker: {e}")))??;
        if ids.is_empty() {
            return Err(ServeError::bad("the prompt is empty", if is_chat { "messages" } else { "prompt" }));
        }
        if ids.len() >= self.max_model_len {
            return Err(ServeError::ContextTooLong(format!(
                "the prompt has {} tokens; this model's context is {} tokens",
                ids.len(),
                self.max_model_len
            )));
        }
        let room = self.max_model_len - ids.len();
        let max_tokens = match request.max_tokens {
            Some(n) if n > room => {
                return Err(ServeError::ContextTooLong(format!(
                    "the prompt ({} tokens) plus max_tokens ({n}) exceeds this model's context of {} tokens",
                    ids.len(),
                    self.max_model_len
                )))
            }
            Some(n) => n,
            None if is_chat => room,
            None => 16.min(room),
        };
        let resumed = request.resume_token_ids;
        if let Some(bad) = resumed.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(ServeError::bad(format!("token id {bad} is outside the vocabulary of {}", self.vocab_size), "resume_token_ids"));
        }
        if !resumed.is_empty() && resumed.len() >= max_tokens {
            return Err(ServeError::bad(
                format!("`resume_token_ids` holds {} tokens: nothing is left of max_tokens ({max_tokens})", resumed.len()),
                "resume_token_ids",
            ));
        }
        let mut params = request.params;
        params.max_tokens = max_tokens;
        params.min_tokens = params.min_tokens.min(max_tokens);
        let (tx, rx) = mpsc::unbounded_channel();
        let generate = GenerateRequest {
            request_id,
            prompt: ids,
            params,
            stop: request.stop,
            resumed,
        };
        let id = ractor::call!(self.scheduler, |reply| SchedulerMsg::Submit { request: generate, events: tx, reply })
            .map_err(|e| ServeError::NotReady(format!("scheduler unavailable: {e}")))??;
        Ok(Admitted { id, events: rx })
    }
}

impl Actor for Router {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = RouterArgs;

    async fn pre_start(&self, _myself: ActorRef<RouterMsg>, args: RouterArgs) -> Result<RouterState, ActorProcessingErr> {
        let template = match &args.tokenizer.chat_template {
            Some(source) => {
                let mut env = minijinja::Environment::new();
                env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
                    Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
                });
                env.add_template_owned("chat", source.clone())
                    .map_err(|e| format!("the model's chat template does not compile: {e}"))?;
                Some(env)
            }
            None => None,
        };
        Ok(RouterState {
            shared: Arc::new(Shared {
                model_name: args.model_name,
                tokenizer: args.tokenizer,
                template,
                max_model_len: args.max_model_len,
                vocab_size: args.vocab_size,
                scheduler: args.scheduler,
                pending: AtomicUsize::new(0),
                max_pending: args.max_pending,
            }),
        })
    }

    async fn handle(&self, _myself: ActorRef<RouterMsg>, msg: RouterMsg, state: &mut RouterState) -> Result<(), ActorProcessingErr> {
        match msg {
            RouterMsg::Submit { request, request_id, reply } => {
                let shared = state.shared.clone();
                if shared.pending.fetch_add(1, Ordering::SeqCst) >= shared.max_pending {
                    shared.pending.fetch_sub(1, Ordering::SeqCst);
                    let _ = reply.send(Err(ServeError::Overloaded("too many requests being prepared".into())));
                    return Ok(());
                }
                tokio::spawn(async move {
                    let result = shared.clone().admit(request, request_id).await;
                    shared.pending.fetch_sub(1, Ordering::SeqCst);
                    let _ = reply.send(result);
                });
            }
        }
        Ok(())
    }
}
