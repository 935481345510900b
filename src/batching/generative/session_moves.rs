//! Moving generative sessions: listing, export (the session leaves this worker as a
//! [`SessionBlob`]) and import (a blob from a worker serving the same weights continues here), run
//! on the step-loop thread that owns the session's blocks.
//!
//! A generative session travels in the one session blob format. Its state tensors, in order:
//! 1. `UINT32 [n]`: the token history (prompts and generated tokens);
//! 2. `UINT64 [2]`: positions whose K/V travel with it, and the block size they are laid out in;
//! 3. `UINT8 [m]`: those K/V blocks as the decoder's `read_blocks` writes them (per block, per
//!    layer, K then V, f32 little-endian);
//! 4. `UINT8 [32]`: the digest of the weights that computed them.
//!
//! The blob's `steps` is the session's turn count. Importing into a decoder whose weights digest
//! differs is refused (its K/V would be another model's); a blob whose parts disagree is refused
//! before anything is loaded. When the pool has no room for the K/V, the session is imported with
//! its tokens only and recomputes on its next turn (still exact).

use std::time::Duration;

use tokio::sync::oneshot;

use super::kv_blocks::BlockPool;
use super::session::KeptSession;
use super::step::Engine;
use crate::backend::generative::{DecoderInstance, DecoderShape, KvDtype};
use crate::sessions::{SequenceId, SessionBlob, SessionInfo};
use crate::tensor::{DataType, Tensor};

/// Why a session could not be moved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoveError {
    /// No open session with that id on this worker.
    #[error("no session {id} on this worker")]
    NotFound {
        /// The id.
        id: SequenceId,
    },
    /// A turn of the session is queued or running.
    #[error("session {id} has a turn queued or running; export it between turns")]
    Busy {
        /// The id.
        id: SequenceId,
    },
    /// The blob cannot be continued here.
    #[error("{reason}")]
    BadBlob {
        /// What is wrong.
        reason: String,
    },
    /// An import whose id is already open here, or that does not fit the session bound.
    #[error("{reason}")]
    Refused {
        /// Why.
        reason: String,
    },
    /// The decoder failed to read or write the blocks.
    #[error("{reason}")]
    Backend {
        /// What the decoder said.
        reason: String,
    },
}

/// A session operation for a step-loop thread.
#[derive(Debug)]
pub enum SessionCommand {
    /// Lists the thread's open sessions.
    List {
        /// Model name and version to report.
        model: (String, i64),
        /// Where the list goes.
        reply: oneshot::Sender<Vec<SessionInfo>>,
    },
    /// Takes an idle session out as a blob.
    Export {
        /// The session.
        id: SequenceId,
        /// Model name and version written into the blob.
        model: (String, i64),
        /// The blob, or why not.
        reply: oneshot::Sender<Result<SessionBlob, MoveError>>,
    },
    /// Opens a session from a blob.
    Import {
        /// The blob (model and version already checked by the caller).
        blob: SessionBlob,
        /// Done, or why not.
        reply: oneshot::Sender<Result<(), MoveError>>,
    },
}

fn tensor(dtype: DataType, shape: Vec<usize>, data: Vec<u8>) -> Tensor {
    Tensor { dtype, shape, data }
}

/// Runs `cmd` on `engine`'s thread.
pub fn run(engine: &mut Engine, cmd: SessionCommand) {
    match cmd {
        SessionCommand::List { model, reply } => {
            let list = engine
                .sessions()
                .iter()
                .map(|(id, s)| SessionInfo {
                    model: model.0.clone(),
                    version: model.1,
                    id: id.clone(),
                    steps: s.turns,
                    live: s.stored.is_none(),
                    idle: s.idle_since.map_or(Duration::ZERO, |t| t.elapsed()),
                })
                .collect();
            let _ = reply.send(list);
        }
        SessionCommand::Export { id, model, reply } => {
            let exported = export(engine, id.clone(), model);
            if exported.is_ok() {
                // It leaves the fleet's store too (with leases).
                let _ = engine.fleet_adopt(&id, false);
            }
            let _ = reply.send(exported);
        }
        SessionCommand::Import { blob, reply } => {
            let id = blob.id.clone();
            let mut imported = import(engine, blob);
            if imported.is_ok()
                && let Err(reason) = engine.fleet_adopt(&id, true)
            {
                let _ = engine.sessions_mut().0.take_idle(&id);
                imported = Err(MoveError::Refused { reason });
            }
            let _ = reply.send(imported);
        }
    }
}

fn export(engine: &mut Engine, id: SequenceId, model: (String, i64)) -> Result<SessionBlob, MoveError> {
    let durable = engine.durable().cloned();
    let (sessions, decoder, pool) = engine.sessions_mut();
    let block_size = pool.block_size();
    let session = sessions.take_idle(&id).map_err(|busy| match busy {
        true => MoveError::Busy { id: id.clone() },
        false => MoveError::NotFound { id: id.clone() },
    })?;
    // A session whose blocks were released to the store travels as the store holds it.
    if session.stored.is_some()
        && let Some(d) = durable
        && let Ok(Some(blob)) = d.store.take(&d.model, d.version, &id)
        && blob.steps == session.turns
    {
        return Ok(SessionBlob { model: model.0, version: model.1, ..blob });
    }
    Ok(blob_of(decoder, block_size, id, &session, model, true))
}

/// The blob of `session` (`with_kv`: its resident K/V travel with it; otherwise, or when the
/// decoder cannot read them, its tokens only, and the next turn recomputes).
pub(super) fn blob_of(
    decoder: &mut dyn DecoderInstance,
    block_size: usize,
    id: SequenceId,
    session: &KeptSession,
    model: (String, i64),
    with_kv: bool,
) -> SessionBlob {
    let (computed, kv) = match &session.table {
        Some(t) if with_kv && session.computed > 0 => {
            let blocks = &t.ids()[..session.computed.div_ceil(block_size).min(t.ids().len())];
            match decoder.read_blocks(blocks) {
                Ok(kv) => (session.computed, kv),
                Err(_) => (0, Vec::new()), // tokens only: the next turn recomputes
            }
        }
        _ => (0, Vec::new()),
    };
    let digest = decoder.weights_digest();
    let tokens: Vec<u8> = session.tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    // Meta: positions with K/V, block size, and (f16 caches only: an f32 blob keeps the two-word
    // layout older workers read) the K/V element type.
    let dtype = decoder.shape().kv_dtype;
    let mut words = vec![computed as u64, block_size as u64];
    if dtype != KvDtype::F32 {
        words.push(dtype.code());
    }
    let meta: Vec<u8> = words.iter().flat_map(|v| v.to_le_bytes()).collect();
    let kv_len = kv.len();
    SessionBlob {
        model: model.0,
        version: model.1,
        id,
        steps: session.turns,
        state: vec![
            tensor(DataType::Uint32, vec![session.tokens.len()], tokens),
            tensor(DataType::Uint64, vec![words.len()], meta),
            tensor(DataType::Uint8, vec![kv_len], kv),
            tensor(DataType::Uint8, vec![32], digest.to_vec()),
        ],
    }
}

/// The parts of a generative session blob, checked against this decoder.
pub(super) struct Parts<'a> {
    /// The token history.
    pub tokens: Vec<u32>,
    /// Positions whose K/V travel in `kv`.
    pub computed: usize,
    /// The K/V bytes.
    pub kv: &'a [u8],
}

/// Checks `blob` against `decoder` (weights digest, layout, vocabulary) and splits it.
pub(super) fn check_blob<'a>(
    decoder: &dyn DecoderInstance,
    block_size: usize,
    blob: &'a SessionBlob,
) -> Result<Parts<'a>, String> {
    let shape = decoder.shape();
    let p = parts(blob, decoder.weights_digest(), block_size, shape)?;
    if p.tokens.iter().any(|&t| t as usize >= shape.vocab) {
        return Err("the blob's tokens are outside this model's vocabulary".into());
    }
    Ok(p)
}

/// A kept session from checked blob parts; its K/V are written into fresh blocks when the pool
/// has room for them (make room first), otherwise it keeps its tokens only (still exact).
pub(super) fn load_parts(
    decoder: &mut dyn DecoderInstance,
    pool: &BlockPool,
    p: Parts<'_>,
    turns: u64,
) -> Result<KeptSession, MoveError> {
    let (computed, kv) = (p.computed, p.kv);
    let mut session = KeptSession { tokens: p.tokens, turns, ..KeptSession::default() };
    if computed > 0 {
        let mut table = pool.table();
        if table.grow(computed).is_ok() {
            decoder.write_blocks(table.ids(), kv).map_err(|e| MoveError::Backend { reason: e.to_string() })?;
            table.register_full_blocks(&session.tokens, computed);
            session.table = Some(table);
            session.computed = computed;
        }
    }
    Ok(session)
}

fn parts<'a>(
    blob: &'a SessionBlob,
    digest: [u8; 32],
    block_size: usize,
    shape: &DecoderShape,
) -> Result<Parts<'a>, String> {
    let [tokens, meta, kv, their_digest] = blob.state.as_slice() else {
        return Err(format!(
            "a generative session blob holds 4 state tensors (tokens, meta, K/V, digest); this one holds {} \
             (is it from a sequence model?)",
            blob.state.len()
        ));
    };
    if their_digest.data.as_ref() != digest {
        return Err("the session was computed by different weights (the weights digest differs): it can only \
                    continue on a worker serving the same model files"
            .into());
    }
    if tokens.dtype != DataType::Uint32 || meta.dtype != DataType::Uint64 || !matches!(meta.data.len(), 16 | 24) {
        return Err("the blob's token or meta tensor has the wrong type".into());
    }
    let tokens: Vec<u32> = tokens.data.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&meta.data[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    let (computed, their_block) = (word(0) as usize, word(1) as usize);
    if computed > tokens.len() {
        return Err(format!("the blob says {computed} positions have K/V but holds {} tokens", tokens.len()));
    }
    let code = if meta.data.len() == 24 { word(2) } else { KvDtype::F32.code() };
    let their_dtype = KvDtype::from_code(code)
        .ok_or_else(|| format!("the blob's K/V element type (code {code}) is not one this worker knows"))?;
    if computed > 0 && their_dtype != shape.kv_dtype {
        // Other K/V precision (another `kv_cache_dtype`): the tokens are the truth; the next turn
        // recomputes the K/V in this model's precision.
        tracing::info!(
            session = %blob.id,
            blob = their_dtype.name(),
            model = shape.kv_dtype.name(),
            "session blob K/V dropped: other element type; its positions are recomputed"
        );
        return Ok(Parts { tokens, computed: 0, kv: &[] });
    }
    let block_bytes = shape.kv_block_bytes(block_size);
    if computed > 0 && their_block != block_size {
        return Err(format!("the blob's K/V uses {their_block}-token blocks; this model uses {block_size}"));
    }
    let expected = computed.div_ceil(block_size.max(1)) * block_bytes;
    if kv.data.len() != expected {
        return Err(format!("the blob holds {} K/V bytes; {computed} positions need {expected}", kv.data.len()));
    }
    Ok(Parts { tokens, computed, kv: &kv.data })
}

fn import(engine: &mut Engine, blob: SessionBlob) -> Result<(), MoveError> {
    let block_size = engine.pool().block_size();
    let (sessions, decoder, _) = engine.sessions_mut();
    if sessions.get(&blob.id).is_some() {
        return Err(MoveError::Refused { reason: format!("session {} is already open on this worker", blob.id) });
    }
    let p = check_blob(decoder, block_size, &blob).map_err(|reason| MoveError::BadBlob { reason })?;
    let needed = p.computed.div_ceil(block_size);
    if engine.pool().available() < needed {
        engine.make_room(needed);
    }
    let (sessions, decoder, pool) = engine.sessions_mut();
    let session = load_parts(decoder, pool, p, blob.steps)?;
    let id = blob.id.clone();
    sessions.insert(id, session).map_err(|e| MoveError::Refused { reason: e.to_string() })
}
