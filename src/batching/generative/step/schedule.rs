//! Who runs in a step: running sequences get their next tokens (one decode token, or the next
//! chunk of a prompt) under the step's token budget and prompt-token cap, preempting the most
//! recently admitted when K/V blocks run out; then waiting sequences are admitted in order while
//! the budget and the blocks for their whole prompt allow (admission never forces a preemption).

use std::sync::atomic::Ordering::Relaxed;

use super::super::kv_blocks::BlockTable;
use super::super::request::GenerationError;
use super::{Engine, StepReport};
use crate::backend::BackendError;

/// What a step may still run: tokens in all, and prompt tokens (chunks of more than one token;
/// `usize::MAX` when no sequence decodes).
pub(super) struct StepBudget {
    tokens: usize,
    prompt: usize,
}

impl StepBudget {
    /// `tokens` in all, of which at most `prompt` in chunks of several tokens.
    pub(super) fn new(tokens: usize, prompt: usize) -> Self {
        Self { tokens, prompt }
    }

    /// How many of the `wanted` tokens a sequence may run now (0: none this step).
    fn allow(&self, wanted: usize) -> usize {
        let n = wanted.min(self.tokens);
        if n > 1 { n.min(self.prompt) } else { n }
    }

    /// Spends `n` tokens (more than is left only for a from-zero history, which takes the rest).
    fn spend(&mut self, n: usize) {
        self.tokens = self.tokens.saturating_sub(n);
        if n > 1 {
            self.prompt = self.prompt.saturating_sub(n);
        }
    }
}

impl Engine {
    /// Gives running sequences their tokens for this step, preempting the newest when blocks run out.
    pub(super) fn schedule_running(
        &mut self,
        budget: &mut StepBudget,
        plan: &mut Vec<(usize, usize)>,
        report: &mut StepReport,
    ) -> Result<(), BackendError> {
        let mut i = 0;
        while i < self.running.len() {
            if budget.tokens == 0 {
                break;
            }
            let s = &self.running[i];
            let wanted = s.tokens.len() - s.computed;
            let n = budget.allow(wanted);
            if n == 0 && wanted > 0 {
                i += 1; // its prompt continues next step
                continue;
            }
            let target = s.computed + n;
            loop {
                let grown = match self.running[i].table.as_mut() {
                    Some(t) => t.grow(target),
                    None => Ok(None),
                };
                match grown {
                    Ok(copy) => {
                        if let Some((src, dst)) = copy {
                            self.decoder.copy_block(src, dst)?;
                        }
                        plan.push((i, n));
                        budget.spend(n);
                        i += 1;
                        break;
                    }
                    Err(e) if self.make_room(e.needed) > 0 => {
                        // Idle sessions gave blocks back; try again.
                    }
                    Err(_) if self.running.len() > i + 1 => {
                        // Preempt the most recently admitted sequence (the last one).
                        if let Some(mut victim) = self.running.pop() {
                            victim.preempt();
                            self.waiting.push_front(victim);
                            report.preempted += 1;
                            self.stats.preemptions.fetch_add(1, Relaxed);
                        }
                    }
                    Err(_) if i > 0 => {
                        // It is itself the newest: it waits, recomputed later.
                        let mut s = self.running.remove(i);
                        s.preempt();
                        self.waiting.push_front(s);
                        report.preempted += 1;
                        self.stats.preemptions.fetch_add(1, Relaxed);
                        break;
                    }
                    Err(e) => {
                        // Alone and out of blocks: the pool cannot hold it any longer.
                        let s = self.running.remove(i);
                        let _ = super::super::outbox::deliver(
                            &s.updates,
                            Err(GenerationError::TooLarge {
                                reason: format!(
                                    "the sequence reached {} positions and the K/V cache cannot hold more ({e}); raise --kv-cache-memory or lower max_tokens",
                                    s.tokens.len()
                                ),
                            }),
                        );
                        self.retire(s, true);
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Gives `table` back to the first waiting sequence, which was not admitted this step.
    fn park_front(&mut self, table: BlockTable) {
        if let Some(s) = self.waiting.front_mut() {
            s.table = Some(table);
        }
    }

    /// Admits waiting sequences in order while the budget lasts and the blocks for their whole
    /// prompt are free (so admitting never forces a preemption).
    pub(super) fn admit_waiting(&mut self, budget: &mut StepBudget, plan: &mut Vec<(usize, usize)>) {
        while budget.tokens > 0 && self.running.len() < self.limits.max_running {
            let Some(s) = self.waiting.front_mut() else { break };
            // A session turn brings its kept blocks; anything else looks for cached prefix blocks.
            let (mut table, cached) = match s.table.take() {
                Some(t) => (t, s.computed),
                None => {
                    let t = self.pool.lookup_prefix(&s.tokens);
                    let len = t.len();
                    (t, len)
                }
            };
            let positions = s.tokens.len();
            // Programs that cannot append recompute the whole history, in one chunk.
            let from_zero = self.decoder.prefill_from_zero_only();
            let cached = if from_zero && cached > 0 {
                self.stats.recomputed_tokens.fetch_add(cached as u64, Relaxed);
                0
            } else {
                cached
            };
            let needed = table.blocks_needed(positions);
            if needed > self.pool.available() {
                self.make_room(needed);
            }
            if needed > self.pool.available() && self.running.is_empty() && plan.is_empty() {
                // Blocks held by turns still waiting behind this one go back (they recompute).
                for w in self.waiting.iter_mut().skip(1) {
                    w.table = None;
                    w.computed = 0;
                }
            }
            if needed > self.pool.available() {
                if self.running.is_empty() && plan.is_empty() {
                    // Cannot happen for prompts within the context limit; refuse rather than stall.
                    drop(table);
                    if let Some(mut s) = self.waiting.pop_front() {
                        self.left_queue += usize::from(!s.started);
                        let _ = super::super::outbox::deliver(
                            &s.updates,
                            Err(GenerationError::TooLarge {
                                reason: format!(
                                    "{positions} positions need {needed} K/V blocks and the cache has {}; raise --kv-cache-memory",
                                    self.pool.num_blocks()
                                ),
                            }),
                        );
                        s.started = true;
                        self.retire(s, false);
                    }
                    continue;
                }
                self.park_front(table);
                break;
            }
            let mut n = budget.allow(positions - cached);
            if n == 0 {
                // No prompt tokens left for this step while others decode: next step.
                self.park_front(table);
                break;
            }
            if from_zero && n < positions - cached {
                if !plan.is_empty() {
                    // Not enough budget left in this step for the whole history: next step.
                    self.park_front(table);
                    break;
                }
                n = positions - cached;
            }
            if table.grow(cached + n).is_err() {
                self.park_front(table);
                break;
            }
            let Some(mut s) = self.waiting.pop_front() else { break };
            if s.preemptions == 0 && !s.started {
                self.stats.prefix_cached_tokens.fetch_add(cached as u64, Relaxed);
                s.reused = cached;
            }
            self.left_queue += usize::from(!s.started);
            s.started = true;
            s.computed = cached;
            s.table = Some(table);
            self.running.push(s);
            plan.push((self.running.len() - 1, n));
            budget.spend(n);
        }
    }
}
