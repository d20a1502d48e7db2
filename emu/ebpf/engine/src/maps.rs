//! The eBPF maps of one object in one shared-memory segment: the layout Python computes
//! (emu/ebpf/maps.py) and the operations both the programs (through helpers) and user space (through
//! the Python API) perform on it, so there is one implementation of each map's semantics.
//!
//! Kernel counterparts: kernel/bpf/arraymap.c, hashtab.c (hash, percpu, LRU), devmap.c, ringbuf.c.
//! Hash maps are open-addressing tables (linear probing, tombstones on delete), twice as many slots as
//! max_entries.  Lookups are lockless (a slot is published by a release store of its state after its key
//! and value are written, as RCU publishes an element); inserts, updates and deletes from any process
//! take an OFD lock on one byte of the segment's file (the map's index), which the kernel drops if the
//! holder dies, so a killed CPU worker cannot wedge the others.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
pub const BPF_MAP_TYPE_PERF_EVENT_ARRAY: u32 = 4;
pub const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
pub const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
pub const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;
pub const BPF_MAP_TYPE_DEVMAP: u32 = 14;
pub const BPF_MAP_TYPE_DEVMAP_HASH: u32 = 25;
pub const BPF_MAP_TYPE_RINGBUF: u32 = 27;

pub const BPF_F_RDONLY_PROG: u32 = 1 << 7;

pub const BPF_NOEXIST: u64 = 1;
pub const BPF_EXIST: u64 = 2;

pub const ENOENT: i64 = 2;
pub const E2BIG: i64 = 7;
pub const EEXIST: i64 = 17;
pub const EINVAL: i64 = 22;

const SLOT_EMPTY: u32 = 0;
const SLOT_USED: u32 = 1;
const SLOT_DELETED: u32 = 2;
const SLOT_BYTES: usize = 16;

// Header words of every map.
pub const HDR_COUNT: usize = 0;
pub const HDR_CLOCK: usize = 8;
pub const HDR_EVENTS: usize = 16;
pub const HDR_EVENT_BYTES: usize = 24;

#[derive(Clone, Debug)]
pub struct MapDesc {
    pub mtype: u32,
    pub key_size: usize,
    pub value_size: usize,
    pub max_entries: usize,
    pub flags: u32,
    pub rows: usize,     // ncpus for per-CPU maps, else 1
    pub capacity: usize, // slots (hash) or entries (array)
    pub vstride: usize,
    pub kstride: usize,
    pub off_hdr: usize,
    pub off_slots: usize,
    pub off_keys: usize,
    pub off_values: usize,
    pub values_len: usize, // rows * capacity * vstride
}

impl MapDesc {
    pub fn is_hash(&self) -> bool {
        matches!(
            self.mtype,
            BPF_MAP_TYPE_HASH
                | BPF_MAP_TYPE_PERCPU_HASH
                | BPF_MAP_TYPE_LRU_HASH
                | BPF_MAP_TYPE_LRU_PERCPU_HASH
                | BPF_MAP_TYPE_DEVMAP_HASH
        )
    }
    pub fn is_array(&self) -> bool {
        matches!(
            self.mtype,
            BPF_MAP_TYPE_ARRAY | BPF_MAP_TYPE_PERCPU_ARRAY | BPF_MAP_TYPE_DEVMAP | BPF_MAP_TYPE_PROG_ARRAY
        )
    }
    pub fn percpu(&self) -> bool {
        self.rows > 1
            || matches!(
                self.mtype,
                BPF_MAP_TYPE_PERCPU_ARRAY | BPF_MAP_TYPE_PERCPU_HASH | BPF_MAP_TYPE_LRU_PERCPU_HASH
            )
    }
    pub fn lru(&self) -> bool {
        matches!(self.mtype, BPF_MAP_TYPE_LRU_HASH | BPF_MAP_TYPE_LRU_PERCPU_HASH)
    }
    /// Whether a program may not write this map's values (BPF_F_RDONLY_PROG; a devmap's values are the
    /// kernel's own).
    pub fn prog_readonly(&self) -> bool {
        self.flags & BPF_F_RDONLY_PROG != 0 || matches!(self.mtype, BPF_MAP_TYPE_DEVMAP | BPF_MAP_TYPE_DEVMAP_HASH)
    }
    /// Offset of (row, slot)'s value inside the values area.
    #[inline]
    pub fn value_off(&self, row: usize, slot: usize) -> usize {
        (row * self.capacity + slot) * self.vstride
    }
}

/// The segment of one object's maps, plus the lock file description.
pub struct MapStore {
    pub base: *mut u8,
    pub len: usize,
    pub maps: Vec<MapDesc>,
    pub lock_fd: i32,
}

fn hash_key(k: &[u8]) -> u64 {
    // FNV-1a then a final avalanche: keys of any size, spread over the table.
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in k {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^ (h >> 33)
}

struct Held<'a> {
    store: &'a MapStore,
    index: i64,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.store.ofd(self.index, libc::F_UNLCK as i16);
    }
}

impl MapStore {
    /// Checked pointer to `n` bytes at `off` of the segment.
    #[inline]
    fn at(&self, off: usize, n: usize) -> *mut u8 {
        assert!(off + n <= self.len, "map layout outside its segment");
        unsafe { self.base.add(off) }
    }
    #[inline]
    fn word(&self, off: usize) -> &AtomicU64 {
        let p = self.at(off, 8);
        unsafe { &*(p as *const AtomicU64) }
    }
    pub fn hdr(&self, m: usize, w: usize) -> &AtomicU64 {
        self.word(self.maps[m].off_hdr + w)
    }
    #[inline]
    fn slot_state(&self, d: &MapDesc, slot: usize) -> &AtomicU32 {
        let p = self.at(d.off_slots + slot * SLOT_BYTES, 4);
        unsafe { &*(p as *const AtomicU32) }
    }
    #[inline]
    fn slot_hash(&self, d: &MapDesc, slot: usize) -> &AtomicU32 {
        let p = self.at(d.off_slots + slot * SLOT_BYTES + 4, 4);
        unsafe { &*(p as *const AtomicU32) }
    }
    #[inline]
    fn slot_stamp(&self, d: &MapDesc, slot: usize) -> &AtomicU64 {
        self.word(d.off_slots + slot * SLOT_BYTES + 8)
    }
    #[inline]
    fn key_ptr(&self, d: &MapDesc, slot: usize) -> *mut u8 {
        self.at(d.off_keys + slot * d.kstride, d.key_size)
    }
    /// Raw pointer to the value of (row, slot).
    #[inline]
    pub fn value_ptr(&self, m: usize, row: usize, slot: usize) -> *mut u8 {
        let d = &self.maps[m];
        self.at(d.off_values + d.value_off(row, slot), d.value_size)
    }

    fn ofd(&self, index: i64, kind: i16) {
        if self.lock_fd < 0 {
            return;
        }
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = index;
        fl.l_len = 1;
        let cmd = if kind == libc::F_UNLCK as i16 { libc::F_OFD_SETLK } else { libc::F_OFD_SETLKW };
        loop {
            let r = unsafe { libc::fcntl(self.lock_fd, cmd, &fl as *const libc::flock) };
            if r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return;
            }
        }
    }
    fn lock(&self, m: usize) -> Held<'_> {
        self.ofd(m as i64, libc::F_WRLCK as i16);
        Held { store: self, index: m as i64 }
    }

    /// The slot holding `key` (hash maps), lockless.
    pub fn hash_find(&self, m: usize, key: &[u8]) -> Option<usize> {
        let d = &self.maps[m];
        let h = hash_key(key);
        let mask = d.capacity - 1;
        let mut i = (h as usize) & mask;
        let h32 = h as u32;
        for _ in 0..d.capacity {
            let st = self.slot_state(d, i).load(Ordering::Acquire);
            if st == SLOT_EMPTY {
                return None;
            }
            if st == SLOT_USED && self.slot_hash(d, i).load(Ordering::Relaxed) == h32 {
                let k = unsafe { std::slice::from_raw_parts(self.key_ptr(d, i), d.key_size) };
                if k == key {
                    return Some(i);
                }
            }
            i = (i + 1) & mask;
        }
        None
    }

    /// The slot of `key` for reading: array index or hash slot; None when absent.
    pub fn find(&self, m: usize, key: &[u8]) -> Option<usize> {
        let d = &self.maps[m];
        if d.is_array() {
            let idx = u32::from_le_bytes(key[..4].try_into().unwrap()) as usize;
            if idx >= d.max_entries {
                return None;
            }
            if matches!(d.mtype, BPF_MAP_TYPE_DEVMAP | BPF_MAP_TYPE_PROG_ARRAY) {
                // An empty devmap / prog_array slot holds 0: no device, no program.
                let v = unsafe { std::ptr::read_unaligned(self.value_ptr(m, 0, idx) as *const u32) };
                if v == 0 {
                    return None;
                }
            }
            return Some(idx);
        }
        if d.is_hash() {
            let s = self.hash_find(m, key)?;
            if d.lru() {
                let c = self.hdr(m, HDR_CLOCK).fetch_add(1, Ordering::Relaxed);
                self.slot_stamp(d, s).store(c, Ordering::Relaxed);
            }
            return Some(s);
        }
        None
    }

    /// Update: `row` is the caller's CPU row; with `all_rows` the value holds one value per row (user
    /// space updating a per-CPU map, as bpf(2) takes it), else one value for `row`.
    pub fn update(&self, m: usize, key: &[u8], value: &[u8], flags: u64, row: usize, all_rows: bool) -> i64 {
        let d = self.maps[m].clone();
        if flags > BPF_EXIST {
            return -EINVAL;
        }
        let write_value = |slot: usize, fresh: bool| {
            let n = d.value_size;
            for r in 0..d.rows {
                let dst = self.value_ptr(m, r, slot);
                if all_rows {
                    unsafe { std::ptr::copy_nonoverlapping(value[r * n..].as_ptr(), dst, n) };
                } else if r == row {
                    unsafe { std::ptr::copy_nonoverlapping(value.as_ptr(), dst, n) };
                } else if fresh {
                    // pcpu_init_value: a new key's other CPUs start at zero.
                    unsafe { std::ptr::write_bytes(dst, 0, n) };
                }
            }
        };
        if d.is_array() {
            let idx = u32::from_le_bytes(key[..4].try_into().unwrap()) as usize;
            if idx >= d.max_entries {
                return -E2BIG;
            }
            if flags == BPF_NOEXIST {
                return -EEXIST;
            }
            write_value(idx, false);
            return 0;
        }
        if !d.is_hash() {
            return -EINVAL;
        }
        let _held = self.lock(m);
        if let Some(s) = self.hash_find(m, key) {
            if flags == BPF_NOEXIST {
                return -EEXIST;
            }
            write_value(s, false);
            if d.lru() {
                let c = self.hdr(m, HDR_CLOCK).fetch_add(1, Ordering::Relaxed);
                self.slot_stamp(&d, s).store(c, Ordering::Relaxed);
            }
            return 0;
        }
        if flags == BPF_EXIST {
            return -ENOENT;
        }
        let count = self.hdr(m, HDR_COUNT);
        if count.load(Ordering::Relaxed) as usize >= d.max_entries {
            if !d.lru() {
                return -E2BIG;
            }
            // Evict the least recently used element (the kernel's LRU is approximate too).
            let mut victim = None;
            let mut oldest = u64::MAX;
            for s in 0..d.capacity {
                if self.slot_state(&d, s).load(Ordering::Relaxed) == SLOT_USED {
                    let t = self.slot_stamp(&d, s).load(Ordering::Relaxed);
                    if t < oldest {
                        oldest = t;
                        victim = Some(s);
                    }
                }
            }
            if let Some(s) = victim {
                self.slot_state(&d, s).store(SLOT_DELETED, Ordering::Release);
                count.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let h = hash_key(key);
        let mask = d.capacity - 1;
        let mut i = (h as usize) & mask;
        for _ in 0..d.capacity {
            if self.slot_state(&d, i).load(Ordering::Relaxed) != SLOT_USED {
                break;
            }
            i = (i + 1) & mask;
        }
        unsafe { std::ptr::copy_nonoverlapping(key.as_ptr(), self.key_ptr(&d, i), d.key_size) };
        self.slot_hash(&d, i).store(h as u32, Ordering::Relaxed);
        write_value(i, true);
        let c = self.hdr(m, HDR_CLOCK).fetch_add(1, Ordering::Relaxed);
        self.slot_stamp(&d, i).store(c, Ordering::Relaxed);
        self.slot_state(&d, i).store(SLOT_USED, Ordering::Release);
        count.fetch_add(1, Ordering::Relaxed);
        0
    }

    pub fn delete(&self, m: usize, key: &[u8]) -> i64 {
        let d = &self.maps[m];
        if d.is_array() {
            if matches!(d.mtype, BPF_MAP_TYPE_DEVMAP | BPF_MAP_TYPE_PROG_ARRAY) {
                let idx = u32::from_le_bytes(key[..4].try_into().unwrap()) as usize;
                if idx >= d.max_entries {
                    return -E2BIG;
                }
                unsafe { std::ptr::write_bytes(self.value_ptr(m, 0, idx), 0, d.value_size) };
                return 0;
            }
            return -EINVAL;
        }
        if !d.is_hash() {
            return -EINVAL;
        }
        let _held = self.lock(m);
        match self.hash_find(m, key) {
            None => -ENOENT,
            Some(s) => {
                self.slot_state(d, s).store(SLOT_DELETED, Ordering::Release);
                self.hdr(m, HDR_COUNT).fetch_sub(1, Ordering::Relaxed);
                0
            }
        }
    }

    /// The devices of a devmap or devmap_hash, as dev_map_enqueue_multi walks them for a broadcast: a
    /// devmap in index order, a devmap_hash bucket by bucket (the kernel's bucket is the key modulo
    /// max_entries rounded up to a power of two; keys sharing one come here in key order, the kernel
    /// lists them newest first).  Each value's first u32 is the ifindex (`struct bpf_devmap_val`).
    pub fn devmap_ifindexes(&self, m: usize) -> Vec<u32> {
        let d = &self.maps[m];
        let mut out: Vec<(u32, u32)> = Vec::new(); // (bucket, key) -> sorted
        let mut vals: Vec<u32> = Vec::new();
        let nb = (d.max_entries.max(1) as u32).next_power_of_two();
        for k in self.keys(m) {
            let key = u32::from_le_bytes([k[0], k[1], k[2], k[3]]);
            if let Some(slot) = self.find(m, &k) {
                let v = unsafe { std::ptr::read_unaligned(self.value_ptr(m, 0, slot) as *const u32) };
                if v != 0 {
                    out.push((if d.is_hash() { key & (nb - 1) } else { 0 }, key));
                    vals.push(v);
                }
            }
        }
        let mut order: Vec<usize> = (0..out.len()).collect();
        order.sort_by_key(|&i| out[i]);
        order.into_iter().map(|i| vals[i]).collect()
    }

    /// Every key present, in slot order.
    pub fn keys(&self, m: usize) -> Vec<Vec<u8>> {
        let d = &self.maps[m];
        let mut out = Vec::new();
        if d.is_array() {
            for i in 0..d.max_entries {
                let k = (i as u32).to_le_bytes();
                if self.find(m, &k).is_some() {
                    out.push(k.to_vec());
                }
            }
        } else if d.is_hash() {
            for s in 0..d.capacity {
                if self.slot_state(d, s).load(Ordering::Acquire) == SLOT_USED {
                    out.push(unsafe { std::slice::from_raw_parts(self.key_ptr(d, s), d.key_size) }.to_vec());
                }
            }
        }
        out
    }
}
