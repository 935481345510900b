//! Tensors in host memory: their storage (owned and 4-byte aligned, or a caller's buffer), one
//! read/write lock each, locking several at once without deadlock, and per-core accounting of
//! the bytes allocated on "device".

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::abi::{NRT_INVALID, NRT_SUCCESS, NrtStatus};

/// Bytes allocated per core, shared by a runtime and its tensors (each tensor gives its bytes
/// back when dropped).
#[derive(Debug, Default)]
pub struct CoreMemory {
    used: Mutex<HashMap<u32, u64>>,
}

impl CoreMemory {
    /// Bytes currently allocated on `core`.
    pub fn used(&self, core: u32) -> u64 {
        lock(&self.used).get(&core).copied().unwrap_or(0)
    }

    /// Adds `bytes` to `core` if the total stays within `limit`; false otherwise.
    pub fn try_reserve(&self, core: u32, bytes: u64, limit: u64) -> bool {
        let mut used = lock(&self.used);
        let entry = used.entry(core).or_insert(0);
        match entry.checked_add(bytes) {
            Some(total) if total <= limit => {
                *entry = total;
                true
            }
            _ => false,
        }
    }

    fn release(&self, core: u32, bytes: u64) {
        if let Some(entry) = lock(&self.used).get_mut(&core) {
            *entry = entry.saturating_sub(bytes);
        }
    }
}

/// Device bytes a tensor holds on a core, given back when it is dropped or detached.
#[derive(Debug)]
pub struct Reservation {
    memory: Arc<CoreMemory>,
    core: u32,
    bytes: u64,
}

impl Reservation {
    /// A reservation already counted in `memory` (see [`CoreMemory::try_reserve`]).
    pub fn new(memory: Arc<CoreMemory>, core: u32, bytes: u64) -> Reservation {
        Reservation { memory, core, bytes }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.memory.release(self.core, self.bytes);
    }
}

/// Where a tensor's bytes are.
#[derive(Debug)]
pub enum Storage {
    /// Memory of the stand-in, held as 4-byte words so `f32`/`i32` views need no copy.
    Owned {
        /// The words (`ceil(len / 4)`).
        words: Vec<u32>,
        /// Length in bytes.
        len: usize,
    },
    /// A caller-owned buffer (address, length).
    Attached(usize, usize),
    /// No memory.
    Empty,
}

impl Storage {
    /// `size` zero bytes, or `None` when the memory cannot be reserved.
    pub fn zeroed(size: usize) -> Option<Storage> {
        let mut words = Vec::new();
        words.try_reserve_exact(size.div_ceil(4)).ok()?;
        words.resize(size.div_ceil(4), 0);
        Some(Storage::Owned { words, len: size })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        match self {
            Storage::Owned { len, .. } | Storage::Attached(_, len) => *len,
            Storage::Empty => 0,
        }
    }

    /// True for no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Storage::Owned { words, len } => bytemuck::cast_slice::<u32, u8>(words).get(..*len).unwrap_or_default(),
            // SAFETY: the caller attached `len` valid bytes at `ptr` and keeps them alive while
            // the tensor uses them (the `nrt_tensor_attach_buffer` contract).
            Storage::Attached(ptr, len) if *len > 0 => unsafe { std::slice::from_raw_parts(*ptr as *const u8, *len) },
            Storage::Attached(..) | Storage::Empty => &[],
        }
    }

    /// The bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Storage::Owned { words, len } => {
                bytemuck::cast_slice_mut::<u32, u8>(words).get_mut(..*len).unwrap_or_default()
            }
            // SAFETY: as in `bytes`; the buffer is writable and only reached through this lock.
            Storage::Attached(ptr, len) if *len > 0 => unsafe { std::slice::from_raw_parts_mut(*ptr as *mut u8, *len) },
            Storage::Attached(..) | Storage::Empty => &mut [],
        }
    }
}

/// A tensor in host memory.
#[derive(Debug)]
pub struct Tensor {
    /// Name given at allocation.
    pub name: String,
    /// The core of a device tensor (`None` for host and empty tensors).
    pub core: Option<u32>,
    storage: RwLock<Storage>,
    reservation: Mutex<Option<Reservation>>,
}

impl Tensor {
    /// A tensor over `storage`, holding `reservation` (if any) until dropped or detached.
    pub fn new(name: &str, core: Option<u32>, storage: Storage, reservation: Option<Reservation>) -> Tensor {
        Tensor { name: name.to_string(), core, storage: RwLock::new(storage), reservation: Mutex::new(reservation) }
    }

    /// Size in bytes (0 for an empty tensor).
    pub fn size(&self) -> usize {
        read(&self.storage).len()
    }

    /// Makes the tensor use a caller-owned buffer; its own memory (and reservation) is released.
    pub fn attach(&self, buffer: usize, size: usize) {
        *write(&self.storage) = Storage::Attached(buffer, size);
        lock(&self.reservation).take();
    }

    /// Copies `dst.len()` bytes from `offset`; `NRT_INVALID` when out of range.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> NrtStatus {
        let storage = read(&self.storage);
        match offset.checked_add(dst.len()).and_then(|end| storage.bytes().get(offset..end)) {
            Some(src) => {
                dst.copy_from_slice(src);
                NRT_SUCCESS
            }
            None => NRT_INVALID,
        }
    }

    /// Copies `src` to `offset`; `NRT_INVALID` when out of range.
    pub fn write(&self, offset: usize, src: &[u8]) -> NrtStatus {
        let mut storage = write(&self.storage);
        match offset.checked_add(src.len()).and_then(|end| storage.bytes_mut().get_mut(offset..end)) {
            Some(dst) => {
                dst.copy_from_slice(src);
                NRT_SUCCESS
            }
            None => NRT_INVALID,
        }
    }
}

/// Copies `size` bytes from `src` at `src_offset` to `dst` at `dst_offset` (the same tensor
/// allowed, ranges may overlap); `NRT_INVALID` when a range is out of bounds.
pub fn copy(src: &Tensor, src_offset: usize, dst: &Tensor, dst_offset: usize, size: usize) -> NrtStatus {
    let in_range = |offset: usize, len: usize| offset.checked_add(size).is_some_and(|end| end <= len);
    if std::ptr::eq(src, dst) {
        let mut storage = write(&src.storage);
        let bytes = storage.bytes_mut();
        if !in_range(src_offset, bytes.len()) || !in_range(dst_offset, bytes.len()) {
            return NRT_INVALID;
        }
        bytes.copy_within(src_offset..src_offset + size, dst_offset);
        return NRT_SUCCESS;
    }
    let mut locks = LockSet::lock(&[(src, Access::Read), (dst, Access::Write)]);
    let mut views = locks.views();
    let (Some(View::Read(from)), Some(View::Write(to))) = (views.remove(&addr(src)), views.remove(&addr(dst))) else {
        return NRT_INVALID;
    };
    if !in_range(src_offset, from.len()) || !in_range(dst_offset, to.len()) {
        return NRT_INVALID;
    }
    to[dst_offset..dst_offset + size].copy_from_slice(&from[src_offset..src_offset + size]);
    NRT_SUCCESS
}

/// How a tensor is locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Shared, read-only.
    Read,
    /// Exclusive.
    Write,
}

enum Guard<'a> {
    Read(RwLockReadGuard<'a, Storage>),
    Write(RwLockWriteGuard<'a, Storage>),
}

/// The bytes of one locked tensor.
pub enum View<'b> {
    /// Read-only (shared lock).
    Read(&'b [u8]),
    /// Writable (exclusive lock).
    Write(&'b mut [u8]),
}

/// Several tensors locked together. Locks are taken in address order (each tensor once, with the
/// strongest access asked for it), so executions and copies that lock overlapping sets never
/// deadlock.
pub struct LockSet<'a> {
    guards: Vec<(usize, Guard<'a>)>,
}

/// A tensor's identity for [`LockSet::views`].
pub fn addr(tensor: &Tensor) -> usize {
    tensor as *const Tensor as usize
}

impl<'a> LockSet<'a> {
    /// Locks every tensor of `requests`.
    pub fn lock(requests: &[(&'a Tensor, Access)]) -> LockSet<'a> {
        let mut wanted: Vec<(usize, &'a Tensor, Access)> = Vec::with_capacity(requests.len());
        for &(tensor, access) in requests {
            match wanted.iter_mut().find(|(a, _, _)| *a == addr(tensor)) {
                Some(entry) if access == Access::Write => entry.2 = Access::Write,
                Some(_) => {}
                None => wanted.push((addr(tensor), tensor, access)),
            }
        }
        wanted.sort_by_key(|(a, _, _)| *a);
        let guards = wanted
            .into_iter()
            .map(|(a, tensor, access)| {
                let guard = match access {
                    Access::Read => Guard::Read(read(&tensor.storage)),
                    Access::Write => Guard::Write(write(&tensor.storage)),
                };
                (a, guard)
            })
            .collect();
        LockSet { guards }
    }

    /// The locked bytes, by [`addr`].
    pub fn views(&mut self) -> HashMap<usize, View<'_>> {
        self.guards
            .iter_mut()
            .map(|(a, guard)| {
                let view = match guard {
                    Guard::Read(g) => View::Read(g.bytes()),
                    Guard::Write(g) => View::Write(g.bytes_mut()),
                };
                (*a, view)
            })
            .collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_storage_is_word_aligned_and_sized_in_bytes() {
        let storage = Storage::zeroed(10).expect("memory");
        assert_eq!(storage.len(), 10);
        assert_eq!(storage.bytes().as_ptr() as usize % 4, 0);
        let t = Tensor::new("t", None, storage, None);
        assert_eq!(t.write(6, &[1, 2, 3, 4]), NRT_SUCCESS);
        assert_eq!(t.write(7, &[1, 2, 3, 4]), NRT_INVALID);
        let mut out = [0u8; 4];
        assert_eq!(t.read(6, &mut out), NRT_SUCCESS);
        assert_eq!(out, [1, 2, 3, 4]);
    }

    #[test]
    fn copy_moves_ranges_within_and_between_tensors() {
        let a = Tensor::new("a", None, Storage::zeroed(8).expect("memory"), None);
        let b = Tensor::new("b", None, Storage::zeroed(8).expect("memory"), None);
        assert_eq!(a.write(0, &[1, 2, 3, 4, 5, 6, 7, 8]), NRT_SUCCESS);
        assert_eq!(copy(&a, 2, &b, 4, 4), NRT_SUCCESS);
        assert_eq!(copy(&a, 0, &a, 1, 4), NRT_SUCCESS, "overlapping, same tensor");
        assert_eq!(copy(&a, 6, &b, 0, 4), NRT_INVALID);
        let (mut x, mut y) = ([0u8; 8], [0u8; 8]);
        assert_eq!((a.read(0, &mut x), b.read(0, &mut y)), (NRT_SUCCESS, NRT_SUCCESS));
        assert_eq!(x, [1, 1, 2, 3, 4, 6, 7, 8]);
        assert_eq!(y, [0, 0, 0, 0, 3, 4, 5, 6]);
    }

    #[test]
    fn reservations_are_given_back_on_drop_and_attach() {
        let memory = Arc::new(CoreMemory::default());
        assert!(memory.try_reserve(1, 600, 1000));
        assert!(!memory.try_reserve(1, 600, 1000), "over the limit");
        let t = Tensor::new("t", Some(1), Storage::zeroed(600).expect("memory"), None);
        let r = Tensor::new(
            "r",
            Some(1),
            Storage::zeroed(8).expect("memory"),
            Some(Reservation::new(Arc::clone(&memory), 1, 600)),
        );
        assert_eq!(memory.used(1), 600);
        drop(t);
        assert_eq!(memory.used(1), 600);
        r.attach(0, 0);
        assert_eq!(memory.used(1), 0);
    }

    #[test]
    fn a_lock_set_locks_each_tensor_once_with_the_strongest_access() {
        let a = Tensor::new("a", None, Storage::zeroed(4).expect("memory"), None);
        let b = Tensor::new("b", None, Storage::zeroed(4).expect("memory"), None);
        let mut set = LockSet::lock(&[(&a, Access::Read), (&b, Access::Read), (&a, Access::Write)]);
        let mut views = set.views();
        assert_eq!(views.len(), 2);
        assert!(matches!(views.get(&addr(&b)), Some(View::Read(_))));
        match views.get_mut(&addr(&a)) {
            Some(View::Write(bytes)) => bytes[0] = 9,
            _ => panic!("a is locked for writing"),
        }
        drop(views);
        drop(set);
        let mut out = [0u8; 4];
        assert_eq!(a.read(0, &mut out), NRT_SUCCESS);
        assert_eq!(out[0], 9);
    }
}
