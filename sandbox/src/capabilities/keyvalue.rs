//! `wasi:keyvalue` backed by redb: one database file under the state
//! directory, one table whose keys are `(bucket, key)`. A function opens only
//! the buckets its manifest grants; the bucket handle it gets is the permission.
//!
//! Quotas: a key is at most [`MAX_KEY_BYTES`], a value at most the function's
//! `kv_value_kb`, and a write may not grow a bucket (keys plus values, kept in
//! a second table updated in the same transaction) beyond the function's
//! `kv_bucket_mb`. Every database operation runs on tokio's blocking pool
//! (each write is a durable, fsynced transaction), never on the async workers
//! that serve HTTP.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use wasmtime::component::Resource;

use super::bindings::wasi::keyvalue::{atomics, store};
use super::CapsView;
use crate::manifest::Grants;
use crate::Error;

/// `(bucket, key) -> value`.
const ENTRIES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("entries");

/// `bucket -> bytes` of keys plus values stored in it.
const USAGE: TableDefinition<&str, u64> = TableDefinition::new("usage");

/// Keys returned per `list-keys` page.
const PAGE: usize = 1000;

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// The key-value database shared by every function of one server.
pub struct KvStore {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore").field("path", &self.path).finish()
    }
}

/// A granted bucket; held in the store's resource table.
#[derive(Debug)]
pub struct BucketHandle {
    name: String,
}

/// What one function may write.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    /// Largest value, in bytes.
    pub max_value: u64,
    /// Size a bucket may not grow beyond, in bytes.
    pub max_bucket: u64,
}

impl Quota {
    /// The quota `grants` set.
    pub fn of(grants: &Grants) -> Quota {
        Quota {
            max_value: grants.kv_max_value,
            max_bucket: grants.kv_max_bucket,
        }
    }
}

/// Why a key-value operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvError {
    /// A quota (key length, value size, bucket size) refused the write.
    Quota(String),
    /// The database failed.
    Failed(String),
}

impl KvError {
    fn into_wit(self) -> store::Error {
        match self {
            KvError::Quota(m) | KvError::Failed(m) => store::Error::Other(m),
        }
    }
}

fn other(e: impl std::fmt::Display) -> KvError {
    KvError::Failed(e.to_string())
}

fn entry_size(key: &str, value_len: usize) -> u64 {
    (key.len() + value_len) as u64
}

type Entries<'t> = redb::Table<'t, (&'static str, &'static str), &'static [u8]>;
type Usage<'t> = redb::Table<'t, &'static str, u64>;

/// Adds `grow` and removes `shrink` bytes from `bucket`'s usage, refusing to
/// grow it beyond `max` (a write that does not grow it is always allowed).
fn account(
    usage: &mut Usage<'_>,
    bucket: &str,
    shrink: u64,
    grow: u64,
    max: u64,
) -> Result<(), KvError> {
    let used = usage
        .get(bucket)
        .map_err(other)?
        .map(|v| v.value())
        .unwrap_or(0);
    let next = used.saturating_sub(shrink).saturating_add(grow);
    if next > used && next > max {
        return Err(KvError::Quota(format!(
            "bucket {bucket:?} is full: {used} of its {max} bytes are in use and this write \
             needs {} more (the quota is kv_bucket_mb in the manifest); delete keys first",
            next - used
        )));
    }
    usage.insert(bucket, next).map_err(other)?;
    Ok(())
}

fn check_key(key: &str) -> Result<(), KvError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(KvError::Quota(format!(
            "key of {} bytes is longer than the limit of {MAX_KEY_BYTES} bytes",
            key.len()
        )));
    }
    Ok(())
}

impl KvStore {
    /// Opens (creating if needed) `kv.redb` in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<KvStore, Error> {
        std::fs::create_dir_all(state_dir).map_err(|source| Error::Io {
            what: format!("creating state directory {}", state_dir.display()),
            source,
        })?;
        let path = state_dir.join("kv.redb");
        if let Ok(meta) = std::fs::metadata(&path) {
            if !meta.is_file() {
                return Err(Error::State {
                    path,
                    msg: "not a regular file".into(),
                });
            }
        }
        let db = Database::create(&path).map_err(|e| Error::State {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let kv = KvStore { db, path };
        // Create the tables up front so a bad database fails at startup, not
        // on first use; a database from before quotas gets its usage counted.
        kv.write(|entries, usage| {
            if usage.is_empty().map_err(other)? && !entries.is_empty().map_err(other)? {
                let mut sizes = std::collections::BTreeMap::<String, u64>::new();
                for entry in entries.iter().map_err(other)? {
                    let (k, v) = entry.map_err(other)?;
                    let (bucket, key) = k.value();
                    *sizes.entry(bucket.to_owned()).or_default() +=
                        entry_size(key, v.value().len());
                }
                for (bucket, size) in sizes {
                    usage.insert(bucket.as_str(), size).map_err(other)?;
                }
            }
            Ok(())
        })
        .map_err(|e| Error::State {
            path: kv.path.clone(),
            msg: format!("{e:?}"),
        })?;
        Ok(kv)
    }

    fn write<R>(
        &self,
        f: impl FnOnce(&mut Entries<'_>, &mut Usage<'_>) -> Result<R, KvError>,
    ) -> Result<R, KvError> {
        let txn = self.db.begin_write().map_err(other)?;
        let r = {
            let mut entries = txn.open_table(ENTRIES).map_err(other)?;
            let mut usage = txn.open_table(USAGE).map_err(other)?;
            f(&mut entries, &mut usage)?
        };
        txn.commit().map_err(other)?;
        Ok(r)
    }

    /// The value at `key` in `bucket`.
    pub fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let txn = self.db.begin_read().map_err(other)?;
        let table = match txn.open_table(ENTRIES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(other(e)),
        };
        Ok(table
            .get((bucket, key))
            .map_err(other)?
            .map(|v| v.value().to_vec()))
    }

    /// Bytes (keys plus values) stored in `bucket`.
    pub fn usage(&self, bucket: &str) -> Result<u64, KvError> {
        let txn = self.db.begin_read().map_err(other)?;
        let table = txn.open_table(USAGE).map_err(other)?;
        Ok(table
            .get(bucket)
            .map_err(other)?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// Sets `key` in `bucket`, within `quota`.
    pub fn set(&self, bucket: &str, key: &str, value: &[u8], quota: Quota) -> Result<(), KvError> {
        check_key(key)?;
        if value.len() as u64 > quota.max_value {
            return Err(KvError::Quota(format!(
                "value of {} bytes is larger than the limit of {} bytes (kv_value_kb in the manifest)",
                value.len(),
                quota.max_value
            )));
        }
        self.write(|entries, usage| {
            let old = entries
                .get((bucket, key))
                .map_err(other)?
                .map(|v| entry_size(key, v.value().len()))
                .unwrap_or(0);
            account(
                usage,
                bucket,
                old,
                entry_size(key, value.len()),
                quota.max_bucket,
            )?;
            entries.insert((bucket, key), value).map_err(other)?;
            Ok(())
        })
    }

    /// Removes `key` from `bucket`.
    pub fn delete(&self, bucket: &str, key: &str) -> Result<(), KvError> {
        self.write(|entries, usage| {
            if let Some(old) = entries.remove((bucket, key)).map_err(other)? {
                let size = entry_size(key, old.value().len());
                drop(old);
                account(usage, bucket, size, 0, u64::MAX)?;
            }
            Ok(())
        })
    }

    /// Adds `delta` to the counter at `key` (8 bytes, little-endian; absent is 0), in one transaction.
    pub fn increment(
        &self,
        bucket: &str,
        key: &str,
        delta: u64,
        quota: Quota,
    ) -> Result<u64, KvError> {
        check_key(key)?;
        self.write(|entries, usage| {
            let current = match entries.get((bucket, key)).map_err(other)? {
                None => None,
                Some(v) => {
                    let bytes: [u8; 8] = v.value().try_into().map_err(|_| {
                        other(format!(
                            "value at {key:?} is not a counter (8-byte little-endian u64)"
                        ))
                    })?;
                    Some(u64::from_le_bytes(bytes))
                }
            };
            if current.is_none() {
                account(usage, bucket, 0, entry_size(key, 8), quota.max_bucket)?;
            }
            let next = current
                .unwrap_or(0)
                .checked_add(delta)
                .ok_or_else(|| other(format!("counter {key:?} would overflow")))?;
            entries
                .insert((bucket, key), next.to_le_bytes().as_slice())
                .map_err(other)?;
            Ok(next)
        })
    }

    /// Keys of `bucket`, one page from `cursor` (an index into the sorted keys).
    pub fn list(&self, bucket: &str, cursor: Option<u64>) -> Result<store::KeyResponse, KvError> {
        let txn = self.db.begin_read().map_err(other)?;
        let table = match txn.open_table(ENTRIES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => {
                return Ok(store::KeyResponse {
                    keys: vec![],
                    cursor: None,
                })
            }
            Err(e) => return Err(other(e)),
        };
        let skip = usize::try_from(cursor.unwrap_or(0)).unwrap_or(usize::MAX);
        let mut keys = Vec::new();
        let mut more = false;
        for (i, entry) in table.range((bucket, "")..).map_err(other)?.enumerate() {
            let (k, _) = entry.map_err(other)?;
            let (b, key) = k.value();
            if b != bucket {
                break;
            }
            if i < skip {
                continue;
            }
            if keys.len() == PAGE {
                more = true;
                break;
            }
            keys.push(key.to_owned());
        }
        let next = more.then(|| (skip + keys.len()) as u64);
        Ok(store::KeyResponse { keys, cursor: next })
    }
}

impl CapsView<'_> {
    fn bucket(&self, handle: &Resource<BucketHandle>) -> wasmtime::Result<(String, Arc<KvStore>)> {
        let name = self.table.get(handle)?.name.clone();
        let kv = self
            .caps
            .kv
            .clone()
            .ok_or_else(|| wasmtime::Error::msg("bucket handle without a key-value store"))?;
        Ok((name, kv))
    }

    /// Runs `op` on the blocking pool and turns its result into what the
    /// function sees, logging a quota denial (once per request).
    async fn kv<R: Send + 'static>(
        &mut self,
        handle: &Resource<BucketHandle>,
        op: impl FnOnce(&KvStore, &str) -> Result<R, KvError> + Send + 'static,
    ) -> wasmtime::Result<Result<R, store::Error>> {
        let (name, kv) = self.bucket(handle)?;
        let bucket = name.clone();
        let r = tokio::task::spawn_blocking(move || op(&kv, &bucket))
            .await
            .map_err(|e| wasmtime::Error::msg(format!("key-value worker failed: {e}")))?;
        if let Err(KvError::Quota(msg)) = &r {
            if !*self.kv_quota_logged {
                *self.kv_quota_logged = true;
                tracing::warn!(
                    function = %self.caps.name,
                    capability = %"keyvalue",
                    bucket = %name,
                    "denied: key-value quota: {msg}"
                );
            }
        }
        Ok(r.map_err(KvError::into_wit))
    }
}

impl store::Host for CapsView<'_> {
    async fn open(
        &mut self,
        identifier: String,
    ) -> wasmtime::Result<Result<Resource<BucketHandle>, store::Error>> {
        let granted = self.caps.grants.buckets.contains(&identifier);
        if !granted || self.caps.kv.is_none() {
            tracing::warn!(function = %self.caps.name, capability = %"keyvalue", bucket = %identifier, "denied: bucket not granted");
            return Ok(Err(store::Error::AccessDenied));
        }
        Ok(Ok(self.table.push(BucketHandle { name: identifier })?))
    }
}

impl store::HostBucket for CapsView<'_> {
    async fn get(
        &mut self,
        b: Resource<BucketHandle>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, store::Error>> {
        self.kv(&b, move |kv, bucket| kv.get(bucket, &key)).await
    }

    async fn set(
        &mut self,
        b: Resource<BucketHandle>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let quota = Quota::of(&self.caps.grants);
        self.kv(&b, move |kv, bucket| kv.set(bucket, &key, &value, quota))
            .await
    }

    async fn delete(
        &mut self,
        b: Resource<BucketHandle>,
        key: String,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        self.kv(&b, move |kv, bucket| kv.delete(bucket, &key)).await
    }

    async fn exists(
        &mut self,
        b: Resource<BucketHandle>,
        key: String,
    ) -> wasmtime::Result<Result<bool, store::Error>> {
        self.kv(&b, move |kv, bucket| {
            kv.get(bucket, &key).map(|v| v.is_some())
        })
        .await
    }

    async fn list_keys(
        &mut self,
        b: Resource<BucketHandle>,
        cursor: Option<u64>,
    ) -> wasmtime::Result<Result<store::KeyResponse, store::Error>> {
        self.kv(&b, move |kv, bucket| kv.list(bucket, cursor)).await
    }

    async fn drop(&mut self, b: Resource<BucketHandle>) -> wasmtime::Result<()> {
        self.table.delete(b)?;
        Ok(())
    }
}

impl atomics::Host for CapsView<'_> {
    async fn increment(
        &mut self,
        b: Resource<BucketHandle>,
        key: String,
        delta: u64,
    ) -> wasmtime::Result<Result<u64, store::Error>> {
        let quota = Quota::of(&self.caps.grants);
        self.kv(&b, move |kv, bucket| {
            kv.increment(bucket, &key, delta, quota)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: Quota = Quota {
        max_value: 1 << 20,
        max_bucket: 64 << 20,
    };

    #[test]
    fn quotas_refuse_large_values_and_full_buckets_and_count_deletes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kv = KvStore::open(dir.path()).expect("open");
        let q = Quota {
            max_value: 100,
            max_bucket: 250,
        };
        let e = kv.set("b", "k", &[0; 101], q).expect_err("value too large");
        assert!(
            matches!(&e, KvError::Quota(m) if m.contains("101 bytes")),
            "{e:?}"
        );
        kv.set("b", "k1", &[0; 98], q).expect("fits");
        kv.set("b", "k2", &[0; 98], q).expect("fits");
        assert_eq!(kv.usage("b").expect("usage"), 200);
        let e = kv.set("b", "k3", &[0; 98], q).expect_err("bucket full");
        assert!(
            matches!(&e, KvError::Quota(m) if m.contains("\"b\" is full")),
            "{e:?}"
        );
        assert_eq!(
            kv.get("b", "k3").expect("get"),
            None,
            "refused write left nothing"
        );
        // Another bucket has its own account; overwriting does not double-count.
        kv.set("c", "k3", &[0; 98], q).expect("other bucket");
        kv.set("b", "k1", &[1; 98], q).expect("overwrite");
        kv.delete("b", "k1").expect("delete");
        assert_eq!(kv.usage("b").expect("usage"), 100);
        kv.set("b", "k3", &[0; 98], q).expect("room again");
        assert!(kv.set("b", &"x".repeat(MAX_KEY_BYTES + 1), b"", Q).is_err());
        drop(kv);
        let kv = KvStore::open(dir.path()).expect("reopen");
        assert_eq!(kv.usage("b").expect("usage"), 200);
    }

    #[test]
    fn counters_persist_and_buckets_are_separate() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let kv = KvStore::open(dir.path()).expect("open");
            assert_eq!(kv.increment("a", "n", 1, Q).expect("inc"), 1);
            assert_eq!(kv.increment("a", "n", 2, Q).expect("inc"), 3);
            kv.set("b", "n", b"x", Q).expect("set");
            assert!(kv.increment("b", "n", 1, Q).is_err());
        }
        let kv = KvStore::open(dir.path()).expect("reopen");
        assert_eq!(kv.increment("a", "n", 1, Q).expect("inc"), 4);
        assert_eq!(
            kv.list("a", None).expect("list").keys,
            vec!["n".to_string()]
        );
        assert_eq!(kv.get("c", "n").expect("get"), None);
    }
}
