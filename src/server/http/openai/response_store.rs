//! Stored responses of `/v1/responses` (`store: true`): each keeps its conversation (the messages
//! that led to it and its answer) so a follow-up naming it by `previous_response_id` continues from
//! there, and continuing from an older one forks without touching the newer. Bounded (oldest
//! dropped first); held in memory for the worker's lifetime. The conversation is kept as messages
//! and sent again in full with each follow-up: the worker-side session that would keep its K/V
//! (and its exact token history) is not built yet.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde_json::Value;

/// One stored response.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    /// The model that answered.
    pub model: String,
    /// The conversation up to and including this response's answer.
    pub messages: Vec<Value>,
    /// The response object as returned.
    pub body: Value,
}

/// The store.
#[derive(Debug)]
pub struct ResponseStore {
    capacity: usize,
    inner: Mutex<(HashMap<String, StoredResponse>, VecDeque<String>)>,
}

impl ResponseStore {
    /// A store keeping at most `capacity` responses.
    pub fn new(capacity: usize) -> ResponseStore {
        ResponseStore { capacity: capacity.max(1), inner: Mutex::new((HashMap::new(), VecDeque::new())) }
    }

    /// Keeps `r` under `id`, dropping the oldest beyond capacity.
    pub fn put(&self, id: String, r: StoredResponse) {
        let Ok(mut g) = self.inner.lock() else { return };
        let (map, order) = &mut *g;
        if map.insert(id.clone(), r).is_none() {
            order.push_back(id);
        }
        while order.len() > self.capacity {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    /// The response stored under `id`.
    pub fn get(&self, id: &str) -> Option<StoredResponse> {
        self.inner.lock().ok()?.0.get(id).cloned()
    }

    /// Removes `id`; whether it was there.
    pub fn delete(&self, id: &str) -> bool {
        let Ok(mut g) = self.inner.lock() else { return false };
        let (map, order) = &mut *g;
        order.retain(|o| o != id);
        map.remove(id).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_oldest_first() {
        let s = ResponseStore::new(2);
        let r = |m: &str| StoredResponse { model: m.into(), messages: Vec::new(), body: Value::Null };
        s.put("a".into(), r("1"));
        s.put("b".into(), r("2"));
        s.put("c".into(), r("3"));
        assert!(s.get("a").is_none());
        assert_eq!(s.get("c").map(|r| r.model), Some("3".into()));
        assert!(s.delete("b") && !s.delete("b"));
    }
}
