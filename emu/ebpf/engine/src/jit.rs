//! The JIT: each function of the object (a program's entry, a bpf-to-bpf callee, a `bpf_loop` callback)
//! compiled once at load to native code through Cranelift, with the interpreter's safety contract.
//!
//! The compiled code keeps the interpreter's address space: a pointer is the same tagged 64-bit value
//! (region in the high 32 bits, `BASE` + offset in the low 32), so every value a program computes, stores
//! or returns is the interpreter's, bit for bit, and the differential and fuzz tests can demand identical
//! results.  Each load and store is checked inline for the two regions of the hot path — the packet
//! (`[data_meta, data_end)`, re-read from the `Pkt` at every access because helpers move them) and the
//! stack (the 8 frames of 512 bytes) — and translated there to a host address; any other access (the ctx,
//! a map value, a bad pointer) calls the interpreter's own `Vm::load`/`Vm::store_mem`, which checks it
//! against the same table and produces the same fault.  Helpers, tail calls and atomics call the
//! interpreter's Rust functions (`Vm::helper`, `Vm::tail_call`, `Vm::atomic`).  A fault records itself in
//! the `Vm` (`jit_faulted`, `jit_fault`) and the compiled code returns at once, up through every frame;
//! `Vm::call` turns it back into the `Err` the interpreter would have returned.  The budget (backward
//! jumps, calls, `bpf_loop` iterations) is the same counter, `Vm::left`, decremented at the same places.
//!
//! Registers r0-r10 are Cranelift variables.  A compiled function takes `(vm, pkt, regs)`: `regs` holds
//! r0-r9 at entry and receives r0-r5 at exit, because the interpreter's callee sees the caller's r0 and
//! r6-r9 and leaves its r0-r5 to the caller (the verifier would forbid reading them; without a verifier
//! the emulator keeps the two engines equal).  r10 is the frame top of the current depth.

use crate::maps::ENOENT;
use crate::vm::*;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{I16, I32, I64, I8};
use cranelift_codegen::ir::{
    AbiParam, Block, FuncRef, InstBuilder, MemFlagsData, SigRef, Signature, StackSlot, StackSlotData, StackSlotKind,
    Type, UserFuncName, Value,
};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, FuncId, Linkage, Module};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::mem::offset_of;

/// A compiled function: `(vm, pkt, regs) -> r0`.
pub type JitFn = unsafe extern "C" fn(*mut Vm, *mut Pkt, *mut u64) -> u64;

/// The compiled functions of one engine, by entry instruction.
pub struct Jit {
    module: Option<JITModule>,
    pub fns: Vec<Option<JitFn>>,
    // Fault messages fixed at compile time (an unsupported opcode, a jump out of the program), by index.
    msgs: Vec<String>,
}

impl Drop for Jit {
    fn drop(&mut self) {
        if let Some(m) = self.module.take() {
            // Safety: the engine that owns this Jit is being dropped; no compiled code runs any more.
            unsafe { m.free_memory() };
        }
    }
}

// ---- the Rust side of the compiled code: the interpreter's functions, faults kept in the Vm ----

impl Vm {
    fn set_jit_fault(&mut self, f: Box<Fault>) {
        self.jit_fault = Some(f);
        self.jit_faulted = 1;
    }
}

unsafe extern "C" fn jit_load(vm: *mut Vm, pkt: *mut Pkt, pc: u64, addr: u64, n: u64) -> u64 {
    let vm = &mut *vm;
    match vm.load(&*pkt, pc as usize, addr, n as usize) {
        Ok(v) => v,
        Err(f) => {
            vm.set_jit_fault(f);
            0
        }
    }
}

unsafe extern "C" fn jit_store(vm: *mut Vm, pkt: *mut Pkt, pc: u64, addr: u64, n: u64, v: u64) {
    let vm = &mut *vm;
    if let Err(f) = vm.store_mem(&*pkt, pc as usize, addr, n as usize, v) {
        vm.set_jit_fault(f);
    }
}

unsafe extern "C" fn jit_helper(vm: *mut Vm, pkt: *mut Pkt, pc: u64, id: u64, regs: *mut u64) -> u64 {
    let vm = &mut *vm;
    match vm.helper(&mut *pkt, pc as usize, id as i32, &mut *(regs as *mut [u64; 16])) {
        Ok(v) => v,
        Err(f) => {
            vm.set_jit_fault(f);
            0
        }
    }
}

unsafe extern "C" fn jit_atomic(vm: *mut Vm, pkt: *mut Pkt, pc: u64, regs: *mut u64) {
    let vm = &mut *vm;
    let i = vm.code[pc as usize];
    if let Err(f) = vm.atomic(&*pkt, pc as usize, i, &mut *(regs as *mut [u64; 16])) {
        vm.set_jit_fault(f);
    }
}

/// The compiled entry of the tail call's target, or 0 when the call falls through.
unsafe extern "C" fn jit_tail_call(vm: *mut Vm, pkt: *mut Pkt, pc: u64, regs: *mut u64) -> u64 {
    let vm = &mut *vm;
    match vm.tail_call(&mut *pkt, pc as usize, &*(regs as *const [u64; 16])) {
        Ok(Some(t)) => match vm.jit.as_ref().and_then(|j| j.fns[t]) {
            Some(f) => f as usize as u64,
            None => {
                vm.set_jit_fault(Box::new(Fault { pc: pc as usize, what: "tail call target not compiled".into() }));
                0
            }
        },
        Ok(None) => 0,
        Err(f) => {
            vm.set_jit_fault(f);
            0
        }
    }
}

unsafe extern "C" fn jit_fault(vm: *mut Vm, pc: u64, msg: u64) {
    let vm = &mut *vm;
    let what = vm.jit.as_ref().map(|j| j.msgs[msg as usize].clone()).unwrap_or_default();
    vm.set_jit_fault(Box::new(Fault { pc: pc as usize, what }));
}

unsafe extern "C" fn jit_budget(vm: *mut Vm, pc: u64) {
    let vm = &mut *vm;
    let what = format!("budget of {} backward jumps and calls exhausted", vm.budget);
    vm.set_jit_fault(Box::new(Fault { pc: pc as usize, what }));
}

// ---- compilation ----

/// What instruction `op` does to control flow: its successors given its pc (targets may lie outside the
/// code: the interpreter faults there, and so does the compiled code).
fn successors(i: &Insn, pc: usize) -> Vec<i64> {
    let next = pc as i64 + 1;
    match i.op {
        0x95 => vec![],
        0x05 => vec![next + i.off as i64],
        0x06 => vec![next + i.imm as i64],
        0x18 => vec![next + 1],
        op if cond(op).is_some() => vec![next + i.off as i64, next],
        op if known(op) => vec![next],
        _ => vec![], // faults
    }
}

/// The conditional jumps: (condition, 32-bit, register operand); JSET is `None` as a condition code.
fn cond(op: u8) -> Option<(Option<IntCC>, bool, bool)> {
    let cls = op & 7;
    if cls != 5 && cls != 6 {
        return None;
    }
    let cc = match op & 0xf0 {
        0x10 => Some(IntCC::Equal),
        0x20 => Some(IntCC::UnsignedGreaterThan),
        0x30 => Some(IntCC::UnsignedGreaterThanOrEqual),
        0x40 => None,
        0x50 => Some(IntCC::NotEqual),
        0x60 => Some(IntCC::SignedGreaterThan),
        0x70 => Some(IntCC::SignedGreaterThanOrEqual),
        0xa0 => Some(IntCC::UnsignedLessThan),
        0xb0 => Some(IntCC::UnsignedLessThanOrEqual),
        0xc0 => Some(IntCC::SignedLessThan),
        0xd0 => Some(IntCC::SignedLessThanOrEqual),
        _ => return None,
    };
    Some((cc, cls == 6, op & 8 != 0))
}

/// Opcodes the interpreter executes that fall through to the next instruction (jumps and exit apart).
fn known(op: u8) -> bool {
    matches!(op,
        0x07 | 0x0f | 0x17 | 0x1f | 0x27 | 0x2f | 0x37 | 0x3f | 0x47 | 0x4f | 0x57 | 0x5f | 0x67 | 0x6f
        | 0x77 | 0x7f | 0x87 | 0x97 | 0x9f | 0xa7 | 0xaf | 0xb7 | 0xbf | 0xc7 | 0xcf | 0xd7
        | 0x04 | 0x0c | 0x14 | 0x1c | 0x24 | 0x2c | 0x34 | 0x3c | 0x44 | 0x4c | 0x54 | 0x5c | 0x64 | 0x6c
        | 0x74 | 0x7c | 0x84 | 0x94 | 0x9c | 0xa4 | 0xac | 0xb4 | 0xbc | 0xc4 | 0xcc | 0xd4 | 0xdc
        | 0x61 | 0x69 | 0x71 | 0x79 | 0x81 | 0x89 | 0x91 | 0x62 | 0x6a | 0x72 | 0x7a | 0x63 | 0x6b | 0x73
        | 0x7b | 0xc3 | 0xdb | 0x85)
}

impl Jit {
    /// Compile every entry of `vm`'s code: the programs, the bpf-to-bpf callees and the functions
    /// `ld_imm64` names (`bpf_loop` callbacks).  An error means no JIT on this host (the caller falls back
    /// to the interpreter).
    pub fn compile(vm: &Vm) -> Result<Jit, String> {
        let mut fb = settings::builder();
        for (k, v) in [("opt_level", "speed"), ("use_colocated_libcalls", "false"), ("is_pic", "false")] {
            fb.set(k, v).map_err(|e| e.to_string())?;
        }
        let isa = cranelift_native::builder()
            .map_err(|e| e.to_string())?
            .finish(settings::Flags::new(fb))
            .map_err(|e| e.to_string())?;
        if isa.pointer_type() != I64 || cfg!(target_endian = "big") {
            return Err("the JIT needs a 64-bit little-endian host".into());
        }
        let mut module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()));
        let code = &vm.code;
        let mut entries: BTreeSet<usize> = vm.prog_start.iter().copied().collect();
        for (k, i) in code.iter().enumerate() {
            if i.op == 0x85 && i.src == 1 {
                let t = k as i64 + 1 + i.imm as i64;
                if t >= 0 && (t as usize) < code.len() {
                    entries.insert(t as usize);
                }
            }
            if i.op == 0x18 && i.imm64 >> 32 == TAG_FUNC && ((i.imm64 & 0xffff_ffff) as usize) < code.len() {
                entries.insert((i.imm64 & 0xffff_ffff) as usize);
            }
        }
        let mut sig = module.make_signature();
        for _ in 0..3 {
            sig.params.push(AbiParam::new(I64));
        }
        sig.returns.push(AbiParam::new(I64));
        let mut ids: BTreeMap<usize, FuncId> = BTreeMap::new();
        for &e in &entries {
            let id = module.declare_function(&format!("f{}", e), Linkage::Local, &sig).map_err(|e| e.to_string())?;
            ids.insert(e, id);
        }
        let mut msgs = Vec::new();
        let mut ctx = module.make_context();
        let mut fctx = FunctionBuilderContext::new();
        for (&entry, &id) in &ids {
            ctx.func.signature = sig.clone();
            ctx.func.name = UserFuncName::user(0, id.as_u32());
            {
                let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
                let mut refs = HashMap::new();
                for (&t, &tid) in &ids {
                    refs.insert(t, module.declare_func_in_func(tid, b.func));
                }
                let mut fc = FnCompiler::new(&mut b, vm, &refs, &mut msgs, sig.call_conv);
                fc.build(entry);
                b.seal_all_blocks();
                b.finalize(module.target_config());
            }
            module.define_function(id, &mut ctx).map_err(|e| format!("function at insn {}: {:?}", entry, e))?;
            module.clear_context(&mut ctx);
        }
        module.finalize_definitions().map_err(|e| e.to_string())?;
        let mut fns = vec![None; code.len()];
        for (&e, &id) in &ids {
            let p = module.get_finalized_function(id);
            // Safety: the function was built with exactly JitFn's signature, in the host's call convention.
            fns[e] = Some(unsafe { std::mem::transmute::<*const u8, JitFn>(p) });
        }
        Ok(Jit { module: Some(module), fns, msgs })
    }
}

// The engine's own fields: aligned, never trapping.
const TRUSTED: MemFlagsData = MemFlagsData::trusted();
// Packet and stack accesses: checked before, so they cannot trap; unaligned allowed.
const CHECKED: MemFlagsData = MemFlagsData::new().with_notrap();
const VM_LEFT: i32 = offset_of!(Vm, left) as i32;
const VM_DEPTH: i32 = offset_of!(Vm, depth) as i32;
const VM_FAULTED: i32 = offset_of!(Vm, jit_faulted) as i32;
const VM_STACK: i32 = offset_of!(Vm, stack_base) as i32;
const PKT_PAGE: i32 = offset_of!(Pkt, page) as i32;
const PKT_META: i32 = offset_of!(Pkt, data_meta) as i32;
const PKT_END: i32 = offset_of!(Pkt, data_end) as i32;

struct FnCompiler<'a, 'b> {
    b: &'a mut FunctionBuilder<'b>,
    vm: &'a Vm,
    refs: &'a HashMap<usize, FuncRef>,
    msgs: &'a mut Vec<String>,
    cc: cranelift_codegen::isa::CallConv,
    regs: [Variable; 11],
    blocks: BTreeMap<i64, Block>,
    leaders: BTreeSet<i64>,
    todo: Vec<i64>,
    vmp: Value,
    pktp: Value,
    regsp: Value,
    page: Value,
    stack: Value,
    bail: Block,
    slot: StackSlot,
    sigs: HashMap<(usize, bool), SigRef>,
}

impl<'a, 'b> FnCompiler<'a, 'b> {
    fn new(b: &'a mut FunctionBuilder<'b>, vm: &'a Vm, refs: &'a HashMap<usize, FuncRef>,
           msgs: &'a mut Vec<String>, cc: cranelift_codegen::isa::CallConv) -> Self {
        let regs = std::array::from_fn(|_| b.declare_var(I64));
        let bail = b.create_block();
        let slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 16 * 8, 3));
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let p = b.block_params(entry).to_vec();
        let z = b.ins().iconst(I64, 0);
        FnCompiler {
            b, vm, refs, msgs, cc, regs, blocks: BTreeMap::new(), leaders: BTreeSet::new(), todo: Vec::new(),
            vmp: p[0], pktp: p[1], regsp: p[2], page: z, stack: z, bail, slot, sigs: HashMap::new(),
        }
    }

    fn get(&mut self, r: u8) -> Value {
        self.b.use_var(self.regs[(r & 0xf) as usize])
    }

    fn set(&mut self, r: u8, v: Value) {
        self.b.def_var(self.regs[(r & 0xf) as usize], v);
    }

    fn k(&mut self, v: u64) -> Value {
        self.b.ins().iconst(I64, v as i64)
    }

    /// A signature of `n` i64 parameters, returning an i64 or nothing.
    fn sig(&mut self, n: usize, ret: bool) -> SigRef {
        if let Some(s) = self.sigs.get(&(n, ret)) {
            return *s;
        }
        let mut s = Signature::new(self.cc);
        for _ in 0..n {
            s.params.push(AbiParam::new(I64));
        }
        if ret {
            s.returns.push(AbiParam::new(I64));
        }
        let r = self.b.import_signature(s);
        self.sigs.insert((n, ret), r);
        r
    }

    /// Call a Rust function of this module at `addr`; its result if it has one.
    fn call_rust(&mut self, addr: usize, args: &[Value], ret: bool) -> Option<Value> {
        let sig = self.sig(args.len(), ret);
        let f = self.k(addr as u64);
        let inst = self.b.ins().call_indirect(sig, f, args);
        if ret { Some(self.b.inst_results(inst)[0]) } else { None }
    }

    /// After a call that may have faulted: go to `bail` when it did.
    fn check_fault(&mut self) {
        let f = self.b.ins().load(I64, TRUSTED, self.vmp, VM_FAULTED);
        let ok = self.b.create_block();
        self.b.ins().brif(f, self.bail, &[], ok, &[]);
        self.b.switch_to_block(ok);
    }

    /// Record a fault fixed at compile time and return.
    fn fault_here(&mut self, pc: usize, what: String) {
        self.msgs.push(what);
        let idx = self.msgs.len() - 1;
        let (vmp, pcv, m) = (self.vmp, self.k(pc as u64), self.k(idx as u64));
        self.call_rust(jit_fault as *const () as usize, &[vmp, pcv, m], false);
        self.b.ins().jump(self.bail, &[]);
    }

    fn block_for(&mut self, pc: i64) -> Block {
        if let Some(b) = self.blocks.get(&pc) {
            return *b;
        }
        let blk = self.b.create_block();
        self.blocks.insert(pc, blk);
        self.todo.push(pc);
        blk
    }

    fn spill(&mut self, from: usize, to: usize, base: Value) {
        for r in from..to {
            let v = self.b.use_var(self.regs[r]);
            self.b.ins().store(TRUSTED, v, base, (r * 8) as i32);
        }
    }

    fn reload(&mut self, from: usize, to: usize, base: Value) {
        for r in from..to {
            let v = self.b.ins().load(I64, TRUSTED, base, (r * 8) as i32);
            self.b.def_var(self.regs[r], v);
        }
    }

    /// The budget check of a backward jump or call at `pc`, in the current block.
    fn spend(&mut self, pc: usize) {
        let left = self.b.ins().load(I64, TRUSTED, self.vmp, VM_LEFT);
        let out = self.b.create_block();
        let ok = self.b.create_block();
        self.b.ins().brif(left, ok, &[], out, &[]);
        self.b.switch_to_block(out);
        let (vmp, pcv) = (self.vmp, self.k(pc as u64));
        self.call_rust(jit_budget as *const () as usize, &[vmp, pcv], false);
        self.b.ins().jump(self.bail, &[]);
        self.b.switch_to_block(ok);
        let l1 = self.b.ins().iadd_imm_s(left, -1);
        self.b.ins().store(TRUSTED, l1, self.vmp, VM_LEFT);
    }

    fn build(&mut self, entry: usize) {
        // Leaders: the entry, every jump target, the instruction after a conditional jump.
        let code = &self.vm.code;
        let mut seen = BTreeSet::new();
        let mut work = vec![entry as i64];
        self.leaders.insert(entry as i64);
        while let Some(pc) = work.pop() {
            if pc < 0 || pc as usize >= code.len() || !seen.insert(pc) {
                continue;
            }
            let i = &code[pc as usize];
            let s = successors(i, pc as usize);
            let branches = matches!(i.op, 0x05 | 0x06) || cond(i.op).is_some();
            for &t in &s {
                if branches {
                    self.leaders.insert(t);
                }
                work.push(t);
            }
        }
        // Prologue: the page, the stack, r10 of this depth, r0-r9 from the caller.
        self.page = self.b.ins().load(I64, TRUSTED, self.pktp, PKT_PAGE);
        self.stack = self.b.ins().load(I64, TRUSTED, self.vmp, VM_STACK);
        let depth = self.b.ins().load(I64, TRUSTED, self.vmp, VM_DEPTH);
        let d512 = self.b.ins().imul_imm_s(depth, STACK_FRAME as i64);
        let top = self.k((TAG_STACK << 32) + BASE + STACK_SIZE as u64);
        let r10 = self.b.ins().isub(top, d512);
        self.b.def_var(self.regs[10], r10);
        let rp = self.regsp;
        self.reload(0, 10, rp);
        let first = self.block_for(entry as i64);
        self.b.ins().jump(first, &[]);
        while let Some(pc) = self.todo.pop() {
            let blk = self.blocks[&pc];
            self.b.switch_to_block(blk);
            self.chain(pc);
        }
        self.b.switch_to_block(self.bail);
        let z = self.k(0);
        self.b.ins().return_(&[z]);
    }

    /// Emit the instructions from leader `pc` until a terminator or the next leader.
    fn chain(&mut self, start: i64) {
        let mut pc = start;
        loop {
            if pc < 0 || pc as usize >= self.vm.code.len() {
                self.fault_here(pc as usize, "jump out of the program".into());
                return;
            }
            let i = self.vm.code[pc as usize];
            let next = match self.insn(pc as usize, i) {
                Some(n) => n,
                None => return,
            };
            if self.leaders.contains(&next) {
                let blk = self.block_for(next);
                self.b.ins().jump(blk, &[]);
                return;
            }
            pc = next;
        }
    }

    /// Host address of an access of `n` bytes at `addr` when it is in the packet or the stack, with the
    /// fast path's block to go to; otherwise `slow`.
    fn translate(&mut self, src: u8, addr: Value, n: u64, fast: Block, slow: Block, host: Variable) {
        let lo = self.b.ins().ireduce(I32, addr);
        let off32 = self.b.ins().iadd_imm_s(lo, -(BASE as i64));
        let off = self.b.ins().uextend(I64, off32);
        let end = self.b.ins().iadd_imm_s(off, n as i64);
        let st_blk = self.b.create_block();
        if src != 10 {
            // r10-relative addresses are always the stack's (r10 + an i16 offset cannot leave the tag)
            let tag = self.b.ins().ushr_imm_s(addr, 32);
            let pkt_blk = self.b.create_block();
            let not_pkt = self.b.create_block();
            let is_pkt = self.b.ins().icmp_imm_s(IntCC::Equal, tag, TAG_PKT as i64);
            self.b.ins().brif(is_pkt, pkt_blk, &[], not_pkt, &[]);
            self.b.switch_to_block(pkt_blk);
            let dm = self.b.ins().load(I64, TRUSTED, self.pktp, PKT_META);
            let de = self.b.ins().load(I64, TRUSTED, self.pktp, PKT_END);
            let c1 = self.b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, off, dm);
            let c2 = self.b.ins().icmp(IntCC::UnsignedLessThanOrEqual, end, de);
            let ok = self.b.ins().band(c1, c2);
            let h = self.b.ins().iadd(self.page, off);
            self.b.def_var(host, h);
            self.b.ins().brif(ok, fast, &[], slow, &[]);
            self.b.switch_to_block(not_pkt);
            let is_st = self.b.ins().icmp_imm_s(IntCC::Equal, tag, TAG_STACK as i64);
            self.b.ins().brif(is_st, st_blk, &[], slow, &[]);
        } else {
            self.b.ins().jump(st_blk, &[]);
        }
        self.b.switch_to_block(st_blk);
        let ok = self.b.ins().icmp_imm_s(IntCC::UnsignedLessThanOrEqual, end, STACK_SIZE as i64);
        let h = self.b.ins().iadd(self.stack, off);
        self.b.def_var(host, h);
        self.b.ins().brif(ok, fast, &[], slow, &[]);
    }

    fn ty(n: u64) -> Type {
        match n {
            1 => I8,
            2 => I16,
            4 => I32,
            _ => I64,
        }
    }

    /// r[dst] = the `n`-byte value at r[src] + off, zero-extended (sign-extended with `sx`).
    fn emit_load(&mut self, pc: usize, i: Insn, n: u64, sx: bool) {
        let base = self.get(i.src);
        let addr = self.b.ins().iadd_imm_s(base, i.off as i64);
        let host = self.b.declare_var(I64);
        let res = self.b.declare_var(I64);
        let (fast, slow, done) = (self.b.create_block(), self.b.create_block(), self.b.create_block());
        self.translate(i.src, addr, n, fast, slow, host);
        self.b.switch_to_block(fast);
        let h = self.b.use_var(host);
        let ty = Self::ty(n);
        let v = self.b.ins().load(ty, CHECKED, h, 0);
        let v = if ty == I64 { v } else { self.b.ins().uextend(I64, v) };
        self.b.def_var(res, v);
        self.b.ins().jump(done, &[]);
        self.b.switch_to_block(slow);
        let (vmp, pktp, pcv, nv) = (self.vmp, self.pktp, self.k(pc as u64), self.k(n));
        let v = self.call_rust(jit_load as *const () as usize, &[vmp, pktp, pcv, addr, nv], true).unwrap();
        self.b.def_var(res, v);
        self.check_fault();
        self.b.ins().jump(done, &[]);
        self.b.switch_to_block(done);
        let mut v = self.b.use_var(res);
        if sx && n < 8 {
            let narrow = self.b.ins().ireduce(ty, v);
            v = self.b.ins().sextend(I64, narrow);
        }
        self.set(i.dst, v);
    }

    /// The `n`-byte store of `v` at r[dst] + off.
    fn emit_store(&mut self, pc: usize, i: Insn, n: u64, v: Value) {
        let base = self.get(i.dst);
        let addr = self.b.ins().iadd_imm_s(base, i.off as i64);
        let host = self.b.declare_var(I64);
        let (fast, slow, done) = (self.b.create_block(), self.b.create_block(), self.b.create_block());
        self.translate(i.dst, addr, n, fast, slow, host);
        self.b.switch_to_block(fast);
        let h = self.b.use_var(host);
        let ty = Self::ty(n);
        let nv = if ty == I64 { v } else { self.b.ins().ireduce(ty, v) };
        self.b.ins().store(CHECKED, nv, h, 0);
        self.b.ins().jump(done, &[]);
        self.b.switch_to_block(slow);
        let (vmp, pktp, pcv, nn) = (self.vmp, self.pktp, self.k(pc as u64), self.k(n));
        self.call_rust(jit_store as *const () as usize, &[vmp, pktp, pcv, addr, nn, v], false);
        self.check_fault();
        self.b.ins().jump(done, &[]);
        self.b.switch_to_block(done);
    }

    /// Division and modulo with the kernel's definitions (by zero: 0, or the dividend kept; signed
    /// INT_MIN / -1 = INT_MIN, INT_MIN % -1 = 0), on values of type `ty`.
    fn divmod(&mut self, d: Value, s: Value, signed: bool, rem: bool, ty: Type) -> Value {
        let zero = self.b.ins().iconst(ty, 0);
        let one = self.b.ins().iconst(ty, 1);
        let z = self.b.ins().icmp_imm_s(IntCC::Equal, s, 0);
        if !signed {
            let s1 = self.b.ins().select(z, one, s);
            let q = if rem { self.b.ins().urem(d, s1) } else { self.b.ins().udiv(d, s1) };
            return self.b.ins().select(z, if rem { d } else { zero }, q);
        }
        let m1 = self.b.ins().icmp_imm_s(IntCC::Equal, s, -1);
        let bad = self.b.ins().bor(z, m1);
        let s1 = self.b.ins().select(bad, one, s);
        if rem {
            let q = self.b.ins().srem(d, s1);
            let q = self.b.ins().select(m1, zero, q);
            self.b.ins().select(z, d, q)
        } else {
            let q = self.b.ins().sdiv(d, s1);
            let neg = self.b.ins().ineg(d);
            let q = self.b.ins().select(m1, neg, q);
            self.b.ins().select(z, zero, q)
        }
    }

    fn bswap(&mut self, d: Value, width: i32) -> Value {
        match width {
            16 | 32 => {
                let ty = if width == 16 { I16 } else { I32 };
                let n = self.b.ins().ireduce(ty, d);
                let s = self.b.ins().bswap(n);
                self.b.ins().uextend(I64, s)
            }
            _ => self.b.ins().bswap(d),
        }
    }

    /// The arithmetic both ALU classes share, on values of type `ty` (I64, or I32 for the 32-bit class):
    /// `None`, emitting nothing, for the rest (mov, movsx, byte swaps, unknown codes).
    fn binop(&mut self, op: u8, off: i16, d: Value, s: Value, ty: Type) -> Option<Value> {
        let mask = if ty == I64 { 63 } else { 31 };
        Some(match op & 0xf0 {
            0x00 => self.b.ins().iadd(d, s),
            0x10 => self.b.ins().isub(d, s),
            0x20 => self.b.ins().imul(d, s),
            0x30 => self.divmod(d, s, off == 1, false, ty),
            0x40 => self.b.ins().bor(d, s),
            0x50 => self.b.ins().band(d, s),
            0x60 | 0x70 | 0xc0 => {
                let m = self.b.ins().band_imm_s(s, mask);
                match op & 0xf0 {
                    0x60 => self.b.ins().ishl(d, m),
                    0x70 => self.b.ins().ushr(d, m),
                    _ => self.b.ins().sshr(d, m),
                }
            }
            0x80 if op & 8 == 0 => self.b.ins().ineg(d),
            0x90 => self.divmod(d, s, off == 1, true, ty),
            0xa0 => self.b.ins().bxor(d, s),
            _ => return None,
        })
    }

    /// Emit one instruction; the next pc when control falls through, `None` after a terminator.
    fn insn(&mut self, pc: usize, i: Insn) -> Option<i64> {
        let next = pc as i64 + 1;
        let op = i.op;
        let imm = i.imm as i64 as u64;
        // ---- ALU64 ----
        if op & 7 == 7 {
            let d = self.get(i.dst);
            let s = if op & 8 != 0 { self.get(i.src) } else { self.k(imm) };
            let v = if let Some(v) = self.binop(op, i.off, d, s, I64) { v } else { match op {
                0xb7 => s,
                0xbf => match i.off {
                    8 | 16 | 32 => {
                        let ty = Self::ty((i.off / 8) as u64);
                        let n = self.b.ins().ireduce(ty, s);
                        self.b.ins().sextend(I64, n)
                    }
                    _ => s,
                },
                0xd7 if matches!(i.imm, 16 | 32 | 64) => self.bswap(d, i.imm),
                0xd7 => {
                    self.fault_here(pc, format!("bad bswap width {}", i.imm));
                    return None;
                }
                _ => {
                    self.fault_here(pc, format!("unsupported instruction opcode {:#04x}", op));
                    return None;
                }
            } };
            self.set(i.dst, v);
            return Some(next);
        }
        // ---- ALU32 (results zero-extended) ----
        if op & 7 == 4 {
            let d64 = self.get(i.dst);
            if op == 0xd4 || op == 0xdc {
                let v = match (op, i.imm) {
                    (0xd4, 16) => self.b.ins().band_imm_s(d64, 0xffff),
                    (0xd4, 32) => self.b.ins().band_imm_s(d64, 0xffff_ffff),
                    (0xd4, 64) => d64,
                    (0xdc, 16 | 32 | 64) => self.bswap(d64, i.imm),
                    _ => {
                        self.fault_here(pc, format!("bad endian width {}", i.imm));
                        return None;
                    }
                };
                self.set(i.dst, v);
                return Some(next);
            }
            let d = self.b.ins().ireduce(I32, d64);
            let s = if op & 8 != 0 {
                let s64 = self.get(i.src);
                self.b.ins().ireduce(I32, s64)
            } else {
                self.b.ins().iconst(I32, i.imm as u32 as i64)
            };
            let v = if let Some(v) = self.binop(op, i.off, d, s, I32) { v } else { match op {
                0xb4 => s,
                0xbc => match i.off {
                    8 | 16 => {
                        let ty = Self::ty((i.off / 8) as u64);
                        let n = self.b.ins().ireduce(ty, s);
                        self.b.ins().sextend(I32, n)
                    }
                    _ => s,
                },
                _ => {
                    self.fault_here(pc, format!("unsupported instruction opcode {:#04x}", op));
                    return None;
                }
            } };
            let v = self.b.ins().uextend(I64, v);
            self.set(i.dst, v);
            return Some(next);
        }
        match op {
            0x18 => {
                let v = self.k(i.imm64);
                self.set(i.dst, v);
                Some(next + 1)
            }
            0x61 | 0x69 | 0x71 | 0x79 | 0x81 | 0x89 | 0x91 => {
                let n = match op { 0x61 | 0x81 => 4, 0x69 | 0x89 => 2, 0x71 | 0x91 => 1, _ => 8 };
                self.emit_load(pc, i, n, op & 0xf0 >= 0x80);
                Some(next)
            }
            0x62 | 0x6a | 0x72 | 0x7a | 0x63 | 0x6b | 0x73 | 0x7b => {
                let n = match op & 0xf8 { 0x60 => 4, 0x68 => 2, 0x70 => 1, _ => 8 };
                let v = if op & 7 == 2 { self.k(imm) } else { self.get(i.src) };
                self.emit_store(pc, i, n, v);
                Some(next)
            }
            0xc3 | 0xdb => {
                let sl = self.b.ins().stack_addr(I64, self.slot, 0);
                self.spill(0, 11, sl);
                let (vmp, pktp, pcv) = (self.vmp, self.pktp, self.k(pc as u64));
                self.call_rust(jit_atomic as *const () as usize, &[vmp, pktp, pcv, sl], false);
                self.check_fault();
                let sl = self.b.ins().stack_addr(I64, self.slot, 0);
                self.reload(0, 10, sl);
                Some(next)
            }
            0x05 | 0x06 => {
                let rel = if op == 0x05 { i.off as i64 } else { i.imm as i64 };
                if rel < 0 {
                    self.spend(pc);
                }
                let blk = self.block_for(next + rel);
                self.b.ins().jump(blk, &[]);
                None
            }
            0x95 => {
                let rp = self.regsp;
                self.spill(0, 6, rp);
                let r0 = self.get(0);
                self.b.ins().return_(&[r0]);
                None
            }
            0x85 => self.call(pc, i),
            op if cond(op).is_some() => {
                let (cc, is32, reg) = cond(op).unwrap();
                let mut d = self.get(i.dst);
                let mut s = if reg { self.get(i.src) } else { self.k(imm) };
                if is32 {
                    d = self.b.ins().ireduce(I32, d);
                    s = self.b.ins().ireduce(I32, s);
                }
                let c = match cc {
                    Some(cc) => self.b.ins().icmp(cc, d, s),
                    None => {
                        let a = self.b.ins().band(d, s);
                        self.b.ins().icmp_imm_s(IntCC::NotEqual, a, 0)
                    }
                };
                let target = next + i.off as i64;
                let fall = self.block_for(next);
                if i.off < 0 {
                    let taken = self.b.create_block();
                    self.b.ins().brif(c, taken, &[], fall, &[]);
                    self.b.switch_to_block(taken);
                    self.spend(pc);
                    let blk = self.block_for(target);
                    self.b.ins().jump(blk, &[]);
                } else {
                    let blk = self.block_for(target);
                    self.b.ins().brif(c, blk, &[], fall, &[]);
                }
                None
            }
            _ => {
                self.fault_here(pc, format!("unsupported instruction opcode {:#04x}", op));
                None
            }
        }
    }

    /// `call`: a bpf-to-bpf call, a tail call or a helper.
    fn call(&mut self, pc: usize, i: Insn) -> Option<i64> {
        let next = pc as i64 + 1;
        let (vmp, pktp) = (self.vmp, self.pktp);
        if i.src == 1 {
            let target = (pc as i64 + 1 + i.imm as i64) as usize;
            let Some(&f) = self.refs.get(&target) else {
                self.fault_here(pc, "call outside the program".into());
                return None;
            };
            // the depth, then the budget, as the interpreter checks them
            let depth = self.b.ins().load(I64, TRUSTED, vmp, VM_DEPTH);
            let d1 = self.b.ins().iadd_imm_s(depth, 1);
            let deep = self.b.ins().icmp_imm_s(IntCC::UnsignedGreaterThanOrEqual, d1, MAX_CALL_FRAMES as i64);
            let (too, ok) = (self.b.create_block(), self.b.create_block());
            self.b.ins().brif(deep, too, &[], ok, &[]);
            self.b.switch_to_block(too);
            self.fault_here(pc, format!("call depth beyond {} frames", MAX_CALL_FRAMES));
            self.b.switch_to_block(ok);
            self.spend(pc);
            self.b.ins().store(TRUSTED, d1, vmp, VM_DEPTH);
            let sl = self.b.ins().stack_addr(I64, self.slot, 0);
            self.spill(0, 10, sl);
            let inst = self.b.ins().call(f, &[vmp, pktp, sl]);
            let _ = self.b.inst_results(inst)[0];
            self.b.ins().store(TRUSTED, depth, vmp, VM_DEPTH);
            self.check_fault();
            let sl = self.b.ins().stack_addr(I64, self.slot, 0);
            self.reload(0, 6, sl);
            return Some(next);
        }
        if i.src != 0 {
            self.fault_here(pc, format!("unsupported call (src_reg {})", i.src));
            return None;
        }
        let sl = self.b.ins().stack_addr(I64, self.slot, 0);
        if i.imm == H_TAIL_CALL {
            self.spill(0, 10, sl);
            let pcv = self.k(pc as u64);
            let f = self.call_rust(jit_tail_call as *const () as usize, &[vmp, pktp, pcv, sl], true).unwrap();
            self.check_fault();
            let z = self.k(0);
            for r in 1..6 {
                self.set(r, z);
            }
            let (go, fall) = (self.b.create_block(), self.b.create_block());
            self.b.ins().brif(f, go, &[], fall, &[]);
            // taken: the target runs as an entry does (the ctx in r1) in this frame, and its exit is ours
            self.b.switch_to_block(go);
            let ctx = self.k((TAG_CTX << 32) + BASE);
            self.set(1, ctx);
            let rp = self.regsp;
            self.spill(0, 10, rp);
            let sig = self.sig(3, true);
            let inst = self.b.ins().call_indirect(sig, f, &[vmp, pktp, rp]);
            let r0 = self.b.inst_results(inst)[0];
            self.b.ins().return_(&[r0]);
            // not taken: r0 = -ENOENT, on with the next instruction
            self.b.switch_to_block(fall);
            let e = self.k((-ENOENT) as u64);
            self.set(0, e);
            return Some(next);
        }
        self.spill(1, 6, sl);
        let (pcv, idv) = (self.k(pc as u64), self.k(i.imm as u32 as u64));
        let r0 = self.call_rust(jit_helper as *const () as usize, &[vmp, pktp, pcv, idv, sl], true).unwrap();
        self.check_fault();
        self.set(0, r0);
        let z = self.k(0);
        for r in 1..6 {
            self.set(r, z);
        }
        Some(next)
    }
}
