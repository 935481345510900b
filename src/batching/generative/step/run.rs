//! One step's forward and what follows it: the chunks of the plan run through the decoder (or its
//! on-device greedy picks), then each sequence that reached its last token samples, accepts the
//! token, streams its update, and the statistics move.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use super::super::request::{FinishReason, PositionLogprobs};
use super::super::sampler::{self, RankedLogprob};
use super::Engine;
use crate::backend::BackendError;
use crate::backend::generative::{LogitsWanted, SeqChunk};

impl Engine {
    /// Runs the forward of `plan`, then samples and sends updates.
    pub(super) fn run(&mut self, plan: &[(usize, usize)]) -> Result<(), BackendError> {
        let mut chunks = Vec::with_capacity(plan.len());
        for &(i, n) in plan {
            let s = &self.running[i];
            let end = s.computed + n;
            chunks.push(SeqChunk {
                tokens: &s.tokens[s.computed..end],
                start: s.computed,
                blocks: s.table.as_ref().map_or(&[][..], |t| t.ids()),
                logits: if end == s.tokens.len() { LogitsWanted::Last } else { LogitsWanted::None },
            });
        }
        self.logits.clear();
        let wanted: Vec<bool> = chunks.iter().map(|c| c.logits == LogitsWanted::Last).collect();
        // Greedy rows without top-logprobs can take their token from the device (no logits out).
        let on_device = self.decoder.greedy_on_device()
            && plan.iter().zip(&wanted).all(|(&(i, _), &w)| {
                let p = &self.running[i].params;
                !w || (p.is_greedy() && p.logprobs.is_none())
            });
        self.picked.clear();
        // The previous step's updates leave now, as the thread is about to wait for the device:
        // waking the delivery thread here costs the step loop nothing it would otherwise do (it does
        // not preempt the step loop: see `delivery_thread`).
        super::super::outbox::flush();
        if on_device {
            self.decoder.forward_greedy(&chunks, &mut self.picked)?;
        } else {
            self.decoder.forward(&chunks, &mut self.logits)?;
        }
        drop(chunks);
        let vocab = self.decoder.shape().vocab;
        let rows = wanted.iter().filter(|&&w| w).count();
        if on_device && self.picked.len() != rows {
            return Err(BackendError::Execution {
                message: format!(
                    "decoder returned {} device-sampled tokens for {rows} rows; the decoder implementation is inconsistent",
                    self.picked.len()
                ),
                instance_usable: false,
                nrt_status: None,
            });
        }
        if !on_device && self.logits.len() != rows * vocab {
            return Err(BackendError::Execution {
                message: format!(
                    "decoder returned {} logits for {rows} rows of {vocab}; the decoder implementation is inconsistent",
                    self.logits.len()
                ),
                instance_usable: false,
                nrt_status: None,
            });
        }
        let now = Instant::now();
        let mut row = 0;
        for (&(i, n), wants) in plan.iter().zip(wanted) {
            let s = &mut self.running[i];
            s.computed += n;
            if let Some(t) = s.table.as_mut() {
                t.register_full_blocks(&s.tokens, s.computed);
            }
            if !wants {
                continue;
            }
            let (sampled, top) = if on_device {
                let (token, logprob) = self.picked[row];
                self.stats.device_sampled_tokens.fetch_add(1, Relaxed);
                (sampler::Sampled { token, logprob }, None)
            } else {
                let logits = &self.logits[row * vocab..(row + 1) * vocab];
                let position = s.tokens.len();
                let sampled = sampler::sample(logits, &s.params, s.seed, position, &mut self.scratch);
                let top = s.params.logprobs.map(|k| {
                    let (top, rank) = sampler::top_logprobs(logits, sampled.token, k, self.scratch.candidates());
                    PositionLogprobs {
                        chosen: RankedLogprob { token: sampled.token, logprob: sampled.logprob, rank },
                        top,
                    }
                });
                (sampled, top)
            };
            row += 1;
            let accepted = s.accept(sampled, top, &self.rules, &self.text, now);
            self.stats.generated_tokens.fetch_add(1, Relaxed);
            if let Some(t) = accepted.first_token_s {
                self.stats.time_to_first_token.observe(t);
            }
            if let Some(t) = accepted.inter_token_s {
                self.stats.inter_token_latency.observe(t);
            }
            if accepted.client_gone {
                self.stats.cancelled.fetch_add(1, Relaxed);
            }
            match accepted.finished {
                Some(FinishReason::Stop) => self.stats.finished_stop.fetch_add(1, Relaxed),
                Some(FinishReason::Length) => self.stats.finished_length.fetch_add(1, Relaxed),
                Some(FinishReason::Abort) | None => 0,
            };
        }
        Ok(())
    }
}
