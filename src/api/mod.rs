//! The socket API: HTTP/1.1 + JSON on a unix socket.
//!
//! * [`bind`] creates the socket: parent directory created 0750 when missing, a stale socket
//!   (nobody answers on it) replaced, a live one refused, the socket made 0660 between bind
//!   and listen.
//! * [`serve`] runs the accept loop: at most `max_connections` at once, a header read
//!   timeout, a bounded header buffer and a per-request timeout, so slow or half-open clients
//!   cannot block others. Each connection's peer credentials (SO_PEERCRED) travel with its
//!   requests for authorization and audit.
//! * Routes: every GSE API at `POST /v1/<api_name>`, also at `POST /api/v2/proc/<api_name>/`
//!   (trailing slash optional); `GET /v1/healthz`, `GET /v1/events`, `GET /v1/logs`,
//!   `POST /v1/reload`, `GET /metrics` (also `/v1/metrics`; see [`metrics`]).
//!   Every answer, errors included, is the GSE envelope `{result, code, message, data,
//!   request_id}`.

pub mod auth;
pub mod client;
pub mod gsekit;
pub mod handlers;
pub mod limits;
pub mod logs;
pub mod metrics;
pub mod reload;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as AxPath, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, watch};

use crate::proto::{Envelope, codes};
use crate::supervisor::Engine;

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
    (http, [("content-type", "application/json")], body).into_response()
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

/// Create the listening socket at `path` (see the module docs).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
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

/// The router.
pub fn router(engine: Arc<Engine>) -> Router {
    let state = AppState { engine };
    Router::new()
        .route(
            "/v1/healthz",
            get(handlers::healthz).fallback(method_not_allowed),
        )
        .route(
            "/healthz",
            get(handlers::healthz).fallback(method_not_allowed),
        )
        .route(
            "/v1/events",
            get(handlers::events).fallback(method_not_allowed),
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
        .fallback(not_found)
        .with_state(state)
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
            return handlers::healthz(State(st), req).await;
        }
        return ApiError {
            http: StatusCode::METHOD_NOT_ALLOWED,
            code: codes::METHOD_NOT_ALLOWED,
            message: format!("{} needs POST with a JSON body", req.uri().path()),
        }
        .into_response();
    }
    let peer = req.extensions().get::<Peer>().copied();
    // Refuse an unauthorized peer before reading (and buffering) its body.
    let access = match auth::authorize(&st.engine, peer) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let limit = st.engine.config.api.max_body_bytes;
    let body = match read_body(req.into_body(), limit).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    match handlers::call_authorized(&st.engine, &api, &body, &access).await {
        Ok(data) => ok(data),
        Err(e) => e.into_response(),
    }
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

/// An answer after which the connection is closed (its request body may be unread).
fn closing(e: ApiError) -> Response {
    let mut r = e.into_response();
    r.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    r
}

/// One request: authorize the peer before anything else, read the body (bounded, within
/// the request's time), then run the router as a task of its own: a request that times out
/// is answered 408 but never cancelled halfway through a change (a registration whose
/// commit landed still reaches memory).
async fn handle(
    engine: Arc<Engine>,
    app: Router,
    req: hyper::Request<hyper::body::Incoming>,
    peer: Option<Peer>,
    timeout: Duration,
    body_limit: usize,
) -> Response {
    let deadline = tokio::time::Instant::now() + timeout;
    let too_slow = || ApiError {
        http: StatusCode::REQUEST_TIMEOUT,
        code: codes::TIMEOUT,
        message: format!("the request took longer than {}s", timeout.as_secs_f64()),
    };
    if let Err(e) = auth::authorize(&engine, peer) {
        return closing(e);
    }
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout_at(deadline, read_body(Body::new(body), body_limit)).await
    {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return closing(e),
        Err(_) => return closing(too_slow()),
    };
    let req = Request::from_parts(parts, Body::from(body));
    let work = tokio::spawn(tower::ServiceExt::oneshot(app, req));
    match tokio::time::timeout_at(deadline, work).await {
        Ok(Ok(Ok(r))) => r,
        Ok(Ok(Err(e))) => match e {},
        Ok(Err(e)) => ApiError::new(codes::INTERNAL, format!("the request handler failed: {e}"))
            .into_response(),
        Err(_) => too_slow().into_response(),
    }
}

/// Serve the API on `listener` until `shutdown` turns true.
pub async fn serve(
    engine: Arc<Engine>,
    listener: UnixListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = router(engine.clone());
    let api = engine.config.api.clone();
    let limit = Arc::new(Semaphore::new(api.max_connections));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
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
        let app = app.clone();
        let engine = engine.clone();
        let timeout = api.request_timeout;
        let header_timeout = api.header_timeout;
        let body_limit = api.max_body_bytes;
        let mut sd = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    if let Some(p) = peer {
                        req.extensions_mut().insert(p);
                    }
                    let app = app.clone();
                    let engine = engine.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            handle(engine, app, req, peer, timeout, body_limit).await,
                        )
                    }
                },
            );
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(64 * 1024)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                _ = sd.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
}
