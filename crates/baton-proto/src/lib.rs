//! Baton's native client protocol. One QUIC bidirectional stream per request: the client sends
//! one [`Request`] frame and finishes its side; the server answers with [`Frame`]s (`Started`,
//! then `Token`s, then `Done` or `Error`). Each frame is a little-endian u32 length and an rkyv
//! archive, read into an aligned buffer and validated (bytecheck) before anything touches it.
//!
//! Only this crate knows the wire format; the server and client map it to their own types.

use rkyv::rancor::Error as RkyvError;
use rkyv::util::AlignedVec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bumped on any incompatible change; a server refuses other versions with an error frame.
pub const PROTOCOL_VERSION: u16 = 2;
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 4 << 20;
/// QUIC application close code for a peer that sent bytes that are not a valid frame.
pub const CLOSE_MALFORMED: u32 = 0x42_01;
/// QUIC application stream-reset code a client uses to cancel a request.
pub const RESET_CANCELLED: u32 = 0x42_02;

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Chat(Vec<ChatMessage>),
}

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A generation request: the same parameters as the HTTP API.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Request {
    pub version: u16,
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<u32>,
    pub temperature: f32,
    /// 0 means off.
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub min_tokens: u32,
    /// Top-n log-probabilities per token.
    pub logprobs: Option<u32>,
    /// Tokens already received for this request from a node that went away: the server
    /// computes them with the prompt and streams only what follows (a client resuming).
    pub resume_token_ids: Vec<u32>,
}

impl Request {
    /// A request with the HTTP API's defaults.
    pub fn new(prompt: Prompt) -> Self {
        Request {
            version: PROTOCOL_VERSION,
            model: None,
            prompt,
            max_tokens: None,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            min_tokens: 0,
            logprobs: None,
            resume_token_ids: Vec::new(),
        }
    }
}

/// Error classes, as HTTP maps them to status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ErrorKind {
    BadRequest,
    ContextTooLong,
    ModelNotFound,
    Overloaded,
    NotReady,
    Internal,
    /// The request outlived the node's request timeout.
    Timeout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Finish {
    Stop,
    Length,
    Abort,
}

/// A node's QUIC client API.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct NodeAddr {
    pub name: String,
    pub addr: String,
}

/// What the server streams back.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Frame {
    /// `nodes`: other nodes of the cluster a client may resume this stream at (name, the
    /// name their certificate carries, and QUIC address), if the one it is connected to goes.
    Started { prompt_token_ids: Vec<u32>, nodes: Vec<NodeAddr> },
    Token { id: u32, text: String, logprob: f32, top_logprobs: Vec<(u32, f32)> },
    Done { finish: Finish, prompt_tokens: u32, completion_tokens: u32, tail: String },
    Error { kind: ErrorKind, message: String, param: Option<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("the stream ended")]
    Closed,
}

/// Encodes a message as one frame (length prefix included).
pub fn encode<T>(msg: &T) -> Result<Vec<u8>, FrameError>
where
    T: for<'a> rkyv::Serialize<rkyv::api::high::HighSerializer<AlignedVec, rkyv::ser::allocator::ArenaHandle<'a>, RkyvError>>,
{
    let body = rkyv::to_bytes::<RkyvError>(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Validates and deserializes one frame body.
pub fn decode<T>(body: &[u8]) -> Result<T, FrameError>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, RkyvError>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<RkyvError>>,
{
    // rkyv needs its input aligned; network buffers are not, so copy into an aligned one.
    let mut aligned = AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    let archived = rkyv::access::<T::Archived, RkyvError>(&aligned).map_err(|e| FrameError::Malformed(e.to_string()))?;
    rkyv::deserialize::<T, RkyvError>(archived).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Largest frame of tensors (activations) between pipeline stages.
pub const MAX_TENSOR_FRAME: usize = 256 << 20;

/// The body of one whole frame held in memory (as `encode` made it: length prefix, body), for
/// transports that deliver whole messages (UCX active messages).
pub fn frame_body(frame: &[u8]) -> Result<&[u8], FrameError> {
    let malformed = || FrameError::Malformed(format!("a {}-byte message is not one frame", frame.len()));
    let len = frame.get(..4).and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_le_bytes).ok_or_else(malformed)? as usize;
    frame.get(4..).filter(|b| b.len() == len).ok_or_else(malformed)
}

/// Reads one frame's body; `Ok(None)` at a clean end of stream before a frame starts.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    read_frame_limited(r, MAX_FRAME).await
}

/// `read_frame` with a different size limit.
pub async fn read_frame_limited<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| if e.kind() == std::io::ErrorKind::UnexpectedEof { FrameError::Closed } else { e.into() })?;
    Ok(Some(body))
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> Result<(), FrameError> {
    w.write_all(frame).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_roundtrip() {
        let mut req = Request::new(Prompt::Chat(vec![ChatMessage { role: "user".into(), content: "hi ✓".into() }]));
        req.stop = vec!["\n".into()];
        req.seed = Some(7);
        let bytes = encode(&req).unwrap();
        assert_eq!(u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize, bytes.len() - 4);
        assert_eq!(decode::<Request>(&bytes[4..]).unwrap(), req);
        let f = Frame::Token { id: 5, text: "a".into(), logprob: -0.5, top_logprobs: vec![(1, -1.0)] };
        assert_eq!(decode::<Frame>(&encode(&f).unwrap()[4..]).unwrap(), f);
    }

    #[test]
    fn garbage_and_truncation_are_rejected_not_panicked() {
        let good = encode(&Request::new(Prompt::Text("hello".into()))).unwrap();
        let body = &good[4..];
        for cut in 0..body.len() {
            assert!(decode::<Request>(&body[..cut]).is_err(), "truncated at {cut} accepted");
        }
        let mut rng = 0x1234_5678u64;
        for _ in 0..2000 {
            let mut b = body.to_vec();
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let i = (rng as usize) % b.len();
            b[i] ^= (rng >> 32) as u8 | 1;
            let _ = decode::<Request>(&b); // must not panic
        }
        assert!(decode::<Frame>(&[0xff; 64]).is_err());
    }

    #[test]
    fn frame_body_takes_exactly_one_frame() {
        let good = encode(&Request::new(Prompt::Text("hello".into()))).unwrap();
        assert_eq!(frame_body(&good).unwrap(), &good[4..]);
        assert!(frame_body(&good[..good.len() - 1]).is_err());
        assert!(frame_body(&[good.as_slice(), &[0]].concat()).is_err());
        assert!(frame_body(&[1, 0]).is_err());
    }
}
