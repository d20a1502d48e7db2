//! `emu.ebpf._engine`: pagepool-emu's native eBPF engine (see vm.rs for the interpreter, maps.rs for the
//! maps).  Python drives it through emu/ebpf/engine.py and emu/ebpf/maps.py.

mod jit;
mod maps;
mod vm;

use maps::{MapDesc, MapStore};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use vm::*;

/// A map's layout as emu/ebpf/maps.py computes it: type, key_size, value_size, max_entries, map_flags, rows,
/// capacity, vstride, kstride, off_hdr, off_slots, off_keys, off_values, values_len.
type MapTuple = Vec<usize>;

fn desc(t: &MapTuple) -> PyResult<MapDesc> {
    if t.len() != 14 {
        return Err(PyValueError::new_err("a map layout has 14 fields"));
    }
    Ok(MapDesc {
        mtype: t[0] as u32, key_size: t[1], value_size: t[2], max_entries: t[3], flags: t[4] as u32, rows: t[5],
        capacity: t[6], vstride: t[7], kstride: t[8], off_hdr: t[9], off_slots: t[10], off_keys: t[11],
        off_values: t[12], values_len: t[13],
    })
}

/// Build the store over `mem` (a writable uint8 buffer: the maps' segment), checking every map's layout
/// lies inside it.
fn store(mem: &PyBuffer<u8>, maps: &[MapTuple], lock_fd: i32) -> PyResult<MapStore> {
    if mem.readonly() || !mem.is_c_contiguous() {
        return Err(PyValueError::new_err("the maps' memory must be a writable contiguous buffer"));
    }
    let len = mem.len_bytes();
    let ds: Vec<MapDesc> = maps.iter().map(desc).collect::<PyResult<_>>()?;
    for (i, d) in ds.iter().enumerate() {
        let slots_end = d.off_slots + if d.is_hash() { d.capacity * 16 } else { 0 };
        let keys_end = d.off_keys + if d.is_hash() { d.capacity * d.kstride } else { 0 };
        let ok = d.off_hdr + 64 <= len && slots_end <= len && keys_end <= len
            && d.off_values + d.values_len <= len
            && d.values_len == d.rows * d.capacity * d.vstride
            && d.value_size <= d.vstride.max(d.value_size) && (d.vstride == 0 || d.value_size <= d.vstride)
            && d.values_len < (1 << 32)
            && (!d.is_hash() || (d.capacity.is_power_of_two() && d.capacity > d.max_entries && d.key_size <= d.kstride))
            && (!d.is_array() || (d.key_size == 4 && d.capacity == d.max_entries))
            && d.off_hdr % 8 == 0 && d.off_slots % 8 == 0;
        if !ok {
            return Err(PyValueError::new_err(format!("map {}: layout {:?} does not fit a segment of {} bytes", i, d, len)));
        }
    }
    Ok(MapStore { base: mem.buf_ptr() as *mut u8, len, maps: ds, lock_fd })
}

/// The maps of one object, for user space: lookups, updates, deletes, keys, event counters.
#[pyclass(unsendable)]
struct Maps {
    store: MapStore,
    _mem: PyBuffer<u8>,
}

fn check_map(s: &MapStore, m: usize) -> PyResult<()> {
    if m >= s.maps.len() {
        return Err(PyValueError::new_err(format!("no map {}", m)));
    }
    Ok(())
}

fn check_key(s: &MapStore, m: usize, key: &[u8]) -> PyResult<()> {
    check_map(s, m)?;
    if key.len() != s.maps[m].key_size {
        return Err(PyValueError::new_err(format!(
            "key of {} bytes for a map whose keys are {} bytes", key.len(), s.maps[m].key_size)));
    }
    Ok(())
}

#[pymethods]
impl Maps {
    #[new]
    fn new(mem: &Bound<'_, PyAny>, maps: Vec<MapTuple>, lock_fd: i32) -> PyResult<Self> {
        let buf = PyBuffer::<u8>::get_bound(mem)?;
        let store = store(&buf, &maps, lock_fd)?;
        Ok(Maps { store, _mem: buf })
    }

    /// The value of `key` in `row` (per-CPU maps: the CPU), None when absent.
    fn lookup<'py>(&self, py: Python<'py>, m: usize, key: &[u8], row: usize) -> PyResult<Option<Bound<'py, PyBytes>>> {
        check_key(&self.store, m, key)?;
        let d = &self.store.maps[m];
        if row >= d.rows {
            return Err(PyValueError::new_err(format!("row {} of a map with {} rows", row, d.rows)));
        }
        Ok(self.store.find(m, key).map(|slot| {
            let p = self.store.value_ptr(m, row, slot);
            PyBytes::new_bound(py, unsafe { std::slice::from_raw_parts(p, d.value_size) })
        }))
    }

    /// bpf(2) BPF_MAP_UPDATE_ELEM: 0 or -errno.  `all_rows`: `value` holds one value per row.
    fn update(&self, m: usize, key: &[u8], value: &[u8], flags: u64, row: usize, all_rows: bool) -> PyResult<i64> {
        check_key(&self.store, m, key)?;
        let d = &self.store.maps[m];
        let want = if all_rows { d.value_size * d.rows } else { d.value_size };
        if value.len() != want || row >= d.rows {
            return Err(PyValueError::new_err(format!(
                "value of {} bytes (row {}) for a map whose values are {} bytes x {} rows",
                value.len(), row, d.value_size, d.rows)));
        }
        Ok(self.store.update(m, key, value, flags, row, all_rows))
    }

    fn delete(&self, m: usize, key: &[u8]) -> PyResult<i64> {
        check_key(&self.store, m, key)?;
        Ok(self.store.delete(m, key))
    }

    fn keys<'py>(&self, py: Python<'py>, m: usize) -> PyResult<Bound<'py, PyList>> {
        check_map(&self.store, m)?;
        let ks: Vec<Bound<'py, PyBytes>> = self.store.keys(m).iter().map(|k| PyBytes::new_bound(py, k)).collect();
        Ok(PyList::new_bound(py, ks))
    }

    /// The ifindexes of devmap (or devmap_hash) `m` in the order a broadcast walks them.
    fn devmap_ifindexes(&self, m: usize) -> PyResult<Vec<u32>> {
        check_map(&self.store, m)?;
        let t = self.store.maps[m].mtype;
        if t != maps::BPF_MAP_TYPE_DEVMAP && t != maps::BPF_MAP_TYPE_DEVMAP_HASH {
            return Err(pyo3::exceptions::PyValueError::new_err(format!("map {} is not a devmap", m)));
        }
        Ok(self.store.devmap_ifindexes(m))
    }

    /// (events, bytes) a ringbuf or perf_event_array map collected.
    fn events(&self, m: usize) -> PyResult<(u64, u64)> {
        check_map(&self.store, m)?;
        use std::sync::atomic::Ordering::Relaxed;
        Ok((self.store.hdr(m, maps::HDR_EVENTS).load(Relaxed), self.store.hdr(m, maps::HDR_EVENT_BYTES).load(Relaxed)))
    }
}

/// The programs of one object on one emulated CPU.
#[pyclass(unsendable)]
struct Engine {
    vm: Vm,
    names: Vec<String>,
    _mem: PyBuffer<u8>,
    #[pyo3(get)]
    faults: u64,
    #[pyo3(get)]
    last_fault: Option<String>,
    /// Why the JIT was asked for and not used (None: JIT in use, or not asked for).
    #[pyo3(get)]
    jit_error: Option<String>,
}

const HELPER_CALL: u8 = 0x85;

fn decode(names: &[String], progs: &[Vec<u8>], nmaps: usize, store: &MapStore) -> PyResult<(Vec<Insn>, Vec<usize>)> {
    let mut code = Vec::new();
    let mut starts = Vec::new();
    for (p, raw) in progs.iter().enumerate() {
        if raw.len() % 8 != 0 || raw.is_empty() {
            return Err(PyValueError::new_err(format!("program {}: {} bytes is not a whole number of instructions", names[p], raw.len())));
        }
        let start = code.len();
        let n = raw.len() / 8;
        let raw_insn = |k: usize| -> Insn {
            let b = &raw[k * 8..k * 8 + 8];
            Insn { op: b[0], dst: b[1] & 0xf, src: b[1] >> 4, off: i16::from_le_bytes([b[2], b[3]]),
                   imm: i32::from_le_bytes([b[4], b[5], b[6], b[7]]), imm64: 0 }
        };
        let err = |k: usize, what: String| PyValueError::new_err(format!("program {} insn {}: {}", names[p], k, what));
        let mut k = 0;
        while k < n {
            let mut i = raw_insn(k);
            if i.dst > 10 || i.src > 10 {
                return Err(err(k, "bad register".into()));
            }
            // r10 is the read-only frame pointer: refuse every write to it here, once, not per packet.
            let cls = i.op & 7;
            let writes_dst = matches!(cls, 1 | 4 | 7) || i.op == 0x18;
            let writes_src = matches!(i.op, 0xc3 | 0xdb) && (i.imm & 1 == 1);
            if (writes_dst && i.dst == 10) || (writes_src && i.src == 10) {
                return Err(err(k, "writes the frame pointer r10".into()));
            }
            if i.op == 0x18 {
                if k + 1 >= n {
                    return Err(err(k, "ld_imm64 without its second half".into()));
                }
                let hi = raw_insn(k + 1);
                let lo = i.imm as u32 as u64;
                i.imm64 = match i.src {
                    0 => lo | ((hi.imm as u32 as u64) << 32),
                    1 | 5 => {
                        if lo as usize >= nmaps { return Err(err(k, format!("map index {} of {} maps", lo, nmaps))); }
                        (TAG_MAPPTR << 32) | lo
                    }
                    2 | 6 => {
                        if lo as usize >= nmaps { return Err(err(k, format!("map index {} of {} maps", lo, nmaps))); }
                        let d = &store.maps[lo as usize];
                        if !d.is_array() || d.mtype != maps::BPF_MAP_TYPE_ARRAY {
                            return Err(err(k, format!("a direct value of map {} which is not an array", lo)));
                        }
                        let off = hi.imm as u32 as u64;
                        if off as usize >= d.value_size { return Err(err(k, format!("value offset {} beyond {} bytes", off, d.value_size))); }
                        ((TAG_VALUE + lo) << 32) + BASE + off
                    }
                    4 => {
                        let t = k as i64 + 1 + i.imm as i64;
                        if t < 0 || t as usize >= n { return Err(err(k, "function reference outside the program".into())); }
                        (TAG_FUNC << 32) | (start + t as usize) as u64
                    }
                    s => return Err(err(k, format!("ld_imm64 with src_reg {}", s))),
                };
                code.push(i);
                code.push(Insn { op: 0, ..hi });
                k += 2;
                continue;
            }
            if i.op == HELPER_CALL {
                match i.src {
                    0 => if !SUPPORTED_HELPERS.contains(&i.imm) {
                        return Err(err(k, format!("unsupported helper {}", i.imm)));
                    },
                    1 => {
                        let t = k as i64 + 1 + i.imm as i64;
                        if t < 0 || t as usize >= n { return Err(err(k, "call outside the program".into())); }
                    }
                    s => return Err(err(k, format!("call with src_reg {} (kfuncs are not supported)", s))),
                }
            }
            code.push(i);
            k += 1;
        }
        starts.push(start);
    }
    Ok((code, starts))
}

#[pymethods]
impl Engine {
    /// `names`/`progs`: the object's programs (relocated instructions); `maps`/`mem`/`lock_fd`: as for
    /// `Maps`; `cpu` of `ncpus`: the emulated CPU this engine runs on.
    /// `jit`: compile the programs to native code (src/jit.rs); where the host has no JIT the engine
    /// interprets them and `jit_error` says why.
    #[new]
    #[pyo3(signature = (names, progs, mem, maps, lock_fd, ncpus, cpu, budget=1_000_000, trace_limit=64, seed=0,
                        jit=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(names: Vec<String>, progs: Vec<Vec<u8>>, mem: &Bound<'_, PyAny>, maps: Vec<MapTuple>, lock_fd: i32,
           ncpus: usize, cpu: usize, budget: u64, trace_limit: usize, seed: u64, jit: bool) -> PyResult<Self> {
        if names.len() != progs.len() {
            return Err(PyValueError::new_err("one name per program"));
        }
        if cpu >= ncpus {
            return Err(PyValueError::new_err(format!("cpu {} of {}", cpu, ncpus)));
        }
        let buf = PyBuffer::<u8>::get_bound(mem)?;
        let st = store(&buf, &maps, lock_fd)?;
        let (code, starts) = decode(&names, &progs, maps.len(), &st)?;
        let vm = Vm {
            code, prog_start: starts, store: st, ncpus, cpu, budget,
            stack: vec![0u8; STACK_SIZE],
            rng: (seed ^ 0x9E3779B97F4A7C15).wrapping_mul(cpu as u64 * 2 + 1) | 1,
            events: Events { trace: Vec::new(), trace_dropped: 0, trace_limit },
            mtus: Vec::new(), left: 0, depth: 0,
            jit: None, stack_base: std::ptr::null_mut(), jit_faulted: 0, jit_fault: None, frags: Frags::new(),
        };
        let mut vm = vm;
        let mut jit_error = None;
        if jit {
            match jit::Jit::compile(&vm) {
                Ok(j) => vm.jit = Some(j),
                Err(e) => jit_error = Some(e),
            }
        }
        Ok(Engine { vm, names, _mem: buf, faults: 0, last_fault: None, jit_error })
    }

    /// The devices the helpers know (bpf_check_mtu): (ifindex, mtu) pairs.
    fn set_devices(&mut self, devs: Vec<(u32, u32)>) {
        self.vm.mtus = devs;
    }

    /// Lines bpf_trace_printk produced since the last call, and how many were dropped over the limit.
    fn drain_trace(&mut self) -> (Vec<String>, u64) {
        let lines = std::mem::take(&mut self.vm.events.trace);
        let dropped = std::mem::replace(&mut self.vm.events.trace_dropped, 0);
        (lines, dropped)
    }

    /// Run program `prog` over the packets described by `pages`/`offs`/`lens` (u32 arrays, any stride: a
    /// worker passes its descriptors' own fields) in `mem` (uint8, nbufs x buf_size: `page_size` is the
    /// buffer size).  Writes each verdict (int64; ABORTED after a fault or an unknown action) and redirect
    /// target (int64, -1 none), and the new offset and length back into `offs`/`lens` (only for packets
    /// whose data or data_end moved).
    ///
    /// `nfrags` (a writable u8 array, or None when no packet has fragments): each packet's nr_frags as it
    /// arrived (0: a linear frame, its shinfo not read).  A packet with fragments has them listed in its
    /// head buffer's shinfo at `page_size - 320` (the multi-buffer contract, see vm.rs `Frags`), checked
    /// before the program runs (a malformed one aborts the packet, nothing touched); the helpers work
    /// across them, and when bpf_xdp_adjust_tail changed them the shinfo is written back (nr_frags,
    /// xdp_frags_size, the lengths kept; released entries keep their buffer ids) and the new count goes
    /// into `nfrags`.  Nothing is ever freed here.
    ///
    /// Returns (packets that faulted or returned an unknown action: the kernel's xdp_exception, packets
    /// whose data, data_end or fragments changed, bpf_trace_printk lines waiting for `drain_trace`).
    #[pyo3(signature = (prog, mem, page_size, pages, offs, lens, verdicts, targets, ingress_ifindex, rx_queue,
                        nfrags=None))]
    #[allow(clippy::too_many_arguments)]
    fn run_batch(&mut self, prog: usize, mem: &Bound<'_, PyAny>, page_size: usize, pages: &Bound<'_, PyAny>,
                 offs: &Bound<'_, PyAny>, lens: &Bound<'_, PyAny>, verdicts: &Bound<'_, PyAny>,
                 targets: &Bound<'_, PyAny>, ingress_ifindex: u32, rx_queue: u32,
                 nfrags: Option<&Bound<'_, PyAny>>) -> PyResult<(u64, u64, u64)> {
        if prog >= self.names.len() {
            return Err(PyValueError::new_err(format!("no program {}", prog)));
        }
        let mem = PyBuffer::<u8>::get_bound(mem)?;
        let pg = PyBuffer::<u32>::get_bound(pages)?;
        let of = PyBuffer::<u32>::get_bound(offs)?;
        let ln = PyBuffer::<u32>::get_bound(lens)?;
        let vd = PyBuffer::<i64>::get_bound(verdicts)?;
        let tg = PyBuffer::<i64>::get_bound(targets)?;
        let nf = match nfrags {
            Some(b) if !b.is_none() => Some(PyBuffer::<u8>::get_bound(b)?),
            _ => None,
        };
        let n = pg.item_count();
        for (what, b) in [("offs", &of), ("lens", &ln)] {
            if b.item_count() != n || b.dimensions() != 1 {
                return Err(PyValueError::new_err(format!("{}: {} items expected", what, n)));
            }
        }
        if let Some(b) = &nf {
            if b.item_count() != n || b.dimensions() != 1 || b.readonly() {
                return Err(PyValueError::new_err(format!("nfrags: {} writable items expected", n)));
            }
        }
        // Read-only descriptors are fine for a program that moves no packet; one that does has that
        // packet aborted rather than a write into memory the caller did not offer for writing.
        let desc_writable = !of.readonly() && !ln.readonly();
        for (what, b) in [("verdicts", &vd), ("targets", &tg)] {
            if b.item_count() != n || b.dimensions() != 1 || b.readonly() {
                return Err(PyValueError::new_err(format!("{}: {} writable items expected", what, n)));
            }
        }
        if pg.dimensions() != 1 {
            return Err(PyValueError::new_err("pages: one dimension expected"));
        }
        if mem.readonly() || !mem.is_c_contiguous() || page_size == 0 || page_size > (1 << 24)
            || page_size <= XDP_FRAME_SIZE + SKB_SHARED_INFO {
            return Err(PyValueError::new_err("mem: a writable contiguous page memory and a page size expected"));
        }
        let npages = mem.len_bytes() / page_size;
        let base = mem.buf_ptr() as *mut u8;
        let at = |b: &PyBuffer<u32>, k: usize| unsafe { (b.buf_ptr() as *mut u8).offset(b.strides()[0] * k as isize) as *mut u32 };
        let at64 = |b: &PyBuffer<i64>, k: usize| unsafe { (b.buf_ptr() as *mut u8).offset(b.strides()[0] * k as isize) as *mut i64 };
        let at8 = |b: &PyBuffer<u8>, k: usize| unsafe { (b.buf_ptr() as *mut u8).offset(b.strides()[0] * k as isize) };
        if nf.is_some() {
            // rxq->frag_size: every buffer's data ends at most at its tailroom (the contract)
            let fr = &mut self.vm.frags;
            fr.base = base;
            fr.buf_size = page_size;
            fr.nbufs = npages;
            fr.frag_size = page_size - SKB_SHARED_INFO;
        }
        let mut exc = 0u64;
        let mut moved = 0u64;
        for k in 0..n {
            let (page, off, len) = unsafe {
                (std::ptr::read_unaligned(at(&pg, k)) as usize, std::ptr::read_unaligned(at(&of, k)) as usize,
                 std::ptr::read_unaligned(at(&ln, k)) as usize)
            };
            let nfr = match &nf {
                Some(b) => (unsafe { *at8(b, k) }) as usize,
                None => 0,
            };
            let mut verdict = XDP_ABORTED as i64;
            let mut target = -1i64;
            let bad = if page >= npages || off < XDP_FRAME_SIZE || off + len > page_size {
                Some(format!("descriptor {}: page {} off {} len {} outside the page memory", k, page, off, len))
            } else if nfr > 0 {
                let shinfo = unsafe { base.add(page * page_size + page_size - SKB_SHARED_INFO) };
                if off + len > page_size - SKB_SHARED_INFO {
                    Some(format!("descriptor {}: page {} off {} len {}: the linear part of a frame with fragments \
                                  runs into its shinfo at {}", k, page, off, len, page_size - SKB_SHARED_INFO))
                } else {
                    self.vm.frags.parse(shinfo, nfr).err().map(|e| format!("descriptor {} (page {}): {}", k, page, e))
                }
            } else {
                None
            };
            if let Some(msg) = bad {
                exc += 1;
                self.faults += 1;
                self.last_fault = Some(msg);
            } else {
                let frags_size = if nfr > 0 { self.vm.frags.size } else { 0 };
                let mut pkt = Pkt {
                    page: unsafe { base.add(page * page_size) }, page_size, data: off, data_end: off + len,
                    data_meta: off, ingress_ifindex, rx_queue, redirect: -1, tail_calls: 0, has_frags: nfr > 0,
                };
                let res = self.vm.run(prog, &mut pkt);
                let res = match res {
                    Ok(_) if !desc_writable && (pkt.data != off || pkt.data_end != off + len) => {
                        pkt.data = off;
                        pkt.data_end = off + len;
                        Err(Box::new(Fault { pc: self.vm.prog_start[prog],
                            what: "moved the packet (adjust_head/meta/tail) but its descriptors are read-only".into() }))
                    }
                    r => r,
                };
                match res {
                    Ok(r0) => {
                        let act = r0 as u32 as i64;
                        if act > 4 {
                            exc += 1;
                        } else {
                            verdict = act;
                            if act == XDP_REDIRECT as i64 {
                                target = pkt.redirect;
                            }
                        }
                    }
                    Err(f) => {
                        exc += 1;
                        self.note(prog, &f);
                    }
                }
                // Fragments released or resized (also by a program that faulted afterwards: the caller
                // frees what the shinfo no longer lists, whatever the verdict).
                let fr = &self.vm.frags;
                let frags_changed = nfr > 0 && (fr.nr != nfr || fr.size != frags_size);
                if frags_changed {
                    fr.store(unsafe { base.add(page * page_size + page_size - SKB_SHARED_INFO) });
                    unsafe { *at8(nf.as_ref().unwrap(), k) = fr.nr as u8 };
                }
                let data_moved = pkt.data != off || pkt.data_end != off + len;
                if data_moved || frags_changed {
                    moved += 1;
                }
                if data_moved {
                    unsafe {
                        std::ptr::write_unaligned(at(&of, k), pkt.data as u32);
                        std::ptr::write_unaligned(at(&ln, k), (pkt.data_end - pkt.data) as u32);
                    }
                }
            }
            unsafe {
                std::ptr::write_unaligned(at64(&vd, k), verdict);
                std::ptr::write_unaligned(at64(&tg, k), target);
            }
        }
        Ok((exc, moved, self.vm.events.trace.len() as u64 + self.vm.events.trace_dropped))
    }

    /// Run program `prog` once per frame as `bpf_prog_test_run_xdp` does: each frame at the 256-byte
    /// headroom of a buffer of `page_size` bytes whose linear part holds at most `page_size - 256 - 320`
    /// bytes; the rest of a longer frame goes into fragments of up to `page_size` bytes each (offset 0 in
    /// buffers of their own, `rxq->frag_size` = `page_size`), at most MAX_SKB_FRAGS of them (more: the
    /// kernel's -ENOMEM, a ValueError here).  A list of (r0 as u32, the frame's bytes after the program
    /// — the linear part, then every fragment left —, redirect target or -1).  A fault gives r0 =
    /// XDP_ABORTED and the frame as the program left it; `last_fault` says why.
    #[pyo3(signature = (prog, frames, ingress_ifindex=1, rx_queue=0, page_size=4096))]
    fn run_frames<'py>(&mut self, py: Python<'py>, prog: usize, frames: Vec<Vec<u8>>, ingress_ifindex: u32,
                       rx_queue: u32, page_size: usize) -> PyResult<Vec<(u64, Bound<'py, PyBytes>, i64)>> {
        if prog >= self.names.len() {
            return Err(PyValueError::new_err(format!("no program {}", prog)));
        }
        if page_size <= XDP_PACKET_HEADROOM + SKB_SHARED_INFO || page_size > (1 << 24) {
            return Err(PyValueError::new_err(format!("page size {} leaves no room for a frame", page_size)));
        }
        let max_data = page_size - XDP_PACKET_HEADROOM - SKB_SHARED_INFO;
        let mut out = Vec::with_capacity(frames.len());
        let mut mem: Vec<u8> = Vec::new();
        for f in frames {
            let lin = f.len().min(max_data);
            let nfr = (f.len() - lin).div_ceil(page_size);
            if nfr > MAX_SKB_FRAGS {
                return Err(PyValueError::new_err(format!(
                    "a frame of {} bytes needs {} fragments of {} bytes after its {}-byte linear part; at most {} \
                     (BPF_PROG_TEST_RUN: -ENOMEM)", f.len(), nfr, page_size, max_data, MAX_SKB_FRAGS)));
            }
            mem.clear();
            mem.resize(page_size * (1 + nfr), 0);
            mem[XDP_PACKET_HEADROOM..XDP_PACKET_HEADROOM + lin].copy_from_slice(&f[..lin]);
            let sh = page_size - SKB_SHARED_INFO;
            let put = |mem: &mut Vec<u8>, w: usize, v: usize| {
                mem[sh + 4 * w..sh + 4 * w + 4].copy_from_slice(&(v as u32).to_le_bytes())
            };
            put(&mut mem, 0, nfr);
            put(&mut mem, 1, f.len() - lin);
            for i in 0..nfr {
                let (from, to) = (lin + i * page_size, (lin + (i + 1) * page_size).min(f.len()));
                mem[(1 + i) * page_size..(1 + i) * page_size + to - from].copy_from_slice(&f[from..to]);
                put(&mut mem, 2 + 3 * i, 1 + i);
                put(&mut mem, 3 + 3 * i, 0);
                put(&mut mem, 4 + 3 * i, to - from);
            }
            let base = mem.as_mut_ptr();
            if nfr > 0 {
                let fr = &mut self.vm.frags;
                fr.base = base;
                fr.buf_size = page_size;
                fr.nbufs = 1 + nfr;
                fr.frag_size = page_size;
                fr.parse(unsafe { base.add(sh) }, nfr).map_err(PyValueError::new_err)?;
            }
            let mut pkt = Pkt {
                page: base, page_size, data: XDP_PACKET_HEADROOM, data_end: XDP_PACKET_HEADROOM + lin,
                data_meta: XDP_PACKET_HEADROOM, ingress_ifindex, rx_queue, redirect: -1, tail_calls: 0,
                has_frags: nfr > 0,
            };
            let (r0, target) = match self.vm.run(prog, &mut pkt) {
                Ok(r0) => (r0 as u32 as u64, if r0 as u32 as u64 == XDP_REDIRECT { pkt.redirect } else { -1 }),
                Err(flt) => {
                    self.note(prog, &flt);
                    (XDP_ABORTED, -1)
                }
            };
            // bpf_test_finish: the linear part, then the fragments the frame still has
            let mut bytes = mem[pkt.data..pkt.data_end].to_vec();
            if pkt.has_frags {
                let fr = &self.vm.frags;
                for e in &fr.ent[..fr.nr] {
                    let at = e.buf as usize * page_size + e.off as usize;
                    bytes.extend_from_slice(&mem[at..at + e.len as usize]);
                }
            }
            out.push((r0, PyBytes::new_bound(py, &bytes), target));
        }
        Ok(out)
    }

    /// Whether the programs run compiled (the JIT) rather than interpreted.
    #[getter]
    fn jit(&self) -> bool {
        self.vm.jit.is_some()
    }

    /// The programs' names, in index order.
    #[getter]
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }
}

impl Engine {
    fn note(&mut self, prog: usize, f: &Fault) {
        self.faults += 1;
        // Name the instruction relative to its program, as the verifier's log would.
        let p = self.vm.prog_start.iter().rposition(|&s| s <= f.pc).unwrap_or(prog);
        self.last_fault = Some(format!("{} insn {}: {}", self.names[p], f.pc - self.vm.prog_start[p], f.what));
    }
}

#[pymodule]
fn _engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Maps>()?;
    m.add("SUPPORTED_HELPERS", SUPPORTED_HELPERS.to_vec())?;
    m.add("STACK_SIZE", STACK_SIZE)?;
    m.add("MAX_TAIL_CALL_CNT", MAX_TAIL_CALL_CNT)?;
    m.add("MAX_SKB_FRAGS", MAX_SKB_FRAGS)?;
    Ok(())
}
