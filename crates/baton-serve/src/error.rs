//! The serving layer's error classes. The component closest to the cause picks the class once;
//! the HTTP edge (http.rs) maps each class to a status code and an OpenAI error body.

/// What went wrong with a request, as a client may see it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServeError {
    /// Malformed JSON or a parameter out of range (400); `param` names the parameter.
    #[error("{message}")]
    BadRequest { message: String, param: Option<String> },
    /// The prompt does not fit the model's context (400).
    #[error("{0}")]
    ContextTooLong(String),
    /// The `model` field names a model this server does not serve (404).
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    /// The request queue is full (429, with Retry-After).
    #[error("the server is overloaded: {0}")]
    Overloaded(String),
    /// The server is starting or shutting down (503).
    #[error("the server is not ready: {0}")]
    NotReady(String),
    /// The request did not finish within the node's request timeout (504).
    #[error("timeout: {0}")]
    Timeout(String),
    /// The engine failed while serving this request (500); details are in the server's log.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServeError {
    pub fn bad(message: impl Into<String>, param: &str) -> Self {
        ServeError::BadRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }
}
