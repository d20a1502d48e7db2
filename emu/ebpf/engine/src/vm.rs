//! The interpreter: eBPF instructions pre-decoded at load, run over one packet at a time, every memory
//! access checked against the regions the program may touch.
//!
//! The program sees addresses in a private 64-bit space: the high 32 bits name a region, the low 32 bits
//! are an offset in it (the way the kernel's ctx rewrite turns `ctx->data`, a 32-bit field, into a real
//! pointer: here the engine hands out the tagged address and translates it back on every access).
//! Regions: the ctx (`struct xdp_md`, read-only), the stack (512 bytes per call frame), the packet (the
//! page, of which only [data_meta, data_end) is accessible), and each map's value area (an access must
//! stay inside one value; `.rodata` is read-only).  Anything else — a scalar used as a pointer, a map
//! pointer dereferenced, a value read past its end — is a fault: the packet ends as XDP_ABORTED.

use crate::maps::*;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub const TAG_CTX: u64 = 1;
pub const TAG_STACK: u64 = 2;
pub const TAG_PKT: u64 = 3;
pub const TAG_MAPPTR: u64 = 4;
pub const TAG_FUNC: u64 = 5;
pub const TAG_VALUE: u64 = 0x100; // + map index
// Offsets inside a region start here, so that a pointer moved below its region's start (data - 300) stays
// in its region's tag and is refused as what it is, rather than borrowing into the next tag.
pub const BASE: u64 = 0x4000_0000;

pub const STACK_FRAME: usize = 512;
pub const MAX_CALL_FRAMES: usize = 8;
pub const STACK_SIZE: usize = STACK_FRAME * MAX_CALL_FRAMES;
pub const MAX_TAIL_CALL_CNT: u32 = 33;
pub const XDP_PACKET_HEADROOM: usize = 256;
pub const XDP_FRAME_SIZE: usize = 40; // sizeof(struct xdp_frame), kept at the start of the headroom
pub const SKB_SHARED_INFO: usize = 320; // SKB_DATA_ALIGN(sizeof(struct skb_shared_info)): the tailroom
pub const ETH_HLEN: usize = 14;
pub const MAX_SKB_FRAGS: usize = 17;
/// The emulator's `skb_shared_info` in a head buffer's tailroom (the multi-buffer contract,
/// emu/topology/model.py): u32 nr_frags, u32 xdp_frags_size, then MAX_SKB_FRAGS x (buf, off, len).
pub const SHINFO_BYTES: usize = 8 + MAX_SKB_FRAGS * 12;
pub const BPF_MAX_LOOPS: u64 = 1 << 23;

pub const XDP_ABORTED: u64 = 0;
pub const XDP_REDIRECT: u64 = 4;

// Helper ids (include/uapi/linux/bpf.h, ___BPF_FUNC_MAPPER).
pub const H_MAP_LOOKUP_ELEM: i32 = 1;
pub const H_MAP_UPDATE_ELEM: i32 = 2;
pub const H_MAP_DELETE_ELEM: i32 = 3;
pub const H_KTIME_GET_NS: i32 = 5;
pub const H_TRACE_PRINTK: i32 = 6;
pub const H_GET_PRANDOM_U32: i32 = 7;
pub const H_GET_SMP_PROCESSOR_ID: i32 = 8;
pub const H_TAIL_CALL: i32 = 12;
pub const H_REDIRECT: i32 = 23;
pub const H_PERF_EVENT_OUTPUT: i32 = 25;
pub const H_CSUM_DIFF: i32 = 28;
pub const H_XDP_ADJUST_HEAD: i32 = 44;
pub const H_REDIRECT_MAP: i32 = 51;
pub const H_XDP_ADJUST_META: i32 = 54;
pub const H_XDP_ADJUST_TAIL: i32 = 65;
pub const H_JIFFIES64: i32 = 118;
pub const H_KTIME_GET_BOOT_NS: i32 = 125;
pub const H_RINGBUF_OUTPUT: i32 = 130;
pub const H_CHECK_MTU: i32 = 163;
pub const H_LOOP: i32 = 181;
pub const H_XDP_GET_BUFF_LEN: i32 = 188;
pub const H_XDP_LOAD_BYTES: i32 = 189;
pub const H_XDP_STORE_BYTES: i32 = 190;
pub const H_MAP_LOOKUP_PERCPU_ELEM: i32 = 195;

pub const SUPPORTED_HELPERS: &[i32] = &[
    H_MAP_LOOKUP_ELEM, H_MAP_UPDATE_ELEM, H_MAP_DELETE_ELEM, H_KTIME_GET_NS, H_TRACE_PRINTK,
    H_GET_PRANDOM_U32, H_GET_SMP_PROCESSOR_ID, H_TAIL_CALL, H_REDIRECT, H_PERF_EVENT_OUTPUT, H_CSUM_DIFF,
    H_XDP_ADJUST_HEAD, H_REDIRECT_MAP, H_XDP_ADJUST_META, H_XDP_ADJUST_TAIL, H_JIFFIES64,
    H_KTIME_GET_BOOT_NS, H_RINGBUF_OUTPUT, H_CHECK_MTU, H_LOOP, H_XDP_GET_BUFF_LEN, H_XDP_LOAD_BYTES,
    H_XDP_STORE_BYTES, H_MAP_LOOKUP_PERCPU_ELEM,
];

const BPF_F_BROADCAST: u64 = 1 << 3;
const BPF_F_EXCLUDE_INGRESS: u64 = 1 << 4;
const BPF_F_CURRENT_CPU: u64 = 0xffff_ffff;
/// A broadcast's redirect target: `REDIRECT_BROADCAST | map index << 16 | exclude_ingress`, the code
/// emu.xdp.bpfmaps.REDIRECT_BROADCAST gives the Python programs' devmaps (`DevMap.bcast_base`).
pub const REDIRECT_BROADCAST: i64 = 2 << 32;

/// One decoded instruction; `imm64` is the 64-bit immediate of `ld_imm64` with map references resolved.
#[derive(Clone, Copy, Debug, Default)]
pub struct Insn {
    pub op: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
    pub imm64: u64,
}

/// Why a packet was aborted.
#[derive(Debug, Clone)]
pub struct Fault {
    pub pc: usize,
    pub what: String,
}

/// Where the current packet lives and what the helpers changed.
#[repr(C)]
pub struct Pkt {
    pub page: *mut u8,
    pub page_size: usize,
    pub data: usize,
    pub data_end: usize,
    pub data_meta: usize,
    pub ingress_ifindex: u32,
    pub rx_queue: u32,
    pub redirect: i64,
    pub tail_calls: u32,
    /// XDP_FLAGS_HAS_FRAGS: the frame has fragments, described by `Vm::frags` (the kernel's
    /// `xdp_buff_has_frags`).  Cleared when bpf_xdp_adjust_tail releases the last one.
    pub has_frags: bool,
}

/// One fragment (`skb_frag_t`): its buffer (a row of the buffer memory), where its data starts in the
/// buffer and how long it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frag {
    pub buf: u32,
    pub off: u32,
    pub len: u32,
}

/// The fragments of the packet being run (its `skb_shared_info`, validated and copied out of the head
/// buffer before the program runs; written back after it when a helper changed them).  Only a packet
/// with `Pkt::has_frags` reads it.
pub struct Frags {
    pub base: *mut u8,     // the buffer memory: `nbufs` rows of `buf_size` bytes
    pub buf_size: usize,
    pub nbufs: usize,
    /// `rxq->frag_size`: a fragment's data may end at most this far into its buffer (its tailroom is
    /// `frag_size - off - len`, what bpf_xdp_adjust_tail may grow the last fragment by).
    pub frag_size: usize,
    pub nr: usize,
    pub size: usize, // xdp_frags_size: the sum of the fragments' lengths
    pub ent: [Frag; MAX_SKB_FRAGS],
}

impl Frags {
    pub fn new() -> Frags {
        Frags { base: std::ptr::null_mut(), buf_size: 0, nbufs: 0, frag_size: 0, nr: 0, size: 0,
                ent: [Frag::default(); MAX_SKB_FRAGS] }
    }

    fn addr(&self, f: &Frag) -> *mut u8 {
        // Safety (for the caller's access of up to `frag_size - off` bytes): `parse` checked buf < nbufs
        // and off + len <= frag_size <= buf_size; growth stays within frag_size.
        unsafe { self.base.add(f.buf as usize * self.buf_size + f.off as usize) }
    }

    /// Read and check the shinfo at `shinfo` (SHINFO_BYTES readable bytes): the fragments of a packet that
    /// arrived with `expect` of them.  A malformed one is an error naming what is wrong, never an access
    /// outside the buffer memory later.
    pub fn parse(&mut self, shinfo: *const u8, expect: usize) -> Result<(), String> {
        let word = |k: usize| unsafe { std::ptr::read_unaligned(shinfo.add(4 * k) as *const u32) } as usize;
        let nr = word(0);
        if nr != expect || nr > MAX_SKB_FRAGS {
            return Err(format!("shinfo nr_frags {} (the packet arrived with {}, at most {})", nr, expect, MAX_SKB_FRAGS));
        }
        let mut sum = 0usize;
        for i in 0..nr {
            let f = Frag { buf: word(2 + 3 * i) as u32, off: word(3 + 3 * i) as u32, len: word(4 + 3 * i) as u32 };
            if f.buf as usize >= self.nbufs || f.off as usize + f.len as usize > self.frag_size {
                return Err(format!("shinfo fragment {}: buffer {} offset {} length {} outside {} buffers of {} bytes \
                                    (data at most {} bytes in)", i, f.buf, f.off, f.len, self.nbufs, self.buf_size,
                                   self.frag_size));
            }
            sum += f.len as usize;
            self.ent[i] = f;
        }
        if word(1) != sum {
            return Err(format!("shinfo xdp_frags_size {} is not the sum of its {} fragments' lengths ({})", word(1), nr, sum));
        }
        self.nr = nr;
        self.size = sum;
        Ok(())
    }

    /// Write nr_frags, xdp_frags_size and the lengths of the fragments kept back into the shinfo; the
    /// entries of released fragments keep their buffer ids (the contract: the Python side frees them).
    pub fn store(&self, shinfo: *mut u8) {
        let put = |k: usize, v: usize| unsafe { std::ptr::write_unaligned(shinfo.add(4 * k) as *mut u32, v as u32) };
        put(0, self.nr);
        put(1, self.size);
        for i in 0..self.nr {
            put(4 + 3 * i, self.ent[i].len as usize);
        }
    }
}

impl Default for Frags {
    fn default() -> Self {
        Frags::new()
    }
}

pub struct Events {
    pub trace: Vec<String>,
    pub trace_dropped: u64,
    pub trace_limit: usize,
}

pub struct Vm {
    pub code: Vec<Insn>,
    pub prog_start: Vec<usize>, // entry instruction of each program
    pub store: MapStore,
    pub ncpus: usize,
    pub cpu: usize,
    pub budget: u64,
    pub stack: Vec<u8>,
    pub rng: u64,
    pub events: Events,
    pub mtus: Vec<(u32, u32)>, // (ifindex, mtu) of the host's devices
    // prog_array values hold (program index + 1); the map value's index resolves here.
    pub left: u64,
    pub depth: usize,
    // The JIT (src/jit.rs): its compiled functions when enabled, the stack's address for the compiled
    // code, and a fault the compiled code recorded (the flag is what the code tests after each call).
    pub jit: Option<crate::jit::Jit>,
    pub stack_base: *mut u8,
    pub jit_faulted: u64,
    pub jit_fault: Option<Box<Fault>>,
    /// The current packet's fragments (read only when `Pkt::has_frags`).
    pub frags: Frags,
}

// A boxed fault keeps every `Result` on the hot path one word wide.
pub(crate) type R<T> = Result<T, Box<Fault>>;

#[cold]
#[inline(never)]
fn fault<T>(pc: usize, what: String) -> R<T> {
    Err(Box::new(Fault { pc, what }))
}

/// r10 of call frame `depth`: frames grow down from the top of the stack region, 512 bytes each.
fn frame_top(depth: usize) -> u64 {
    (TAG_STACK << 32) + BASE + (STACK_SIZE - depth * STACK_FRAME) as u64
}

fn clock(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Vm {
    /// Translate `addr` for an access of `n` bytes; `write` refuses read-only regions.
    #[inline(always)]
    fn tr(&mut self, pkt: &Pkt, pc: usize, addr: u64, n: usize, write: bool) -> R<*mut u8> {
        let tag = addr >> 32;
        let off = ((addr & 0xffff_ffff).wrapping_sub(BASE) & 0xffff_ffff) as usize;
        if tag == TAG_PKT {
            if off >= pkt.data_meta && off + n <= pkt.data_end {
                return Ok(unsafe { pkt.page.add(off) });
            }
        } else if tag == TAG_STACK {
            if off + n <= STACK_SIZE {
                return Ok(unsafe { self.stack.as_mut_ptr().add(off) });
            }
        } else if tag >= TAG_VALUE && ((tag - TAG_VALUE) as usize) < self.store.maps.len() {
            let d = &self.store.maps[(tag - TAG_VALUE) as usize];
            if off < d.values_len && off % d.vstride + n <= d.value_size && !(write && d.prog_readonly()) {
                return Ok(unsafe { self.store.base.add(d.off_values + off) });
            }
        }
        self.bad_access(pkt, pc, addr, n, write)
    }

    #[cold]
    #[inline(never)]
    fn bad_access(&self, pkt: &Pkt, pc: usize, addr: u64, n: usize, write: bool) -> R<*mut u8> {
        let tag = addr >> 32;
        let off = ((addr & 0xffff_ffff).wrapping_sub(BASE) & 0xffff_ffff) as usize;
        let what = if write { "store" } else { "load" };
        match tag {
            TAG_PKT => fault(pc, format!(
                "{} of {} bytes at packet offset {} outside [data_meta {}, data_end {})",
                what, n, off as i32 as i64 - pkt.data as i64,
                pkt.data_meta as i64 - pkt.data as i64, pkt.data_end - pkt.data)),
            TAG_STACK => fault(pc, format!("stack {} of {} bytes at {:#x} outside the stack", what, n, off)),
            t if t >= TAG_VALUE && ((t - TAG_VALUE) as usize) < self.store.maps.len() => {
                let m = (t - TAG_VALUE) as usize;
                let d = &self.store.maps[m];
                if write && d.prog_readonly() {
                    return fault(pc, format!("store into read-only map value (map {})", m));
                }
                fault(pc, format!("{} of {} bytes at offset {} of a map value of {} bytes (map {})",
                    what, n, off % d.vstride.max(1), d.value_size, m))
            }
            TAG_CTX => fault(pc, format!("ctx {} through a helper or of a bad size", what)),
            _ => fault(pc, format!("{} through a bad pointer {:#x}", what, addr)),
        }
    }

    #[inline(always)]
    pub(crate) fn load(&mut self, pkt: &Pkt, pc: usize, addr: u64, n: usize) -> R<u64> {
        if addr >> 32 == TAG_CTX {
            return self.load_ctx(pkt, pc, (addr & 0xffff_ffff).wrapping_sub(BASE) & 0xffff_ffff, n);
        }
        let p = self.tr(pkt, pc, addr, n, false)?;
        Ok(unsafe {
            match n {
                1 => *p as u64,
                2 => std::ptr::read_unaligned(p as *const u16) as u64,
                4 => std::ptr::read_unaligned(p as *const u32) as u64,
                _ => std::ptr::read_unaligned(p as *const u64),
            }
        })
    }

    #[inline(always)]
    pub(crate) fn store_mem(&mut self, pkt: &Pkt, pc: usize, addr: u64, n: usize, v: u64) -> R<()> {
        let p = self.tr(pkt, pc, addr, n, true)?;
        unsafe {
            match n {
                1 => *p = v as u8,
                2 => std::ptr::write_unaligned(p as *mut u16, v as u16),
                4 => std::ptr::write_unaligned(p as *mut u32, v as u32),
                _ => std::ptr::write_unaligned(p as *mut u64, v),
            }
        }
        Ok(())
    }

    /// `struct xdp_md` reads, as the kernel's `xdp_convert_ctx_access` rewrites them: data, data_end and
    /// data_meta become pointers (here tagged packet addresses).
    fn load_ctx(&self, pkt: &Pkt, pc: usize, off: u64, n: usize) -> R<u64> {
        if n != 4 {
            return fault(pc, format!("ctx access of {} bytes at offset {} (xdp_md fields are u32)", n, off));
        }
        let p = (TAG_PKT << 32) + BASE;
        Ok(match off {
            0 => p + pkt.data as u64,
            4 => p + pkt.data_end as u64,
            8 => p + pkt.data_meta as u64,
            12 => pkt.ingress_ifindex as u64,
            16 => pkt.rx_queue as u64,
            20 => 0, // egress_ifindex: only for devmap programs
            _ => return fault(pc, format!("ctx access at offset {} beyond struct xdp_md", off)),
        })
    }

    fn bytes(&mut self, pkt: &Pkt, pc: usize, addr: u64, n: usize) -> R<Vec<u8>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let p = self.tr(pkt, pc, addr, n, false)?;
        Ok(unsafe { std::slice::from_raw_parts(p, n) }.to_vec())
    }

    fn map_arg(&self, pc: usize, v: u64) -> R<usize> {
        if v >> 32 == TAG_MAPPTR && ((v & 0xffff_ffff) as usize) < self.store.maps.len() {
            return Ok((v & 0xffff_ffff) as usize);
        }
        fault(pc, format!("helper argument {:#x} is not a map", v))
    }

    fn value_addr(&self, m: usize, row: usize, slot: usize) -> u64 {
        ((TAG_VALUE + m as u64) << 32) + BASE + self.store.maps[m].value_off(row, slot) as u64
    }

    /// Run the program `prog` over the packet; Ok(r0) or the fault.
    pub fn run(&mut self, prog: usize, pkt: &mut Pkt) -> R<u64> {
        self.left = self.budget;
        self.depth = 0;
        pkt.tail_calls = 0;
        let mut regs = [0u64; 16];
        regs[1] = (TAG_CTX << 32) + BASE;
        regs[10] = frame_top(0);
        self.call(self.prog_start[prog], &mut regs, pkt)
    }

    /// Run the function entered at `pc` (a program, a `bpf_loop` callback) at the current depth: its
    /// compiled code when the JIT compiled one there, else the interpreter.
    pub(crate) fn call(&mut self, pc: usize, regs: &mut [u64; 16], pkt: &mut Pkt) -> R<u64> {
        if let Some(f) = self.jit.as_ref().and_then(|j| j.fns.get(pc).copied().flatten()) {
            self.stack_base = self.stack.as_mut_ptr();
            // Safety: the code was compiled for this Vm's layout; it touches memory only through the
            // checks of src/jit.rs and calls back into this Vm's own functions.
            let r0 = unsafe { f(self as *mut Vm, pkt as *mut Pkt, regs.as_mut_ptr()) };
            if self.jit_faulted != 0 {
                self.jit_faulted = 0;
                return Err(self.jit_fault.take().unwrap_or_else(|| Box::new(Fault { pc, what: "fault".into() })));
            }
            return Ok(r0);
        }
        self.exec(pc, regs, pkt)
    }

    /// Interpret from `pc` until the frame entered at depth `self.depth` exits.
    fn exec(&mut self, mut pc: usize, regs: &mut [u64; 16], pkt: &mut Pkt) -> R<u64> {
        let base = self.depth;
        let mut frames: Vec<(usize, [u64; 4])> = Vec::new();
        let code_len = self.code.len();
        // The code does not change while a packet runs; a raw pointer lets helpers borrow self.
        let code = self.code.as_ptr();
        loop {
            if pc >= code_len {
                return fault(pc, "jump out of the program".into());
            }
            let i = unsafe { *code.add(pc) };
            // registers were checked at decode (<= 10); the mask lets the compiler drop bounds checks
            let dst = (i.dst & 0xf) as usize;
            let src = (i.src & 0xf) as usize;
            let imm = i.imm as i64 as u64;
            pc += 1;
            macro_rules! alu64 {
                ($v:expr) => {{
                    regs[dst] = $v; // never r10: refused at decode
                }};
            }
            macro_rules! alu32 {
                ($v:expr) => {{
                    regs[dst] = ($v) as u32 as u64;
                }};
            }
            // The budget is spent by backward jumps (and calls, loop iterations): straight-line code ends
            // within the program's length, so only going back can run forever; counting there keeps the
            // per-instruction path free of it.
            macro_rules! back {
                () => {{
                    if self.left == 0 {
                        return fault(pc - 1, format!("budget of {} backward jumps and calls exhausted", self.budget));
                    }
                    self.left -= 1;
                }};
            }
            macro_rules! jmp {
                ($c:expr) => {{
                    if $c {
                        if i.off < 0 { back!(); }
                        pc = (pc as i64 + i.off as i64) as usize;
                    }
                }};
            }
            let d64 = regs[dst];
            let d32 = d64 as u32;
            match i.op {
                // ---- ALU64 ----
                0x07 => alu64!(d64.wrapping_add(imm)),
                0x0f => alu64!(d64.wrapping_add(regs[src])),
                0x17 => alu64!(d64.wrapping_sub(imm)),
                0x1f => alu64!(d64.wrapping_sub(regs[src])),
                0x27 => alu64!(d64.wrapping_mul(imm)),
                0x2f => alu64!(d64.wrapping_mul(regs[src])),
                0x37 | 0x3f => {
                    let s = if i.op & 8 != 0 { regs[src] } else { imm };
                    alu64!(if i.off == 1 {
                        if s == 0 { 0 } else { (d64 as i64).wrapping_div(s as i64) as u64 }
                    } else if s == 0 { 0 } else { d64 / s })
                }
                0x47 => alu64!(d64 | imm),
                0x4f => alu64!(d64 | regs[src]),
                0x57 => alu64!(d64 & imm),
                0x5f => alu64!(d64 & regs[src]),
                0x67 => alu64!(d64 << (imm & 63)),
                0x6f => alu64!(d64 << (regs[src] & 63)),
                0x77 => alu64!(d64 >> (imm & 63)),
                0x7f => alu64!(d64 >> (regs[src] & 63)),
                0x87 => alu64!((d64 as i64).wrapping_neg() as u64),
                0x97 | 0x9f => {
                    let s = if i.op & 8 != 0 { regs[src] } else { imm };
                    alu64!(if i.off == 1 {
                        if s == 0 { d64 } else { (d64 as i64).wrapping_rem(s as i64) as u64 }
                    } else if s == 0 { d64 } else { d64 % s })
                }
                0xa7 => alu64!(d64 ^ imm),
                0xaf => alu64!(d64 ^ regs[src]),
                0xb7 => alu64!(imm),
                0xbf => {
                    let s = regs[src];
                    alu64!(match i.off {
                        8 => s as i8 as i64 as u64,
                        16 => s as i16 as i64 as u64,
                        32 => s as i32 as i64 as u64,
                        _ => s,
                    })
                }
                0xc7 => alu64!(((d64 as i64) >> (imm & 63)) as u64),
                0xcf => alu64!(((d64 as i64) >> (regs[src] & 63)) as u64),
                0xd7 => alu64!(match i.imm {
                    // BPF_ALU64 | BPF_END: unconditional byte swap (cpu v4)
                    16 => (d64 as u16).swap_bytes() as u64,
                    32 => (d64 as u32).swap_bytes() as u64,
                    64 => d64.swap_bytes(),
                    _ => return fault(pc - 1, format!("bad bswap width {}", i.imm)),
                }),
                // ---- ALU (32-bit; results zero-extended) ----
                0x04 => alu32!(d32.wrapping_add(imm as u32)),
                0x0c => alu32!(d32.wrapping_add(regs[src] as u32)),
                0x14 => alu32!(d32.wrapping_sub(imm as u32)),
                0x1c => alu32!(d32.wrapping_sub(regs[src] as u32)),
                0x24 => alu32!(d32.wrapping_mul(imm as u32)),
                0x2c => alu32!(d32.wrapping_mul(regs[src] as u32)),
                0x34 | 0x3c => {
                    let s = if i.op & 8 != 0 { regs[src] as u32 } else { imm as u32 };
                    alu32!(if i.off == 1 {
                        if s == 0 { 0 } else { (d32 as i32).wrapping_div(s as i32) as u32 }
                    } else if s == 0 { 0 } else { d32 / s })
                }
                0x44 => alu32!(d32 | imm as u32),
                0x4c => alu32!(d32 | regs[src] as u32),
                0x54 => alu32!(d32 & imm as u32),
                0x5c => alu32!(d32 & regs[src] as u32),
                0x64 => alu32!(d32 << (imm & 31)),
                0x6c => alu32!(d32 << (regs[src] & 31)),
                0x74 => alu32!(d32 >> (imm & 31)),
                0x7c => alu32!(d32 >> (regs[src] & 31)),
                0x84 => alu32!((d32 as i32).wrapping_neg() as u32),
                0x94 | 0x9c => {
                    let s = if i.op & 8 != 0 { regs[src] as u32 } else { imm as u32 };
                    alu32!(if i.off == 1 {
                        if s == 0 { d32 } else { (d32 as i32).wrapping_rem(s as i32) as u32 }
                    } else if s == 0 { d32 } else { d32 % s })
                }
                0xa4 => alu32!(d32 ^ imm as u32),
                0xac => alu32!(d32 ^ regs[src] as u32),
                0xb4 => alu32!(imm as u32),
                0xbc => {
                    let s = regs[src];
                    alu32!(match i.off {
                        8 => s as i8 as i32 as u32,
                        16 => s as i16 as i32 as u32,
                        _ => s as u32,
                    })
                }
                0xc4 => alu32!(((d32 as i32) >> (imm & 31)) as u32),
                0xcc => alu32!(((d32 as i32) >> (regs[src] & 31)) as u32),
                0xd4 => alu64!(match i.imm {
                    // BPF_TO_LE on a little-endian machine: truncate
                    16 => d64 as u16 as u64,
                    32 => d64 as u32 as u64,
                    64 => d64,
                    _ => return fault(pc - 1, format!("bad endian width {}", i.imm)),
                }),
                0xdc => alu64!(match i.imm {
                    // BPF_TO_BE: swap
                    16 => (d64 as u16).swap_bytes() as u64,
                    32 => (d64 as u32).swap_bytes() as u64,
                    64 => d64.swap_bytes(),
                    _ => return fault(pc - 1, format!("bad endian width {}", i.imm)),
                }),
                // ---- loads and stores ----
                0x18 => {
                    alu64!(i.imm64);
                    pc += 1; // the second half of ld_imm64
                }
                0x61 | 0x69 | 0x71 | 0x79 => {
                    let n = match i.op { 0x61 => 4, 0x69 => 2, 0x71 => 1, _ => 8 };
                    let v = self.load(pkt, pc - 1, regs[src].wrapping_add(i.off as i64 as u64), n)?;
                    alu64!(v)
                }
                0x81 | 0x89 | 0x91 => {
                    // BPF_MEMSX: sign-extending loads (cpu v4)
                    let n = match i.op { 0x81 => 4, 0x89 => 2, _ => 1 };
                    let v = self.load(pkt, pc - 1, regs[src].wrapping_add(i.off as i64 as u64), n)?;
                    alu64!(match n { 4 => v as u32 as i32 as i64 as u64, 2 => v as u16 as i16 as i64 as u64,
                                     _ => v as u8 as i8 as i64 as u64 })
                }
                0x62 | 0x6a | 0x72 | 0x7a => {
                    let n = match i.op { 0x62 => 4, 0x6a => 2, 0x72 => 1, _ => 8 };
                    self.store_mem(pkt, pc - 1, d64.wrapping_add(i.off as i64 as u64), n, imm)?;
                }
                0x63 | 0x6b | 0x73 | 0x7b => {
                    let n = match i.op { 0x63 => 4, 0x6b => 2, 0x73 => 1, _ => 8 };
                    self.store_mem(pkt, pc - 1, d64.wrapping_add(i.off as i64 as u64), n, regs[src])?;
                }
                0xc3 | 0xdb => {
                    self.atomic(pkt, pc - 1, i, regs)?;
                }
                // ---- jumps ----
                0x05 => jmp!(true),
                0x06 => {
                    // gotol
                    if i.imm < 0 { back!(); }
                    pc = (pc as i64 + i.imm as i64) as usize;
                }
                0x15 => jmp!(d64 == imm), 0x1d => jmp!(d64 == regs[src]),
                0x25 => jmp!(d64 > imm), 0x2d => jmp!(d64 > regs[src]),
                0x35 => jmp!(d64 >= imm), 0x3d => jmp!(d64 >= regs[src]),
                0x45 => jmp!(d64 & imm != 0), 0x4d => jmp!(d64 & regs[src] != 0),
                0x55 => jmp!(d64 != imm), 0x5d => jmp!(d64 != regs[src]),
                0x65 => jmp!((d64 as i64) > imm as i64), 0x6d => jmp!((d64 as i64) > regs[src] as i64),
                0x75 => jmp!((d64 as i64) >= imm as i64), 0x7d => jmp!((d64 as i64) >= regs[src] as i64),
                0xa5 => jmp!(d64 < imm), 0xad => jmp!(d64 < regs[src]),
                0xb5 => jmp!(d64 <= imm), 0xbd => jmp!(d64 <= regs[src]),
                0xc5 => jmp!((d64 as i64) < imm as i64), 0xcd => jmp!((d64 as i64) < regs[src] as i64),
                0xd5 => jmp!((d64 as i64) <= imm as i64), 0xdd => jmp!((d64 as i64) <= regs[src] as i64),
                // JMP32: the low 32 bits
                0x16 => jmp!(d32 == imm as u32), 0x1e => jmp!(d32 == regs[src] as u32),
                0x26 => jmp!(d32 > imm as u32), 0x2e => jmp!(d32 > regs[src] as u32),
                0x36 => jmp!(d32 >= imm as u32), 0x3e => jmp!(d32 >= regs[src] as u32),
                0x46 => jmp!(d32 & imm as u32 != 0), 0x4e => jmp!(d32 & regs[src] as u32 != 0),
                0x56 => jmp!(d32 != imm as u32), 0x5e => jmp!(d32 != regs[src] as u32),
                0x66 => jmp!((d32 as i32) > i.imm), 0x6e => jmp!((d32 as i32) > regs[src] as i32),
                0x76 => jmp!((d32 as i32) >= i.imm), 0x7e => jmp!((d32 as i32) >= regs[src] as i32),
                0xa6 => jmp!(d32 < imm as u32), 0xae => jmp!(d32 < regs[src] as u32),
                0xb6 => jmp!(d32 <= imm as u32), 0xbe => jmp!(d32 <= regs[src] as u32),
                0xc6 => jmp!((d32 as i32) < i.imm), 0xce => jmp!((d32 as i32) < regs[src] as i32),
                0xd6 => jmp!((d32 as i32) <= i.imm), 0xde => jmp!((d32 as i32) <= regs[src] as i32),
                0x85 => {
                    if i.src == 1 {
                        // bpf-to-bpf call: callee-saved r6-r9, a new stack frame
                        if self.depth + 1 >= MAX_CALL_FRAMES {
                            return fault(pc - 1, format!("call depth beyond {} frames", MAX_CALL_FRAMES));
                        }
                        back!();
                        frames.push((pc, [regs[6], regs[7], regs[8], regs[9]]));
                        self.depth += 1;
                        regs[10] = frame_top(self.depth);
                        pc = (pc as i64 + i.imm as i64) as usize;
                    } else if i.src == 0 {
                        if i.imm == H_TAIL_CALL {
                            let target = self.tail_call(pkt, pc - 1, regs)?;
                            regs[1..6].fill(0);
                            match target {
                                // the tail-called program starts as an entry does: the ctx in r1
                                Some(t) => {
                                    pc = t;
                                    regs[1] = (TAG_CTX << 32) + BASE;
                                }
                                None => regs[0] = (-(ENOENT)) as u64, // falls through, as in the kernel
                            }
                        } else {
                            regs[0] = self.helper(pkt, pc - 1, i.imm, regs)?;
                            // r1-r5 are clobbered by a helper call; the verifier makes them unreadable.
                            regs[1..6].fill(0);
                        }
                    } else {
                        return fault(pc - 1, format!("unsupported call (src_reg {})", i.src));
                    }
                }
                0x95 => {
                    match frames.pop() {
                        None => {
                            if self.depth != base {
                                return fault(pc - 1, "exit at a wrong depth".into());
                            }
                            return Ok(regs[0]);
                        }
                        Some((ret, saved)) => {
                            regs[6..10].copy_from_slice(&saved);
                            self.depth -= 1;
                            regs[10] = frame_top(self.depth);
                            pc = ret;
                        }
                    }
                }
                op => return fault(pc - 1, format!("unsupported instruction opcode {:#04x}", op)),
            }
        }
    }

    pub(crate) fn atomic(&mut self, pkt: &Pkt, pc: usize, i: Insn, regs: &mut [u64; 16]) -> R<()> {
        let wide = i.op == 0xdb;
        let n = if wide { 8 } else { 4 };
        let addr = regs[i.dst as usize].wrapping_add(i.off as i64 as u64);
        let tag = addr >> 32;
        if tag == TAG_PKT {
            return fault(pc, "atomic operation on packet memory".into());
        }
        let p = self.tr(pkt, pc, addr, n, true)?;
        if (p as usize) % n != 0 {
            return fault(pc, format!("misaligned atomic of {} bytes", n));
        }
        let s = i.src as usize;
        let v = regs[s];
        macro_rules! go {
            ($a:expr, $t:ty) => {{
                let a = $a;
                let vv = v as $t;
                let old: $t = match i.imm & !1 {
                    0x00 => a.fetch_add(vv, Ordering::SeqCst),
                    0x40 => a.fetch_or(vv, Ordering::SeqCst),
                    0x50 => a.fetch_and(vv, Ordering::SeqCst),
                    0xa0 => a.fetch_xor(vv, Ordering::SeqCst),
                    0xe0 if i.imm == 0xe1 => a.swap(vv, Ordering::SeqCst),
                    0xf0 if i.imm == 0xf1 => {
                        let exp = regs[0] as $t;
                        match a.compare_exchange(exp, vv, Ordering::SeqCst, Ordering::SeqCst) {
                            Ok(x) | Err(x) => x,
                        }
                    }
                    _ => return fault(pc, format!("unsupported atomic operation {:#x}", i.imm)),
                };
                old as u64
            }};
        }
        let old = if wide {
            go!(unsafe { &*(p as *const AtomicU64) }, u64)
        } else {
            go!(unsafe { &*(p as *const AtomicU32) }, u32)
        };
        match i.imm {
            0xf1 => regs[0] = old,
            x if x & 1 == 1 => regs[s] = old,
            _ => {}
        }
        Ok(())
    }

    pub(crate) fn tail_call(&mut self, pkt: &mut Pkt, pc: usize, regs: &[u64; 16]) -> R<Option<usize>> {
        let m = self.map_arg(pc, regs[2])?;
        if self.store.maps[m].mtype != BPF_MAP_TYPE_PROG_ARRAY {
            return fault(pc, "bpf_tail_call on a map that is not a prog_array".into());
        }
        let idx = regs[3] as u32;
        if pkt.tail_calls >= MAX_TAIL_CALL_CNT {
            return Ok(None);
        }
        let key = idx.to_le_bytes();
        let Some(slot) = self.store.find(m, &key) else { return Ok(None) };
        let v = unsafe { std::ptr::read_unaligned(self.store.value_ptr(m, 0, slot) as *const u32) } as usize;
        if v == 0 || v > self.prog_start.len() {
            return Ok(None);
        }
        pkt.tail_calls += 1;
        Ok(Some(self.prog_start[v - 1]))
    }

    /// `xdp_get_buff_len`: the linear part, plus the fragments' bytes when the frame has them.
    #[inline(always)]
    fn buff_len(&self, pkt: &Pkt) -> usize {
        pkt.data_end - pkt.data + if pkt.has_frags { self.frags.size } else { 0 }
    }

    /// `bpf_xdp_copy_buf`: `len` bytes at offset `off` of the frame (the linear part, then each fragment)
    /// copied out to `buf`, or in from it when `flush`.  The caller checked `off + len <= buff_len`.
    fn copy_buf(&self, pkt: &Pkt, mut off: usize, mut buf: *mut u8, mut len: usize, flush: bool) {
        let mut ptr_off = 0usize;
        let mut ptr_buf = unsafe { pkt.page.add(pkt.data) };
        let mut ptr_len = pkt.data_end - pkt.data;
        let nr = if pkt.has_frags { self.frags.nr } else { 0 };
        let mut next = 0usize;
        loop {
            if off < ptr_off + ptr_len {
                let at = off - ptr_off;
                let n = len.min(ptr_len - at);
                // ptr::copy (memmove): the program's buffer may be the packet itself
                unsafe {
                    if flush {
                        std::ptr::copy(buf, ptr_buf.add(at), n);
                    } else {
                        std::ptr::copy(ptr_buf.add(at), buf, n);
                    }
                    buf = buf.add(n);
                }
                off += n;
                len -= n;
            }
            if len == 0 || next == nr {
                break;
            }
            ptr_off += ptr_len;
            let f = self.frags.ent[next];
            ptr_buf = self.frags.addr(&f);
            ptr_len = f.len as usize;
            next += 1;
        }
    }

    /// `bpf_xdp_frags_increase_tail`: grow the last fragment into its tailroom (`rxq->frag_size - off -
    /// len`), the new bytes zeroed; -EINVAL beyond it.
    fn frags_increase_tail(&mut self, offset: i32) -> u64 {
        let fs = &mut self.frags;
        let last = fs.ent[fs.nr - 1];
        let tailroom = fs.frag_size - last.off as usize - last.len as usize;
        if offset as usize > tailroom {
            return (-EINVAL) as u64;
        }
        unsafe { std::ptr::write_bytes(fs.addr(&last).add(last.len as usize), 0, offset as usize) };
        fs.ent[fs.nr - 1].len += offset as u32;
        fs.size += offset as usize;
        0
    }

    /// `bpf_xdp_frags_shrink_tail`: take `offset` bytes off the end, whole fragments from the last one
    /// (each released when emptied: nr_frags drops, the entry keeps its buffer id for the caller to free),
    /// then from the next one's length; with no fragment left the frame is linear again and data_end moves
    /// back by what remains.  -EINVAL when fewer than ETH_HLEN bytes would be left.  (`offset` is the
    /// negated i32 argument: INT_MIN stays negative and changes nothing, as in the kernel.)
    fn frags_shrink_tail(&mut self, pkt: &mut Pkt, mut offset: i32) -> u64 {
        if offset as i64 > self.buff_len(pkt) as i64 - ETH_HLEN as i64 {
            return (-EINVAL) as u64;
        }
        let fs = &mut self.frags;
        let (mut n_free, mut len_free) = (0usize, 0usize);
        let mut i = fs.nr;
        while i > 0 && offset > 0 {
            i -= 1;
            let f = &mut fs.ent[i];
            let shrink = offset.min(f.len as i32);
            len_free += shrink as usize;
            offset -= shrink;
            if f.len as i32 == shrink {
                n_free += 1;
            } else {
                f.len -= shrink as u32;
                break;
            }
        }
        fs.nr -= n_free;
        fs.size -= len_free;
        if fs.nr == 0 {
            pkt.has_frags = false; // xdp_buff_clear_frags_flag
            pkt.data_end -= offset as usize;
        }
        0
    }

    pub(crate) fn helper(&mut self, pkt: &mut Pkt, pc: usize, id: i32, regs: &mut [u64; 16]) -> R<u64> {
        let (a1, a2, a3, a4, a5) = (regs[1], regs[2], regs[3], regs[4], regs[5]);
        let neg = |e: i64| (-e) as u64;
        match id {
            H_MAP_LOOKUP_ELEM | H_MAP_LOOKUP_PERCPU_ELEM => {
                let m = self.map_arg(pc, a1)?;
                let d = self.store.maps[m].clone();
                if matches!(d.mtype, BPF_MAP_TYPE_PROG_ARRAY | BPF_MAP_TYPE_RINGBUF | BPF_MAP_TYPE_PERF_EVENT_ARRAY) {
                    return fault(pc, format!("bpf_map_lookup_elem on map {} of type {}", m, d.mtype));
                }
                let row = if id == H_MAP_LOOKUP_PERCPU_ELEM {
                    if !d.percpu() {
                        return fault(pc, "bpf_map_lookup_percpu_elem on a map that is not per-CPU".into());
                    }
                    if a3 as usize >= self.ncpus {
                        return Ok(0);
                    }
                    a3 as usize
                } else if d.percpu() { self.cpu } else { 0 };
                // the key is read in place: no copy on the per-packet lookup path
                let kp = self.tr(pkt, pc, a2, d.key_size, false)?;
                let key = unsafe { std::slice::from_raw_parts(kp, d.key_size) };
                Ok(match self.store.find(m, key) {
                    Some(slot) => self.value_addr(m, row, slot),
                    None => 0,
                })
            }
            H_MAP_UPDATE_ELEM => {
                let m = self.map_arg(pc, a1)?;
                let d = self.store.maps[m].clone();
                if !(d.is_hash() || matches!(d.mtype, BPF_MAP_TYPE_ARRAY | BPF_MAP_TYPE_PERCPU_ARRAY)) || d.prog_readonly() {
                    return fault(pc, format!("bpf_map_update_elem on map {} (not writable by a program)", m));
                }
                let key = self.bytes(pkt, pc, a2, d.key_size)?;
                let val = self.bytes(pkt, pc, a3, d.value_size)?;
                let row = if d.percpu() { self.cpu } else { 0 };
                Ok(self.store.update(m, &key, &val, a4, row, false) as u64)
            }
            H_MAP_DELETE_ELEM => {
                let m = self.map_arg(pc, a1)?;
                let d = self.store.maps[m].clone();
                if !d.is_hash() || d.mtype == BPF_MAP_TYPE_DEVMAP_HASH {
                    return if d.is_array() { Ok(neg(EINVAL)) } else {
                        fault(pc, format!("bpf_map_delete_elem on map {}", m))
                    };
                }
                let key = self.bytes(pkt, pc, a2, d.key_size)?;
                Ok(self.store.delete(m, &key) as u64)
            }
            H_KTIME_GET_NS => Ok(clock(libc::CLOCK_MONOTONIC)),
            H_KTIME_GET_BOOT_NS => Ok(clock(libc::CLOCK_BOOTTIME)),
            H_JIFFIES64 => Ok(clock(libc::CLOCK_MONOTONIC) / 4_000_000), // HZ=250
            H_GET_PRANDOM_U32 => {
                // xorshift64*: per-engine state, as the kernel's per-CPU prandom state
                let mut x = self.rng;
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                self.rng = x;
                Ok((x.wrapping_mul(0x2545F4914F6CDD1D) >> 32) as u32 as u64)
            }
            H_GET_SMP_PROCESSOR_ID => Ok(self.cpu as u64),
            H_TRACE_PRINTK => {
                let n = a2 as usize;
                if n == 0 || n > 1024 {
                    return Ok(neg(EINVAL));
                }
                let fmt = self.bytes(pkt, pc, a1, n)?;
                let Some(end) = fmt.iter().position(|&b| b == 0) else { return Ok(neg(EINVAL)) };
                let line = format_printk(&fmt[..end], &[a3, a4, a5]);
                let len = line.len() as u64;
                if self.events.trace.len() < self.events.trace_limit {
                    self.events.trace.push(line);
                } else {
                    self.events.trace_dropped += 1;
                }
                Ok(len)
            }
            H_REDIRECT => {
                if a2 != 0 {
                    return Ok(XDP_ABORTED);
                }
                pkt.redirect = a1 as u32 as i64;
                Ok(XDP_REDIRECT)
            }
            H_REDIRECT_MAP => {
                let m = self.map_arg(pc, a1)?;
                let d = self.store.maps[m].clone();
                if !matches!(d.mtype, BPF_MAP_TYPE_DEVMAP | BPF_MAP_TYPE_DEVMAP_HASH) {
                    return Ok(XDP_ABORTED); // cpumap and xskmap are not emulated yet
                }
                // __bpf_xdp_redirect_map: the low bits are the action on a failed lookup; a devmap also
                // takes BPF_F_BROADCAST and BPF_F_EXCLUDE_INGRESS; any other bit aborts.
                let flags = a3;
                if flags & !(3 | BPF_F_BROADCAST | BPF_F_EXCLUDE_INGRESS) != 0 {
                    return Ok(XDP_ABORTED);
                }
                if flags & BPF_F_BROADCAST != 0 {
                    // The key is ignored and the verdict is XDP_REDIRECT whatever the map holds: the
                    // targets are read at xdp_do_redirect (dev_map_enqueue_multi), by the CPU worker's
                    // one broadcast path (emu/datapath/napi.py), from this code: the map's index and
                    // whether the ingress device is excluded.
                    let excl = (flags & BPF_F_EXCLUDE_INGRESS != 0) as i64;
                    pkt.redirect = REDIRECT_BROADCAST | (m as i64) << 16 | excl;
                    return Ok(XDP_REDIRECT);
                }
                let key = (a2 as u32).to_le_bytes();
                match self.store.find(m, &key) {
                    Some(slot) => {
                        let v = unsafe { std::ptr::read_unaligned(self.store.value_ptr(m, 0, slot) as *const u32) };
                        if v == 0 {
                            return Ok(flags & 3);
                        }
                        pkt.redirect = v as i64;
                        Ok(XDP_REDIRECT)
                    }
                    None => Ok(flags & 3),
                }
            }
            H_PERF_EVENT_OUTPUT | H_RINGBUF_OUTPUT => {
                let (m, data, size, flags) = if id == H_RINGBUF_OUTPUT { (a1, a2, a3, a4) } else { (a2, a4, a5, a3) };
                let m = self.map_arg(pc, m)?;
                let want = if id == H_RINGBUF_OUTPUT { BPF_MAP_TYPE_RINGBUF } else { BPF_MAP_TYPE_PERF_EVENT_ARRAY };
                if self.store.maps[m].mtype != want {
                    return fault(pc, format!("event output to map {} of the wrong type", m));
                }
                let size = size as usize;
                if size > 65536 {
                    return Ok(neg(E2BIG));
                }
                self.bytes(pkt, pc, data, size)?; // the data must be readable
                let mut total = size as u64;
                if id == H_PERF_EVENT_OUTPUT {
                    // bpf_xdp_event_output: only BPF_F_INDEX_MASK and BPF_F_CTXLEN_MASK bits
                    if flags & !(0xffff_ffff | (0xf_ffff << 32)) != 0 {
                        return Ok(neg(EINVAL));
                    }
                    let idx = flags & 0xffff_ffff;
                    if idx != BPF_F_CURRENT_CPU && idx as usize >= self.ncpus {
                        return Ok(neg(E2BIG));
                    }
                    let ctxlen = flags >> 32 & 0xf_ffff; // BPF_F_CTXLEN_MASK: bytes of the packet appended
                    if ctxlen as usize > self.buff_len(pkt) {
                        return Ok(neg(EFAULT));
                    }
                    total += ctxlen;
                } else if flags & !3 != 0 {
                    return Ok(neg(EINVAL));
                }
                self.store.hdr(m, HDR_EVENTS).fetch_add(1, Ordering::Relaxed);
                self.store.hdr(m, HDR_EVENT_BYTES).fetch_add(total, Ordering::Relaxed);
                Ok(0)
            }
            H_CSUM_DIFF => {
                let (fs, ts) = (a2 as usize, a4 as usize);
                if fs % 4 != 0 || ts % 4 != 0 || fs + ts > 512 {
                    return Ok(neg(EINVAL));
                }
                let from = self.bytes(pkt, pc, a1, fs)?;
                let to = self.bytes(pkt, pc, a3, ts)?;
                let mut sum = a5 as u32 as u64;
                for w in from.chunks(4) {
                    sum += !u32::from_le_bytes(w.try_into().unwrap()) as u64;
                }
                for w in to.chunks(4) {
                    sum += u32::from_le_bytes(w.try_into().unwrap()) as u64;
                }
                while sum >> 32 != 0 {
                    sum = (sum & 0xffff_ffff) + (sum >> 32);
                }
                Ok(sum)
            }
            H_XDP_ADJUST_HEAD => {
                let delta = a2 as i32 as i64;
                let data = pkt.data as i64 + delta;
                let metalen = pkt.data - pkt.data_meta;
                if data < (XDP_FRAME_SIZE + metalen) as i64 || data > pkt.data_end as i64 - ETH_HLEN as i64 {
                    return Ok(neg(EINVAL));
                }
                let data = data as usize;
                if metalen > 0 {
                    unsafe { std::ptr::copy(pkt.page.add(pkt.data_meta), pkt.page.add(data - metalen), metalen) };
                }
                pkt.data = data;
                pkt.data_meta = data - metalen;
                Ok(0)
            }
            H_XDP_ADJUST_META => {
                let meta = pkt.data_meta as i64 + a2 as i32 as i64;
                if meta < XDP_FRAME_SIZE as i64 || meta > pkt.data as i64 {
                    return Ok(neg(EINVAL));
                }
                let metalen = pkt.data - meta as usize;
                if metalen % 4 != 0 || metalen > 32 {
                    return Ok(neg(EACCES));
                }
                pkt.data_meta = meta as usize;
                Ok(0)
            }
            H_XDP_ADJUST_TAIL => {
                let offset = a2 as i32;
                if pkt.has_frags {
                    // a frame with fragments grows or shrinks at its last fragment
                    return Ok(if offset < 0 {
                        self.frags_shrink_tail(pkt, offset.wrapping_neg())
                    } else {
                        self.frags_increase_tail(offset)
                    });
                }
                let end = pkt.data_end as i64 + offset as i64;
                if end > (pkt.page_size - SKB_SHARED_INFO) as i64 || end < (pkt.data + ETH_HLEN) as i64 {
                    return Ok(neg(EINVAL));
                }
                let end = end as usize;
                if end > pkt.data_end {
                    // the kernel clears the grown tail: it may hold stale bytes
                    unsafe { std::ptr::write_bytes(pkt.page.add(pkt.data_end), 0, end - pkt.data_end) };
                }
                pkt.data_end = end;
                Ok(0)
            }
            H_XDP_GET_BUFF_LEN => Ok(self.buff_len(pkt) as u64),
            H_XDP_LOAD_BYTES | H_XDP_STORE_BYTES => {
                // bpf_xdp_pointer's checks, then bpf_xdp_copy_buf across the linear part and the fragments
                let (off, len) = (a2 as u32 as usize, a4 as u32 as usize);
                if off > 0xffff || len > 0xffff {
                    return Ok(neg(EFAULT));
                }
                if len == 0 || off + len > self.buff_len(pkt) {
                    return Ok(neg(EINVAL));
                }
                let load = id == H_XDP_LOAD_BYTES;
                let p = self.tr(pkt, pc, a3, len, load)?;
                self.copy_buf(pkt, off, p, len, !load);
                Ok(0)
            }
            H_CHECK_MTU => {
                if a5 != 0 {
                    return Ok(neg(EINVAL));
                }
                let want = if a2 as u32 == 0 { pkt.ingress_ifindex } else { a2 as u32 };
                let Some(&(_, mtu)) = self.mtus.iter().find(|(i, _)| *i == want) else {
                    return Ok(neg(ENODEV));
                };
                let p = self.tr(pkt, pc, a3, 4, true)?;
                let given = unsafe { std::ptr::read_unaligned(p as *const u32) } as i64;
                // bpf_xdp_check_mtu measures the linear part only (data_end - data), also for a frame
                // with fragments (6.18: checked against BPF_PROG_TEST_RUN), in int arithmetic.
                let mut len = (pkt.data_end - pkt.data) as i32;
                if given != 0 {
                    len = (given as u32).wrapping_add(ETH_HLEN as u32) as i32;
                }
                len = len.wrapping_add(a4 as i32);
                let dev_len = (mtu as i32).wrapping_add(ETH_HLEN as i32);
                let ret = if len > dev_len { 1 } else { 0 }; // BPF_MTU_CHK_RET_FRAG_NEEDED
                unsafe { std::ptr::write_unaligned(p as *mut u32, mtu) };
                Ok(ret)
            }
            H_LOOP => {
                let (nr, cb, cbctx, flags) = (a1 as u32 as u64, a2, a3, a4);
                if flags != 0 {
                    return Ok(neg(EINVAL));
                }
                if nr > BPF_MAX_LOOPS {
                    return Ok(neg(E2BIG));
                }
                if cb >> 32 != TAG_FUNC || (cb & 0xffff_ffff) as usize >= self.code.len() {
                    return fault(pc, "bpf_loop callback is not a function".into());
                }
                if self.depth + 1 >= MAX_CALL_FRAMES {
                    return fault(pc, format!("call depth beyond {} frames", MAX_CALL_FRAMES));
                }
                let saved = *regs;
                let mut done = 0u64;
                for k in 0..nr {
                    if self.left == 0 {
                        return fault(pc, format!("budget of {} backward jumps and calls exhausted", self.budget));
                    }
                    self.left -= 1;
                    let mut r = [0u64; 16];
                    r[1] = k;
                    r[2] = cbctx;
                    self.depth += 1;
                    r[10] = frame_top(self.depth);
                    let ret = self.call((cb & 0xffff_ffff) as usize, &mut r, pkt);
                    self.depth -= 1;
                    let ret = ret?;
                    done = k + 1;
                    if ret != 0 {
                        break;
                    }
                }
                *regs = saved;
                Ok(done)
            }
            _ => fault(pc, format!("unsupported helper {}", id)),
        }
    }
}

const EFAULT: i64 = 14;
#[allow(dead_code)]
const _SHINFO_FITS: () = assert!(SHINFO_BYTES <= SKB_SHARED_INFO);
const EACCES: i64 = 13;
const ENODEV: i64 = 19;

/// `bpf_trace_printk`'s format: %d %i %u %x %X %c %p with l/ll, and %%; at most three arguments.
pub fn format_printk(fmt: &[u8], args: &[u64; 3]) -> String {
    let mut out = String::new();
    let mut k = 0;
    let mut i = 0;
    while i < fmt.len() {
        let c = fmt[i];
        if c != b'%' {
            out.push(c as char);
            i += 1;
            continue;
        }
        i += 1;
        if i < fmt.len() && fmt[i] == b'%' {
            out.push('%');
            i += 1;
            continue;
        }
        let mut longs = 0;
        while i < fmt.len() && fmt[i] == b'l' {
            longs += 1;
            i += 1;
        }
        if i >= fmt.len() {
            break;
        }
        let a = if k < 3 { args[k] } else { 0 };
        k += 1;
        let a = if longs == 0 { a as u32 as u64 } else { a };
        match fmt[i] {
            b'd' | b'i' => {
                if longs == 0 { out += &(a as u32 as i32).to_string() } else { out += &(a as i64).to_string() }
            }
            b'u' => out += &a.to_string(),
            b'x' => out += &format!("{:x}", a),
            b'X' => out += &format!("{:X}", a),
            b'c' => out.push(a as u8 as char),
            b'p' => out += &format!("{:#x}", args[k - 1]),
            b's' => out += "(string)",
            other => { out.push('%'); out.push(other as char); }
        }
        i += 1;
    }
    out
}
