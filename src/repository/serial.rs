//! [`ModelTurns`]: loads and unloads of one model run one at a time, in the order they were asked
//! for, so the last word wins and no version is left running unseen (a load that finished during
//! an unload's drain was once dropped without being drained, leaking its instance threads).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

type Turn = Arc<tokio::sync::Mutex<()>>;

/// One queue of load/unload operations per model name (names with no operation pending hold
/// nothing).
#[derive(Debug, Default)]
pub(crate) struct ModelTurns {
    turns: Mutex<HashMap<String, Turn>>,
}

/// The right to load or unload one model, until dropped.
pub(crate) struct ModelTurn<'a> {
    owner: &'a ModelTurns,
    name: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl ModelTurns {
    /// Waits for the operations on `name` asked for earlier (first come, first served).
    pub(crate) async fn wait(&self, name: &str) -> ModelTurn<'_> {
        let turn = match self.turns.lock() {
            Ok(mut map) => map.entry(name.to_string()).or_default().clone(),
            // A poisoned map still serializes nothing wrongly: fall back to a private turn.
            Err(_) => Turn::default(),
        };
        let guard = turn.lock_owned().await;
        ModelTurn { owner: self, name: name.to_string(), guard: Some(guard) }
    }
}

impl Drop for ModelTurn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        if let Ok(mut map) = self.owner.turns.lock()
            && map.get(&self.name).is_some_and(|t| Arc::strong_count(t) == 1)
        {
            map.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_are_taken_in_order_and_released_names_hold_nothing() {
        let turns = Arc::new(ModelTurns::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let first = turns.wait("m").await;
        let mut tasks = Vec::new();
        for k in 0..3 {
            let (turns, log) = (turns.clone(), log.clone());
            tasks.push(tokio::spawn(async move {
                let _t = turns.wait("m").await;
                log.lock().expect("log").push(k);
            }));
            tokio::task::yield_now().await;
        }
        let other = turns.wait("other").await; // another model is not held up
        drop(other);
        assert!(log.lock().expect("log").is_empty());
        drop(first);
        for t in tasks {
            t.await.expect("join");
        }
        assert_eq!(*log.lock().expect("log"), vec![0, 1, 2]);
        assert!(turns.turns.lock().expect("map").is_empty());
    }
}
