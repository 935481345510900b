//! The stand-in's runtime state: loaded models, tensors, tensor sets and execution on host memory.
//!
//! Handles given to C are the addresses of `Arc`s held in registries here, so a stale or foreign
//! handle is detected (`NRT_INVALID_HANDLE`) instead of dereferenced. No lock is held while a
//! program runs, so executions on different models and cores proceed in parallel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::abi::*;
use crate::knobs::{ExecKind, Knobs};
use crate::neff::{self, TensorDecl};
use crate::program::Program;
pub use crate::tensor::Tensor;
use crate::tensor::{CoreMemory, Reservation, Storage};

/// Allocations of 4 GiB or more are refused (real libnrt overflows on them).
pub const MAX_TENSOR_BYTES: usize = (4usize << 30) - 1;

/// A loaded model.
#[derive(Debug)]
pub struct Model {
    /// Header name of the NEFF.
    pub name: String,
    /// First NeuronCore (relative to the visible ones).
    pub core: u32,
    /// Declared inputs.
    pub inputs: Vec<TensorDecl>,
    /// Declared outputs.
    pub outputs: Vec<TensorDecl>,
    program: Option<Program>,
}

impl Model {
    /// The kind of program the model runs, for the per-kind device-time knobs.
    pub fn exec_kind(&self) -> ExecKind {
        self.program.as_ref().map_or(ExecKind::Plain, Program::exec_kind)
    }
}

type TensorSet = Mutex<HashMap<String, Arc<Tensor>>>;

#[derive(Debug, Default)]
struct State {
    initialized: bool,
    closed: bool,
    knobs: Knobs,
    models: HashMap<usize, Arc<Model>>,
    tensors: HashMap<usize, Arc<Tensor>>,
    sets: HashMap<usize, Arc<TensorSet>>,
    next_core: u32,
    exec_counts: HashMap<u32, u64>,
    /// One lock per core, held through a whole execution when `serial_cores` is set.
    core_locks: HashMap<u32, Arc<Mutex<()>>>,
    exec_failed: bool,
    load_failed: bool,
    memory: Arc<CoreMemory>,
}

enum Injected {
    Hang,
    Status(NrtStatus),
}

/// One stand-in runtime. The C functions use [`global`]; tests may make private instances.
#[derive(Debug, Default)]
pub struct Runtime {
    state: Mutex<State>,
}

/// The process-wide runtime behind the exported C functions.
pub fn global() -> &'static Runtime {
    static GLOBAL: std::sync::OnceLock<Runtime> = std::sync::OnceLock::new();
    GLOBAL.get_or_init(Runtime::default)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn log(message: &str) {
    eprintln!("nrt-standin: {message}");
}

/// Appends `<name> core <core>` to the execution log (one `write` of an `O_APPEND` file, so lines
/// from concurrent executions do not interleave); a failure is reported on stderr.
fn append_exec_log(path: &std::path::Path, name: &str, core: u32) {
    use std::io::Write;
    let line = format!("{name} core {core}\n");
    let written =
        std::fs::OpenOptions::new().create(true).append(true).open(path).and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        log(&format!("cannot append to NRT_STANDIN_EXEC_LOG {}: {e}", path.display()));
    }
}

impl Runtime {
    fn ready(&self) -> Result<MutexGuard<'_, State>, NrtStatus> {
        let state = lock(&self.state);
        match (state.initialized, state.closed) {
            (true, _) => Ok(state),
            (false, true) => Err(NRT_CLOSED),
            (false, false) => Err(NRT_UNINITIALIZED),
        }
    }

    /// Initialises with `knobs`. A repeated call succeeds and keeps the first call's knobs.
    pub fn init(&self, knobs: Knobs) -> NrtStatus {
        let mut state = lock(&self.state);
        if !state.initialized {
            *state = State { initialized: true, knobs, ..State::default() };
        }
        NRT_SUCCESS
    }

    /// Replaces the knobs of an initialised runtime and resets the failure counters.
    pub fn set_knobs(&self, knobs: Knobs) {
        let mut state = lock(&self.state);
        state.knobs = knobs;
        state.exec_counts.clear();
        state.exec_failed = false;
        state.load_failed = false;
    }

    /// Releases everything; later calls return `NRT_CLOSED` until the next `init`.
    pub fn close(&self) {
        let mut state = lock(&self.state);
        *state = State { closed: true, ..State::default() };
    }

    /// Visible NeuronCores (from the knobs once initialised, else from the environment).
    pub fn visible_cores(&self) -> u32 {
        let state = lock(&self.state);
        if state.initialized { state.knobs.visible_cores } else { Knobs::from_env().visible_cores }
    }

    /// Loads a NEFF onto `nc_count` cores from `start_nc` (-1: runtime's choice / one core).
    pub fn load(&self, bytes: &[u8], start_nc: i32, nc_count: i32) -> Result<usize, NrtStatus> {
        let mut state = self.ready()?;
        let visible = state.knobs.visible_cores;
        let count = match nc_count {
            -1 => 1,
            n if n >= 1 => n as u32,
            n => {
                log(&format!("nrt_load: nc_count {n} is invalid"));
                return Err(NRT_INVALID);
            }
        };
        let core = match start_nc {
            -1 => {
                let core = state.next_core % visible.max(1);
                state.next_core = state.next_core.wrapping_add(count);
                core
            }
            n if n >= 0 => n as u32,
            n => {
                log(&format!("nrt_load: start_nc {n} is invalid"));
                return Err(NRT_INVALID);
            }
        };
        if u64::from(core) + u64::from(count) > u64::from(visible) {
            log(&format!("nrt_load: cores {core}..{} requested, {visible} visible", core + count));
            return Err(NRT_LOAD_NOT_ENOUGH_NC);
        }
        if let Some(status) = state.knobs.fail_load_status
            && !(state.knobs.fail_once && state.load_failed)
        {
            state.load_failed = true;
            log(&format!("nrt_load: injected failure {status} (NRT_STANDIN_FAIL_LOAD_STATUS)"));
            return Err(status);
        }
        drop(state);
        let parsed = neff::parse(bytes).map_err(|e| {
            log(&format!("nrt_load: cannot read NEFF: {e}"));
            NRT_INVALID
        })?;
        if parsed.version_major > 2 {
            log(&format!("nrt_load: NEFF version {} is newer than this runtime supports", parsed.version_major));
            return Err(NRT_UNSUPPORTED_NEFF_VERSION);
        }
        let program = if parsed.standin_files.contains_key(crate::program::PROGRAM_PATH) {
            let program = Program::load(&parsed.standin_files, &parsed.inputs, &parsed.outputs).map_err(|e| {
                log(&format!("nrt_load: model '{}': {}", parsed.name, e.message));
                e.status
            })?;
            Some(program)
        } else {
            None
        };
        let model =
            Arc::new(Model { name: parsed.name, core, inputs: parsed.inputs, outputs: parsed.outputs, program });
        let handle = Arc::as_ptr(&model) as usize;
        self.ready()?.models.insert(handle, model);
        Ok(handle)
    }

    /// Unloads a model.
    pub fn unload(&self, model: usize) -> NrtStatus {
        match self.ready() {
            Ok(mut state) => match state.models.remove(&model) {
                Some(_) => NRT_SUCCESS,
                None => NRT_INVALID_HANDLE,
            },
            Err(status) => status,
        }
    }

    /// The loaded model behind a handle.
    pub fn model(&self, model: usize) -> Result<Arc<Model>, NrtStatus> {
        self.ready()?.models.get(&model).cloned().ok_or(NRT_INVALID_HANDLE)
    }

    /// Allocates a tensor: `placement` DEVICE (on visible core `nc`, counted against the core's
    /// device memory), HOST, or VIRTUAL (empty).
    pub fn tensor_allocate(&self, placement: u32, nc: i32, size: usize, name: &str) -> Result<usize, NrtStatus> {
        let state = self.ready()?;
        let (visible, limit, memory) =
            (state.knobs.visible_cores, state.knobs.device_memory_bytes, Arc::clone(&state.memory));
        drop(state);
        let tensor = match placement {
            NRT_TENSOR_PLACEMENT_VIRTUAL => Tensor::new(name, None, Storage::Empty, None),
            NRT_TENSOR_PLACEMENT_DEVICE | NRT_TENSOR_PLACEMENT_HOST => {
                let device = placement == NRT_TENSOR_PLACEMENT_DEVICE;
                if device && !(0..visible as i64).contains(&i64::from(nc)) {
                    log(&format!("nrt_tensor_allocate '{name}': core {nc} is not visible ({visible} visible)"));
                    return Err(NRT_INVALID);
                }
                if size > MAX_TENSOR_BYTES {
                    log(&format!("nrt_tensor_allocate '{name}': {size} bytes (4 GiB or more) refused"));
                    return Err(NRT_INVALID);
                }
                let core = device.then_some(nc as u32);
                let reservation = match core {
                    Some(core) if memory.try_reserve(core, size as u64, limit) => {
                        Some(Reservation::new(memory, core, size as u64))
                    }
                    Some(core) => {
                        log(&format!(
                            "nrt_tensor_allocate '{name}': {size} bytes do not fit core {core} \
                             ({} of {limit} bytes in use, NRT_STANDIN_DEVICE_MEMORY_BYTES)",
                            memory.used(core)
                        ));
                        return Err(NRT_RESOURCE);
                    }
                    None => None,
                };
                let storage = Storage::zeroed(size).ok_or(NRT_FAIL_HOST_MEM_ALLOC)?;
                Tensor::new(name, core, storage, reservation)
            }
            other => {
                log(&format!("nrt_tensor_allocate '{name}': placement {other} is invalid"));
                return Err(NRT_INVALID);
            }
        };
        Ok(self.register_tensor(tensor))
    }

    /// Allocates a tensor with no memory (see [`Runtime::tensor_attach`]).
    pub fn tensor_allocate_empty(&self, name: &str) -> Result<usize, NrtStatus> {
        drop(self.ready()?);
        Ok(self.register_tensor(Tensor::new(name, None, Storage::Empty, None)))
    }

    fn register_tensor(&self, tensor: Tensor) -> usize {
        let tensor = Arc::new(tensor);
        let handle = Arc::as_ptr(&tensor) as usize;
        lock(&self.state).tensors.insert(handle, tensor);
        handle
    }

    /// Makes a tensor use a caller-owned buffer of `size` bytes at address `buffer`.
    pub fn tensor_attach(&self, tensor: usize, buffer: usize, size: usize) -> NrtStatus {
        match self.tensor(tensor) {
            Ok(t) => {
                t.attach(buffer, size);
                NRT_SUCCESS
            }
            Err(status) => status,
        }
    }

    /// The tensor behind a handle.
    pub fn tensor(&self, tensor: usize) -> Result<Arc<Tensor>, NrtStatus> {
        self.ready()?.tensors.get(&tensor).cloned().ok_or(NRT_INVALID_HANDLE)
    }

    /// `nrt_tensor_read` as the C API sees it: like [`Tensor::read`], but refused with
    /// `NRT_INVALID` (and a line on stderr) for tensors whose allocation name starts with the
    /// `NRT_STANDIN_DENY_READ_PREFIX` knob, so tests can prove such tensors never reach the host.
    pub fn host_read(&self, tensor: &Tensor, offset: usize, dst: &mut [u8]) -> NrtStatus {
        let denied = lock(&self.state).knobs.deny_read_prefix.clone();
        if let Some(prefix) = denied.filter(|p| tensor.name.starts_with(p.as_str())) {
            log(&format!("nrt_tensor_read '{}': refused (NRT_STANDIN_DENY_READ_PREFIX={prefix})", tensor.name));
            return NRT_INVALID;
        }
        tensor.read(offset, dst)
    }

    /// `nrt_tensor_write` as the C API sees it: like [`Tensor::write`], but refused with
    /// `NRT_INVALID` (and a line on stderr) for tensors whose allocation name starts with the
    /// `NRT_STANDIN_DENY_WRITE_PREFIX` knob, so tests can prove the host never writes such tensors
    /// (executions still write them).
    pub fn host_write(&self, tensor: &Tensor, offset: usize, src: &[u8]) -> NrtStatus {
        let denied = lock(&self.state).knobs.deny_write_prefix.clone();
        if let Some(prefix) = denied.filter(|p| tensor.name.starts_with(p.as_str())) {
            log(&format!("nrt_tensor_write '{}': refused (NRT_STANDIN_DENY_WRITE_PREFIX={prefix})", tensor.name));
            return NRT_INVALID;
        }
        tensor.write(offset, src)
    }

    /// `nrt_tensor_copy`: `size` bytes from `src` at `src_offset` to `dst` at `dst_offset`.
    /// Like the real runtime, two device tensors must be on the same core (else `NRT_INVALID`);
    /// out-of-range offsets give `NRT_INVALID`. A copy between a device tensor and host memory
    /// is a host access: the deny knobs apply to it (device-to-device copies are not).
    pub fn tensor_copy(&self, src: usize, src_offset: usize, dst: usize, dst_offset: usize, size: usize) -> NrtStatus {
        let (src, dst) = match (self.tensor(src), self.tensor(dst)) {
            (Ok(s), Ok(d)) => (s, d),
            (Err(e), _) | (_, Err(e)) => return e,
        };
        let knobs = lock(&self.state).knobs.clone();
        let denied = |prefix: &Option<String>, device: &Tensor, host: &Tensor| {
            host.core.is_none() && prefix.as_deref().is_some_and(|p| device.name.starts_with(p))
        };
        if denied(&knobs.deny_read_prefix, &src, &dst) || denied(&knobs.deny_write_prefix, &dst, &src) {
            log(&format!(
                "nrt_tensor_copy '{}' -> '{}': refused, a host transfer of a denied tensor \
                 (NRT_STANDIN_DENY_READ_PREFIX / NRT_STANDIN_DENY_WRITE_PREFIX)",
                src.name, dst.name
            ));
            return NRT_INVALID;
        }
        if let (Some(a), Some(b)) = (src.core, dst.core)
            && a != b
        {
            log(&format!(
                "nrt_tensor_copy '{}' (core {a}) -> '{}' (core {b}): device tensors must be on the same core",
                src.name, dst.name
            ));
            return NRT_INVALID;
        }
        let status = crate::tensor::copy(&src, src_offset, &dst, dst_offset, size);
        if status != NRT_SUCCESS {
            log(&format!(
                "nrt_tensor_copy '{}'[{src_offset}..+{size}] -> '{}'[{dst_offset}..]: out of range ({} and {} bytes)",
                src.name,
                dst.name,
                src.size(),
                dst.size()
            ));
        }
        status
    }

    /// `nrt_get_vnc_memory_stats`: bytes of device tensors allocated on `core` and the
    /// `NRT_STANDIN_DEVICE_MEMORY_BYTES` limit; `NRT_INVALID` for a core that is not visible.
    pub fn memory_stats(&self, core: u32) -> Result<(u64, u64), NrtStatus> {
        let state = self.ready()?;
        if core >= state.knobs.visible_cores {
            let visible = state.knobs.visible_cores;
            log(&format!("nrt_get_vnc_memory_stats: core {core} is not visible ({visible} visible)"));
            return Err(NRT_INVALID);
        }
        Ok((state.memory.used(core), state.knobs.device_memory_bytes))
    }

    /// Frees a tensor handle (sets holding it keep the memory alive).
    pub fn tensor_free(&self, tensor: usize) {
        lock(&self.state).tensors.remove(&tensor);
    }

    /// Allocates an empty tensor set.
    pub fn set_allocate(&self) -> Result<usize, NrtStatus> {
        let mut state = self.ready()?;
        let set: Arc<TensorSet> = Arc::default();
        let handle = Arc::as_ptr(&set) as usize;
        state.sets.insert(handle, set);
        Ok(handle)
    }

    /// Destroys a tensor set (not its tensors).
    pub fn set_destroy(&self, set: usize) {
        lock(&self.state).sets.remove(&set);
    }

    fn set(&self, set: usize) -> Result<Arc<TensorSet>, NrtStatus> {
        self.ready()?.sets.get(&set).cloned().ok_or(NRT_INVALID_HANDLE)
    }

    /// Adds (or replaces) `name` → tensor in a set.
    pub fn set_add(&self, set: usize, name: &str, tensor: usize) -> NrtStatus {
        let (set, tensor) = match (self.set(set), self.tensor(tensor)) {
            (Ok(s), Ok(t)) => (s, t),
            (Err(e), _) | (_, Err(e)) => return e,
        };
        lock(&set).insert(name.to_string(), tensor);
        NRT_SUCCESS
    }

    /// The tensor handle stored under `name`; `NRT_FAILURE` for an unknown name.
    pub fn set_get(&self, set: usize, name: &str) -> Result<usize, NrtStatus> {
        let set = self.set(set)?;
        let tensor = lock(&set).get(name).cloned().ok_or(NRT_FAILURE)?;
        let handle = Arc::as_ptr(&tensor) as usize;
        // A tensor freed while in the set gets a fresh registration so its handle stays usable.
        lock(&self.state).tensors.entry(handle).or_insert(tensor);
        Ok(handle)
    }

    /// Executes `repeat` times; returns the first non-success status, or success.
    pub fn execute(&self, model: usize, inputs: usize, outputs: usize, repeat: i32) -> NrtStatus {
        match self.execute_inner(model, inputs, outputs, repeat) {
            Ok(()) => NRT_SUCCESS,
            Err(status) => status,
        }
    }

    fn execute_inner(&self, model: usize, inputs: usize, outputs: usize, repeat: i32) -> Result<(), NrtStatus> {
        let model = self.model(model)?;
        let (in_set, out_set) = (self.set(inputs)?, self.set(outputs)?);
        if repeat < 1 {
            log(&format!("nrt_execute_repeat: repeat_count {repeat} is invalid"));
            return Err(NRT_INVALID);
        }
        let in_tensors = bind(&model, &model.inputs, &lock(&in_set), "input")?;
        let out_tensors = bind(&model, &model.outputs, &lock(&out_set), "output")?;
        for _ in 0..repeat {
            let core_lock = self.core_lock(model.core)?;
            let _one_at_a_time = core_lock.as_deref().map(lock);
            let started = Instant::now();
            let (knobs, injected) = self.next_execution(model.core)?;
            // The simulated device time is the execution's duration: the host computation counts
            // toward it, the rest is slept (an injected failure sleeps it all first).
            let delay = knobs.delay_for(model.exec_kind());
            match injected {
                Some(Injected::Hang) => {
                    std::thread::sleep(delay);
                    return Err(self.hang(&model, knobs.hang_bound));
                }
                Some(Injected::Status(status)) => {
                    std::thread::sleep(delay);
                    log(&format!("nrt_execute: model '{}' core {}: injected failure {status}", model.name, model.core));
                    return Err(status);
                }
                None => {}
            }
            run_program(&model, &in_tensors, &out_tensors)?;
            if let Some(path) = &knobs.exec_log {
                append_exec_log(path, &model.name, model.core);
            }
            let remaining = delay.saturating_sub(started.elapsed());
            if !remaining.is_zero() {
                std::thread::sleep(remaining);
            }
        }
        Ok(())
    }

    /// The lock serialising executions on `core`, when the `serial_cores` knob is set.
    fn core_lock(&self, core: u32) -> Result<Option<Arc<Mutex<()>>>, NrtStatus> {
        let mut state = self.ready()?;
        if !state.knobs.serial_cores {
            return Ok(None);
        }
        Ok(Some(Arc::clone(state.core_locks.entry(core).or_default())))
    }

    /// Counts one execution on `core` and decides whether the knobs make it fail or hang.
    fn next_execution(&self, core: u32) -> Result<(Knobs, Option<Injected>), NrtStatus> {
        let mut state = self.ready()?;
        let count = {
            let counter = state.exec_counts.entry(core).or_insert(0);
            *counter += 1;
            *counter
        };
        let knobs = state.knobs.clone();
        if knobs.fail_core.is_some_and(|c| c != core) {
            return Ok((knobs, None));
        }
        if knobs.hang_exec {
            return Ok((knobs, Some(Injected::Hang)));
        }
        let Some(status) = knobs.fail_exec_status else {
            return Ok((knobs, None));
        };
        let trigger = match knobs.fail_every_n {
            None => !state.exec_failed,
            Some(n) => count % n == 0 && !(knobs.fail_once && state.exec_failed),
        };
        if trigger {
            state.exec_failed = true;
        }
        Ok((knobs, trigger.then_some(Injected::Status(status))))
    }

    /// Sleeps until `bound` (or until the runtime is closed), then reports a timeout.
    fn hang(&self, model: &Model, bound: Duration) -> NrtStatus {
        log(&format!(
            "nrt_execute: model '{}' core {}: hanging for up to {bound:?} (NRT_STANDIN_HANG_EXEC)",
            model.name, model.core
        ));
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline && lock(&self.state).initialized {
            std::thread::sleep((deadline - Instant::now()).min(Duration::from_millis(10)));
        }
        NRT_TIMEOUT
    }
}

/// Matches a set to the model's declared tensors: every set name declared (else `NRT_FAILURE`),
/// every declared tensor present with its exact size (else `NRT_INVALID`).
fn bind(
    model: &Model,
    decls: &[TensorDecl],
    set: &HashMap<String, Arc<Tensor>>,
    kind: &str,
) -> Result<Vec<Arc<Tensor>>, NrtStatus> {
    if let Some(name) = set.keys().find(|n| !decls.iter().any(|d| &d.name == *n)) {
        log(&format!("nrt_execute: model '{}' has no {kind} tensor named '{name}'", model.name));
        return Err(NRT_FAILURE);
    }
    decls
        .iter()
        .map(|decl| {
            let Some(tensor) = set.get(&decl.name) else {
                log(&format!("nrt_execute: model '{}': {kind} '{}' is missing from the set", model.name, decl.name));
                return Err(NRT_INVALID);
            };
            let size = tensor.size() as u64;
            if size != decl.size {
                log(&format!(
                    "nrt_execute: model '{}': {kind} '{}' is {size} bytes, the model needs {}",
                    model.name, decl.name, decl.size
                ));
                return Err(NRT_INVALID);
            }
            Ok(Arc::clone(tensor))
        })
        .collect()
}

fn run_program(model: &Model, inputs: &[Arc<Tensor>], outputs: &[Arc<Tensor>]) -> Result<(), NrtStatus> {
    let Some(program) = &model.program else {
        log(&format!(
            "nrt_execute: model '{}' has no standin/program.json (compiled for real hardware); the stand-in cannot run it",
            model.name
        ));
        return Err(NRT_UNSUPPORTED_NEFF_VERSION);
    };
    if let Some(decoder) = program.decoder() {
        // Works on the tensors in place: weights read, caches updated, outputs written.
        return decoder.execute(inputs, outputs).map_err(|(status, message)| {
            log(&format!("nrt_execute: model '{}': {message}", model.name));
            status
        });
    }
    let mut buffers = HashMap::new();
    for (decl, tensor) in model.inputs.iter().zip(inputs) {
        let mut bytes = vec![0u8; tensor.size()];
        let status = tensor.read(0, &mut bytes);
        if status != NRT_SUCCESS {
            return Err(status);
        }
        let int32 = decl.dtype.as_deref() == Some("int32");
        let values = bytes
            .chunks_exact(4)
            .map(|c| {
                let b = [c[0], c[1], c[2], c[3]];
                // int32 values enter as f32: exact for |v| < 2^24.
                if int32 { i32::from_le_bytes(b) as f32 } else { f32::from_le_bytes(b) }
            })
            .collect();
        buffers.insert(decl.name.clone(), values);
    }
    let results = program.run(buffers).map_err(|e| {
        log(&format!("nrt_execute: model '{}': {e}", model.name));
        NRT_FAILURE
    })?;
    for (decl, tensor) in model.outputs.iter().zip(outputs) {
        let values = results.get(&decl.name).ok_or(NRT_FAILURE)?;
        let bytes: Vec<u8> = if decl.dtype.as_deref() == Some("int32") {
            // Rounded to the nearest integer; `as` saturates out-of-range values (NaN gives 0).
            values.iter().flat_map(|v| (v.round() as i32).to_le_bytes()).collect()
        } else {
            values.iter().flat_map(|v| v.to_le_bytes()).collect()
        };
        let status = tensor.write(0, &bytes);
        if status != NRT_SUCCESS {
            return Err(status);
        }
    }
    Ok(())
}
