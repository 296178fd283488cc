//! The one place that knows the CPU: where a task's saved user registers keep the syscall's
//! number and arguments, the syscall numbers of the socket paths, and which registers Go's
//! register ABI uses. The eBPF object is built per architecture (`bpf_target_arch`, set by
//! aya-build from the agent's target); everything else reads these tables.

/// Saved user registers (`struct pt_regs`, the ptrace ABI: stable) as 8-byte slots.
pub struct Table {
    /// Slot of the syscall number, read as its low 32 bits (x86_64 `orig_ax`; arm64
    /// `syscallno`, an `s32` sharing its slot with padding).
    pub nr_slot: u32,
    /// Slots of the syscall's first three arguments: three adjacent slots from the first.
    pub args_first_slot: u32,
    /// Their order there: argument i is at `args_first_slot + args_order[i]`.
    pub args_order: [u32; 3],
    /// Where the first argument is kept for the whole syscall, followed by the number's slot:
    /// arm64 overwrites x0 with the result before the syscall's exit tracepoint runs, and keeps
    /// the argument in `orig_x0`.
    pub saved_arg0_slot: u32,
    pub nr_read: u64,
    pub nr_write: u64,
    pub nr_readv: u64,
    pub nr_writev: u64,
    pub nr_sendfile: u64,
    pub nr_sendto: u64,
    pub nr_recvfrom: u64,
    pub nr_sendmsg: u64,
    pub nr_recvmsg: u64,
    /// Go's register ABI (Go >= 1.17): the running goroutine `g`, then the first three integer
    /// arguments at a function's entry (the first is also where the first result is at a
    /// RET).
    pub go_g_slot: u32,
    pub go_arg_slots: [u32; 3],
}

/// x86_64: `struct pt_regs` is r15, r14, r13, r12, bp, bx, r11, r10, r9, r8, ax, cx, dx, si,
/// di, orig_ax, ...; syscall arguments in di, si, dx; Go: g in R14, arguments RAX, RBX, RCX, ...
#[cfg(bpf_target_arch = "x86_64")]
pub const ARCH: Table = Table {
    nr_slot: 15,
    args_first_slot: 12,
    args_order: [2, 1, 0],
    saved_arg0_slot: 14,
    nr_read: 0,
    nr_write: 1,
    nr_readv: 19,
    nr_writev: 20,
    nr_sendfile: 40,
    nr_sendto: 44,
    nr_recvfrom: 45,
    nr_sendmsg: 46,
    nr_recvmsg: 47,
    go_g_slot: 1,
    go_arg_slots: [10, 5, 11],
};

/// arm64: `struct pt_regs` is regs[0..31], sp, pc, pstate, orig_x0, syscallno, ...; the
/// syscall arguments are in x0..x2 (x0 replaced by the result at the exit, `orig_x0` kept);
/// numbers from the generic table
/// (asm-generic/unistd.h); Go: g in R28, arguments R0, R1, ...
#[cfg(bpf_target_arch = "aarch64")]
pub const ARCH: Table = Table {
    nr_slot: 35,
    args_first_slot: 0,
    args_order: [0, 1, 2],
    saved_arg0_slot: 34,
    nr_read: 63,
    nr_write: 64,
    nr_readv: 65,
    nr_writev: 66,
    nr_sendfile: 71,
    nr_sendto: 206,
    nr_recvfrom: 207,
    nr_sendmsg: 211,
    nr_recvmsg: 212,
    go_g_slot: 28,
    go_arg_slots: [0, 1, 2],
};

// The saved first argument is followed by the number (one read of both).
const _: () = assert!(ARCH.saved_arg0_slot + 1 == ARCH.nr_slot);

#[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
compile_error!("the agent's kernel programs support x86_64 and aarch64 (bpf_target_arch)");

/// Byte offset of a register slot.
#[inline(always)]
pub const fn slot(n: u32) -> u64 {
    n as u64 * 8
}

/// The current syscall's number and first three arguments from the saved user registers at
/// `regs`, valid during the syscall and at its exit: one read where the number follows the
/// arguments and the first one stays in place (x86_64), two elsewhere.
#[inline(always)]
pub fn syscall_regs(regs: u64) -> Option<(u64, [u64; 3])> {
    let first = regs + slot(ARCH.args_first_slot);
    let o = ARCH.args_order;
    if ARCH.nr_slot == ARCH.args_first_slot + 3
        && ARCH.saved_arg0_slot == ARCH.args_first_slot + o[0]
    {
        let r: [u64; 4] = read_kernel(first)?;
        let nr = r[3] & 0xffff_ffff;
        return Some((nr, [r[o[0] as usize], r[o[1] as usize], r[o[2] as usize]]));
    }
    let r: [u64; 3] = read_kernel(first)?;
    let [arg0, nr] = read_kernel::<[u64; 2]>(regs + slot(ARCH.saved_arg0_slot))?;
    Some((nr & 0xffff_ffff, [arg0, r[o[1] as usize], r[o[2] as usize]]))
}

/// A register of a uprobe's context (`struct pt_regs`, as `slot` numbers them).
#[inline(always)]
pub fn uprobe_reg(ctx: &aya_ebpf::programs::ProbeContext, slot: u32) -> u64 {
    unsafe { *(ctx.regs as *const u64).add(slot as usize) }
}

#[inline(always)]
fn read_kernel<T>(at: u64) -> Option<T> {
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel(at as *const T).ok() }
}
