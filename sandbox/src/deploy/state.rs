//! The deploy database (`DIR/functions.redb`): every version's record and
//! each function's live version. Each change is one redb transaction, so a
//! crash leaves either the old or the new state, never half of one.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};

use super::spec::VersionRecord;
use super::DeployError;

/// (function, version) -> the version's record as JSON.
const VERSIONS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("versions");
/// function -> its live version.
const LIVE: TableDefinition<&str, u64> = TableDefinition::new("live");
/// function -> the versions that were live before the live one, most recent last (JSON):
/// what a rollback without a version goes back to.
const PREVIOUS: TableDefinition<&str, &[u8]> = TableDefinition::new("previous");

/// How a version becomes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// A deploy: the live version is remembered as the one before.
    Deploy,
    /// A rollback (to the version before, or to one named): the version rolled away
    /// from is not remembered, and if the target was live before, so is what came
    /// after it; a later rollback goes further back, never to a version rolled away
    /// from.
    Rollback,
}

/// The open database.
#[derive(Debug)]
pub struct DeployState {
    db: Database,
    path: PathBuf,
}

impl DeployState {
    /// Opens (or creates) `state_dir/functions.redb`.
    pub fn open(state_dir: &Path) -> Result<DeployState, DeployError> {
        let path = state_dir.join("functions.redb");
        let db = Database::create(&path).map_err(|e| DeployError::Database {
            path: path.clone(),
            source: Box::new(e.into()),
        })?;
        let state = DeployState { db, path };
        // Create both tables now, so a bad file fails at start, not on first use.
        state.write(|_, _| Ok(()))?;
        Ok(state)
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> DeployError {
        DeployError::Database {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    fn write(
        &self,
        f: impl FnOnce(
            &mut redb::Table<(&str, u64), &[u8]>,
            &mut redb::Table<&str, u64>,
        ) -> Result<(), DeployError>,
    ) -> Result<(), DeployError> {
        self.write_all(|versions, live, _| f(versions, live))
    }

    fn write_all(
        &self,
        f: impl FnOnce(
            &mut redb::Table<(&str, u64), &[u8]>,
            &mut redb::Table<&str, u64>,
            &mut redb::Table<&str, &[u8]>,
        ) -> Result<(), DeployError>,
    ) -> Result<(), DeployError> {
        let tx = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut versions = tx.open_table(VERSIONS).map_err(|e| self.db_err(e))?;
            let mut live = tx.open_table(LIVE).map_err(|e| self.db_err(e))?;
            let mut previous = tx.open_table(PREVIOUS).map_err(|e| self.db_err(e))?;
            f(&mut versions, &mut live, &mut previous)?;
        }
        tx.commit().map_err(|e| self.db_err(e))
    }

    /// The versions live before `function`'s live one, most recent last.
    pub fn previous(&self, function: &str) -> Result<Vec<u64>, DeployError> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = match tx.open_table(PREVIOUS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.db_err(e)),
        };
        let got = table.get(function).map_err(|e| self.db_err(e))?;
        Ok(got
            .and_then(|v| serde_json::from_slice(v.value()).ok())
            .unwrap_or_default())
    }

    /// Records the switch of `function` from its live version to `to` in `previous`.
    fn remember(
        &self,
        function: &str,
        to: u64,
        how: Switch,
        live: &redb::Table<&str, u64>,
        previous: &mut redb::Table<&str, &[u8]>,
    ) -> Result<(), DeployError> {
        let from = live
            .get(function)
            .map_err(|e| self.db_err(e))?
            .map(|v| v.value());
        let mut stack: Vec<u64> = previous
            .get(function)
            .map_err(|e| self.db_err(e))?
            .and_then(|v| serde_json::from_slice(v.value()).ok())
            .unwrap_or_default();
        match how {
            Switch::Deploy => stack.extend(from.filter(|f| *f != to)),
            Switch::Rollback => {
                if let Some(i) = stack.iter().rposition(|v| *v == to) {
                    stack.truncate(i);
                }
            }
        }
        // A bounded history: the versions a rollback can reach by default.
        if stack.len() > 64 {
            stack.drain(..stack.len() - 64);
        }
        let json = serde_json::to_vec(&stack).unwrap_or_default();
        previous
            .insert(function, json.as_slice())
            .map_err(|e| self.db_err(e))?;
        Ok(())
    }

    fn decode(&self, key: String, bytes: &[u8]) -> Result<VersionRecord, DeployError> {
        serde_json::from_slice(bytes).map_err(|source| DeployError::Record {
            path: self.path.clone(),
            key,
            source,
        })
    }

    /// Stores each record and makes it live, all in one transaction: after a crash
    /// either every one is live or none is.
    pub fn insert_live_all(&self, records: &[&VersionRecord]) -> Result<(), DeployError> {
        let json = records
            .iter()
            .map(|record| {
                serde_json::to_vec(record).map_err(|source| DeployError::Record {
                    path: self.path.clone(),
                    key: format!("{}/{}", record.function, record.version),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.write_all(|versions, live, previous| {
            for (record, json) in records.iter().zip(&json) {
                versions
                    .insert((record.function.as_str(), record.version), json.as_slice())
                    .map_err(|e| self.db_err(e))?;
                self.remember(
                    &record.function,
                    record.version,
                    Switch::Deploy,
                    live,
                    previous,
                )?;
                live.insert(record.function.as_str(), record.version)
                    .map_err(|e| self.db_err(e))?;
            }
            Ok(())
        })
    }

    /// Makes `version` of `function` live.
    pub fn set_live(&self, function: &str, version: u64, how: Switch) -> Result<(), DeployError> {
        self.write_all(|_, live, previous| {
            self.remember(function, version, how, live, previous)?;
            live.insert(function, version).map_err(|e| self.db_err(e))?;
            Ok(())
        })
    }

    /// Forgets `function`: its versions and its live pointer.
    pub fn remove(&self, function: &str) -> Result<(), DeployError> {
        self.write_all(|versions, live, previous| {
            live.remove(function).map_err(|e| self.db_err(e))?;
            previous.remove(function).map_err(|e| self.db_err(e))?;
            let keys: Vec<u64> = versions
                .range((function, 0)..=(function, u64::MAX))
                .map_err(|e| self.db_err(e))?
                .map(|r| r.map(|(k, _)| k.value().1))
                .collect::<Result<_, _>>()
                .map_err(|e| self.db_err(e))?;
            for v in keys {
                versions.remove((function, v)).map_err(|e| self.db_err(e))?;
            }
            Ok(())
        })
    }

    /// Every function's live version number.
    pub fn live(&self) -> Result<Vec<(String, u64)>, DeployError> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = tx.open_table(LIVE).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = entry.map_err(|e| self.db_err(e))?;
            out.push((k.value().to_owned(), v.value()));
        }
        Ok(out)
    }

    /// The components (hex digests) some version of some function refers to.
    pub fn components(&self) -> Result<std::collections::BTreeSet<String>, DeployError> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = tx.open_table(VERSIONS).map_err(|e| self.db_err(e))?;
        let mut out = std::collections::BTreeSet::new();
        for entry in table.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = entry.map_err(|e| self.db_err(e))?;
            let (name, version) = k.value();
            out.insert(
                self.decode(format!("{name}/{version}"), v.value())?
                    .component,
            );
        }
        Ok(out)
    }

    /// Every version of `function`, oldest first.
    pub fn versions(&self, function: &str) -> Result<Vec<VersionRecord>, DeployError> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = tx.open_table(VERSIONS).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for entry in table
            .range((function, 0)..=(function, u64::MAX))
            .map_err(|e| self.db_err(e))?
        {
            let (k, v) = entry.map_err(|e| self.db_err(e))?;
            let (name, version) = k.value();
            out.push(self.decode(format!("{name}/{version}"), v.value())?);
        }
        Ok(out)
    }

    /// One version's record.
    pub fn version(
        &self,
        function: &str,
        version: u64,
    ) -> Result<Option<VersionRecord>, DeployError> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = tx.open_table(VERSIONS).map_err(|e| self.db_err(e))?;
        match table.get((function, version)).map_err(|e| self.db_err(e))? {
            Some(v) => Ok(Some(
                self.decode(format!("{function}/{version}"), v.value())?,
            )),
            None => Ok(None),
        }
    }

    /// The highest version number `function` has had (0 if none).
    pub fn last_version(&self, function: &str) -> Result<u64, DeployError> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = tx.open_table(VERSIONS).map_err(|e| self.db_err(e))?;
        let last = table
            .range((function, 0)..=(function, u64::MAX))
            .map_err(|e| self.db_err(e))?
            .next_back()
            .transpose()
            .map_err(|e| self.db_err(e))?
            .map(|(k, _)| k.value().1)
            .unwrap_or(0);
        Ok(last)
    }
}
