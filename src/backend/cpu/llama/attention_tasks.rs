//! How the attention of a step's rows is shared among threads: rows of one sequence form tasks of
//! up to [`TASK_ROWS`] rows (each K/V row read once per task); many tasks of similar weight (a
//! prefill, a batch of decodes) are spread over threads whole, and a task that would otherwise
//! leave threads idle or outweighs the others (a kept session's 17-row turn over a long history,
//! one long decode) has its items — one per K/V head and history partition — spread over the
//! threads and merged on the calling thread. The results do not depend on the split (see
//! [`super::attention`]).

use super::attention::{AttentionShape, AttnScratch, SeqQueries, attend_items, attend_rows};
use super::attention_merge::merge;
use super::kv_pool::KvPool;
use crate::backend::generative::SeqChunk;

/// Query rows × attended positions × heads below which attention runs on the calling thread.
const PARALLEL_ATTENTION_MIN: usize = 4096;

/// Query rows × attended positions × heads below which one task is not split among threads.
const SPLIT_TASK_MIN: usize = 1 << 16;

/// Most rows of one sequence whose attention runs as one task (bounds the scores scratch).
const TASK_ROWS: usize = 16;

/// Attention of every row (`rows`: absolute position and chunk index; queries in `qkv`, rows
/// `qkv_w` apart) into `out` (`heads * head_dim` per row), with up to `threads` threads, one
/// scratch each.
#[allow(clippy::too_many_arguments)]
pub fn attention_rows(
    pool: &KvPool,
    layer: usize,
    shape: AttentionShape,
    qkv: &[f32],
    qkv_w: usize,
    rows: &[(usize, usize)],
    chunks: &[SeqChunk<'_>],
    scratch: &mut [AttnScratch],
    out: &mut [f32],
    threads: usize,
) {
    let q_dim = shape.heads * shape.head_dim;
    let work: usize = rows.iter().map(|&(p, _)| p + 1).sum();
    let t = threads.min(scratch.len()).max(1);
    let t = if work * shape.heads < PARALLEL_ATTENTION_MIN { 1 } else { t };
    let positions: Vec<usize> = rows.iter().map(|&(p, _)| p).collect();
    let positions = &positions[..];
    // Tasks: runs of rows of one chunk, at most TASK_ROWS.
    let mut tasks: Vec<std::ops::Range<usize>> = Vec::new();
    let mut r = 0;
    while r < rows.len() {
        let c = rows[r].1;
        let end = r + rows[r..].iter().take_while(|row| row.1 == c).count();
        tasks.extend((r..end).step_by(TASK_ROWS).map(|s| s..(s + TASK_ROWS).min(end)));
        r = end;
    }
    let queries = |task: &std::ops::Range<usize>| SeqQueries {
        q: &qkv[task.start * qkv_w..],
        stride: qkv_w,
        positions: &positions[task.clone()],
        blocks: chunks[rows[task.start].1].blocks,
    };
    let run = |tasks: &[std::ops::Range<usize>], out: &mut [f32], scratch: &mut AttnScratch| {
        let Some(first) = tasks.first().map(|t| t.start) else { return };
        for task in tasks {
            let o = &mut out[(task.start - first) * q_dim..(task.end - first) * q_dim];
            attend_rows(pool, layer, shape, queries(task), scratch, o);
        }
    };
    let Some((mine, others)) = scratch.split_first_mut() else { return };
    if t == 1 {
        run(&tasks, out, mine);
        return;
    }
    // Many tasks: whole tasks per thread, balanced by attended positions (later rows of a
    // prefill attend further) — unless one task outweighs the rest (a 17-row turn is a 16-row
    // task and a 1-row one): then each large task's items are spread as below.
    let task_work = |task: &std::ops::Range<usize>| positions[task.clone()].iter().map(|p| p + 1).sum::<usize>();
    let per = work.div_ceil(t);
    let mut cuts = vec![0usize];
    let mut acc = 0;
    for (i, task) in tasks.iter().enumerate() {
        acc += task_work(task);
        if acc >= per * cuts.len() && cuts.len() < t {
            cuts.push(i + 1);
        }
    }
    cuts.push(tasks.len());
    cuts.dedup();
    let heaviest = cuts.windows(2).map(|w| tasks[w[0]..w[1]].iter().map(task_work).sum::<usize>()).max().unwrap_or(0);
    if tasks.len() < t || 2 * heaviest > 3 * per {
        // Few tasks: each large one's items spread over the threads.
        for task in &tasks {
            let o = &mut out[task.start * q_dim..task.end * q_dim];
            if task_work(task) * shape.heads < SPLIT_TASK_MIN {
                attend_rows(pool, layer, shape, queries(task), mine, o);
            } else {
                split_task(pool, layer, shape, queries(task), mine, others, o);
            }
        }
        return;
    }
    // Helpers come from the process's rayon pool (no thread is started per layer); the calling
    // thread runs the first part itself.
    rayon::in_place_scope(|s| {
        let mut rest = out;
        let mut first_part = None;
        let mut helpers = others.iter_mut();
        for w in cuts.windows(2) {
            let part = &tasks[w[0]..w[1]];
            let rows_in = part.last().map_or(0, |l| l.end) - part.first().map_or(0, |f| f.start);
            let (dst, tail) = rest.split_at_mut(rows_in * q_dim);
            rest = tail;
            if w[0] == 0 {
                first_part = Some((part, dst));
            } else if let Some(buf) = helpers.next() {
                let run = &run;
                s.spawn(move |_| run(part, dst, buf));
            }
        }
        if let Some((part, dst)) = first_part {
            run(part, dst, mine);
        }
    });
}

/// One task's items spread over `1 + others.len()` threads (contiguous runs of items), then
/// merged on the calling thread.
fn split_task(
    pool: &KvPool,
    layer: usize,
    shape: AttentionShape,
    rows: SeqQueries<'_>,
    mine: &mut AttnScratch,
    others: &mut [AttnScratch],
    out: &mut [f32],
) {
    let items = shape.kv_heads * rows.parts();
    let item_len = shape.item_len(rows.positions.len());
    let mut partials = std::mem::take(&mut mine.partials);
    if partials.len() < items * item_len {
        partials.resize(items * item_len, 0.0);
    }
    let t = (1 + others.len()).min(items);
    rayon::in_place_scope(|s| {
        let mut rest = &mut partials[..items * item_len];
        let mut helpers = others.iter_mut();
        let mut first = None;
        for k in 0..t {
            let range = k * items / t..(k + 1) * items / t;
            let (dst, tail) = rest.split_at_mut(range.len() * item_len);
            rest = tail;
            if k == 0 {
                first = Some((range, dst));
            } else if let Some(scratch) = helpers.next() {
                s.spawn(move |_| attend_items(pool, layer, shape, rows, range, scratch, dst));
            }
        }
        if let Some((range, dst)) = first {
            attend_items(pool, layer, shape, rows, range, mine, dst);
        }
    });
    merge(shape, rows.positions, &partials[..items * item_len], out);
    mine.partials = partials;
}
