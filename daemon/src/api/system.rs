//! `/metrics` and `/version`.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{AppState, Json};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(metrics))
        .routes(routes!(version))
        .routes(routes!(openapi_json))
}

/// This document: the OpenAPI 3.1 description of every route, generated from the code.
#[utoipa::path(get, path = "/openapi.json", tag = "system",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(super::openapi())
}

/// Prometheus metrics: guests by state, restarts, API requests by route and status.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let text =
        crate::functions::prometheus::append(s.metrics.render(&s.guests.list()), &s.functions);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

/// The daemon's version.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Version {
    /// hostd's version.
    pub version: String,
}

/// The daemon's version (a cheap liveness check).
#[utoipa::path(get, path = "/version", tag = "system",
    responses((status = 200, description = "Version", body = Version)))]
async fn version() -> Json<Version> {
    Json(Version {
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}
