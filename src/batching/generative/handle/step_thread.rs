//! The instance thread of a generative model: its step loop, the commands it takes, and the
//! hand-over of its sequences to the other instances when it fails.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::{AcqRel, Release};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, Mutex};

use super::super::request::GenerationError;
use super::super::session_tiers::SaveReason;
use super::super::step::Engine;
use super::{Command, InstanceLink, least_loaded};
use crate::batching::admission::Admission;

/// What an instance thread needs besides its engine.
pub(super) struct ThreadContext {
    pub(super) rx: mpsc::Receiver<Command>,
    pub(super) load: Arc<AtomicUsize>,
    pub(super) alive: Arc<AtomicBool>,
    pub(super) admission: Arc<Admission>,
    pub(super) in_service: Arc<AtomicUsize>,
    /// Every instance's link (this one is `index`), to hand sequences over when this one fails.
    pub(super) peers: Arc<Mutex<Vec<InstanceLink>>>,
    pub(super) index: usize,
}

/// Sends `cmd` to the least loaded other instance still in service; gives it back when there is
/// none.
fn to_peer(ctx: &ThreadContext, cmd: Command) -> Option<Command> {
    let Ok(peers) = ctx.peers.lock() else { return Some(cmd) };
    let Some((_, target)) = least_loaded(&peers, Some(ctx.index)) else { return Some(cmd) };
    target.load.fetch_add(1, AcqRel);
    match target.sender.send(cmd) {
        Ok(()) => None,
        Err(e) => {
            target.load.fetch_sub(1, AcqRel);
            Some(e.0)
        }
    }
}

/// Moves this instance's stateless sequences to other instances still in service; returns how
/// many moved (the caller fails the rest).
fn hand_over(engine: &mut Engine, ctx: &ThreadContext) -> usize {
    let mut moved = 0;
    for seq in engine.take_movable() {
        match to_peer(ctx, Command::Resume(seq)) {
            None => moved += 1,
            Some(Command::Resume(seq)) => engine.resume(seq),
            Some(_) => {}
        }
    }
    moved
}

fn take(engine: &mut Engine, cmd: Command) {
    match cmd {
        Command::Generate(req) => engine.add(req),
        Command::Session(cmd) => super::super::session_moves::run(engine, cmd),
        Command::Resume(seq) => engine.resume(seq),
        Command::Fleet(ev) => engine.fleet_event(ev),
        Command::CutShort => {
            let cut = engine.cut_short();
            if cut > 0 {
                tracing::warn!(instance = %engine.label(), generations = cut, "exit deadline near: generations cut short (finish reason abort)");
            }
        }
    }
}

/// How often a step loop looks for sessions idle long enough to go to the store.
fn idle_check_every(engine: &Engine) -> Option<std::time::Duration> {
    let age = engine.sessions().limits().store_after_idle?;
    engine.durable()?;
    Some((age / 4).clamp(std::time::Duration::from_millis(10), std::time::Duration::from_secs(1)))
}

/// The instance thread: take requests, step while there is work, block when idle (waking up to
/// write long-idle sessions to the store), end when the handle is gone and the work is done.
pub(super) fn step_loop(mut engine: Engine, ctx: ThreadContext) {
    let mut open = true;
    let check_every = idle_check_every(&engine);
    let mut last_check = std::time::Instant::now();
    // Whether the last step ran a forward: the next one then flushes the outbox itself, right
    // before its execution (`Engine::run`).
    let mut forwarded = false;
    loop {
        // What the last step (or command) sent leaves now when no execution is about to: before a
        // wait, or after a step that ran nothing.
        if !forwarded || engine.is_idle() {
            super::super::outbox::flush();
        }
        if let Some(every) = check_every
            && last_check.elapsed() >= every
        {
            last_check = std::time::Instant::now();
            engine.store_long_idle();
        }
        if engine.is_idle() {
            if !open {
                // Turns still writing their tokens through are answered first (their sessions'
                // next turns may then run).
                if engine.settle_writes() {
                    continue;
                }
                return engine.save_sessions_for(SaveReason::Drain);
            }
            let received = match check_every {
                Some(every) if engine.has_idle_to_store() => match ctx.rx.recv_timeout(every) {
                    Ok(cmd) => Some(cmd),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        open = false;
                        continue;
                    }
                },
                _ => match ctx.rx.recv() {
                    Ok(cmd) => Some(cmd),
                    Err(_) => {
                        open = false;
                        continue;
                    }
                },
            };
            if let Some(cmd) = received {
                take(&mut engine, cmd);
            }
            if engine.is_idle() {
                continue;
            }
        }
        while open {
            match ctx.rx.try_recv() {
                Ok(cmd) => take(&mut engine, cmd),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        // Turns whose write through ended are answered (also while draining, when no wake-up
        // reaches this loop).
        engine.turns_written();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.step()));
        forwarded = matches!(result, Ok(Ok(report)) if report.tokens > 0);
        ctx.admission.dequeued(engine.take_left_queue());
        let (waiting, running) = engine.load();
        ctx.load.store(waiting + running, Release);
        let fatal = match result {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => match &e {
                crate::backend::BackendError::Execution { instance_usable: true, .. } => {
                    tracing::warn!(model = %ctx.admission.spec.name, instance = %engine.label(), error = %e, "generation step failed");
                    None
                }
                _ => Some(e.to_string()),
            },
            Err(_) => Some("the instance panicked".to_string()),
        };
        if let Some(reason) = fatal {
            tracing::error!(model = %ctx.admission.spec.name, instance = %engine.label(), %reason, "generative instance leaves service");
            ctx.alive.store(false, Release);
            let left = ctx.in_service.fetch_sub(1, AcqRel).saturating_sub(1);
            ctx.admission.set_in_service(left);
            engine.save_sessions_for(SaveReason::InstanceFailed);
            let moved = hand_over(&mut engine, &ctx);
            if moved > 0 {
                tracing::warn!(model = %ctx.admission.spec.name, instance = %engine.label(), moved, "sequences continue on another instance");
            }
            // Answer what is still queued to this instance, then stop.
            while let Ok(cmd) = ctx.rx.try_recv() {
                // Stateless requests and moved sequences go on to another instance.
                let cmd = match cmd {
                    Command::Generate(req) if req.session.is_none() => match to_peer(&ctx, Command::Generate(req)) {
                        None => continue,
                        Some(cmd) => cmd,
                    },
                    Command::Resume(seq) => match to_peer(&ctx, Command::Resume(seq)) {
                        None => continue,
                        Some(Command::Resume(seq)) => {
                            engine.resume(seq);
                            continue;
                        }
                        Some(cmd) => cmd,
                    },
                    other => other,
                };
                if let Command::Generate(req) = cmd {
                    ctx.admission.dequeued(1);
                    let _ = super::super::outbox::deliver(
                        &req.updates,
                        Err(GenerationError::Unavailable {
                            reason: format!("instance {} failed: {reason}", engine.label()),
                        }),
                    );
                }
            }
            engine.fail_all(GenerationError::Unavailable {
                reason: format!("instance {} failed: {reason}", engine.label()),
            });
            ctx.admission.dequeued(engine.take_left_queue());
            return;
        }
    }
}
