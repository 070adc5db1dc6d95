//! `/components` and `/functions`: upload components, deploy versions, list
//! them, roll back and remove (docs/daemon.md, "Functions").

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use hostd_sandbox::deploy::{DeployError, DeploySpec, VersionInfo};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::{check_name, ApiResult, AppState, Json, Path};
use crate::error::{chain, ApiError, ErrorBody};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(put_component))
        .routes(routes!(list_functions))
        .routes(routes!(deploy, list_versions))
        .routes(routes!(rollback))
        .routes(routes!(remove))
}

/// A stored component.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StoredComponent {
    /// `sha256:` and the 64 hex digits of its sha256.
    pub digest: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// A new version: `POST /functions/{name}/versions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// The component's digest (`sha256:HEX` from `PUT /components`).
    pub component: String,
    /// Routes as in fns.toml: `/exact` or `/prefix/...`.
    pub routes: Vec<String>,
    /// Grants: the fields of an fns.toml function table other than
    /// `component` and `routes` (config, outbound, buckets, secrets, dirs,
    /// env, memory_mb, time_ms, kv_value_kb, kv_bucket_mb). Paths must be absolute.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub grants: serde_json::Map<String, serde_json::Value>,
    /// A path the new version must answer 2xx to a GET before it goes live.
    #[serde(default)]
    pub health_check: Option<String>,
}

/// `POST /functions/{name}/rollback`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The version to make live [default: the one that was live before the live one].
    #[serde(default)]
    pub version: Option<u64>,
}

/// Per-version request figures since the daemon started.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VersionMetrics {
    /// Requests routed to it.
    pub requests: u64,
    /// Answers outside 2xx (errors included).
    pub non_2xx: u64,
    /// Requests the function failed (trap, time or memory limit, no capacity).
    pub errors: u64,
    /// Median latency to response headers, in ms (a histogram bucket's bound).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency, in ms.
    pub p99_ms: Option<f64>,
}

/// One version of a function.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Version {
    /// The function.
    pub function: String,
    /// Its number (1, 2, …).
    pub version: u64,
    /// `sha256:` digest of its component.
    pub component: String,
    /// Its routes.
    pub routes: Vec<String>,
    /// Its grants (fns.toml fields).
    #[schema(value_type = Object)]
    pub grants: serde_json::Value,
    /// The health-check path it passed, if any.
    pub health_check: Option<String>,
    /// When it was deployed, in ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// Whether it is serving.
    pub live: bool,
    /// Whether it is compiled and ready (a rollback to it is a pointer move).
    pub warm: bool,
    /// Its requests.
    pub metrics: VersionMetrics,
}

/// A function and its live version.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Function {
    /// Its name.
    pub name: String,
    /// How many versions it has.
    pub versions: usize,
    /// The live version.
    pub live: Version,
}

fn ms(d: Option<std::time::Duration>) -> Option<f64> {
    d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3)
}

impl From<VersionInfo> for Version {
    fn from(v: VersionInfo) -> Version {
        let r = v.record;
        Version {
            grants: serde_json::to_value(&r.grants).unwrap_or(serde_json::Value::Null),
            function: r.function,
            version: r.version,
            component: format!("sha256:{}", r.component),
            routes: r.routes,
            health_check: r.health_check,
            created_unix_ms: r.created_unix_ms,
            live: v.live,
            warm: v.warm,
            metrics: VersionMetrics {
                requests: v.metrics.requests,
                non_2xx: v.metrics.non_2xx,
                errors: v.metrics.errors,
                p50_ms: ms(v.metrics.latency_p50),
                p99_ms: ms(v.metrics.latency_p99),
            },
        }
    }
}

/// The answer to a failed deploy, rollback or removal.
pub fn deploy_error(e: DeployError) -> ApiError {
    use DeployError as E;
    let msg = chain(&e);
    match e {
        E::InvalidName { .. }
        | E::InvalidDigest { .. }
        | E::InvalidSpec { .. }
        | E::NotAComponent { .. } => ApiError::bad_request(msg),
        E::UnknownFunction { .. } | E::UnknownVersion { .. } | E::UnknownComponent { .. } => {
            ApiError::not_found(msg)
        }
        E::RouteConflict { .. } => ApiError::conflict(msg),
        E::Prepare { .. } | E::HealthCheck { .. } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable", msg)
        }
        _ => ApiError::internal(&e),
    }
}

/// Upload a component (the raw `.wasm` file as the body). Stored by its
/// sha256; storing the same bytes again is a no-op.
#[utoipa::path(put, path = "/components", tag = "functions",
    request_body(content = Vec<u8>, content_type = "application/wasm"),
    responses(
        (status = 201, description = "Stored", body = StoredComponent),
        (status = 400, description = "Not a WebAssembly component", body = ErrorBody),
        (status = 413, description = "Larger than 64 MiB", body = ErrorBody),
    ))]
async fn put_component(
    State(s): State<AppState>,
    body: Body,
) -> ApiResult<(StatusCode, Json<StoredComponent>)> {
    let bytes = crate::body::read_capped(body, super::MAX_COMPONENT_BYTES, "a component").await?;
    let host = s.functions.clone();
    let len = bytes.len() as u64;
    let hex = tokio::task::spawn_blocking(move || host.put_component(&bytes))
        .await
        .map_err(|e| ApiError::internal(&e))?
        .map_err(deploy_error)?;
    Ok((
        StatusCode::CREATED,
        Json(StoredComponent {
            digest: format!("sha256:{hex}"),
            bytes: len,
        }),
    ))
}

/// Every function with its live version.
#[utoipa::path(get, path = "/functions", tag = "functions",
    responses((status = 200, description = "The functions", body = Vec<Function>)))]
async fn list_functions(State(s): State<AppState>) -> ApiResult<Json<Vec<Function>>> {
    let list = s.functions.list().map_err(deploy_error)?;
    Ok(Json(
        list.into_iter()
            .map(|f| Function {
                name: f.name,
                versions: f.versions,
                live: f.live.into(),
            })
            .collect(),
    ))
}

/// Deploy a new version: compiled and pre-instantiated (and health-checked
/// when asked) before the route switches to it; every request is served
/// wholly by the old or the new version. Creates the function if new.
#[utoipa::path(post, path = "/functions/{name}/versions", tag = "functions",
    params(("name" = String, Path, description = "The function")),
    request_body = DeployRequest,
    responses(
        (status = 201, description = "Live", body = Version),
        (status = 400, description = "A bad name, digest, route or grant", body = ErrorBody),
        (status = 404, description = "No such component", body = ErrorBody),
        (status = 409, description = "A route served by another function", body = ErrorBody),
        (status = 422, description = "Does not compile, or failed its health check; nothing changed", body = ErrorBody),
    ))]
async fn deploy(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Json(req): Json<DeployRequest>,
) -> ApiResult<(StatusCode, Json<Version>)> {
    check_name(&name)?;
    let grants: toml::Table = serde_json::from_value(serde_json::Value::Object(req.grants))
        .map_err(|e| ApiError::bad_request(format!("grants: {e}")))?;
    let spec = DeploySpec {
        component: req.component,
        routes: req.routes,
        grants,
        health_check: req.health_check,
    };
    let v = s
        .functions
        .deploy(&name, spec)
        .await
        .map_err(deploy_error)?;
    Ok((StatusCode::CREATED, Json(v.into())))
}

/// Every version of a function, oldest first.
#[utoipa::path(get, path = "/functions/{name}/versions", tag = "functions",
    params(("name" = String, Path, description = "The function")),
    responses(
        (status = 200, description = "Its versions", body = Vec<Version>),
        (status = 400, description = "Not a valid name", body = ErrorBody),
        (status = 404, description = "No such function", body = ErrorBody),
    ))]
async fn list_versions(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<Version>>> {
    check_name(&name)?;
    let versions = s.functions.versions(&name).map_err(deploy_error)?;
    Ok(Json(versions.into_iter().map(Version::from).collect()))
}

/// Make an earlier version live again (by default the one before the live
/// one). A version among the last 5 is still compiled: the switch is a pointer move.
#[utoipa::path(post, path = "/functions/{name}/rollback", tag = "functions",
    params(("name" = String, Path, description = "The function")),
    request_body = RollbackRequest,
    responses(
        (status = 200, description = "Now live", body = Version),
        (status = 400, description = "Not a valid name", body = ErrorBody),
        (status = 404, description = "No such function or version", body = ErrorBody),
    ))]
async fn rollback(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Json(req): Json<RollbackRequest>,
) -> ApiResult<Json<Version>> {
    check_name(&name)?;
    let v = s
        .functions
        .rollback(&name, req.version)
        .await
        .map_err(deploy_error)?;
    Ok(Json(v.into()))
}

/// Stop serving a function and forget its versions (components stay stored).
#[utoipa::path(delete, path = "/functions/{name}", tag = "functions",
    params(("name" = String, Path, description = "The function")),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "Not a valid name", body = ErrorBody),
        (status = 404, description = "No such function", body = ErrorBody),
    ))]
async fn remove(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    check_name(&name)?;
    s.functions.remove(&name).await.map_err(deploy_error)?;
    Ok(StatusCode::NO_CONTENT)
}
