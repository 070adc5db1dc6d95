//! Errors: [`DaemonError`] for what fails inside the daemon, [`ApiError`] for what an API
//! caller gets back (always a JSON body `{"error": "...", "code": "..."}`).

use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// Why the daemon (or one of its stores) failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A file or directory of the daemon's state could not be used.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done, e.g. "cannot create".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state database failed.
    #[error("state database {}", path.display())]
    Database {
        /// The database file.
        path: PathBuf,
        /// Why (boxed: redb's error is large).
        #[source]
        source: Box<redb::Error>,
    },
    /// A stored record could not be decoded (the database was written by another version).
    #[error("state database: record {key} is not readable")]
    Record {
        /// The record's key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The API socket could not be set up.
    #[error("API socket {}", path.display())]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An image was refused.
    #[error("image {}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// Why.
        #[source]
        source: hostd_images::format::ImageError,
    },
    /// The function host could not be opened.
    #[error("functions in {}", path.display())]
    Functions {
        /// Its state directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: hostd_sandbox::deploy::DeployError,
    },
    /// The function front could not listen.
    #[error("function front on {addr}")]
    Front {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: hostd_sandbox::Error,
    },
    /// The async runtime could not start.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    /// A guest's VM process could not be started.
    #[error("guest {name}: cannot start `{}`", runner.display())]
    Spawn {
        /// The guest.
        name: String,
        /// The program.
        runner: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl<E: Into<redb::Error>> From<(PathBuf, E)> for DaemonError {
    fn from((path, e): (PathBuf, E)) -> Self {
        DaemonError::Database {
            path,
            source: Box::new(e.into()),
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What was wrong, for a person (the causes joined with `: `).
    pub error: String,
    /// What was wrong, for a program: `not_found`, `bad_request`, `conflict`,
    /// `forbidden`, `too_large`, `unsupported_media_type`, `internal`.
    pub code: String,
}

/// An error answer: a status and an [`ErrorBody`].
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The machine-readable code.
    pub code: &'static str,
    /// The message.
    pub message: String,
}

impl ApiError {
    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    /// 413 `too_large`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }
    /// 500 `internal`, with the whole cause chain of `e` (logged too).
    pub fn internal(e: &(dyn std::error::Error + 'static)) -> Self {
        let message = chain(e);
        tracing::error!("{message}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
    /// Any status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

/// `e` and its sources, joined with `: `.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl From<DaemonError> for ApiError {
    fn from(e: DaemonError) -> Self {
        match &e {
            DaemonError::Image { .. } => ApiError::bad_request(chain(&e)),
            _ => ApiError::internal(&e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            code: self.code.to_owned(),
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// Turns axum's own rejections (malformed JSON, a wrong content type, a body over the
/// limit, a bad path or query) into JSON errors.
pub fn rejection(status: StatusCode, text: String) -> ApiError {
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        // Well-formed JSON of the wrong shape (a string for a number, an unknown field).
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    ApiError::new(status, code, text)
}
