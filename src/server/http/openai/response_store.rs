//! Stored responses of `/v1/responses` (`store: true`). Each keeps its conversation's exact token
//! history (never re-tokenized) and the worker-side generative session that holds it: the newest
//! response of a session is its *head*, and only a follow-up of the head continues the session in
//! place (prefilling only its new tokens). A follow-up of an older response forks: it opens a new
//! session from that response's tokens, so the newer branch keeps its session intact. Bounded
//! (oldest dropped first); held in memory, and written through to the session store when the
//! worker has one (see `response_persist`), so ids outlive a restart.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde_json::Value;

/// One stored response.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    /// The model that answered.
    pub model: String,
    /// The generative session (string sequence id) holding the conversation on the worker.
    pub session: String,
    /// The conversation's tokens up to and including this response's answer.
    pub tokens: Vec<u32>,
    /// The response object as returned.
    pub body: Value,
}

/// What a session's head is.
#[derive(Debug, Clone, PartialEq)]
enum Head {
    /// The session's tokens are those of this response.
    At(String),
    /// A follow-up turn is running on it.
    Busy,
}

/// A session the caller must end on the worker (its head response was dropped or deleted).
#[derive(Debug, Clone, PartialEq)]
pub struct Orphan {
    /// Model of the session.
    pub model: String,
    /// Session id.
    pub session: String,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, StoredResponse>,
    order: VecDeque<String>,
    heads: HashMap<String, Head>,
}

impl Inner {
    /// Removes `id`; the session to end when it was its session's head.
    fn remove(&mut self, id: &str) -> Option<Option<Orphan>> {
        let r = self.map.remove(id)?;
        if self.heads.get(&r.session) == Some(&Head::At(id.to_string())) {
            self.heads.remove(&r.session);
            return Some(Some(Orphan { model: r.model, session: r.session }));
        }
        Some(None)
    }
}

/// The store.
#[derive(Debug)]
pub struct ResponseStore {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl ResponseStore {
    /// A store keeping at most `capacity` responses.
    pub fn new(capacity: usize) -> ResponseStore {
        ResponseStore { capacity: capacity.max(1), inner: Mutex::new(Inner::default()) }
    }

    /// Keeps `r` under `id` as the head of its session, dropping the oldest beyond capacity;
    /// returns the sessions left without a head (to end).
    #[cfg(test)]
    pub fn put(&self, id: String, r: StoredResponse) -> Vec<Orphan> {
        self.insert(id, r, true).0
    }

    /// Keeps `r` under `id` (as its session's head when `head`), dropping the oldest beyond
    /// capacity: the sessions left without a head (to end), and the ids dropped.
    pub fn insert(&self, id: String, r: StoredResponse, head: bool) -> (Vec<Orphan>, Vec<String>) {
        let Ok(mut g) = self.inner.lock() else { return (Vec::new(), Vec::new()) };
        if head {
            g.heads.insert(r.session.clone(), Head::At(id.clone()));
        }
        if g.map.insert(id.clone(), r).is_none() {
            g.order.push_back(id);
        }
        let (mut orphans, mut dropped) = (Vec::new(), Vec::new());
        while g.order.len() > self.capacity {
            let Some(old) = g.order.pop_front() else { break };
            if let Some(o) = g.remove(&old) {
                orphans.extend(o);
            }
            dropped.push(old);
        }
        (orphans, dropped)
    }

    /// Whether `session` has a head (a stored response, or a turn running on it).
    pub fn has_head(&self, session: &str) -> bool {
        self.inner.lock().is_ok_and(|g| g.heads.contains_key(session))
    }

    /// The response stored under `id`.
    pub fn get(&self, id: &str) -> Option<StoredResponse> {
        self.inner.lock().ok()?.map.get(id).cloned()
    }

    /// The response stored under `id`, and whether the caller may continue its session in place
    /// (it is the head: the session is then marked busy until [`put`](Self::put) or
    /// [`drop_session`](Self::drop_session)).
    pub fn claim(&self, id: &str) -> Option<(StoredResponse, bool)> {
        let mut g = self.inner.lock().ok()?;
        let r = g.map.get(id)?.clone();
        let head = g.heads.get_mut(&r.session);
        let is_head = head.as_ref().is_some_and(|h| **h == Head::At(id.to_string()));
        if let Some(h) = head.filter(|_| is_head) {
            *h = Head::Busy;
        }
        Some((r, is_head))
    }

    /// Forgets `session`'s head after a failed turn (its state on the worker is no longer a stored
    /// response's; the caller ends it).
    pub fn drop_session(&self, session: &str) {
        if let Ok(mut g) = self.inner.lock() {
            g.heads.remove(session);
        }
    }

    /// Removes `id`: `None` when unknown, else the session to end when `id` was its head.
    pub fn delete(&self, id: &str) -> Option<Option<Orphan>> {
        let mut g = self.inner.lock().ok()?;
        let out = g.remove(id)?;
        g.order.retain(|o| o != id);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(session: &str) -> StoredResponse {
        StoredResponse { model: "m".into(), session: session.into(), tokens: vec![1], body: Value::Null }
    }

    #[test]
    fn bounded_oldest_first_and_heads_orphaned() {
        let s = ResponseStore::new(2);
        assert!(s.put("a".into(), r("s1")).is_empty());
        assert!(s.put("b".into(), r("s2")).is_empty());
        let orphans = s.put("c".into(), r("s2"));
        assert_eq!(orphans, vec![Orphan { model: "m".into(), session: "s1".into() }], "a was s1's head");
        assert!(s.get("a").is_none());
        assert_eq!(s.delete("b"), Some(None), "b is no longer s2's head");
        assert_eq!(s.delete("b"), None);
        assert_eq!(s.delete("c"), Some(Some(Orphan { model: "m".into(), session: "s2".into() })));
    }

    #[test]
    fn only_the_head_continues_and_one_claim_at_a_time() {
        let s = ResponseStore::new(8);
        s.put("a".into(), r("s"));
        let (_, head) = s.claim("a").expect("stored");
        assert!(head);
        assert!(!s.claim("a").expect("stored").1, "a second follow-up while the first runs forks");
        s.put("b".into(), r("s"));
        assert!(!s.claim("a").expect("stored").1, "a is older than b: fork");
        assert!(s.claim("b").expect("stored").1);
        s.drop_session("s");
        assert!(!s.claim("b").expect("stored").1);
        assert!(s.claim("zz").is_none());
    }
}
