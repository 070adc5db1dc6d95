//! The REST API (axum), its OpenAPI document (utoipa, generated from the handlers), and
//! what every request goes through: the peer-credential check, the request metrics, the
//! body size limit and JSON errors for everything axum itself refuses.

pub mod fleet;
pub mod guests;
pub mod images;
pub mod system;

use std::sync::Arc;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::IntoResponse;
use tokio::net::UnixStream;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::error::{rejection, ApiError};
use crate::guests::Guests;
use crate::images::ImageStore;
use crate::metrics::Metrics;

/// Largest JSON body, in bytes.
pub const MAX_JSON_BYTES: usize = 1 << 20;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The guests.
    pub guests: Arc<Guests>,
    /// The image store.
    pub images: Arc<ImageStore>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The functions (see [`crate::functions`]).
    pub functions: hostd_sandbox::deploy::FunctionHost,
}

/// Who may use the socket besides root.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    /// The daemon's own uid.
    pub uid: u32,
    /// The socket's group.
    pub gid: u32,
}

/// The credentials of the process at the other end of a connection (SO_PEERCRED).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Its uid, if the kernel told us.
    pub uid: Option<u32>,
    /// Its primary gid.
    pub gid: Option<u32>,
    /// Its pid.
    pub pid: Option<i32>,
}

impl Peer {
    /// The credentials of the process at the other end of `stream`.
    pub fn of(stream: &UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(c) => Peer {
                uid: Some(c.uid()),
                gid: Some(c.gid()),
                pid: c.pid(),
            },
            Err(_) => Peer {
                uid: None,
                gid: None,
                pid: None,
            },
        }
    }
}

impl Access {
    /// Whether `peer` may use the API: root, the daemon's uid, or a member (primary or
    /// supplementary) of the socket's group.
    pub fn allows(&self, peer: &Peer) -> bool {
        let (Some(uid), Some(gid)) = (peer.uid, peer.gid) else {
            return false;
        };
        if uid == 0 || uid == self.uid || gid == self.gid {
            return true;
        }
        // Supplementary groups, from /proc/PID/status of the connecting process.
        peer.pid
            .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Groups:"))
                    .map(|g| g.split_whitespace().any(|g| g.parse() == Ok(self.gid)))
            })
            .unwrap_or(false)
    }
}

/// A JSON body whose rejection (malformed, wrong type, too large) is a JSON error.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Read here rather than in axum's extractor so that an oversized body is
        // drained before the 413 (crate::body), not cut off with a broken pipe.
        let (parts, body) = req.into_parts();
        let bytes = crate::body::read_capped(body, MAX_JSON_BYTES, "a JSON request body").await?;
        let req = Request::from_parts(parts, axum::body::Body::from(bytes));
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(r) => Err(rejection(r.status(), r.body_text())),
        }
    }
}

/// A path parameter whose rejection is a JSON error.
#[derive(Debug, Clone)]
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(r) => Err(rejection(r.status(), r.body_text())),
        }
    }
}

/// A query string whose rejection is a JSON error.
#[derive(Debug, Clone)]
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(r) => Err(rejection(r.status(), r.body_text())),
        }
    }
}

/// Checks that a name from a URL is a valid guest/function name (so `../x` is a 400).
pub fn check_name(name: &str) -> Result<(), ApiError> {
    if crate::fleet::valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "`{name}` is not a valid name: 1-63 of a-z, 0-9, `-`, `_`, starting with a letter or digit"
        )))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hostd daemon API",
        description = "Guests, images and fleets of one host, over a Unix socket (docs/daemon.md)."
    ),
    components(schemas(crate::error::ErrorBody))
)]
struct ApiDoc;

/// Every route with its OpenAPI document, before state is attached.
pub fn openapi_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(guests::router())
        .merge(images::router())
        .merge(fleet::router())
        .merge(system::router())
        .merge(crate::functions::api::router())
}

/// The OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    openapi_router().into_openapi()
}

/// The whole service: routes, the access check, metrics, limits and
/// JSON errors for unknown routes and methods.
pub fn app(state: AppState, access: Access) -> axum::Router {
    let router: axum::Router<AppState> = openapi_router().into();
    let metrics = Arc::clone(&state.metrics);
    let (m404, m405) = (Arc::clone(&metrics), Arc::clone(&metrics));
    router
        .route_layer(axum::middleware::from_fn(move |req: Request, next: Next| {
            let metrics = Arc::clone(&metrics);
            async move {
                let method = req.method().to_string();
                let route = req
                    .extensions()
                    .get::<MatchedPath>()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_default();
                let resp = next.run(req).await;
                metrics.request(&method, &route, resp.status().as_u16());
                resp
            }
        }))
        .fallback(move |req: Request| async move {
            m404.request(req.method().as_str(), "unmatched", 404);
            ApiError::not_found("no such route (GET /openapi.json lists them)")
        })
        .method_not_allowed_fallback(move |req: Request| async move {
            // Not the path: a label per path asked for would grow the series without end.
            m405.request(req.method().as_str(), "method_not_allowed", 405);
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route (GET /openapi.json lists them)",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_JSON_BYTES))
        .with_state(state)
        .layer(axum::middleware::from_fn(move |req: Request, next: Next| async move {
            let peer = req.extensions().get::<ConnectInfo<Peer>>().map(|c| c.0);
            match peer {
                Some(p) if access.allows(&p) => next.run(req).await,
                // No connect info: served in-process (tests of the router itself).
                None => next.run(req).await,
                Some(p) => {
                    tracing::warn!("refused an API request from uid {:?} (pid {:?})", p.uid, p.pid);
                    ApiError::forbidden(
                        "only root, the daemon's user and members of the socket's group may use this API",
                    )
                    .into_response()
                }
            }
        }))
}

/// Shorthand for handlers' results.
pub type ApiResult<T> = Result<T, ApiError>;
