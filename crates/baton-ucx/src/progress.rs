//! The progress thread: owns one UCX context and worker (and every endpoint, rkey and registered
//! window made on them), runs the commands async callers queue, progresses the worker, and
//! sleeps on the worker's event fd when there is nothing to do.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::ptr;
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tmpsc, oneshot};
use ucx_rs::{decode_status_ptr, sys};

use crate::{AmMessage, UcxError};

/// The raw worker handle, shared only for `ucp_worker_signal`.
#[derive(Clone, Copy)]
pub(crate) struct WorkerPtr(pub(crate) sys::ucp_worker_h);
// SAFETY: the handle is used off the progress thread only for ucp_worker_signal, which UCX
// documents as safe from any thread, and only while the worker is alive (see `Shared::submit`).
unsafe impl Send for WorkerPtr {}
unsafe impl Sync for WorkerPtr {}

type Reply<T> = oneshot::Sender<Result<T, UcxError>>;

pub(crate) enum Command {
    Connect { id: u64, address: Vec<u8>, peer: String, reply: Reply<()> },
    CloseEndpoint { id: u64 },
    Listen { am_id: u16, max_len: usize, tx: tmpsc::UnboundedSender<AmMessage>, reply: Reply<()> },
    SendAm { ep: u64, am_id: u16, header: Vec<u8>, data: Vec<u8>, reply: Reply<()> },
    Put { ep: u64, rkey: u64, remote_addr: u64, data: Vec<u8>, reply: Reply<()> },
    Flush { ep: u64, reply: Reply<()> },
    Register { id: u64, len: usize, reply: Reply<(u64, Vec<u8>)> },
    Read { id: u64, offset: usize, len: usize, reply: Reply<Vec<u8>> },
    Unregister { id: u64 },
    /// Answers where the window is mapped in this process, if it is.
    UnpackRkey { id: u64, ep: u64, packed: Vec<u8>, base: u64, reply: Reply<Option<usize>> },
    DestroyRkey { id: u64 },
    Shutdown,
}

struct Endpoint {
    raw: sys::ucp_ep_h,
    peer: String,
    /// Made with peer-failure detection (then it can be force-closed).
    detects_failure: bool,
}

/// Where incoming active messages for one id go. Boxed: UCX holds a pointer to it.
struct Listener {
    tx: tmpsc::UnboundedSender<AmMessage>,
    worker: sys::ucp_worker_h,
    max_len: usize,
}

/// A registered window: memory UCX allocated for it, mapped until `memh` is unmapped.
struct Window {
    base: *const u8,
    len: usize,
    memh: sys::ucp_mem_h,
}

/// A peer's window unpacked here on endpoint `ep`; `mapped`: its remote base and where it is
/// mapped in this process, when the transport lets us write it directly (shared memory).
struct RemoteKey {
    rkey: sys::ucp_rkey_h,
    ep: u64,
    mapped: Option<(u64, *mut u8)>,
}

/// What a send, put or flush owns until UCX completes it.
struct SendCtx {
    op: &'static str,
    _header: Vec<u8>,
    _data: Vec<u8>,
    reply: Reply<()>,
}

/// A rendezvous receive in progress.
struct RecvCtx {
    header: Vec<u8>,
    buf: Vec<u8>,
    tx: tmpsc::UnboundedSender<AmMessage>,
}

thread_local! {
    /// Endpoints UCX reported as failed during the last progress call (the error callback runs
    /// inside `ucp_worker_progress`, on this thread).
    static FAILED: RefCell<Vec<(u64, sys::ucs_status_t)>> = const { RefCell::new(Vec::new()) };
    /// Send contexts UCX still holds (their callback has not run): at shutdown, once UCX is
    /// gone, they are freed, which answers their callers `WorkerGone`.
    static LIVE_SENDS: RefCell<std::collections::HashSet<usize>> = RefCell::new(std::collections::HashSet::new());
}

struct State {
    context: sys::ucp_context_h,
    worker: sys::ucp_worker_h,
    efd: i32,
    endpoints: HashMap<u64, Endpoint>,
    failed: HashMap<u64, String>,
    listeners: HashMap<u16, Box<Listener>>,
    windows: HashMap<u64, Window>,
    rkeys: HashMap<u64, RemoteKey>,
    /// UCX_TLS named shared-memory transports only when the worker started.
    shared_memory_only: bool,
}

fn check(op: &'static str, status: sys::ucs_status_t) -> Result<(), UcxError> {
    if status == sys::ucs_status_t_UCS_OK {
        Ok(())
    } else {
        Err(UcxError::status(op, status))
    }
}

fn zeroed<T>() -> T {
    // SAFETY: only used for UCX's plain-C parameter structs, for which all-zero is the
    // documented "no fields set" value (their field_mask is 0).
    unsafe { MaybeUninit::zeroed().assume_init() }
}

impl State {
    fn new() -> Result<State, UcxError> {
        let mut params: sys::ucp_params_t = zeroed();
        params.field_mask = sys::ucp_params_field_UCP_PARAM_FIELD_FEATURES as u64;
        params.features =
            (sys::ucp_feature_UCP_FEATURE_AM | sys::ucp_feature_UCP_FEATURE_RMA | sys::ucp_feature_UCP_FEATURE_WAKEUP) as u64;
        let mut context: sys::ucp_context_h = ptr::null_mut();
        // SAFETY: params is initialised for the fields its mask names; a null config makes UCX
        // read its configuration (UCX_TLS...) from the environment.
        check("init", unsafe { sys::ucp_init_version(sys::UCP_API_MAJOR, sys::UCP_API_MINOR, &params, ptr::null(), &mut context) })?;
        let mut wparams: sys::ucp_worker_params_t = zeroed();
        wparams.field_mask = sys::ucp_worker_params_field_UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64;
        wparams.thread_mode = sys::ucs_thread_mode_t_UCS_THREAD_MODE_SINGLE;
        let mut worker: sys::ucp_worker_h = ptr::null_mut();
        // SAFETY: a valid context; the worker is used only from this thread (SINGLE mode).
        if let Err(e) = check("worker create", unsafe { sys::ucp_worker_create(context, &wparams, &mut worker) }) {
            // SAFETY: the context was created above and nothing else uses it.
            unsafe { sys::ucp_cleanup(context) };
            return Err(e);
        }
        let mut efd = -1;
        // SAFETY: a valid worker created with the WAKEUP feature.
        if let Err(e) = check("event fd", unsafe { sys::ucp_worker_get_efd(worker, &mut efd) }) {
            // SAFETY: both handles were created above and are unused elsewhere.
            unsafe {
                sys::ucp_worker_destroy(worker);
                sys::ucp_cleanup(context);
            }
            return Err(e);
        }
        Ok(State {
            context,
            worker,
            efd,
            endpoints: HashMap::new(),
            failed: HashMap::new(),
            listeners: HashMap::new(),
            windows: HashMap::new(),
            rkeys: HashMap::new(),
            shared_memory_only: shared_memory_only(),
        })
    }

    fn address(&self) -> Result<Vec<u8>, UcxError> {
        let mut attr: sys::ucp_worker_attr_t = zeroed();
        attr.field_mask = sys::ucp_worker_attr_field_UCP_WORKER_ATTR_FIELD_ADDRESS as u64;
        // SAFETY: a valid worker; the address UCX returns is copied, then released.
        unsafe {
            check("worker address", sys::ucp_worker_query(self.worker, &mut attr))?;
            let bytes = std::slice::from_raw_parts(attr.address as *const u8, attr.address_length).to_vec();
            sys::ucp_worker_release_address(self.worker, attr.address);
            Ok(bytes)
        }
    }

    fn endpoint(&self, id: u64) -> Result<sys::ucp_ep_h, UcxError> {
        match self.endpoints.get(&id) {
            Some(ep) => Ok(ep.raw),
            None => Err(match self.failed.get(&id) {
                Some(peer) => UcxError::PeerFailed(peer.clone()),
                None => UcxError::Invalid("the endpoint is closed".into()),
            }),
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Connect { id, address, peer, reply } => {
                let _ = reply.send(self.connect(id, &address, peer));
            }
            Command::CloseEndpoint { id } => {
                self.failed.remove(&id);
                if let Some(ep) = self.endpoints.remove(&id) {
                    close_endpoint(ep.raw, false);
                }
            }
            Command::Listen { am_id, max_len, tx, reply } => {
                let listener = Box::new(Listener { tx, worker: self.worker, max_len });
                let mut p: sys::ucp_am_handler_param_t = zeroed();
                p.field_mask = (sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_ID
                    | sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_CB
                    | sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_ARG
                    | sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_FLAGS) as u64;
                p.id = am_id as u32;
                p.flags = sys::ucp_am_cb_flags_UCP_AM_FLAG_WHOLE_MSG;
                p.cb = Some(am_received);
                p.arg = &*listener as *const Listener as *mut c_void;
                // SAFETY: the listener box lives in `self.listeners` until the worker is destroyed
                // or the handler is replaced (the old box is dropped only after the new handler
                // is in place).
                let r = check("set AM handler", unsafe { sys::ucp_worker_set_am_recv_handler(self.worker, &p) });
                if r.is_ok() {
                    self.listeners.insert(am_id, listener);
                }
                let _ = reply.send(r);
            }
            Command::SendAm { ep, am_id, header, data, reply } => {
                let raw = match self.endpoint(ep) {
                    Ok(raw) => raw,
                    Err(e) => return drop(reply.send(Err(e))),
                };
                let (hp, hl, dp, dl) = (header.as_ptr(), header.len(), data.as_ptr(), data.len());
                let ctx = Box::new(SendCtx { op: "active message send", _header: header, _data: data, reply });
                submit_send(ctx, |param| {
                    // SAFETY: a live endpoint; header and data are owned by the context, which is
                    // freed only when UCX reports completion (or at once if it completed inline).
                    unsafe { sys::ucp_am_send_nbx(raw, am_id as u32, hp as *const c_void, hl, dp as *const c_void, dl, param) }
                });
            }
            Command::Put { ep, rkey, remote_addr, data, reply } => {
                let raw = match self.endpoint(ep) {
                    Ok(raw) => raw,
                    Err(e) => return drop(reply.send(Err(e))),
                };
                let Some(rk) = self.rkeys.get(&rkey) else {
                    return drop(reply.send(Err(UcxError::Invalid("the remote window is gone".into()))));
                };
                if let Some((base, local)) = rk.mapped {
                    // Shared memory mapped here: the put is one memcpy, complete at once.
                    // SAFETY: the caller checked the range against the window, which stays mapped
                    // in this process until the rkey is destroyed (on this thread).
                    unsafe { ptr::copy_nonoverlapping(data.as_ptr(), local.add((remote_addr - base) as usize), data.len()) };
                    return drop(reply.send(Ok(())));
                }
                let rk = rk.rkey;
                let (dp, dl) = (data.as_ptr(), data.len());
                let ctx = Box::new(SendCtx { op: "put", _header: Vec::new(), _data: data, reply });
                submit_send(ctx, |param| {
                    // SAFETY: as for sends; the rkey was unpacked on this endpoint and the range was
                    // checked against the window by the caller.
                    unsafe { sys::ucp_put_nbx(raw, dp as *const c_void, dl, remote_addr, rk, param) }
                });
            }
            Command::Flush { ep, reply } => {
                let raw = match self.endpoint(ep) {
                    Ok(raw) => raw,
                    Err(e) => return drop(reply.send(Err(e))),
                };
                let ctx = Box::new(SendCtx { op: "flush", _header: Vec::new(), _data: Vec::new(), reply });
                // SAFETY: a live endpoint.
                submit_send(ctx, |param| unsafe { sys::ucp_ep_flush_nbx(raw, param) });
            }
            Command::Register { id, len, reply } => {
                let _ = reply.send(self.register(id, len));
            }
            Command::Read { id, offset, len, reply } => {
                let r = match self.windows.get(&id) {
                    Some(w) if offset.checked_add(len).is_some_and(|end| end <= w.len) => {
                        let mut out = vec![0u8; len];
                        // SAFETY: the range lies inside the mapped window (checked above), which
                        // stays mapped until this thread unmaps it; copying raw bytes makes no
                        // claim about what a peer may be writing there.
                        unsafe { ptr::copy_nonoverlapping(w.base.add(offset), out.as_mut_ptr(), len) };
                        Ok(out)
                    }
                    Some(_) => Err(UcxError::Invalid(format!("a read of {len} bytes at {offset} overruns the window"))),
                    None => Err(UcxError::Invalid("the window is gone".into())),
                };
                let _ = reply.send(r);
            }
            Command::Unregister { id } => {
                if let Some(w) = self.windows.remove(&id) {
                    // SAFETY: registered on this context; unmapping frees the memory, which nothing
                    // reads afterwards.
                    unsafe { sys::ucp_mem_unmap(self.context, w.memh) };
                }
            }
            Command::UnpackRkey { id, ep, packed, base, reply } => {
                let r = self.endpoint(ep).and_then(|raw| {
                    let mut rkey: sys::ucp_rkey_h = ptr::null_mut();
                    // SAFETY: a live endpoint; UCX parses (and copies out of) the packed key.
                    check("rkey unpack", unsafe { sys::ucp_ep_rkey_unpack(raw, packed.as_ptr() as *const c_void, &mut rkey) })?;
                    let mut local: *mut c_void = ptr::null_mut();
                    // SAFETY: a valid rkey; UCX says whether the window is mapped into this process.
                    let mapped = (unsafe { sys::ucp_rkey_ptr(rkey, base, &mut local) } == sys::ucs_status_t_UCS_OK && !local.is_null())
                        .then_some((base, local as *mut u8));
                    self.rkeys.insert(id, RemoteKey { rkey, ep, mapped });
                    Ok(mapped.map(|(_, p)| p as usize))
                });
                let _ = reply.send(r);
            }
            Command::DestroyRkey { id } => {
                if let Some(rk) = self.rkeys.remove(&id) {
                    self.destroy_rkey_after_flush(rk);
                }
            }
            Command::Shutdown => {}
        }
    }

    /// UCX requires every operation using an rkey to be flushed before it is destroyed (a put
    /// whose future was dropped may still be in flight): flush the endpoint, destroy in the
    /// callback, or at once if the endpoint is gone or the flush completes inline.
    fn destroy_rkey_after_flush(&mut self, rk: RemoteKey) {
        let Some(ep) = self.endpoints.get(&rk.ep) else {
            // SAFETY: the endpoint is closed (its operations are done) or failed; destroyed once.
            unsafe { sys::ucp_rkey_destroy(rk.rkey) };
            return;
        };
        let ctx = Box::into_raw(Box::new(rk.rkey));
        let mut p: sys::ucp_request_param_t = zeroed();
        p.op_attr_mask = sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_CALLBACK | sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_USER_DATA;
        p.cb.send = Some(rkey_flushed);
        p.user_data = ctx as *mut c_void;
        // SAFETY: a live endpoint; the callback owns the boxed rkey handle.
        match decode_status_ptr(unsafe { sys::ucp_ep_flush_nbx(ep.raw, &p) }) {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                // SAFETY: no callback will run; the rkey is ours to destroy, once.
                let rkey = unsafe { Box::from_raw(ctx) };
                unsafe { sys::ucp_rkey_destroy(*rkey) };
            }
        }
    }

    fn connect(&mut self, id: u64, address: &[u8], peer: String) -> Result<(), UcxError> {
        if address.is_empty() {
            return Err(UcxError::Invalid(format!("{peer} sent an empty worker address")));
        }
        // Peer-failure detection first; shared-memory transports cannot offer it, so a
        // destination reachable only that way is connected without (the control plane's QUIC
        // link still notices a dead peer).
        let mut raw: sys::ucp_ep_h = ptr::null_mut();
        let mut status = sys::ucs_status_t_UCS_ERR_UNREACHABLE;
        let mut detects_failure = false;
        let modes: &[sys::ucp_err_handling_mode_t] = if self.shared_memory_only {
            &[sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_NONE]
        } else {
            &[sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_PEER, sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_NONE]
        };
        for &mode in modes {
            let mut p: sys::ucp_ep_params_t = zeroed();
            p.field_mask = (sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
                | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLER) as u64;
            p.address = address.as_ptr() as *const sys::ucp_address_t;
            p.err_mode = mode;
            p.err_handler = sys::ucp_err_handler { cb: Some(endpoint_failed), arg: id as usize as *mut c_void };
            // SAFETY: a valid worker; UCX unpacks the address during the call. An address that
            // is not a UCX worker address is rejected with an error status.
            status = unsafe { sys::ucp_ep_create(self.worker, &p, &mut raw) };
            detects_failure = mode == sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_PEER;
            if status != sys::ucs_status_t_UCS_ERR_UNREACHABLE {
                break;
            }
            tracing::info!(%peer, "no UCX transport to this peer detects peer failure (shared memory); connecting without");
        }
        check("endpoint create", status)?;
        self.endpoints.insert(id, Endpoint { raw, peer, detects_failure });
        Ok(())
    }

    fn register(&mut self, id: u64, len: usize) -> Result<(u64, Vec<u8>), UcxError> {
        // UCX allocates the window itself, so each transport can place it where peers reach it
        // best (a shared-memory segment peers map and write with a plain memcpy; pinned pages
        // for RDMA).
        let mut p: sys::ucp_mem_map_params_t = zeroed();
        p.field_mask = (sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_ADDRESS
            | sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_LENGTH
            | sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_FLAGS) as u64;
        p.address = ptr::null_mut();
        p.length = len;
        p.flags = sys::UCP_MEM_MAP_ALLOCATE;
        let mut memh: sys::ucp_mem_h = ptr::null_mut();
        // SAFETY: UCX allocates and registers `len` bytes, freed by ucp_mem_unmap.
        check("mem map", unsafe { sys::ucp_mem_map(self.context, &p, &mut memh) })?;
        let mut attr: sys::ucp_mem_attr_t = zeroed();
        attr.field_mask = (sys::ucp_mem_attr_field_UCP_MEM_ATTR_FIELD_ADDRESS | sys::ucp_mem_attr_field_UCP_MEM_ATTR_FIELD_LENGTH) as u64;
        let mut buf: *mut c_void = ptr::null_mut();
        let mut size = 0usize;
        // SAFETY: a valid registration; the packed key is copied, then released.
        let packed = unsafe {
            let r = check("mem query", sys::ucp_mem_query(memh, &mut attr))
                .and_then(|()| {
                    if attr.length < len || attr.address.is_null() {
                        Err(UcxError::Invalid("UCX allocated a short window".into()))
                    } else {
                        Ok(())
                    }
                })
                .and_then(|()| check("rkey pack", sys::ucp_rkey_pack(self.context, memh, &mut buf, &mut size)));
            if let Err(e) = r {
                sys::ucp_mem_unmap(self.context, memh);
                return Err(e);
            }
            let v = std::slice::from_raw_parts(buf as *const u8, size).to_vec();
            sys::ucp_rkey_buffer_release(buf);
            v
        };
        self.windows.insert(id, Window { base: attr.address as *const u8, len, memh });
        Ok((attr.address as u64, packed))
    }

    /// Endpoints UCX reported as failed: closed, and remembered so later calls say why.
    fn reap_failures(&mut self) {
        let failed = FAILED.with(|f| std::mem::take(&mut *f.borrow_mut()));
        for (id, status) in failed {
            if let Some(ep) = self.endpoints.remove(&id) {
                tracing::warn!(peer = %ep.peer, status = ucx_rs::status_string(status), "UCX endpoint failed; closing it");
                close_endpoint(ep.raw, true);
                self.failed.insert(id, ep.peer);
            }
        }
    }

    /// Progresses until UCX has nothing more to do; whether anything happened.
    fn progress(&mut self) -> bool {
        let mut any = false;
        // SAFETY: the worker is used only from this thread.
        while unsafe { sys::ucp_worker_progress(self.worker) } != 0 {
            any = true;
        }
        self.reap_failures();
        any
    }

    /// Closes everything, waits (boundedly) for UCX to finish, then destroys the worker and the
    /// context once no other thread can be signalling it.
    /// Progresses until every request in `reqs` completes or `within` passes; frees them all.
    fn wait_all(&mut self, mut reqs: Vec<sys::ucs_status_ptr_t>, within: Duration) {
        let deadline = Instant::now() + within;
        // SAFETY: requests UCX returned, checked and freed once each (an unfinished one is
        // released to UCX, which frees it if it ever completes).
        while !reqs.is_empty() && Instant::now() < deadline {
            self.progress();
            reqs.retain(|&req| unsafe {
                if sys::ucp_request_check_status(req) == sys::ucs_status_t_UCS_INPROGRESS {
                    true
                } else {
                    sys::ucp_request_free(req);
                    false
                }
            });
        }
        for req in reqs {
            unsafe { sys::ucp_request_free(req) };
        }
    }

    /// Closes everything, waits (boundedly) for UCX to finish, then destroys the worker and the
    /// context once no other thread can be signalling it. Order, as UCX requires: flush the
    /// endpoints, destroy the rkeys, close the endpoints.
    fn shutdown(mut self, gate: &RwLock<bool>) {
        let flushing: Vec<_> = self
            .endpoints
            .values()
            .filter_map(|ep| {
                let p: sys::ucp_request_param_t = zeroed();
                // SAFETY: a live endpoint.
                decode_status_ptr(unsafe { sys::ucp_ep_flush_nbx(ep.raw, &p) }).ok().flatten()
            })
            .collect();
        self.wait_all(flushing, Duration::from_secs(1));
        for (_, rk) in self.rkeys.drain() {
            // SAFETY: unpacked here, destroyed once, before its endpoint closes.
            unsafe { sys::ucp_rkey_destroy(rk.rkey) };
        }
        let mut closing = Vec::new();
        for (_, ep) in self.endpoints.drain() {
            let mut p: sys::ucp_request_param_t = zeroed();
            // UCX refuses a forced close on an endpoint without peer-failure detection.
            if ep.detects_failure {
                p.op_attr_mask = sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_FLAGS;
                p.flags = sys::ucp_ep_close_flags_t_UCP_EP_CLOSE_FLAG_FORCE;
            }
            // SAFETY: a live endpoint, closed once.
            if let Ok(Some(req)) = decode_status_ptr(unsafe { sys::ucp_ep_close_nbx(ep.raw, &p) }) {
                closing.push(req);
            }
        }
        self.wait_all(closing, Duration::from_secs(2));
        self.progress();
        // Nobody may signal the worker past this point.
        let _gate = gate.write().unwrap_or_else(|p| p.into_inner());
        for (_, w) in self.windows.drain() {
            // SAFETY: registered on this context; nothing reads the window afterwards.
            unsafe { sys::ucp_mem_unmap(self.context, w.memh) };
        }
        // SAFETY: everything made on the worker is closed.
        unsafe {
            sys::ucp_worker_destroy(self.worker);
            sys::ucp_cleanup(self.context);
        }
        // UCX is gone and will call nothing back: free the sends it never completed, which
        // answers their callers. (Rendezvous receive contexts left behind have nobody waiting
        // and are leaked.)
        for ptr in LIVE_SENDS.with(|l| std::mem::take(&mut *l.borrow_mut())) {
            // SAFETY: each pointer is a SendCtx leaked by `submit_send` whose callback never ran.
            drop(unsafe { Box::from_raw(ptr as *mut SendCtx) });
        }
        drop(self.listeners);
    }
}

/// Whether UCX_TLS names shared-memory transports only (then no transport can detect peer
/// failure, and asking for it would only make UCX log an error before the retry without).
fn shared_memory_only() -> bool {
    // A leading `^` excludes the listed transports instead.
    std::env::var("UCX_TLS").is_ok_and(|tls| {
        !tls.starts_with('^') && tls.split(',').all(|t| matches!(t.trim(), "shm" | "sm" | "posix" | "sysv" | "cma" | "knem" | "xpmem" | "self"))
    })
}

fn close_endpoint(raw: sys::ucp_ep_h, force: bool) {
    let mut p: sys::ucp_request_param_t = zeroed();
    if force {
        p.op_attr_mask = sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_FLAGS;
        p.flags = sys::ucp_ep_close_flags_t_UCP_EP_CLOSE_FLAG_FORCE;
    }
    // SAFETY: a live endpoint, closed once; an in-progress close request is handed back to UCX
    // (ucp_request_free releases it when it completes).
    unsafe {
        if let Ok(Some(req)) = decode_status_ptr(sys::ucp_ep_close_nbx(raw, &p)) {
            sys::ucp_request_free(req);
        }
    }
}

/// Starts a send-like operation whose completion answers `ctx.reply`; the context (and the
/// buffers it owns) lives until then.
fn submit_send(ctx: Box<SendCtx>, start: impl FnOnce(*const sys::ucp_request_param_t) -> sys::ucs_status_ptr_t) {
    let raw = Box::into_raw(ctx);
    let mut p: sys::ucp_request_param_t = zeroed();
    p.op_attr_mask = sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_CALLBACK | sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = Some(send_done);
    p.user_data = raw as *mut c_void;
    match decode_status_ptr(start(&p)) {
        // In progress: `send_done` owns the context from here.
        Ok(Some(_)) => {
            LIVE_SENDS.with(|l| l.borrow_mut().insert(raw as usize));
        }
        Ok(None) => {
            // SAFETY: completed inline, so UCX will not call back; the context is ours again.
            let ctx = unsafe { Box::from_raw(raw) };
            let _ = ctx.reply.send(Ok(()));
        }
        Err(status) => {
            // SAFETY: failed synchronously, no callback; the context is ours again.
            let ctx = unsafe { Box::from_raw(raw) };
            let _ = ctx.reply.send(Err(UcxError::status(ctx.op, status)));
        }
    }
}

unsafe extern "C" fn send_done(request: *mut c_void, status: sys::ucs_status_t, user_data: *mut c_void) {
    // SAFETY: user_data is the context `submit_send` leaked for this request; UCX calls this
    // exactly once per in-progress request, which is then ours to free.
    LIVE_SENDS.with(|l| l.borrow_mut().remove(&(user_data as usize)));
    let ctx = unsafe { Box::from_raw(user_data as *mut SendCtx) };
    let r = if status == sys::ucs_status_t_UCS_OK { Ok(()) } else { Err(UcxError::status(ctx.op, status)) };
    let _ = ctx.reply.send(r);
    unsafe { sys::ucp_request_free(request) };
}

unsafe extern "C" fn rkey_flushed(request: *mut c_void, _status: sys::ucs_status_t, user_data: *mut c_void) {
    // SAFETY: user_data is the boxed rkey handle `destroy_rkey_after_flush` leaked for this
    // request; the flush is done (or failed: the endpoint is gone), so nothing uses the rkey.
    let rkey = unsafe { Box::from_raw(user_data as *mut sys::ucp_rkey_h) };
    unsafe {
        sys::ucp_rkey_destroy(*rkey);
        sys::ucp_request_free(request);
    }
}

unsafe extern "C" fn endpoint_failed(arg: *mut c_void, _ep: sys::ucp_ep_h, status: sys::ucs_status_t) {
    FAILED.with(|f| f.borrow_mut().push((arg as usize as u64, status)));
}

unsafe extern "C" fn am_received(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    // SAFETY: arg is the listener box registered with this handler, alive while it is set;
    // header and (eager) data are valid for the call; param is UCX's.
    let listener = unsafe { &*(arg as *const Listener) };
    let header = if header_length == 0 {
        Vec::new()
    } else {
        unsafe { std::slice::from_raw_parts(header as *const u8, header_length) }.to_vec()
    };
    if length > listener.max_len {
        // Not received: an eager payload is dropped with the callback, a rendezvous one is never
        // pulled (UCX completes the sender's request).
        tracing::warn!(length, limit = listener.max_len, "refusing an oversized UCX active message");
        let _ = listener.tx.send(AmMessage { header, data: Vec::new(), oversized: Some(length) });
        return sys::ucs_status_t_UCS_OK;
    }
    let rndv = unsafe { (*param).recv_attr } & sys::ucp_am_recv_attr_t_UCP_AM_RECV_ATTR_FLAG_RNDV as u64 != 0;
    if !rndv {
        let data = if length == 0 { Vec::new() } else { unsafe { std::slice::from_raw_parts(data as *const u8, length) }.to_vec() };
        let _ = listener.tx.send(AmMessage { header, data, oversized: None });
        return sys::ucs_status_t_UCS_OK;
    }
    // Rendezvous: receive into a buffer of our own; `recv_done` hands it over.
    let mut ctx = Box::new(RecvCtx { header, buf: vec![0u8; length], tx: listener.tx.clone() });
    let buf = ctx.buf.as_mut_ptr();
    let raw = Box::into_raw(ctx);
    let mut p: sys::ucp_request_param_t = zeroed();
    p.op_attr_mask = sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_CALLBACK | sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.recv_am = Some(recv_done);
    p.user_data = raw as *mut c_void;
    // SAFETY: data is the rendezvous descriptor UCX just gave us; the buffer is owned by the
    // context, which lives until `recv_done` (or is reclaimed here if UCX finished inline).
    match decode_status_ptr(unsafe { sys::ucp_am_recv_data_nbx(listener.worker, data, buf as *mut c_void, length, &p) }) {
        Ok(Some(_)) => {}
        Ok(None) => {
            let ctx = unsafe { Box::from_raw(raw) };
            let _ = ctx.tx.send(AmMessage { header: ctx.header, data: ctx.buf, oversized: None });
        }
        Err(status) => {
            drop(unsafe { Box::from_raw(raw) });
            tracing::warn!(status = ucx_rs::status_string(status), "UCX rendezvous receive failed");
        }
    }
    sys::ucs_status_t_UCS_OK
}

unsafe extern "C" fn recv_done(request: *mut c_void, status: sys::ucs_status_t, length: usize, user_data: *mut c_void) {
    // SAFETY: user_data is the RecvCtx leaked for this request; called once, then the request
    // is ours to free.
    let mut ctx = unsafe { Box::from_raw(user_data as *mut RecvCtx) };
    if status == sys::ucs_status_t_UCS_OK {
        ctx.buf.truncate(length);
        let _ = ctx.tx.send(AmMessage { header: ctx.header, data: ctx.buf, oversized: None });
    } else {
        tracing::warn!(status = ucx_rs::status_string(status), "UCX rendezvous receive failed");
    }
    unsafe { sys::ucp_request_free(request) };
}

/// How long the progress thread keeps polling after the last command or event before it
/// sleeps on the event fd.
const SPIN: Duration = Duration::from_micros(50);

/// The thread's body: start UCX, report the worker (or the error), then serve commands until
/// `Shutdown` or until every handle is gone.
pub(crate) fn run(rx: mpsc::Receiver<Command>, ready: mpsc::Sender<Result<(WorkerPtr, Vec<u8>), UcxError>>, gate: Arc<RwLock<bool>>) {
    let mut state = match State::new() {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    match state.address() {
        Ok(address) => {
            if ready.send(Ok((WorkerPtr(state.worker), address))).is_err() {
                return state.shutdown(&gate);
            }
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return state.shutdown(&gate);
        }
    }
    let mut last_activity = Instant::now();
    'serve: loop {
        loop {
            match rx.try_recv() {
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => break 'serve,
                Ok(cmd) => {
                    state.handle(cmd);
                    last_activity = Instant::now();
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        if state.progress() {
            last_activity = Instant::now();
        }
        // Stay awake a little after activity: a reply or the next message usually follows
        // within microseconds, and waking from the event fd costs tens of them.
        if last_activity.elapsed() < SPIN {
            // Yield rather than spin hot: the thread that will produce the next command may
            // need this core.
            std::thread::yield_now();
            continue;
        }
        // SAFETY: the worker is used only from this thread.
        let armed = unsafe { sys::ucp_worker_arm(state.worker) };
        if armed == sys::ucs_status_t_UCS_ERR_BUSY {
            continue;
        }
        if armed != sys::ucs_status_t_UCS_OK {
            tracing::error!(status = ucx_rs::status_string(armed), "UCX worker arm failed");
        }
        // Arming clears the event fd: a command queued just before it was signalled before, so
        // look at the queue once more before sleeping.
        match rx.try_recv() {
            Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => break,
            Ok(cmd) => {
                state.handle(cmd);
                last_activity = Instant::now();
                continue;
            }
            Err(TryRecvError::Empty) => {}
        }
        let mut pfd = libc::pollfd { fd: state.efd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd. The timeout is a backstop only: UCX or a command signals the fd.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
    }
    state.shutdown(&gate);
}
