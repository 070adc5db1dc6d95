//! `PUT /fleet`: reconcile the guests to a fleet.

use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiResult, AppState, Json};
use crate::error::ErrorBody;
use crate::fleet::Fleet;
use crate::reconcile::{self, ApplyReport};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(apply_fleet))
}

/// Apply a fleet (a parsed fleet file, as `hostd apply` sends it): create what is new,
/// replace what changed, remove fleet guests no longer named, leave the rest alone;
/// likewise deploy the fleet's functions whose live version differs and remove those an
/// earlier fleet declared and this one does not.
#[utoipa::path(put, path = "/fleet", tag = "fleet", request_body = Fleet,
    responses(
        (status = 200, description = "What was done", body = ApplyReport),
        (status = 400, description = "A bad name, value or image", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
    ))]
async fn apply_fleet(
    State(s): State<AppState>,
    Json(fleet): Json<Fleet>,
) -> ApiResult<Json<ApplyReport>> {
    Ok(Json(
        reconcile::apply(&s.guests, &s.functions, &fleet).await?,
    ))
}
