//! `/guests`: create, list, inspect, start, stop, delete, logs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{check_name, ApiResult, AppState, Json, Path, Query};
use crate::error::{ApiError, ErrorBody};
use crate::fleet::{self, GuestDecl, Restart, Vmm};
use crate::guests::console::RING_LINES;
use crate::guests::record::{GuestStatus, Origin};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_guests, create_guest))
        .routes(routes!(get_guest, delete_guest))
        .routes(routes!(start_guest))
        .routes(routes!(stop_guest))
        .routes(routes!(guest_logs))
}

/// The body of `POST /guests`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGuest {
    /// The guest's name: 1-63 of a-z, 0-9, `-`, `_`.
    pub name: String,
    /// An absolute image path, or `sha256:<64 hex>` naming an image in the store.
    pub image: String,
    /// The monitor (default `builtin`).
    #[serde(default)]
    pub vmm: Vmm,
    /// vCPUs (default: the image's).
    pub vcpus: Option<u32>,
    /// Memory, e.g. `256M` (default: the image's).
    pub memory: Option<String>,
    /// Restart policy (default `on-failure`).
    #[serde(default)]
    pub restart: Restart,
    /// Start it now (default true).
    #[serde(default = "yes")]
    pub start: bool,
    /// A network card, as `hostd run --net` takes it.
    pub net: Option<String>,
    /// Secrets: name -> absolute host file.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, String>)]
    pub secrets: BTreeMap<String, PathBuf>,
    /// Public keys (absolute paths) the image must be signed by.
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub trust: Vec<PathBuf>,
}

fn yes() -> bool {
    true
}

/// List every guest.
#[utoipa::path(get, path = "/guests", tag = "guests",
    responses((status = 200, description = "Every guest", body = Vec<GuestStatus>)))]
async fn list_guests(State(s): State<AppState>) -> Json<Vec<GuestStatus>> {
    Json(s.guests.list())
}

/// Create a guest from an image (a path or a digest in the store), and start it unless
/// `start` is false.
#[utoipa::path(post, path = "/guests", tag = "guests", request_body = CreateGuest,
    responses(
        (status = 201, description = "Created", body = GuestStatus),
        (status = 400, description = "Bad name, image or value", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
    ))]
async fn create_guest(
    State(s): State<AppState>,
    Json(req): Json<CreateGuest>,
) -> ApiResult<(StatusCode, Json<GuestStatus>)> {
    check_name(&req.name)?;
    if !req.image.starts_with("sha256:") {
        crate::guests::check_absolute("image", std::path::Path::new(&req.image))?;
    }
    for (n, p) in &req.secrets {
        crate::guests::check_absolute(&format!("secrets.{n}"), p)?;
    }
    for p in &req.trust {
        crate::guests::check_absolute("trust", p)?;
    }
    let decl = GuestDecl {
        image: Some(req.image),
        spec: None,
        vmm: req.vmm,
        vcpus: req.vcpus,
        memory: req.memory,
        autostart: req.start,
        restart: req.restart,
        net: req.net,
        secrets: req.secrets,
        trust: req.trust,
    };
    let guest = fleet::validate_guest(&req.name, decl, std::path::Path::new("/"))
        .map_err(|i| ApiError::bad_request(i.to_string()))?;
    let start = guest.autostart;
    let status = s
        .guests
        .create(&req.name, guest, Origin::Manual, start)
        .await?;
    Ok((StatusCode::CREATED, Json(status)))
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// One guest.
#[utoipa::path(get, path = "/guests/{name}", tag = "guests",
    params(("name" = String, Path, description = "Guest name")),
    responses(
        (status = 200, description = "The guest", body = GuestStatus),
        (status = 400, description = "Not a valid name", body = ErrorBody),
        (status = 404, description = "No such guest", body = ErrorBody),
    ))]
async fn get_guest(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<GuestStatus>> {
    check_name(&name)?;
    Ok(Json(s.guests.get(&name)?))
}

/// Stop a guest and delete it (its record and console).
#[utoipa::path(delete, path = "/guests/{name}", tag = "guests",
    params(("name" = String, Path, description = "Guest name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Not a valid name", body = ErrorBody),
        (status = 404, description = "No such guest", body = ErrorBody),
    ))]
async fn delete_guest(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    check_name(&name)?;
    s.guests.remove(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Start a guest (desired state: running).
#[utoipa::path(post, path = "/guests/{name}/start", tag = "guests",
    params(("name" = String, Path, description = "Guest name")),
    responses(
        (status = 200, description = "Started (or already running)", body = GuestStatus),
        (status = 400, description = "Not a valid name", body = ErrorBody),
        (status = 404, description = "No such guest", body = ErrorBody),
        (status = 409, description = "Still stopping", body = ErrorBody),
    ))]
async fn start_guest(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<GuestStatus>> {
    check_name(&name)?;
    Ok(Json(s.guests.start(&name)?))
}

/// Stop a guest (desired state: stopped): SIGTERM to its VM process, SIGKILL after the
/// image's stop timeout. Answers once it has exited.
#[utoipa::path(post, path = "/guests/{name}/stop", tag = "guests",
    params(("name" = String, Path, description = "Guest name")),
    responses(
        (status = 200, description = "Stopped", body = GuestStatus),
        (status = 400, description = "Not a valid name", body = ErrorBody),
        (status = 404, description = "No such guest", body = ErrorBody),
    ))]
async fn stop_guest(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<GuestStatus>> {
    check_name(&name)?;
    Ok(Json(s.guests.stop(&name).await?))
}

/// Query of `GET /guests/{name}/logs`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// `1`: keep the answer open and send new lines as they come (chunked).
    #[serde(default)]
    pub follow: Option<u8>,
    /// How many of the last lines to send first (default and most: 1000).
    pub tail: Option<usize>,
}

/// A guest's console: its last lines (a bounded ring), and with `follow=1` every new
/// line as it comes.
#[utoipa::path(get, path = "/guests/{name}/logs", tag = "guests",
    params(("name" = String, Path, description = "Guest name"), LogsQuery),
    responses(
        (status = 200, description = "Console lines", content_type = "text/plain", body = String),
        (status = 400, description = "Not a valid name or query", body = ErrorBody),
        (status = 404, description = "No such guest", body = ErrorBody),
    ))]
async fn guest_logs(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Response> {
    check_name(&name)?;
    let console = s.guests.console(&name)?;
    let n = q.tail.unwrap_or(RING_LINES).min(RING_LINES);
    let text = |lines: Vec<String>| -> String {
        let mut t = lines.join("\n");
        if !t.is_empty() {
            t.push('\n');
        }
        t
    };
    let body = match q.follow {
        Some(1) => {
            let (lines, rx) = console.follow(n);
            let first = futures_util::stream::once(async move {
                Ok::<_, std::convert::Infallible>(text(lines))
            });
            let rest = futures_util::stream::unfold(rx, |mut rx| async move {
                loop {
                    match rx.recv().await {
                        Ok(line) => return Some((Ok(format!("{line}\n")), rx)),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
            Body::from_stream(first.chain(rest))
        }
        None | Some(0) => Body::from(text(console.lines(n))),
        Some(_) => return Err(ApiError::bad_request("follow is 0 or 1")),
    };
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}
