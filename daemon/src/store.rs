//! The daemon's state database (redb): one table of guest records, each stored as JSON
//! under the guest's name. Every change is one committed write transaction, so a
//! `kill -9` loses nothing that was acknowledged.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};

use crate::error::DaemonError;
use crate::guests::record::GuestRecord;

const GUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("guests");
/// Names of the functions the last applied fleet declared (so a later fleet without
/// one removes it, while a function deployed by hand is left alone).
const FLEET_FUNCTIONS: TableDefinition<&str, ()> = TableDefinition::new("fleet_functions");

/// The state database.
#[derive(Debug)]
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) `STATE/state.redb`.
    pub fn open(state_dir: &Path) -> Result<Store, DaemonError> {
        let path = state_dir.join("state.redb");
        let db = Database::create(&path).map_err(|e| DaemonError::from((path.clone(), e)))?;
        let store = Store { db, path };
        // Make sure the table exists, so reads of an empty database succeed.
        let tx = store.db.begin_write().map_err(|e| store.err(e))?;
        tx.open_table(GUESTS).map_err(|e| store.err(e))?;
        tx.open_table(FLEET_FUNCTIONS).map_err(|e| store.err(e))?;
        tx.commit().map_err(|e| store.err(e))?;
        Ok(store)
    }

    fn err(&self, e: impl Into<redb::Error>) -> DaemonError {
        DaemonError::from((self.path.clone(), e))
    }

    /// Every guest record, by name.
    pub fn guests(&self) -> Result<Vec<GuestRecord>, DaemonError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(GUESTS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let rec = serde_json::from_slice(v.value()).map_err(|source| DaemonError::Record {
                key: k.value().to_owned(),
                source,
            })?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Writes (creates or replaces) one guest record.
    pub fn put_guest(&self, rec: &GuestRecord) -> Result<(), DaemonError> {
        let bytes = serde_json::to_vec(rec).map_err(|source| DaemonError::Record {
            key: rec.name.clone(),
            source,
        })?;
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = tx.open_table(GUESTS).map_err(|e| self.err(e))?;
            table
                .insert(rec.name.as_str(), bytes.as_slice())
                .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Deletes one guest record.
    pub fn delete_guest(&self, name: &str) -> Result<(), DaemonError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = tx.open_table(GUESTS).map_err(|e| self.err(e))?;
            table.remove(name).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// The functions the last applied fleet declared.
    pub fn fleet_functions(&self) -> Result<Vec<String>, DaemonError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(FLEET_FUNCTIONS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (k, _) = row.map_err(|e| self.err(e))?;
            out.push(k.value().to_owned());
        }
        Ok(out)
    }

    /// Records `name` as declared by the fleet (`true`) or not (`false`).
    pub fn set_fleet_function(&self, name: &str, declared: bool) -> Result<(), DaemonError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = tx.open_table(FLEET_FUNCTIONS).map_err(|e| self.err(e))?;
            if declared {
                table.insert(name, ()).map_err(|e| self.err(e))?;
            } else {
                table.remove(name).map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }
}
