//! `/images`: the content-addressed image store.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiResult, AppState, Json, Path};
use crate::error::{ApiError, ErrorBody};
use crate::fleet::parse_digest;
use crate::guests::image_error;
use crate::images::{GcReport, StoredImage};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(upload_image))
        .routes(routes!(get_image))
        .routes(routes!(collect_images))
}

/// Remove every stored image no guest uses (an image uploaded for a guest not yet
/// created is unused too). Also done for a deleted guest's image on `DELETE /guests`.
#[utoipa::path(post, path = "/images/gc", tag = "images",
    responses(
        (status = 200, description = "What was removed", body = GcReport),
        (status = 500, description = "The store could not be read", body = ErrorBody),
    ))]
async fn collect_images(State(s): State<AppState>) -> ApiResult<Json<GcReport>> {
    let _one_at_a_time = s.guests.apply_lock.lock().await;
    let r = s
        .guests
        .collect_images(None)
        .map_err(|e| ApiError::internal(&e))?;
    tracing::info!("images gc: {} removed, {} bytes", r.removed.len(), r.bytes);
    Ok(Json(r))
}

/// Upload an image (the raw file as the body). It is streamed to disk, verified (header,
/// every section digest, manifest) and kept under its sha256.
#[utoipa::path(post, path = "/images", tag = "images",
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored", body = StoredImage),
        (status = 400, description = "Not a valid hostd image", body = ErrorBody),
        (status = 413, description = "Larger than the daemon's image cap", body = ErrorBody),
    ))]
async fn upload_image(
    State(s): State<AppState>,
    body: Body,
) -> ApiResult<(StatusCode, Json<StoredImage>)> {
    let img = s.images.put_body(body).await.map_err(image_error)?;
    tracing::info!("image sha256:{} ({}) stored", img.digest, img.name);
    Ok((StatusCode::CREATED, Json(img)))
}

/// Describe a stored image.
#[utoipa::path(get, path = "/images/{digest}", tag = "images",
    params(("digest" = String, Path, description = "sha256:<64 hex> or <64 hex>")),
    responses(
        (status = 200, description = "The image", body = StoredImage),
        (status = 400, description = "Not a digest", body = ErrorBody),
        (status = 404, description = "Not in the store", body = ErrorBody),
    ))]
async fn get_image(
    State(s): State<AppState>,
    Path(digest): Path<String>,
) -> ApiResult<Json<StoredImage>> {
    let hex = parse_digest(&digest).ok_or_else(|| {
        ApiError::bad_request(format!(
            "`{digest}` is not a digest: sha256: and 64 lowercase hex digits"
        ))
    })?;
    match s.images.describe(hex) {
        Some(r) => Ok(Json(r.map_err(image_error)?)),
        None => Err(ApiError::not_found(format!("no image sha256:{hex}"))),
    }
}
