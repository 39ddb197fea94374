//! The socket API: HTTP/1.1 + JSON on unix sockets.
//!
//! * [`bind`] creates the main socket: parent directory created 0750 when missing, a stale
//!   socket (nobody answers on it) replaced, a live one refused, the socket made 0660 between
//!   bind and listen. [`bind_private`] does the same for the root socket, made 0600.
//! * [`serve`] runs one accept loop per socket, each with its own connection budget
//!   (`api.max_connections` on the main socket, `api.root_max_connections` on the root
//!   socket; more wait in the listen backlog), a header read timeout, a bounded header buffer
//!   and a per-request timeout, so slow or half-open clients cannot block others. Each
//!   connection's peer credentials (SO_PEERCRED) travel with its requests for authorization
//!   and audit.
//! * Per-uid caps ([`limits`]): on the main socket a uid holds at most
//!   `api.max_connections_per_uid` connections (`api.max_connections_without_role` when it
//!   has no role) and, on any socket, `api.max_streams_per_uid` live follow streams; one more
//!   is answered 1000429 and closed. root and the agent's own uid are never counted, and
//!   only they may use the root socket, so no other uid can make root's requests wait.
//! * A refusal is seen by every client: after the answer the agent stops writing and reads
//!   and discards what the client still sends (a body it did not read) for a bounded time
//!   and byte count before closing ([`linger`]), so a client still writing its body gets the
//!   answer instead of EPIPE or a reset.
//! * Routes: every API at `POST /v1/<api_name>` and `POST /api/v2/proc/<api_name>/` (the
//!   APIGW path), the GSE APIs ([`GSE_APIS`]) also at `POST /<api_name>/` (the ESB root
//!   path), trailing slashes optional, all through one [`dispatch`] (one authorization);
//!   `GET /v1/healthz`, `GET /v1/events`, `GET /v1/logs`,
//!   `POST /v1/reload`, `GET /metrics` (also `/v1/metrics`; see [`metrics`]).
//!   Every answer, errors included, is the GSE envelope `{result, code, message, data,
//!   request_id}`; every refusal is logged, rate-limited ([`refusals`]).

pub mod auth;
pub mod caps;
pub mod client;
pub mod gsekit;
pub mod handlers;
pub mod health;
pub mod limits;
pub mod listing;
pub mod logs;
pub mod metrics;
pub mod operate;
pub mod refusals;
pub mod register;
pub mod reload;
pub mod status;
pub mod submit;
pub mod wire;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as AxPath, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::proto::{Envelope, codes};
use crate::supervisor::Engine;
use caps::{Slot, UidCaps};
use refusals::RefusalLog;

/// The peer of a connection, from SO_PEERCRED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// An API error: answered as the envelope with `result: false`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub http: StatusCode,
    pub code: i64,
    pub message: String,
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError {
            http: StatusCode::OK,
            code: codes::BAD_REQUEST,
            message: message.into(),
        }
    }
    pub fn new(code: i64, message: impl Into<String>) -> ApiError {
        ApiError {
            http: StatusCode::OK,
            code,
            message: message.into(),
        }
    }
}

/// Decode a GET request's query string strictly: a component whose percent-decoded bytes
/// are not UTF-8 (`key=%FF%FE/x`) is refused with 1000400 instead of being read with
/// replacement characters, as JSON bodies are (docs/api.md).
pub fn strict_query<T: serde::de::DeserializeOwned>(uri: &axum::http::Uri) -> Result<T, ApiError> {
    let raw = uri.query().unwrap_or("");
    for part in raw.split('&') {
        if std::str::from_utf8(&percent_decode(part.as_bytes())).is_err() {
            let name = part.split('=').next().unwrap_or(part);
            return Err(ApiError::bad(format!(
                "invalid query: {name:?} does not decode to UTF-8 text"
            )));
        }
    }
    axum::extract::Query::<T>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| ApiError::bad(format!("invalid query: {e}")))
}

/// `application/x-www-form-urlencoded` decoding of one component (`+` is a space; a `%`
/// not followed by two hex digits stays as it is, as the form decoder reads it).
fn percent_decode(b: &[u8]) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod query_tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        for (raw, want) in [
            ("key=a%2Fb", &b"key=a/b"[..]),
            ("a+b", b"a b"),
            ("%FF%fe", b"\xff\xfe"),
            ("50%", b"50%"),
            ("%4", b"%4"),
            ("%zz", b"%zz"),
            ("%e4%b8%ad", "中".as_bytes()),
        ] {
            assert_eq!(percent_decode(raw.as_bytes()), want, "{raw}");
        }
    }

    #[derive(Debug, serde::Deserialize)]
    struct Q {
        key: String,
    }

    #[test]
    fn a_query_that_is_not_utf8_is_refused() {
        let uri: axum::http::Uri = "/v1/logs?key=%FF%FE/x".parse().unwrap();
        let e = strict_query::<Q>(&uri).unwrap_err();
        assert_eq!(e.code, codes::BAD_REQUEST);
        assert!(e.message.contains("\"key\""), "{}", e.message);
        let uri: axum::http::Uri = "/v1/logs?key=ns%2F%E4%B8%AD".parse().unwrap();
        assert_eq!(strict_query::<Q>(&uri).unwrap().key, "ns/中");
    }
}

/// Build an envelope response.
pub fn envelope(
    result: bool,
    code: i64,
    message: &str,
    data: Option<serde_json::Value>,
    http: StatusCode,
) -> Response {
    let env = Envelope {
        result,
        code,
        message: message.to_string(),
        data,
        request_id: crate::util::request_id(),
    };
    let body = serde_json::to_vec(&env)
        .unwrap_or_else(|_| b"{\"result\":false,\"code\":1000500}".to_vec());
    large_answer(body.len());
    let mut r = (http, [("content-type", "application/json")], body).into_response();
    if !result {
        r.extensions_mut().insert(Refused {
            code,
            message: env.message,
        });
    }
    r
}

/// Marks an answer that refused its request (for the refusal log).
#[derive(Debug, Clone)]
pub struct Refused {
    pub code: i64,
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        envelope(false, self.code, &self.message, None, self.http)
    }
}

/// A success envelope.
pub fn ok(data: serde_json::Value) -> Response {
    envelope(true, codes::SUCCESS, "success", Some(data), StatusCode::OK)
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
}

/// Which socket a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// `agent.socket`: every role, per-uid caps.
    Main,
    /// `api.root_socket`: root and the agent's own uid only.
    Root,
}

impl SocketKind {
    pub fn name(self) -> &'static str {
        match self {
            SocketKind::Main => "main",
            SocketKind::Root => "root",
        }
    }
}

/// A request extension: the socket the request came through and every socket served.
#[derive(Debug, Clone)]
pub struct Listening {
    pub via: SocketKind,
    pub sockets: Arc<BTreeMap<String, String>>,
}

/// The socket a request came through ("main", "root"; empty when unknown) and the sockets
/// served, by kind, with their paths (for healthz).
pub fn listening(req: &Request) -> (String, BTreeMap<String, String>) {
    match req.extensions().get::<Listening>() {
        Some(l) => (l.via.name().to_string(), (*l.sockets).clone()),
        None => (String::new(), BTreeMap::new()),
    }
}

/// Create the main socket at `path` (see the module docs): mode 0660.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    bind_mode(path, 0o660)
}

/// Create the root socket at `path`: as [`bind`], mode 0600 (only its owner, the agent's
/// uid, and root can connect).
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    bind_mode(path, 0o600)
}

fn bind_mode(path: &Path, mode: u32) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{} is in use: another procagentd is serving it",
                        path.display()
                    ),
                ));
            }
            Err(_) => {
                tracing::warn!(socket = %path.display(), "replacing a stale socket");
                std::fs::remove_file(path)?;
            }
        },
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                ),
            ));
        }
        Err(_) => {}
    }
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, socket};
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(io::Error::from)?;
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    nix::sys::socket::bind(fd.as_raw_fd(), &addr).map_err(io::Error::from)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    nix::sys::socket::listen(
        &fd,
        nix::sys::socket::Backlog::new(256).unwrap_or(nix::sys::socket::Backlog::MAXCONN),
    )
    .map_err(io::Error::from)?;
    let std_listener = std::os::unix::net::UnixListener::from(fd);
    std_listener.set_nonblocking(true)?;
    UnixListener::from_std(std_listener)
}

/// Give the socket to a group (so the admin/read-only groups can connect).
pub fn chown_socket(path: &Path, group: &str) -> io::Result<()> {
    let g = nix::unistd::Group::from_name(group)
        .map_err(io::Error::from)?
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("group {group:?} does not exist"),
            )
        })?;
    nix::unistd::chown(path, None, Some(g.gid)).map_err(io::Error::from)?;
    if let Some(dir) = path.parent() {
        let _ = nix::unistd::chown(dir, None, Some(g.gid));
    }
    Ok(())
}

/// The GSE APIs, also served at the gateway root (`POST /<api_name>/`), where the ESB
/// forwards them; the agent's own APIs (`procs`, `tasks`, GSEKit's `operate_process`) are
/// not GSE's and stay under `/v1/` and `/api/v2/proc/`.
pub const GSE_APIS: &[&str] = &[
    "operate_proc",
    "operate_proc_v2",
    "operate_proc_multi",
    "get_proc_operate_result",
    "get_proc_operate_result_v2",
    "get_proc_status",
    "get_proc_status_v2",
    "sync_proc_status",
    "register_proc_info",
    "update_proc_info",
    "unregister_proc_info",
];

/// The router.
pub fn router(engine: Arc<Engine>) -> Router {
    let state = AppState { engine };
    Router::new()
        .route(
            "/v1/healthz",
            get(health::healthz).fallback(method_not_allowed),
        )
        .route(
            "/healthz",
            get(health::healthz).fallback(method_not_allowed),
        )
        .route(
            "/v1/events",
            get(health::events).fallback(method_not_allowed),
        )
        .route("/v1/logs", get(logs::handler).fallback(method_not_allowed))
        .route("/v1/reload", any(reload::handler))
        .route(
            "/metrics",
            get(metrics::on_socket).fallback(method_not_allowed),
        )
        .route(
            "/v1/metrics",
            get(metrics::on_socket).fallback(method_not_allowed),
        )
        .route("/v1/{api}", any(dispatch))
        .route("/v1/{api}/", any(dispatch))
        .route("/api/v2/proc/{api}", any(dispatch))
        .route("/api/v2/proc/{api}/", any(dispatch))
        .route("/v2/gsekit/api/process/process_status", any(gsekit_status))
        .route("/v2/gsekit/api/process/process_status/", any(gsekit_status))
        .merge(esb_root_routes())
        .fallback(not_found)
        .with_state(state)
}

/// `POST /<api>` and `POST /<api>/` for every GSE API: the same [`dispatch`] as `/v1/<api>`.
fn esb_root_routes() -> Router<AppState> {
    let mut root = Router::new();
    for &api in GSE_APIS {
        let at =
            move |st: State<AppState>, req: Request| dispatch(st, AxPath(api.to_string()), req);
        root = root
            .route(&format!("/{api}"), any(at))
            .route(&format!("/{api}/"), any(at));
    }
    root
}

/// A GET endpoint asked with another method: the envelope, 405.
async fn method_not_allowed(req: Request) -> Response {
    ApiError {
        http: StatusCode::METHOD_NOT_ALLOWED,
        code: codes::METHOD_NOT_ALLOWED,
        message: format!(
            "{} {} is not served; use GET",
            req.method(),
            req.uri().path()
        ),
    }
    .into_response()
}

async fn not_found(req: Request) -> Response {
    ApiError {
        http: StatusCode::NOT_FOUND,
        code: codes::NOT_FOUND,
        message: format!("no such endpoint: {} {}", req.method(), req.uri().path()),
    }
    .into_response()
}

async fn gsekit_status(state: State<AppState>, req: Request) -> Response {
    dispatch(state, AxPath("process_status".to_string()), req).await
}

/// Route `POST /v1/<api>` to its handler.
async fn dispatch(
    State(st): State<AppState>,
    AxPath(api): AxPath<String>,
    req: Request,
) -> Response {
    st.engine.counters.api_request(&api);
    if req.method() != axum::http::Method::POST {
        if req.method() == axum::http::Method::GET && api == "healthz" {
            return health::healthz(State(st), req).await;
        }
        return ApiError {
            http: StatusCode::METHOD_NOT_ALLOWED,
            code: codes::METHOD_NOT_ALLOWED,
            message: format!("{} needs POST with a JSON body", req.uri().path()),
        }
        .into_response();
    }
    let access = match auth::access_of(&req) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let limit = st.engine.config.api.max_body_bytes;
    let body = match read_body(req.into_body(), limit).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    match handlers::call_authorized(&st.engine, &api, &body, &access).await {
        Ok(handlers::Answer::Data(data)) => ok(data),
        Ok(handlers::Answer::Encoded(bytes)) => {
            large_answer(bytes.len());
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                bytes,
            )
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Answers at least this large leave enough freed memory behind to be worth giving back.
const LARGE_ANSWER: usize = 256 << 10;

/// Set when a large answer was made: the supervisor's housekeeping ticks then give the
/// memory it freed back to the kernel ([`crate::sys::trim_heap`]; [`take_trim_due`]), at
/// the next two ticks (the first may come before the answer is sent and its buffers freed).
static TRIM_DUE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

fn large_answer(len: usize) {
    if len >= LARGE_ANSWER {
        TRIM_DUE.store(2, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether a trim is due at this tick (a large answer was made in the last two).
pub fn take_trim_due() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    TRIM_DUE
        .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

/// Read a request body of at most `limit` bytes.
pub async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    use http_body_util::BodyExt;
    use hyper::body::Body as _;
    // A Content-Length over the limit is refused before a byte of the body is read.
    if body.size_hint().lower() > limit as u64 {
        return Err(ApiError {
            http: StatusCode::PAYLOAD_TOO_LARGE,
            code: codes::TOO_LARGE,
            message: format!("request body is larger than the limit of {limit} bytes"),
        });
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes().to_vec()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(ApiError {
                    http: StatusCode::PAYLOAD_TOO_LARGE,
                    code: codes::TOO_LARGE,
                    message: format!("request body is larger than the limit of {limit} bytes"),
                })
            } else {
                Err(ApiError::bad(format!("cannot read the request body: {e}")))
            }
        }
    }
}

/// An answer after which the connection is closed (its request body may be unread: the
/// connection lingers, see [`linger`]).
fn closing(e: ApiError) -> Response {
    let mut r = e.into_response();
    r.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    r
}

/// How long a connection that is being closed keeps reading (and discarding) what its
/// client still sends, so that a client writing a body the agent did not read can finish
/// and read the answer.
pub const LINGER: Duration = Duration::from_secs(2);

/// Bytes beyond `api.max_body_bytes` a closing connection reads and discards (a body just
/// over the limit, and what sits in the socket buffers).
pub const LINGER_SLACK: usize = 1 << 20;

/// Time a connection over a cap has to send its request headers before it is answered
/// 1000429 (a client that sends nothing is closed without an answer).
pub const REFUSAL_HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// The sockets [`serve`] serves.
pub struct Listeners {
    pub main: UnixListener,
    pub main_path: PathBuf,
    /// The root socket and its path, when bound.
    pub root: Option<(UnixListener, PathBuf)>,
}

/// What every connection of one server shares.
struct Server {
    engine: Arc<Engine>,
    app: Router,
    /// Connections held per uid on the main socket.
    conns: Arc<UidCaps>,
    /// Live follow streams held per uid.
    streams: Arc<UidCaps>,
    /// Connections being answered 1000429/1000403 at once; beyond, they are closed unanswered.
    refusing: Arc<Semaphore>,
    refusals: RefusalLog,
    sockets: Arc<BTreeMap<String, String>>,
}

/// Serve the API on the main socket (and the root socket, when given) until `shutdown`
/// turns true.
pub async fn serve(engine: Arc<Engine>, listeners: Listeners, shutdown: watch::Receiver<bool>) {
    let mut sockets = BTreeMap::new();
    sockets.insert(
        SocketKind::Main.name().to_string(),
        listeners.main_path.display().to_string(),
    );
    if let Some((_, p)) = &listeners.root {
        sockets.insert(SocketKind::Root.name().to_string(), p.display().to_string());
    }
    let api = &engine.config.api;
    let srv = Arc::new(Server {
        app: router(engine.clone()),
        conns: UidCaps::new(),
        streams: UidCaps::new(),
        refusing: Arc::new(Semaphore::new(api.max_connections)),
        refusals: RefusalLog::default(),
        sockets: Arc::new(sockets),
        engine: engine.clone(),
    });
    let main = accept_loop(
        srv.clone(),
        listeners.main,
        SocketKind::Main,
        api.max_connections,
        shutdown.clone(),
    );
    match listeners.root {
        Some((root, _)) => {
            let root = accept_loop(
                srv.clone(),
                root,
                SocketKind::Root,
                api.root_max_connections,
                shutdown,
            );
            tokio::join!(main, root);
        }
        None => main.await,
    }
}

/// Accept connections on one socket, at most `budget` served at once.
async fn accept_loop(
    srv: Arc<Server>,
    listener: UnixListener,
    kind: SocketKind,
    budget: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(budget));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, socket = kind.name(), "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let peer = stream.peer_cred().ok().map(|c| Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        });
        tokio::spawn(
            srv.clone()
                .connection(stream, peer, kind, permit, shutdown.clone()),
        );
    }
}

impl Server {
    /// One accepted connection: admitted (within its uid's cap) and served, or answered
    /// with the refusal and closed.
    async fn connection(
        self: Arc<Self>,
        stream: UnixStream,
        peer: Option<Peer>,
        kind: SocketKind,
        permit: OwnedSemaphorePermit,
        shutdown: watch::Receiver<bool>,
    ) {
        match self.admit(peer, kind).await {
            Ok(slot) => {
                let _held = (permit, slot);
                self.serve_http(stream, peer, kind, shutdown).await;
            }
            Err(e) => {
                // A refused connection does not hold a slot of the socket's budget.
                drop(permit);
                self.refuse(stream, peer, e).await;
            }
        }
    }

    /// May this peer hold one more connection on `kind`? Ok carries its uid's slot (None:
    /// not counted).
    async fn admit(&self, peer: Option<Peer>, kind: SocketKind) -> Result<Option<Slot>, ApiError> {
        let Some(p) = peer else {
            return Err(ApiError::new(
                codes::FORBIDDEN,
                "the peer's credentials are unknown; refused",
            ));
        };
        if auth::full_access_uid(p.uid) {
            return Ok(None);
        }
        if kind == SocketKind::Root {
            return Err(ApiError::new(
                codes::FORBIDDEN,
                format!(
                    "uid {} may not use the root socket: it serves only root and uid {}; use the main socket",
                    p.uid,
                    nix::unistd::getuid().as_raw()
                ),
            ));
        }
        // The role decides the allowance; looking it up (NSS) runs off the async workers.
        let has_role = auth::authorize_off_runtime(&self.engine, peer)
            .await
            .is_ok();
        let api = &self.engine.config.api;
        let (limit, key, what) = if has_role {
            (api.max_connections_per_uid, "max_connections_per_uid", "")
        } else {
            (
                api.max_connections_without_role,
                "max_connections_without_role",
                ", which has no role,",
            )
        };
        match self.conns.try_take(p.uid, limit) {
            Some(slot) => Ok(Some(slot)),
            None => Err(too_many(format!(
                "too many connections for uid {}{what} (limit {limit}, api.{key})",
                p.uid
            ))),
        }
    }

    /// Serve HTTP on an admitted connection, then linger (see [`linger`]).
    async fn serve_http(
        self: Arc<Self>,
        stream: UnixStream,
        peer: Option<Peer>,
        kind: SocketKind,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let api = &self.engine.config.api;
        let keep = stream.as_fd().try_clone_to_owned().ok();
        let listening = Listening {
            via: kind,
            sockets: self.sockets.clone(),
        };
        let srv = self.clone();
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                if let Some(p) = peer {
                    req.extensions_mut().insert(p);
                }
                req.extensions_mut().insert(listening.clone());
                let srv = srv.clone();
                async move { Ok::<_, std::convert::Infallible>(srv.handle(req, peer).await) }
            });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(api.header_timeout)
            .max_buf_size(64 * 1024)
            .keep_alive(true);
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        tokio::pin!(conn);
        let ended = tokio::select! {
            r = conn.as_mut() => Some(r),
            _ = shutdown.changed() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                None
            }
        };
        match ended {
            // A client that never finished its headers was told nothing: nothing to linger for.
            Some(Err(e)) if e.is_timeout() => {
                tracing::debug!(error = %e, "connection cut at header_timeout");
            }
            Some(r) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                if let Some(fd) = keep {
                    linger(fd, api.max_body_bytes.saturating_add(LINGER_SLACK)).await;
                }
            }
            None => {}
        }
    }

    /// Answer a connection that may not be served with `e` (after reading its request
    /// headers, for at most [`REFUSAL_HEADER_TIMEOUT`]), then linger and close. Beyond
    /// `api.max_connections` refusals at once, a connection is closed unanswered.
    async fn refuse(&self, stream: UnixStream, peer: Option<Peer>, e: ApiError) {
        let uid = peer.map(|p| p.uid);
        let Ok(_refusing) = self.refusing.clone().try_acquire_owned() else {
            self.refusals.note(
                uid,
                "connection",
                e.code,
                &format!(
                    "{} (closed unanswered: too many refusals at once)",
                    e.message
                ),
            );
            return;
        };
        self.refusals.note(uid, "connection", e.code, &e.message);
        let keep = stream.as_fd().try_clone_to_owned().ok();
        let svc = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
            let e = e.clone();
            async move { Ok::<_, std::convert::Infallible>(closing(e)) }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(REFUSAL_HEADER_TIMEOUT)
            .max_buf_size(16 * 1024)
            .keep_alive(false);
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        match tokio::time::timeout(REFUSAL_HEADER_TIMEOUT + LINGER, conn).await {
            Ok(Err(e)) if e.is_timeout() => {}
            Ok(_) => {
                if let Some(fd) = keep {
                    let api = &self.engine.config.api;
                    linger(fd, api.max_body_bytes.saturating_add(LINGER_SLACK)).await;
                }
            }
            Err(_) => {}
        }
    }

    /// One request: authorize the peer before anything else, read the body (bounded,
    /// within the request's time), then run the router as a task of its own: a request
    /// that times out is answered 408 but never cancelled halfway through a change (a
    /// registration whose commit landed still reaches memory). A follow stream takes one
    /// of its uid's stream slots for as long as it lives. Every refusal is logged.
    async fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
        peer: Option<Peer>,
    ) -> Response {
        let what = format!("{} {}", req.method(), req.uri().path());
        let r = self.answer(req, peer).await;
        if let Some(refused) = r.extensions().get::<Refused>() {
            self.refusals
                .note(peer.map(|p| p.uid), &what, refused.code, &refused.message);
        }
        r
    }

    async fn answer(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
        peer: Option<Peer>,
    ) -> Response {
        let api = &self.engine.config.api;
        let timeout = api.request_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let too_slow = || ApiError {
            http: StatusCode::REQUEST_TIMEOUT,
            code: codes::TIMEOUT,
            message: format!("the request took longer than {}s", timeout.as_secs_f64()),
        };
        let access = match auth::authorize_off_runtime(&self.engine, peer).await {
            Ok(a) => a,
            Err(e) => return closing(e),
        };
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(access);
        let body =
            match tokio::time::timeout_at(deadline, read_body(Body::new(body), api.max_body_bytes))
                .await
            {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => return closing(e),
                Err(_) => return closing(too_slow()),
            };
        let req = Request::from_parts(parts, Body::from(body));
        let work = tokio::spawn(tower::ServiceExt::oneshot(self.app.clone(), req));
        let r = match tokio::time::timeout_at(deadline, work).await {
            Ok(Ok(Ok(r))) => r,
            Ok(Ok(Err(e))) => match e {},
            Ok(Err(e)) => {
                return ApiError::new(codes::INTERNAL, format!("the request handler failed: {e}"))
                    .into_response();
            }
            Err(_) => return too_slow().into_response(),
        };
        if !is_stream(&r) {
            return r;
        }
        let Some(p) = peer.filter(|p| !auth::full_access_uid(p.uid)) else {
            return r;
        };
        let limit = api.max_streams_per_uid;
        match self.streams.try_take(p.uid, limit) {
            Some(slot) => hold_while_streaming(r, slot),
            None => closing(too_many(format!(
                "too many live streams for uid {} (limit {limit}, api.max_streams_per_uid)",
                p.uid
            ))),
        }
    }
}

fn too_many(message: String) -> ApiError {
    ApiError {
        http: StatusCode::TOO_MANY_REQUESTS,
        code: codes::TOO_MANY,
        message,
    }
}

/// Is this answer a follow stream (newline-delimited JSON)?
fn is_stream(r: &Response) -> bool {
    r.headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-ndjson"))
}

/// The stream's body holds `slot` until it is dropped (the client went away, the stream
/// ended, the agent stops).
fn hold_while_streaming(r: Response, slot: Slot) -> Response {
    use futures_util::StreamExt;
    let (parts, body) = r.into_parts();
    let data = body.into_data_stream().map(move |chunk| {
        let _held = &slot;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(data))
}

/// Close a connection whose answer is written without resetting it: stop writing
/// (half-close), then read and discard what the client still sends (a request body the
/// agent did not read) until it closes, `budget` bytes were read or [`LINGER`] passed.
/// Closing a unix socket with unread data makes the client's writes fail with EPIPE and its
/// reads with ECONNRESET, so a client that writes its body after the headers (Python's
/// http.client, requests) would otherwise never see a refusal.
async fn linger(fd: OwnedFd, budget: usize) {
    use tokio::io::AsyncReadExt;
    let std_stream = std::os::unix::net::UnixStream::from(fd);
    let _ = std_stream.shutdown(std::net::Shutdown::Write);
    let Ok(mut s) = UnixStream::from_std(std_stream) else {
        return;
    };
    let mut buf = vec![0u8; 16 * 1024];
    let mut left = budget;
    let _ = tokio::time::timeout(LINGER, async {
        while left > 0 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn bodies_must_be_utf8_json_with_nothing_after_it() {
        #[derive(serde::Deserialize, Debug)]
        struct Req {
            #[allow(dead_code)]
            #[serde(default)]
            name: String,
        }
        let body = b"{\"name\": \"x\",\n \"bk_username\": \"a\xffb\"}";
        let e = handlers::parse::<Req>(body).unwrap_err();
        assert_eq!(e.code, codes::BAD_REQUEST);
        assert_eq!(
            e.message,
            "the request body is not valid UTF-8: invalid byte 0xff at offset 32 (line 2, column 19)"
        );
        let e = handlers::parse::<Req>(b"{\"name\": \"\xe4\xbd").unwrap_err();
        assert!(
            e.message.contains("a truncated character at offset 10"),
            "{}",
            e.message
        );
        let e = handlers::parse::<Req>(b"{\"name\": \"x\"} {}").unwrap_err();
        assert!(e.message.contains("trailing characters"), "{}", e.message);
        assert!(handlers::parse::<Req>("{\"name\": \"进程\"}\n".as_bytes()).is_ok());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn linger_reads_the_rest_of_the_body_then_closes() {
        let (server, mut client) = std::os::unix::net::UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let fd = OwnedFd::from(server);
        let done = tokio::spawn(linger(fd, 1 << 20));
        // More than the socket buffers hold: only a reading peer lets this finish.
        let writer = std::thread::spawn(move || {
            client.write_all(&vec![b' '; 600_000]).unwrap();
            // The server stopped writing: EOF, then the client closes.
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).unwrap();
            rest.len()
        });
        done.await.unwrap();
        assert_eq!(writer.join().unwrap(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn linger_stops_at_its_byte_budget() {
        let (server, mut client) = std::os::unix::net::UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let fd = OwnedFd::from(server);
        let done = tokio::spawn(linger(fd, 64 * 1024));
        let writer = std::thread::spawn(move || client.write_all(&vec![b' '; 8 << 20]));
        done.await.unwrap();
        // The agent closed after its budget: the rest of the endless body is refused.
        assert!(writer.join().unwrap().is_err());
    }
}
