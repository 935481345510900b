//! Small records kept beside the sessions, in the same store and with the same failure handling:
//! a second redb table (`records`) in the local store, a second key namespace
//! (`neuron-worker:record:`) on Redis. The OpenAI front keeps its stored response ids there, so a
//! `previous_response_id` outlives a restart on the same `--session-store` (see
//! `server::http::openai::response_store`). Keys are the caller's strings; values are opaque bytes.
//! A damaged local file moved aside keeps only its sessions: the records are dropped with it.

use redb::{ReadableDatabase, TableDefinition, TableError};

use super::store::{Backend, SessionStore, StoreError};
use super::store_stats::StoreOp;

/// The records table: key → value.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");

/// Prefix of every record key on Redis.
const NAMESPACE: &str = "neuron-worker:record:";

/// A table that was never written reads as empty (opening it in a read transaction is an error).
fn missing<T>(r: Result<T, TableError>) -> Result<Option<T>, redb::Error> {
    match r {
        Ok(t) => Ok(Some(t)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl SessionStore {
    /// Writes `puts` and deletes `removes` in one transaction (nothing changes on error).
    pub fn write_records(&self, puts: &[(String, Vec<u8>)], removes: &[String]) -> Result<(), StoreError> {
        if puts.is_empty() && removes.is_empty() {
            return Ok(());
        }
        self.timed(StoreOp::Put, || match &self.backend {
            Backend::Redis(r) => r.run("write records", |c| {
                let mut p = redis::pipe();
                p.atomic();
                for k in removes {
                    p.del(format!("{NAMESPACE}{k}")).ignore();
                }
                for (k, v) in puts {
                    p.set(format!("{NAMESPACE}{k}"), v.as_slice()).ignore();
                }
                p.query::<()>(c)
            }),
            Backend::Local(db) => db.run("write records", |db| {
                let txn = db.begin_write()?;
                {
                    let mut t = txn.open_table(RECORDS)?;
                    for k in removes {
                        t.remove(k.as_str())?;
                    }
                    for (k, v) in puts {
                        t.insert(k.as_str(), v.as_slice())?;
                    }
                }
                txn.commit()?;
                Ok(())
            }),
        })
    }

    /// The record `key`, if any.
    pub fn read_record(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.timed(StoreOp::Contains, || match &self.backend {
            Backend::Redis(r) => {
                r.run("read a record", |c| redis::cmd("GET").arg(format!("{NAMESPACE}{key}")).query(c))
            }
            Backend::Local(db) => db.run("read a record", |db| {
                let txn = db.begin_read()?;
                let Some(t) = missing(txn.open_table(RECORDS))? else { return Ok(None) };
                Ok(t.get(key)?.map(|v| v.value().to_vec()))
            }),
        })
    }

    /// Every record whose key starts with `prefix`, in key order.
    pub fn list_records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.timed(StoreOp::List, || match &self.backend {
            Backend::Redis(r) => r.list_in(NAMESPACE, "list records", prefix),
            Backend::Local(db) => db.run("list records", |db| {
                let txn = db.begin_read()?;
                let Some(t) = missing(txn.open_table(RECORDS))? else { return Ok(Vec::new()) };
                let mut out = Vec::new();
                for entry in t.range(prefix..)? {
                    let (k, v) = entry?;
                    let k = k.value().to_string();
                    if !k.starts_with(prefix) {
                        break;
                    }
                    out.push((k, v.value().to_vec()));
                }
                Ok(out)
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_written_read_listed_and_removed_beside_the_sessions() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = SessionStore::open(dir.path()).expect("opens");
        assert_eq!(store.read_record("a").expect("a table never written reads as empty"), None);
        store
            .write_records(
                &[("r:a".into(), b"1".to_vec()), ("r:b".into(), b"2".to_vec()), ("s:x".into(), b"3".to_vec())],
                &[],
            )
            .expect("writes");
        assert_eq!(store.read_record("r:a").expect("reads"), Some(b"1".to_vec()));
        let listed = store.list_records("r:").expect("lists");
        assert_eq!(listed, vec![("r:a".to_string(), b"1".to_vec()), ("r:b".to_string(), b"2".to_vec())]);
        store.write_records(&[], &["r:a".into()]).expect("removes");
        drop(store);
        // Kept across a re-open; the sessions table is untouched (no session listed).
        let store = SessionStore::open(dir.path()).expect("re-opens");
        assert_eq!(store.list_records("r:").expect("lists"), vec![("r:b".to_string(), b"2".to_vec())]);
        assert_eq!(store.read_record("r:a").expect("reads"), None);
        assert!(store.list("m", 1).expect("lists").0.is_empty());
    }
}
