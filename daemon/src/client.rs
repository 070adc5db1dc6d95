//! The CLI's side of the API socket: HTTP/1 over a Unix stream (hyper), blocking calls
//! for the `hostd` commands.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ErrorBody;

/// Why a request to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens on the socket.
    #[error("no daemon at {}: start it with `hostd daemon`", socket.display())]
    NotRunning {
        /// The socket.
        socket: PathBuf,
        /// Why the connection failed.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke.
    #[error("talking to the daemon at {}", socket.display())]
    Http {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: hyper::Error,
    },
    /// The daemon answered with an error.
    #[error("{} ({status})", body.error)]
    Api {
        /// The status.
        status: StatusCode,
        /// The error it sent.
        body: ErrorBody,
    },
    /// The answer was not what the API documents.
    #[error("the daemon's answer ({status}) is not the JSON expected")]
    Decode {
        /// The status.
        status: StatusCode,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The local runtime could not start.
    #[error("cannot start the client's runtime")]
    Runtime(#[source] std::io::Error),
}

/// An answer: its status and whole body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The body.
    pub body: Bytes,
}

/// A client of one daemon socket.
#[derive(Debug)]
pub struct Client {
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Client {
    /// A client of the daemon at `socket` (nothing is connected yet).
    pub fn new(socket: &Path) -> Result<Client, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(Client {
            socket: socket.to_owned(),
            rt,
        })
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::NotRunning {
                socket: self.socket.clone(),
                source,
            })?;
        let http = |source| ClientError::Http {
            socket: self.socket.clone(),
            source,
        };
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "hostd")
            .header("content-type", content_type)
            .body(Full::new(body))
            .map_err(|e| ClientError::Runtime(std::io::Error::other(e)))?;
        tx.send_request(req).await.map_err(http)
    }

    /// Sends a request and reads the whole answer, whatever its status.
    pub fn raw(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> Result<Answer, ClientError> {
        let body = body.into();
        self.rt.block_on(async {
            let resp = self.send(method, path, content_type, body).await?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|source| ClientError::Http {
                    socket: self.socket.clone(),
                    source,
                })?
                .to_bytes();
            Ok(Answer { status, body })
        })
    }

    /// Sends `body` as JSON (or nothing) and decodes a JSON answer; an error status is
    /// [`ClientError::Api`].
    pub fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|source| ClientError::Decode {
                status: StatusCode::OK,
                source,
            })?,
            None => Vec::new(),
        };
        let a = self.raw(method, path, "application/json", bytes)?;
        check(&a)?;
        let body = if a.body.is_empty() {
            &b"null"[..]
        } else {
            &a.body[..]
        };
        serde_json::from_slice(body).map_err(|source| ClientError::Decode {
            status: a.status,
            source,
        })
    }

    /// GETs `path` and hands each chunk of the answer to `out` as it arrives, until the
    /// daemon ends it or `out` returns false.
    pub fn stream(
        &self,
        path: &str,
        mut out: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), ClientError> {
        self.rt.block_on(async {
            let resp = self
                .send(Method::GET, path, "application/json", Bytes::new())
                .await?;
            let status = resp.status();
            let mut body = resp.into_body();
            if !status.is_success() {
                let bytes = body
                    .collect()
                    .await
                    .map_err(|source| ClientError::Http {
                        socket: self.socket.clone(),
                        source,
                    })?
                    .to_bytes();
                check(&Answer {
                    status,
                    body: bytes,
                })?;
                return Ok(());
            }
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|source| ClientError::Http {
                    socket: self.socket.clone(),
                    source,
                })?;
                if let Some(data) = frame.data_ref() {
                    if !out(data) {
                        break;
                    }
                }
            }
            Ok(())
        })
    }
}

/// Turns an error status into [`ClientError::Api`].
pub fn check(a: &Answer) -> Result<(), ClientError> {
    if a.status.is_success() {
        return Ok(());
    }
    let body = serde_json::from_slice::<ErrorBody>(&a.body).unwrap_or_else(|_| ErrorBody {
        error: String::from_utf8_lossy(&a.body).into_owned(),
        code: "unknown".into(),
    });
    Err(ClientError::Api {
        status: a.status,
        body,
    })
}
