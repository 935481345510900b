//! Sequences that outlive their instance: when a decoder instance leaves service (its NeuronCore
//! reported a fatal status, or it panicked), its stateless sequences — running or waiting — move
//! to the least loaded instance still in service and continue there. Their K/V died with the
//! instance, so the new instance recomputes it from the tokens (prompt plus what was generated);
//! sampling is a function of (seed, position) and the decoders are batch-invariant, so the
//! continuation is the one the failed instance would have produced. What the client was already
//! sent is not sent again.
//!
//! Session turns do not move this way: the failed instance writes its sessions to the store
//! (when there is one) and the client retries the turn, which continues on another instance.

use std::time::Instant;

use super::deferred_text::SeqText;
use super::params::SamplingParams;
use super::request::UpdateSender;
use super::sequence::Sequence;

/// A sequence on its way to another instance: everything but its K/V blocks.
#[derive(Debug)]
pub struct MovedSequence {
    tokens: Vec<u32>,
    prompt_len: usize,
    params: SamplingParams,
    seed: u64,
    updates: UpdateSender,
    arrived: Instant,
    last_token_at: Option<Instant>,
    cumulative_logprob: f64,
    preemptions: u32,
    text: SeqText,
    started: bool,
    reused: usize,
}

impl MovedSequence {
    /// Whether `seq` can move to another instance (a stateless sequence still generating).
    pub fn movable(seq: &Sequence) -> bool {
        seq.session.is_none() && !seq.done
    }

    /// Takes `seq` off its instance (its blocks are dropped with it); see [`MovedSequence::movable`].
    pub fn from_sequence(seq: Sequence) -> MovedSequence {
        MovedSequence {
            tokens: seq.tokens,
            prompt_len: seq.prompt_len,
            params: seq.params,
            seed: seq.seed,
            updates: seq.updates,
            arrived: seq.arrived,
            last_token_at: seq.last_token_at,
            cumulative_logprob: seq.cumulative_logprob,
            preemptions: seq.preemptions + u32::from(seq.computed > 0),
            text: seq.text,
            started: seq.started,
            reused: seq.reused,
        }
    }

    /// Whether the sequence had left the model's queue (been admitted once) before it moved.
    pub fn started(&self) -> bool {
        self.started
    }

    /// The sequence on its new instance: waiting, no K/V yet.
    pub fn into_sequence(self) -> Sequence {
        Sequence {
            tokens: self.tokens,
            prompt_len: self.prompt_len,
            computed: 0,
            table: None,
            params: self.params,
            seed: self.seed,
            updates: self.updates,
            arrived: self.arrived,
            last_token_at: self.last_token_at,
            cumulative_logprob: self.cumulative_logprob,
            preemptions: self.preemptions,
            text: self.text,
            done: false,
            started: self.started,
            session: None,
            reused: self.reused,
            hold_final: false,
            held_final: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::handle::GenerativeSetup;
    use super::super::params::SamplingParams;
    use super::super::step::StepLimits;
    use super::super::testing::{EOS, FakeDecoder, direct, request, tokens_until_finished};
    use super::super::tokens::ByteTokenizer;
    use crate::backend::BackendError;
    use crate::backend::generative::{DecoderInstance, DecoderShape, SeqChunk};
    use crate::batching::Batcher;
    use crate::config::ModelSpec;
    use crate::config::generative::complete_config;
    use crate::proto::inference::ModelConfig;

    /// A fake decoder whose `fail_at`-th forward reports a fatal device status.
    struct Failing {
        inner: FakeDecoder,
        forwards: usize,
        fail_at: Option<usize>,
    }

    impl DecoderInstance for Failing {
        fn shape(&self) -> &DecoderShape {
            self.inner.shape()
        }
        fn num_blocks(&self) -> usize {
            self.inner.num_blocks()
        }
        fn forward(&mut self, chunks: &[SeqChunk<'_>], logits: &mut Vec<f32>) -> Result<(), BackendError> {
            self.forwards += 1;
            if self.fail_at == Some(self.forwards) {
                return Err(BackendError::Execution {
                    message: "injected: NRT_EXEC_HW_ERR_HBM_UE".into(),
                    instance_usable: false,
                    nrt_status: Some(1201),
                });
            }
            self.inner.forward(chunks, logits)
        }
        fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), BackendError> {
            self.inner.copy_block(src, dst)
        }
        fn read_blocks(&mut self, blocks: &[u32]) -> Result<Vec<u8>, BackendError> {
            self.inner.read_blocks(blocks)
        }
        fn write_blocks(&mut self, blocks: &[u32], bytes: &[u8]) -> Result<(), BackendError> {
            self.inner.write_blocks(blocks, bytes)
        }
        fn weights_digest(&self) -> [u8; 32] {
            self.inner.weights_digest()
        }
        fn label(&self) -> String {
            format!("failing:{:?}", self.fail_at)
        }
    }

    #[test]
    fn sequences_of_a_failed_instance_continue_on_another_with_the_same_tokens() {
        let mut cfg = ModelConfig { name: "fake".into(), ..Default::default() };
        complete_config(&mut cfg);
        let spec = ModelSpec::from_config(&cfg, "test").unwrap();
        let setup = GenerativeSetup {
            limits: StepLimits::default(),
            eos: vec![EOS],
            defaults: SamplingParams::default(),
            sessions: Default::default(),
            version: 1,
        };
        let decoders: Vec<Box<dyn DecoderInstance>> = vec![
            Box::new(Failing { inner: FakeDecoder::new(64, 4, 4096), forwards: 0, fail_at: Some(4) }),
            Box::new(Failing { inner: FakeDecoder::new(64, 4, 4096), forwards: 0, fail_at: None }),
        ];
        let batcher =
            Batcher::start_generative(Arc::new(spec), setup, decoders, Arc::new(ByteTokenizer), None).unwrap();
        let model = batcher.generative().unwrap().clone();
        let params = SamplingParams { max_tokens: 12, temperature: 0.8, top_k: 50, ..SamplingParams::default() };
        let prompts: Vec<Vec<u32>> = (0..6u32).map(|k| (0..7).map(|i| 97 + (i * 5 + k) % 26).collect()).collect();
        let mut rxs = Vec::new();
        for (k, p) in prompts.iter().enumerate() {
            let (req, rx) = request(p.clone(), params.clone(), k as u64);
            model.submit(req).unwrap();
            rxs.push(rx);
        }
        for (k, mut rx) in rxs.into_iter().enumerate() {
            let tokens = tokens_until_finished(&mut rx, k);
            assert_eq!(tokens, direct(&prompts[k], &params, k as u64).0, "request {k}");
        }
        let moved = model.stats().moved_sequences.load(std::sync::atomic::Ordering::Relaxed);
        assert!(moved >= 1, "the failed instance's sequences moved (moved = {moved})");
        assert_eq!(batcher.instances_in_service(), 1);
        model.drain();
    }
}
