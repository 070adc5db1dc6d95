//! The content-addressed image store: `STATE/images/sha256/HEX`, each file verified
//! with hostd_images (header, every section digest, the manifest) before it is kept,
//! and named by the sha256 of its bytes. Files are written to `STATE/images/tmp` first
//! and renamed into place, so a half-written image is never visible under a digest.

use std::io::Write;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use hostd_images::format::{Image, ImageError};

/// Default largest image accepted, in bytes (4 GiB).
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 4 << 30;

/// Why an image was not stored.
#[derive(Debug, thiserror::Error)]
pub enum ImageStoreError {
    /// More bytes than the store's cap.
    #[error("image is larger than {max} bytes")]
    TooLarge {
        /// The cap.
        max: u64,
    },
    /// Not a valid hostd image.
    #[error("not a valid hostd image")]
    Invalid {
        /// What is wrong with it.
        #[source]
        source: ImageError,
    },
    /// The upload broke off.
    #[error("reading the upload failed")]
    Body {
        /// Why.
        #[source]
        source: axum::Error,
    },
    /// The image file named by path could not be read.
    #[error("cannot read image {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The store itself failed (disk full, permissions).
    #[error("image store {}", path.display())]
    Store {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A stored, verified image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct StoredImage {
    /// sha256 of the file, 64 hex digits (the image id).
    pub digest: String,
    /// Where the store keeps it.
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// The image's name (from its manifest).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Seconds the guest is given to shut down after SIGTERM (from its manifest).
    pub stop_timeout_secs: u32,
}

/// What a garbage collection of the store removed.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct GcReport {
    /// Digests (64 hex) of the images removed.
    pub removed: Vec<String>,
    /// Bytes freed.
    pub bytes: u64,
}

/// The image store.
#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    max_bytes: u64,
}

impl ImageStore {
    /// Opens (creating its directories) the store under `STATE/images`.
    pub fn open(state_dir: &Path, max_bytes: u64) -> Result<ImageStore, ImageStoreError> {
        let root = state_dir.join("images");
        for d in [root.join("sha256"), root.join("tmp")] {
            std::fs::create_dir_all(&d).map_err(|source| ImageStoreError::Store {
                path: d.clone(),
                source,
            })?;
        }
        Ok(ImageStore { root, max_bytes })
    }

    /// The file of a stored image, if the store has it.
    pub fn get(&self, hex: &str) -> Option<PathBuf> {
        let p = self.root.join("sha256").join(hex);
        p.is_file().then_some(p)
    }

    /// Describes a stored image (verifying it again).
    pub fn describe(&self, hex: &str) -> Option<Result<StoredImage, ImageStoreError>> {
        let p = self.get(hex)?;
        Some(describe(&p))
    }

    /// Removes every stored image whose digest `keep` does not hold (and leftovers of
    /// broken-off uploads in `tmp/` older than an hour). `only`, when given, limits the
    /// candidates to those digests.
    pub fn collect_garbage(
        &self,
        keep: &std::collections::BTreeSet<String>,
        only: Option<&str>,
    ) -> Result<GcReport, ImageStoreError> {
        let dir = self.root.join("sha256");
        let store_err = |path: &Path| {
            let path = path.to_owned();
            move |source| ImageStoreError::Store { path, source }
        };
        let mut report = GcReport::default();
        for entry in std::fs::read_dir(&dir).map_err(store_err(&dir))? {
            let entry = entry.map_err(store_err(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if crate::fleet::parse_digest(&name) != Some(name.as_str())
                || keep.contains(&name)
                || only.is_some_and(|o| o != name)
            {
                continue;
            }
            let path = entry.path();
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!("image sha256:{name}: no guest uses it; removed");
                    report.removed.push(name);
                    report.bytes += size;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(ImageStoreError::Store { path, source }),
            }
        }
        report.removed.sort();
        if only.is_none() {
            let tmp = self.root.join("tmp");
            let hour = std::time::Duration::from_secs(3600);
            for entry in std::fs::read_dir(&tmp).map_err(store_err(&tmp))?.flatten() {
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > hour);
                if old {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(report)
    }

    fn temp(&self) -> Result<tempfile::NamedTempFile, ImageStoreError> {
        let dir = self.root.join("tmp");
        tempfile::NamedTempFile::new_in(&dir)
            .map_err(|source| ImageStoreError::Store { path: dir, source })
    }

    /// Streams an upload into the store (at most the cap, else [`ImageStoreError::TooLarge`]).
    pub async fn put_body(&self, body: axum::body::Body) -> Result<StoredImage, ImageStoreError> {
        let tmp = self.temp()?;
        let path = tmp.path().to_owned();
        let mut file =
            tokio::fs::File::from_std(tmp.reopen().map_err(|source| ImageStoreError::Store {
                path: path.clone(),
                source,
            })?);
        let mut stream = body.into_data_stream();
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| ImageStoreError::Body { source })?;
            total += chunk.len() as u64;
            if total > self.max_bytes {
                crate::body::drain(&mut stream).await;
                return Err(ImageStoreError::TooLarge {
                    max: self.max_bytes,
                });
            }
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                .await
                .map_err(|source| ImageStoreError::Store {
                    path: path.clone(),
                    source,
                })?;
        }
        file.sync_all()
            .await
            .map_err(|source| ImageStoreError::Store {
                path: path.clone(),
                source,
            })?;
        drop(file);
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || keep(&root, tmp))
            .await
            .unwrap_or_else(|e| {
                Err(ImageStoreError::Store {
                    path,
                    source: std::io::Error::other(e),
                })
            })
    }

    /// Copies an image file into the store (blocking: run it off the async threads).
    pub fn import_file(&self, from: &Path) -> Result<StoredImage, ImageStoreError> {
        let read = |source| ImageStoreError::Read {
            path: from.to_owned(),
            source,
        };
        let src = hostd_images::input::open_regular(from).map_err(read)?;
        let len = src.metadata().map_err(read)?.len();
        if len > self.max_bytes {
            return Err(ImageStoreError::TooLarge {
                max: self.max_bytes,
            });
        }
        let mut tmp = self.temp()?;
        let tmp_path = tmp.path().to_owned();
        let store = |source| ImageStoreError::Store {
            path: tmp_path.clone(),
            source,
        };
        let copied = std::io::copy(&mut std::io::Read::take(src, self.max_bytes + 1), &mut tmp)
            .map_err(&store)?;
        if copied > self.max_bytes {
            return Err(ImageStoreError::TooLarge {
                max: self.max_bytes,
            });
        }
        tmp.flush().map_err(&store)?;
        tmp.as_file().sync_all().map_err(&store)?;
        keep(&self.root, tmp)
    }
}

/// Verifies a written temp file and renames it to its digest.
fn keep(root: &Path, tmp: tempfile::NamedTempFile) -> Result<StoredImage, ImageStoreError> {
    let info = describe(tmp.path())?;
    let dest = root.join("sha256").join(&info.digest);
    if !dest.exists() {
        tmp.persist(&dest).map_err(|e| ImageStoreError::Store {
            path: dest.clone(),
            source: e.error,
        })?;
    }
    Ok(StoredImage { path: dest, ..info })
}

/// Opens and verifies an image file.
fn describe(path: &Path) -> Result<StoredImage, ImageStoreError> {
    let invalid = |source| ImageStoreError::Invalid { source };
    let image = Image::open(path).map_err(invalid)?;
    let manifest = image.manifest().map_err(invalid)?;
    Ok(StoredImage {
        digest: image.id.clone(),
        path: path.to_owned(),
        name: manifest.name.clone(),
        size: image.header.file_length,
        stop_timeout_secs: manifest.stop_timeout_secs,
    })
}
