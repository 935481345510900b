//! Ending every generation of an instance where it stands, when the worker's exit deadline comes:
//! each running or waiting sequence gets a last update with finish reason `abort` (the tokens it
//! generated were already sent), a session turn keeps what it generated, and the session's queued
//! turns are ended the same way, so that the drain writes the sessions to the store and exits.

use std::sync::atomic::Ordering::Relaxed;

use super::step::Engine;

impl Engine {
    /// Cuts every running, waiting and queued session turn short; returns how many were. The
    /// engine is idle afterwards.
    pub fn cut_short(&mut self) -> usize {
        let mut cut = 0;
        // Retiring a session turn adds the session's next queued turn: loop until none is left.
        while !self.running.is_empty() || !self.waiting.is_empty() {
            let running = std::mem::take(&mut self.running);
            let waiting = std::mem::take(&mut self.waiting);
            // Counted before the last response goes, so a client that sees it sees the count too.
            self.stats.cut_short.fetch_add((running.len() + waiting.len()) as u64, Relaxed);
            for mut s in running {
                s.cut_short(self.text.as_ref());
                self.retire(s, true);
                cut += 1;
            }
            for mut s in waiting {
                self.left_queue += usize::from(!s.started);
                s.cut_short(self.text.as_ref());
                let keep = s.started;
                self.retire(s, keep);
                cut += 1;
            }
        }
        self.publish_gauges();
        cut
    }
}
