//! `wasi:keyvalue` backed by redb: one database file under the state
//! directory, one table whose keys are `(bucket, key)`. A function opens only
//! the buckets its manifest grants; the bucket handle it gets is the permission.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use wasmtime::component::Resource;

use super::bindings::wasi::keyvalue::{atomics, store};
use super::CapsView;
use crate::Error;

/// `(bucket, key) -> value`.
const ENTRIES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("entries");

/// Keys returned per `list-keys` page.
const PAGE: usize = 1000;

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

fn other(e: impl std::fmt::Display) -> store::Error {
    store::Error::Other(e.to_string())
}

impl KvStore {
    /// Opens (creating if needed) `kv.redb` in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<KvStore, Error> {
        std::fs::create_dir_all(state_dir).map_err(|source| Error::Io {
            what: format!("creating state directory {}", state_dir.display()),
            source,
        })?;
        let path = state_dir.join("kv.redb");
        let db = Database::create(&path).map_err(|e| Error::State {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let kv = KvStore { db, path };
        // Create the table up front so a bad database fails at startup, not on first use.
        kv.write(|_| Ok(())).map_err(|e| Error::State {
            path: kv.path.clone(),
            msg: format!("{e:?}"),
        })?;
        Ok(kv)
    }

    fn write<R>(
        &self,
        f: impl FnOnce(&mut redb::Table<(&str, &str), &[u8]>) -> Result<R, store::Error>,
    ) -> Result<R, store::Error> {
        let txn = self.db.begin_write().map_err(other)?;
        let r = {
            let mut table = txn.open_table(ENTRIES).map_err(other)?;
            f(&mut table)?
        };
        txn.commit().map_err(other)?;
        Ok(r)
    }

    /// The value at `key` in `bucket`.
    pub fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, store::Error> {
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

    /// Sets `key` in `bucket`.
    pub fn set(&self, bucket: &str, key: &str, value: &[u8]) -> Result<(), store::Error> {
        self.write(|t| t.insert((bucket, key), value).map(|_| ()).map_err(other))
    }

    /// Removes `key` from `bucket`.
    pub fn delete(&self, bucket: &str, key: &str) -> Result<(), store::Error> {
        self.write(|t| t.remove((bucket, key)).map(|_| ()).map_err(other))
    }

    /// Adds `delta` to the counter at `key` (8 bytes, little-endian; absent is 0), in one transaction.
    pub fn increment(&self, bucket: &str, key: &str, delta: u64) -> Result<u64, store::Error> {
        self.write(|t| {
            let current = match t.get((bucket, key)).map_err(other)? {
                None => 0,
                Some(v) => {
                    let bytes: [u8; 8] = v.value().try_into().map_err(|_| {
                        other(format!(
                            "value at {key:?} is not a counter (8-byte little-endian u64)"
                        ))
                    })?;
                    u64::from_le_bytes(bytes)
                }
            };
            let next = current
                .checked_add(delta)
                .ok_or_else(|| other(format!("counter {key:?} would overflow")))?;
            t.insert((bucket, key), next.to_le_bytes().as_slice())
                .map_err(other)?;
            Ok(next)
        })
    }

    /// Keys of `bucket`, one page from `cursor` (an index into the sorted keys).
    pub fn list(
        &self,
        bucket: &str,
        cursor: Option<u64>,
    ) -> Result<store::KeyResponse, store::Error> {
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
    fn bucket(&self, handle: &Resource<BucketHandle>) -> wasmtime::Result<(String, &KvStore)> {
        let name = self.table.get(handle)?.name.clone();
        let kv = self
            .caps
            .kv
            .as_deref()
            .ok_or_else(|| wasmtime::Error::msg("bucket handle without a key-value store"))?;
        Ok((name, kv))
    }
}

impl store::Host for CapsView<'_> {
    fn open(
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
    fn get(
        &mut self,
        b: Resource<BucketHandle>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, store::Error>> {
        let (name, kv) = self.bucket(&b)?;
        Ok(kv.get(&name, &key))
    }

    fn set(
        &mut self,
        b: Resource<BucketHandle>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let (name, kv) = self.bucket(&b)?;
        Ok(kv.set(&name, &key, &value))
    }

    fn delete(
        &mut self,
        b: Resource<BucketHandle>,
        key: String,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let (name, kv) = self.bucket(&b)?;
        Ok(kv.delete(&name, &key))
    }

    fn exists(
        &mut self,
        b: Resource<BucketHandle>,
        key: String,
    ) -> wasmtime::Result<Result<bool, store::Error>> {
        let (name, kv) = self.bucket(&b)?;
        Ok(kv.get(&name, &key).map(|v| v.is_some()))
    }

    fn list_keys(
        &mut self,
        b: Resource<BucketHandle>,
        cursor: Option<u64>,
    ) -> wasmtime::Result<Result<store::KeyResponse, store::Error>> {
        let (name, kv) = self.bucket(&b)?;
        Ok(kv.list(&name, cursor))
    }

    fn drop(&mut self, b: Resource<BucketHandle>) -> wasmtime::Result<()> {
        self.table.delete(b)?;
        Ok(())
    }
}

impl atomics::Host for CapsView<'_> {
    fn increment(
        &mut self,
        b: Resource<BucketHandle>,
        key: String,
        delta: u64,
    ) -> wasmtime::Result<Result<u64, store::Error>> {
        let (name, kv) = self.bucket(&b)?;
        Ok(kv.increment(&name, &key, delta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_persist_and_buckets_are_separate() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let kv = KvStore::open(dir.path()).expect("open");
            assert_eq!(kv.increment("a", "n", 1).expect("inc"), 1);
            assert_eq!(kv.increment("a", "n", 2).expect("inc"), 3);
            kv.set("b", "n", b"x").expect("set");
            assert!(kv.increment("b", "n", 1).is_err());
        }
        let kv = KvStore::open(dir.path()).expect("reopen");
        assert_eq!(kv.increment("a", "n", 1).expect("inc"), 4);
        assert_eq!(
            kv.list("a", None).expect("list").keys,
            vec!["n".to_string()]
        );
        assert_eq!(kv.get("c", "n").expect("get"), None);
    }
}
