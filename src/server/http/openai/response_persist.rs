//! Stored responses that outlive a restart: the in-memory [`ResponseStore`] written through to the
//! session store (`--session-store`, local or Redis) as records beside the sessions. Two kinds of
//! record: `resp<US>{id}` → the response (model, session, exact tokens, body, as JSON) and
//! `head<US>{session}` → the id of the session's newest response. A worker started on the same
//! store reads them back (oldest first, within the same bound as memory), so after a drain and
//! restart `previous_response_id` of a conversation's last response continues its restored
//! session in place, older ones fork, and `GET /v1/responses/{id}` answers. A response not in
//! memory (written by another worker of a fleet sharing a Redis store) is looked up on demand.
//! Bounded like memory: a response dropped from memory (oldest first beyond the capacity) or
//! deleted is removed from the store, and a session's head record goes with its session. A store
//! that cannot be written is logged; the response is still answered (it is then kept in memory
//! only).

use std::sync::Arc;

use serde_json::{Value, json};

use super::response_store::{Orphan, ResponseStore, StoredResponse};
use crate::sessions::SessionStore;

/// Record key of a response.
fn resp_key(id: &str) -> String {
    format!("resp\u{1f}{id}")
}

/// Record key of a session's head.
fn head_key(session: &str) -> String {
    format!("head\u{1f}{session}")
}

fn encode(r: &StoredResponse) -> Vec<u8> {
    json!({ "model": r.model, "session": r.session, "tokens": r.tokens, "body": r.body }).to_string().into_bytes()
}

fn decode(raw: &[u8]) -> Option<StoredResponse> {
    let v: Value = serde_json::from_slice(raw).ok()?;
    let tokens: Option<Vec<u32>> =
        v["tokens"].as_array()?.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok())).collect();
    Some(StoredResponse {
        model: v["model"].as_str()?.to_string(),
        session: v["session"].as_str()?.to_string(),
        tokens: tokens?,
        body: v["body"].clone(),
    })
}

/// Stored responses: memory, and the session store behind it when there is one.
#[derive(Debug)]
pub struct Responses {
    memory: ResponseStore,
    store: Option<Arc<SessionStore>>,
}

impl Responses {
    /// At most `capacity` responses, written through to `store` when given (its records are read
    /// back now, oldest first).
    pub fn new(capacity: usize, store: Option<Arc<SessionStore>>) -> Responses {
        let r = Responses { memory: ResponseStore::new(capacity), store };
        r.load();
        r
    }

    /// Reads the stored responses back into memory (start-up).
    fn load(&self) {
        let Some(store) = &self.store else { return };
        let (resps, heads) = match (store.list_records("resp\u{1f}"), store.list_records("head\u{1f}")) {
            (Ok(r), Ok(h)) => (r, h),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "stored responses could not be read back; earlier response ids are not known");
                return;
            }
        };
        let heads: std::collections::HashMap<String, String> = heads
            .into_iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("head\u{1f}")?.to_string(), String::from_utf8(v).ok()?)))
            .collect();
        let mut loaded: Vec<(String, StoredResponse)> = resps
            .into_iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("resp\u{1f}")?.to_string(), decode(&v)?)))
            .collect();
        loaded.sort_by_key(|(id, r)| (r.body["created_at"].as_u64().unwrap_or(0), id.clone()));
        let (mut orphans, mut dropped) = (Vec::new(), Vec::new());
        let n = loaded.len();
        for (id, r) in loaded {
            let head = heads.get(&r.session) == Some(&id);
            let (o, d) = self.memory.insert(id, r, head);
            orphans.extend(o);
            dropped.extend(d);
        }
        // Beyond the capacity (a smaller bound than the last run's): drop the oldest.
        let mut removes: Vec<String> = dropped.iter().map(|id| resp_key(id)).collect();
        removes.extend(orphans.iter().map(|o| head_key(&o.session)));
        if let Err(e) = store.write_records(&[], &removes) {
            tracing::warn!(error = %e, "could not remove stored responses beyond the bound");
        }
        if n > 0 {
            tracing::info!(responses = n - dropped.len(), "stored responses read back from the session store");
        }
    }

    /// Runs a store write off the async threads; a failure is logged (memory still has it).
    async fn write(&self, puts: Vec<(String, Vec<u8>)>, removes: Vec<String>) {
        let Some(store) = self.store.clone() else { return };
        if puts.is_empty() && removes.is_empty() {
            return;
        }
        let done = tokio::task::spawn_blocking(move || store.write_records(&puts, &removes)).await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "stored responses: the session store was not updated; the change is kept in memory only")
            }
            Err(e) => tracing::warn!(error = %e, "stored responses: the store write did not run"),
        }
    }

    /// The response `id`: from memory, or read from the store (another worker's, on a shared
    /// store) and kept in memory.
    pub async fn get(&self, id: &str) -> Option<StoredResponse> {
        if let Some(r) = self.memory.get(id) {
            return Some(r);
        }
        let store = self.store.clone()?;
        let key = resp_key(id);
        let found = tokio::task::spawn_blocking(move || -> Option<(StoredResponse, Option<String>)> {
            let r = decode(&store.read_record(&key).ok()??)?;
            let head = store.read_record(&head_key(&r.session)).ok()?.and_then(|h| String::from_utf8(h).ok());
            Some((r, head))
        })
        .await
        .ok()??;
        let (r, head) = found;
        let is_head = head.as_deref() == Some(id) && !self.memory.has_head(&r.session);
        let (orphans, dropped) = self.memory.insert(id.to_string(), r.clone(), is_head);
        self.forget(orphans, dropped).await;
        Some(r)
    }

    /// As [`ResponseStore::claim`], looking `id` up in the store when memory does not have it.
    pub async fn claim(&self, id: &str) -> Option<(StoredResponse, bool)> {
        self.get(id).await?;
        self.memory.claim(id)
    }

    /// Stores `r` under `id` as its session's head; the sessions to end.
    pub async fn put(&self, id: String, r: StoredResponse) -> Vec<Orphan> {
        let puts = vec![(resp_key(&id), encode(&r)), (head_key(&r.session), id.clone().into_bytes())];
        let (orphans, dropped) = self.memory.insert(id, r, true);
        self.write(puts, Vec::new()).await;
        self.forget(orphans.clone(), dropped).await;
        orphans
    }

    /// Removes the records of dropped responses and of sessions left without a head.
    async fn forget(&self, orphans: Vec<Orphan>, dropped: Vec<String>) {
        let mut removes: Vec<String> = dropped.iter().map(|id| resp_key(id)).collect();
        removes.extend(orphans.iter().map(|o| head_key(&o.session)));
        self.write(Vec::new(), removes).await;
    }

    /// Forgets `session`'s head after a failed or abandoned turn (see
    /// [`ResponseStore::drop_session`]).
    pub fn drop_session(&self, session: &str) {
        self.memory.drop_session(session);
    }

    /// Removes `session`'s head record (the session was ended).
    pub async fn ended(&self, session: &str) {
        self.write(Vec::new(), vec![head_key(session)]).await;
    }

    /// Removes `id` (see [`ResponseStore::delete`]), from the store too.
    pub async fn delete(&self, id: &str) -> Option<Option<Orphan>> {
        self.get(id).await?;
        let out = self.memory.delete(id)?;
        let mut removes = vec![resp_key(id)];
        if let Some(o) = &out {
            removes.push(head_key(&o.session));
        }
        self.write(Vec::new(), removes).await;
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(session: &str, t: u64) -> StoredResponse {
        StoredResponse {
            model: "m".into(),
            session: session.into(),
            tokens: vec![1, 2],
            body: json!({ "created_at": t }),
        }
    }

    #[tokio::test]
    async fn responses_and_heads_outlive_a_reopen_within_the_bound() {
        let dir = tempfile::tempdir().expect("tmp");
        let open = || Arc::new(SessionStore::open(dir.path()).expect("store"));
        {
            let rs = Responses::new(3, Some(open()));
            rs.put("a".into(), r("s1", 1)).await;
            rs.put("b".into(), r("s1", 2)).await;
            rs.put("c".into(), r("s2", 3)).await;
            rs.put("d".into(), r("s3", 4)).await; // drops a (s1's head is b)
            assert_eq!(rs.delete("c").await, Some(Some(Orphan { model: "m".into(), session: "s2".into() })));
        }
        let rs = Responses::new(3, Some(open()));
        assert!(rs.get("a").await.is_none(), "dropped beyond the bound, from the store too");
        assert!(rs.get("c").await.is_none(), "deleted");
        assert_eq!(rs.get("b").await.expect("kept").tokens, vec![1, 2]);
        assert!(rs.claim("b").await.expect("kept").1, "b is still s1's head: continued in place");
        assert!(rs.claim("d").await.expect("kept").1);
        // A smaller bound on restart drops the oldest from the store as well.
        drop(rs);
        let rs = Responses::new(1, Some(open()));
        assert!(rs.get("b").await.is_none());
        assert!(rs.get("d").await.is_some());
    }
}
