//! vCPU setup (CPUID, MSRs, FPU, LAPIC, PVH or real-mode registers) and the
//! KVM_RUN loop dispatching port I/O and MMIO exits to the buses.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::Bus;
use crate::loader::GDT_ADDR;
use crate::memory::GuestMemoryMmap;

/// i8042 command port; writing 0xFE there pulses the CPU reset line.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 "pulse reset" command.
pub const I8042_RESET_CMD: u8 = 0xfe;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;

/// Errors of vCPU setup and execution.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// A KVM ioctl failed during setup.
    #[error("vCPU {id}: {op} failed: {source}")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// ioctl name.
        op: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing boot structures to guest memory failed.
    #[error("vCPU {id}: cannot write the boot GDT to guest memory: {reason}")]
    Gdt {
        /// vCPU index.
        id: u8,
        /// Why.
        reason: String,
    },
    /// KVM_RUN failed.
    #[error("vCPU {id}: KVM_RUN failed: {source}")]
    Run {
        /// vCPU index.
        id: u8,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest hit a fatal exit.
    #[error("vCPU {id}: {what}")]
    GuestFault {
        /// vCPU index.
        id: u8,
        /// Description of the exit.
        what: String,
    },
}

/// Why a vCPU stopped running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuExitReason {
    /// Triple fault, i8042 reset or KVM system event: the guest powered off.
    PowerOff,
    /// HLT without an in-kernel irqchip (test programs).
    Halted,
    /// The VMM asked the vCPU to stop.
    Stopped,
}

/// Requested run state of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// vCPUs wait outside KVM_RUN.
    Paused,
    /// vCPUs exit their loops.
    Stopping,
}

impl RunState {
    /// Name used by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
        }
    }
}

/// Shared run-state control of all vCPUs.
pub struct VmControl {
    state: Mutex<RunState>,
    cv: Condvar,
    parked: AtomicUsize,
    threads: Mutex<Vec<libc::pthread_t>>,
}

/// Signal used to kick vCPUs out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

impl Default for VmControl {
    fn default() -> Self {
        Self::new()
    }
}

impl VmControl {
    /// New control in the Running state.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(RunState::Running),
            cv: Condvar::new(),
            parked: AtomicUsize::new(0),
            threads: Mutex::new(Vec::new()),
        }
    }

    /// Current state.
    pub fn state(&self) -> RunState {
        self.state.lock().map(|s| *s).unwrap_or(RunState::Stopping)
    }

    /// Number of vCPUs currently parked (paused).
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }

    /// Register the calling thread as a vCPU thread (for kicks).
    pub fn register_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions and cannot fail.
        let me = unsafe { libc::pthread_self() };
        if let Ok(mut t) = self.threads.lock() {
            t.push(me);
        }
    }

    /// Forget a vCPU thread (it is about to exit).
    pub fn unregister_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions and cannot fail.
        let me = unsafe { libc::pthread_self() };
        if let Ok(mut t) = self.threads.lock() {
            // SAFETY: pthread_equal only compares two thread ids.
            t.retain(|x| unsafe { libc::pthread_equal(*x, me) } == 0);
        }
    }

    /// Interrupt KVM_RUN on every registered vCPU thread.
    pub fn kick_all(&self) {
        if let Ok(t) = self.threads.lock() {
            for th in t.iter() {
                // SAFETY: `th` is a live registered thread (threads unregister
                // under this same lock before exiting); the kick signal has a
                // handler installed by `install_kick_handler`.
                unsafe { libc::pthread_kill(*th, kick_signal()) };
            }
        }
    }

    /// Set the state, wake parked vCPUs and kick running ones.
    pub fn set_state(&self, new: RunState) -> RunState {
        let old = match self.state.lock() {
            Ok(mut s) => {
                let old = *s;
                // Stopping is final.
                if old != RunState::Stopping {
                    *s = new;
                }
                old
            }
            Err(_) => RunState::Stopping,
        };
        self.cv.notify_all();
        if new != RunState::Running {
            self.kick_all();
        }
        old
    }

    /// Pause and wait until `nr_vcpus` are parked (kicking until they are).
    pub fn pause(&self, nr_vcpus: usize, timeout: Duration) -> bool {
        if self.set_state(RunState::Paused) == RunState::Stopping {
            return false;
        }
        let deadline = std::time::Instant::now() + timeout;
        while self.parked() < nr_vcpus {
            if std::time::Instant::now() > deadline {
                return false;
            }
            self.kick_all();
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Called by a vCPU before each KVM_RUN: parks while paused.
    /// Returns false when the vCPU must stop.
    pub fn wait_runnable(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        loop {
            match *s {
                RunState::Running => return true,
                RunState::Stopping => return false,
                RunState::Paused => {
                    self.parked.fetch_add(1, Ordering::SeqCst);
                    let r = self.cv.wait(s);
                    self.parked.fetch_sub(1, Ordering::SeqCst);
                    match r {
                        Ok(g) => s = g,
                        Err(_) => return false,
                    }
                }
            }
        }
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the (empty) handler of the kick signal; KVM_RUN then returns EINTR.
pub fn install_kick_handler() -> Result<(), std::io::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Holds the vCPU threads between their own seccomp filter and the guest's
/// first instruction until the main thread has its filter too (a filter is
/// inherited by threads created after it, so the main thread's goes on last).
#[derive(Default)]
pub struct StartGate {
    decision: Mutex<Option<bool>>,
    cv: Condvar,
}

impl StartGate {
    /// Let the waiting vCPUs run (`true`) or end without running (`false`).
    /// The first decision stands.
    pub fn open(&self, run: bool) {
        if let Ok(mut d) = self.decision.lock() {
            if d.is_none() {
                *d = Some(run);
            }
        }
        self.cv.notify_all();
    }

    /// Wait for [`StartGate::open`]; whether the vCPU may run.
    pub fn wait(&self) -> bool {
        let Ok(mut d) = self.decision.lock() else {
            return false;
        };
        loop {
            if let Some(run) = *d {
                return run;
            }
            d = match self.cv.wait(d) {
                Ok(d) => d,
                Err(_) => return false,
            };
        }
    }
}

/// Everything a running vCPU needs.
#[derive(Clone)]
pub struct VcpuContext {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Run state.
    pub control: Arc<VmControl>,
}

/// One vCPU.
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
}

/// Encode a GDT descriptor.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// kvm_segment for GDT descriptor `entry` at table index `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            ((limit << 12) | 0xfff) as u32
        } else {
            limit as u32
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT: null, 32-bit code (0x08), data (0x10), TSS (0x18).
pub fn boot_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(0xc09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

/// Whether the host KVM is kvm-pvm (a software hypervisor without VT-x/SVM).
pub fn host_is_kvm_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Filter the host-supported CPUID for vCPU `id` of `nr`.
pub fn filter_cpuid(cpuid: &mut CpuId, id: u8, nr: u8) {
    filter_cpuid_for(cpuid, id, nr, host_is_kvm_pvm())
}

/// [`filter_cpuid`] with the host kind explicit. On kvm-pvm, CMPXCHG16B is
/// hidden: its instruction emulator cannot handle it and Linux's SLUB uses it.
/// (XSAVE cannot be hidden this way there; boot such guests with `noxsave`.)
pub fn filter_cpuid_for(cpuid: &mut CpuId, id: u8, nr: u8, pvm: bool) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                if pvm {
                    e.ecx &= !(1 << 13);
                }
                e.ebx =
                    (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(nr.max(1)) << 16);
                // We are a hypervisor guest.
                e.ecx |= 1 << 31;
                if nr > 1 {
                    e.edx |= 1 << 28;
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            // No PMU for the guest.
            0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
}

impl Vcpu {
    /// Create vCPU `id`.
    pub fn new(vm: &VmFd, id: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Kvm {
                id,
                op: "KVM_CREATE_VCPU",
                source,
            })?;
        Ok(Self { fd, id })
    }

    /// vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Raw vCPU fd (tests).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn kvm_err(&self, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Kvm { id, op, source }
    }

    /// CPUID, MSRs, FPU: common to all vCPUs.
    pub fn configure_cpu(&self, kvm: &Kvm, nr_vcpus: u8) -> Result<(), VcpuError> {
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(self.kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        filter_cpuid(&mut cpuid, self.id, nr_vcpus);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.kvm_err("KVM_SET_CPUID2"))?;
        let entry = |index, data| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        };
        let entries = [
            entry(MSR_IA32_SYSENTER_CS, 0),
            entry(MSR_IA32_SYSENTER_ESP, 0),
            entry(MSR_IA32_SYSENTER_EIP, 0),
            entry(MSR_IA32_TSC, 0),
            entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
            // MTRRs enabled, default type write-back.
            entry(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
        ];
        // Set them one by one: an MSR the host KVM lacks is logged, not fatal.
        for e in entries {
            let msrs = Msrs::from_entries(&[e]).map_err(|_| VcpuError::GuestFault {
                id: self.id,
                what: "cannot build the MSR list".into(),
            })?;
            match self.fd.set_msrs(&msrs) {
                Ok(1) => {}
                Ok(_) | Err(_) => log::warn!("vCPU {}: MSR {:#x} not settable", self.id, e.index),
            }
        }
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(self.kvm_err("KVM_SET_FPU"))?;
        Ok(())
    }

    /// LINT0 = ExtINT (legacy PIC), LINT1 = NMI. Needs the in-kernel irqchip.
    pub fn configure_lapic(&self) -> Result<(), VcpuError> {
        let mut lapic = self.fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let mut bytes = [0u8; 4];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = lapic.regs[reg + i] as u8;
            }
            let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *b as _;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(self.kvm_err("KVM_SET_LAPIC"))
    }

    /// PVH entry state: 32-bit protected mode, flat segments, paging off,
    /// `%ebx` = start_info. Writes the boot GDT into guest memory.
    pub fn configure_pvh(
        &self,
        mem: &GuestMemoryMmap,
        entry: GuestAddress,
        start_info: GuestAddress,
    ) -> Result<(), VcpuError> {
        let gdt = boot_gdt();
        for (i, e) in gdt.iter().enumerate() {
            mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
                .map_err(|e| VcpuError::Gdt {
                    id: self.id,
                    reason: e.to_string(),
                })?;
        }
        let mut sregs = self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?;
        let code = segment_from_gdt(gdt[1], 1);
        let data = segment_from_gdt(gdt[2], 2);
        let tss = segment_from_gdt(gdt[3], 3);
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.kvm_err("KVM_SET_SREGS"))?;
        let regs = kvm_regs {
            rip: entry.0,
            rbx: start_info.0,
            rflags: 0x2,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(self.kvm_err("KVM_SET_REGS"))
    }

    /// Real mode at 0000:`ip` (test programs).
    pub fn configure_real_mode(&self, ip: u16) -> Result<(), VcpuError> {
        let mut sregs = self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.kvm_err("KVM_SET_SREGS"))?;
        let regs = kvm_regs {
            rip: u64::from(ip),
            rflags: 0x2,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(self.kvm_err("KVM_SET_REGS"))
    }

    /// One KVM_RUN and its exit; `Ok(None)` means "keep going".
    pub fn run_once(&mut self, ctx: &VcpuContext) -> Result<Option<VcpuExitReason>, VcpuError> {
        let id = self.id;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                Ok(None)
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if port == I8042_COMMAND_PORT && data.first() == Some(&I8042_RESET_CMD) {
                    log::info!("vCPU {id}: guest reset through the i8042");
                    return Ok(Some(VcpuExitReason::PowerOff));
                }
                ctx.pio.write(u64::from(port), data);
                Ok(None)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    log::debug!("vCPU {id}: unclaimed MMIO read at {addr:#x}");
                    data.fill(0);
                }
                Ok(None)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !ctx.mmio.write(addr, data) {
                    log::debug!("vCPU {id}: unclaimed MMIO write at {addr:#x}");
                }
                Ok(None)
            }
            Ok(VcpuExit::Hlt) => Ok(Some(VcpuExitReason::Halted)),
            Ok(VcpuExit::Shutdown) => {
                log::info!("vCPU {id}: triple fault / shutdown");
                Ok(Some(VcpuExitReason::PowerOff))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                    Ok(Some(VcpuExitReason::PowerOff))
                }
                KVM_SYSTEM_EVENT_CRASH => Err(VcpuError::GuestFault {
                    id,
                    what: "guest crashed (KVM_SYSTEM_EVENT_CRASH)".into(),
                }),
                other => {
                    log::warn!("vCPU {id}: unknown system event {other}");
                    Ok(None)
                }
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => Err(VcpuError::GuestFault {
                id,
                what: format!("VM entry failed (hardware reason {reason:#x}, cpu {cpu})"),
            }),
            Ok(VcpuExit::InternalError) => {
                let run = self.fd.get_kvm_run();
                // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit the `internal`
                // member is the active one of the kvm_run exit union.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                Err(VcpuError::GuestFault {
                    id,
                    what: format!("KVM internal error (suberror {suberror}) at rip {rip:#x}"),
                })
            }
            Ok(VcpuExit::Intr) => Ok(None),
            Ok(other) => Err(VcpuError::GuestFault {
                id,
                what: format!("unexpected exit {other:?}"),
            }),
            // Kicked by the VMM (pause/stop) or a spurious wakeup.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(None),
            Err(source) => Err(VcpuError::Run { id, source }),
        }
    }

    /// Run until the guest powers off, halts, fails or the VMM stops us.
    pub fn run(&mut self, ctx: &VcpuContext) -> Result<VcpuExitReason, VcpuError> {
        loop {
            if ctx.control.state() == RunState::Paused && log::log_enabled!(log::Level::Debug) {
                if let Ok(r) = self.fd.get_regs() {
                    log::debug!("vCPU {} pausing at rip {:#x}", self.id, r.rip);
                }
            }
            if !ctx.control.wait_runnable() {
                return Ok(VcpuExitReason::Stopped);
            }
            if let Some(reason) = self.run_once(ctx)? {
                return Ok(reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_roundtrip() {
        let gdt = boot_gdt();
        assert_eq!(gdt[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(gdt[1], 1);
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 8));
        assert_eq!(
            (cs.type_, cs.present, cs.db, cs.s, cs.g, cs.l),
            (0xb, 1, 1, 1, 1, 0)
        );
        let tr = segment_from_gdt(gdt[3], 3);
        assert_eq!(
            (tr.limit, tr.type_, tr.s, tr.g, tr.selector),
            (0x67, 0xb, 0, 0, 0x18)
        );
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn cpuid_filter() {
        use kvm_bindings::kvm_cpuid_entry2;
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_1234,
                ecx: 1 << 13,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                edx: 7,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xa,
                eax: 0x0803_0a02,
                ..Default::default()
            },
        ];
        let mut c = CpuId::from_entries(&entries).unwrap();
        filter_cpuid_for(&mut c, 3, 4, false);
        let e = c.as_slice();
        assert_eq!(e[0].ebx, 0x0304_1234, "APIC id 3, 4 logical CPUs");
        assert_ne!(e[0].ecx & (1 << 31), 0, "hypervisor bit");
        assert_ne!(e[0].ecx & (1 << 13), 0, "CX16 kept on hardware KVM");
        assert_ne!(e[0].edx & (1 << 28), 0, "HTT with several vCPUs");
        assert_eq!(e[1].edx, 3, "x2APIC id");
        assert_eq!(e[2].eax, 0, "no PMU");
        let mut c = CpuId::from_entries(&entries).unwrap();
        filter_cpuid_for(&mut c, 0, 1, true);
        assert_eq!(c.as_slice()[0].ecx & (1 << 13), 0, "CX16 hidden on kvm-pvm");
    }

    #[test]
    fn start_gate_releases_waiters_once() {
        for run in [true, false] {
            let gate = Arc::new(StartGate::default());
            let waiters: Vec<_> = (0..3)
                .map(|_| {
                    let g = gate.clone();
                    std::thread::spawn(move || g.wait())
                })
                .collect();
            gate.open(run);
            // The first decision stands.
            gate.open(!run);
            for w in waiters {
                assert_eq!(w.join().unwrap(), run);
            }
            assert_eq!(gate.wait(), run, "a late waiter sees the same decision");
        }
    }

    #[test]
    fn control_pause_resume_stop() {
        let c = Arc::new(VmControl::new());
        assert!(c.wait_runnable());
        c.set_state(RunState::Paused);
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.wait_runnable());
        while c.parked() != 1 {
            std::thread::yield_now();
        }
        assert_eq!(c.state(), RunState::Paused);
        c.set_state(RunState::Running);
        assert!(t.join().unwrap());
        c.set_state(RunState::Stopping);
        c.set_state(RunState::Running);
        assert_eq!(c.state(), RunState::Stopping, "stopping is final");
        assert!(!c.wait_runnable());
    }
}

/// Guest programs (hand-assembled) run on real KVM through our exit handling.
#[cfg(test)]
mod program_tests {
    use super::*;
    use crate::devices::boot_marker::{BootMarker, BOOT_MARKER_PORT};
    use crate::devices::serial::{Serial, COM1_PORT};
    use crate::devices::virtio_mmio::tests::DummyDevice;
    use crate::devices::virtio_mmio::{MmioTransport, MMIO_LEN};
    use std::io::Write;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Rig {
        kvm: Kvm,
        vm: VmFd,
        mem: GuestMemoryMmap,
        ctx: VcpuContext,
        serial_out: SharedBuf,
        markers: Arc<Mutex<Vec<u8>>>,
        transport: Arc<Mutex<MmioTransport>>,
    }

    /// Run as husk-vmm does: the vCPU on a thread under the vCPU seccomp
    /// filter (made for its own fd), the watchdog standing in for the main
    /// thread under the main filter; a hung guest is stopped after 10 s and
    /// reported. A call missing from either allow-list kills the test process
    /// with SIGSYS.
    fn run_guarded(v: &mut Vcpu, ctx: &VcpuContext) -> VcpuExitReason {
        use crate::seccomp::{self, ThreadKind};
        use std::os::fd::AsRawFd;
        install_kick_handler().unwrap();
        let vcpu_filter = seccomp::vcpu_filter(v.fd().as_raw_fd(), &[]).unwrap();
        let main_filter = seccomp::main_filter().unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        let r = std::thread::scope(|s| {
            let dog = s.spawn(|| -> Result<(), seccomp::SeccompError> {
                seccomp::apply(ThreadKind::Main, &main_filter)?;
                for _ in 0..1000 {
                    if done.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                ctx.control.set_state(RunState::Stopping);
                Ok(())
            });
            let vcpu = s.spawn(|| -> Result<VcpuExitReason, String> {
                let r = seccomp::apply(ThreadKind::Vcpu, &vcpu_filter)
                    .map_err(|e| e.to_string())
                    .and_then(|()| {
                        ctx.control.register_current_thread();
                        let r = v.run(ctx).map_err(|e| e.to_string());
                        ctx.control.unregister_current_thread();
                        r
                    });
                done.store(true, Ordering::SeqCst);
                r
            });
            let r = vcpu.join().expect("vCPU thread panicked");
            dog.join()
                .expect("watchdog thread panicked")
                .expect("watchdog under the main filter");
            r
        })
        .expect("vCPU run");
        if r == VcpuExitReason::Stopped {
            let regs = v.fd().get_regs().unwrap();
            panic!(
                "guest program hung: rip={:#x} rax={:#x}",
                regs.rip, regs.rax
            );
        }
        r
    }

    fn rig(mem_size: u64, mmio_base: u64) -> Rig {
        let (kvm, vm) = crate::vm::create_kvm_vm().expect("KVM must be usable for this test");
        let mem = crate::memory::create_guest_memory(mem_size).unwrap();
        crate::vm::register_memory(&vm, &mem).unwrap();
        let serial_out = SharedBuf::default();
        let mut pio = Bus::new();
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_irqfd(&irq, 4).unwrap();
        pio.insert(
            Arc::new(Mutex::new(Serial::new(irq, Box::new(serial_out.clone())))),
            u64::from(COM1_PORT),
            8,
        )
        .unwrap();
        let marker = BootMarker::quiet();
        let markers = marker.seen();
        pio.insert(Arc::new(Mutex::new(marker)), u64::from(BOOT_MARKER_PORT), 1)
            .unwrap();
        let transport = Arc::new(Mutex::new(
            MmioTransport::new(
                mem.clone(),
                Box::new(DummyDevice {
                    activations: Default::default(),
                    fail: false,
                }),
                vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            )
            .unwrap(),
        ));
        let mut mmio = Bus::new();
        mmio.insert(transport.clone(), mmio_base, MMIO_LEN).unwrap();
        Rig {
            kvm,
            vm,
            mem,
            ctx: VcpuContext {
                pio: Arc::new(pio),
                mmio: Arc::new(mmio),
                control: Arc::new(VmControl::new()),
            },
            serial_out,
            markers,
            transport,
        }
    }

    /// Real mode: serial output, MMIO magic/device-id reads, an MMIO status
    /// write, the boot marker, then an i8042 reset (power off).
    #[test]
    fn real_mode_program() {
        // 512 KiB of RAM; the virtio-mmio window sits right above it.
        let r = rig(0x80000, 0x80000);
        #[rustfmt::skip]
        let code: &[u8] = &[
            0xba, 0xf8, 0x03,             // mov dx, 0x3f8
            0xb0, b'H', 0xee,             // mov al, 'H'; out dx, al
            0xb0, b'i', 0xee,             // mov al, 'i'; out dx, al
            0xb8, 0x00, 0x80,             // mov ax, 0x8000
            0x8e, 0xd8,                   // mov ds, ax
            0x66, 0xa1, 0x00, 0x00,       // mov eax, [0x0000] (MagicValue)
            0x66, 0x3d, 0x76, 0x69, 0x72, 0x74, // cmp eax, "virt"
            0x75, 0x17,                   // jne fail
            0x66, 0xa1, 0x08, 0x00,       // mov eax, [0x0008] (DeviceID)
            0xba, 0xf0, 0x03,             // mov dx, 0x3f0
            0xee,                         // out dx, al (boot marker)
            0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
            0x66, 0xa3, 0x70, 0x00,       // mov [0x0070], eax (Status = ACK)
            0xb0, 0xfe,                   // mov al, 0xfe
            0xe6, 0x64,                   // out 0x64, al (reset)
            0xf4,                         // hlt
            // fail:
            0xb0, 0xee, 0xba, 0xf0, 0x03, 0xee, 0xf4,
        ];
        r.mem.write_slice(code, GuestAddress(0x1000)).unwrap();
        let mut v = Vcpu::new(&r.vm, 0).unwrap();
        v.configure_cpu(&r.kvm, 1).unwrap();
        v.configure_lapic().unwrap();
        v.configure_real_mode(0x1000).unwrap();
        let reason = run_guarded(&mut v, &r.ctx);
        assert_eq!(reason, VcpuExitReason::PowerOff);
        assert_eq!(&*r.serial_out.0.lock().unwrap(), b"Hi");
        assert_eq!(*r.markers.lock().unwrap(), vec![42]);
        assert_eq!(r.transport.lock().unwrap().status(), 1);
    }

    /// PVH entry state: 32-bit protected mode with flat 4 GiB segments (the
    /// program reads the virtio-mmio window at 0xd0000000) and %ebx = start_info.
    #[test]
    fn pvh_protected_mode_program() {
        let r = rig(16 << 20, 0xd000_0000);
        #[rustfmt::skip]
        let code: &[u8] = &[
            0x66, 0xba, 0xf8, 0x03,       // mov dx, 0x3f8
            0xb0, b'P', 0xee,             // mov al, 'P'; out dx, al
            0xa1, 0x00, 0x00, 0x00, 0xd0, // mov eax, [0xd0000000]
            0x3d, 0x76, 0x69, 0x72, 0x74, // cmp eax, "virt"
            0x75, 0x0c,                   // jne fail
            0x88, 0xf8,                   // mov al, bh (start_info >> 8)
            0x66, 0xba, 0xf0, 0x03,       // mov dx, 0x3f0
            0xee,                         // out dx, al
            0xb0, 0xfe, 0xe6, 0x64,       // reset
            0xf4,
            // fail:
            0xb0, 0xee, 0x66, 0xba, 0xf0, 0x03, 0xee, 0xf4,
        ];
        r.mem.write_slice(code, GuestAddress(0x1000)).unwrap();
        let mut v = Vcpu::new(&r.vm, 0).unwrap();
        v.configure_cpu(&r.kvm, 1).unwrap();
        v.configure_lapic().unwrap();
        v.configure_pvh(&r.mem, GuestAddress(0x1000), GuestAddress(0x6000))
            .unwrap();
        let sregs = v.fd().get_sregs().unwrap();
        assert_eq!(sregs.cr0 & 1, 1);
        let reason = run_guarded(&mut v, &r.ctx);
        assert_eq!(reason, VcpuExitReason::PowerOff);
        assert_eq!(&*r.serial_out.0.lock().unwrap(), b"P");
        assert_eq!(*r.markers.lock().unwrap(), vec![0x60]);
    }

    /// Guest kicks through the notify register land in the queue eventfds via
    /// KVM ioeventfds (no exit); a non-matching value still reaches the bus.
    #[test]
    fn ioeventfd_queue_notify_from_guest() {
        use crate::devices::virtio_mmio::{regs, status};
        let r = rig(16 << 20, 0xd000_0000);
        crate::vm::register_queue_notifiers(&r.vm, &r.transport.lock().unwrap(), 0xd000_0000)
            .unwrap();
        // Bring the transport to DRIVER_OK through the bus, as a driver would.
        let w = |off: u64, v: u32| assert!(r.ctx.mmio.write(0xd000_0000 + off, &v.to_le_bytes()));
        w(regs::STATUS, status::ACKNOWLEDGE);
        w(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(regs::DRIVER_FEATURES_SEL, 1);
        w(regs::DRIVER_FEATURES, 1);
        w(
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        w(
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(r.transport.lock().unwrap().is_activated());
        #[rustfmt::skip]
        let code: &[u8] = &[
            0xc7, 0x05, 0x50, 0x00, 0x00, 0xd0, 0x01, 0x00, 0x00, 0x00, // mov dword [0xd0000050], 1
            0xc7, 0x05, 0x50, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, // mov dword [0xd0000050], 0
            0xc7, 0x05, 0x50, 0x00, 0x00, 0xd0, 0x01, 0x00, 0x00, 0x00, // mov dword [0xd0000050], 1
            0xc7, 0x05, 0x50, 0x00, 0x00, 0xd0, 0x07, 0x00, 0x00, 0x00, // mov dword [0xd0000050], 7
            0xb0, 0xfe, 0xe6, 0x64, 0xf4, // reset
        ];
        r.mem.write_slice(code, GuestAddress(0x1000)).unwrap();
        let mut v = Vcpu::new(&r.vm, 0).unwrap();
        v.configure_cpu(&r.kvm, 1).unwrap();
        v.configure_lapic().unwrap();
        v.configure_pvh(&r.mem, GuestAddress(0x1000), GuestAddress(0x6000))
            .unwrap();
        assert_eq!(run_guarded(&mut v, &r.ctx), VcpuExitReason::PowerOff);
        let t = r.transport.lock().unwrap();
        assert_eq!(t.queue_evts()[0].read().unwrap(), 1, "one kick of queue 0");
        assert_eq!(t.queue_evts()[1].read().unwrap(), 2, "two kicks of queue 1");
    }

    /// An irqfd (as used for virtio and serial interrupts) raised by another
    /// thread is delivered through the in-kernel PIC to a halted guest.
    #[test]
    fn irqfd_interrupt_reaches_guest() {
        let r = rig(0x80000, 0x80000);
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        r.vm.register_irqfd(&irq, 5).unwrap();
        #[rustfmt::skip]
        let code: &[u8] = &[
            0xb0, 0x11, 0xe6, 0x20, // ICW1: edge, cascade, ICW4
            0xb0, 0x08, 0xe6, 0x21, // ICW2: vectors 8..15
            0xb0, 0x04, 0xe6, 0x21, // ICW3
            0xb0, 0x01, 0xe6, 0x21, // ICW4: 8086 mode
            0xb0, 0xdf, 0xe6, 0x21, // mask all but IRQ 5
            0xba, 0xf0, 0x03,       // mov dx, 0x3f0
            0xb0, 0x01, 0xee,       // boot marker 1: ready
            0xfb,                   // sti
            0xf4,                   // hlt
            0xeb, 0xfd,             // jmp hlt
        ];
        #[rustfmt::skip]
        let handler: &[u8] = &[
            0xba, 0xf0, 0x03,       // mov dx, 0x3f0
            0xb0, 0x55, 0xee,       // boot marker 0x55: interrupt seen
            0xb0, 0x20, 0xe6, 0x20, // EOI
            0xb0, 0xfe, 0xe6, 0x64, // reset
            0xf4,
        ];
        r.mem.write_slice(code, GuestAddress(0x1000)).unwrap();
        r.mem.write_slice(handler, GuestAddress(0x1100)).unwrap();
        // IVT entry of vector 13 (IRQ 5): 0000:1100.
        r.mem.write_obj(0x1100u16, GuestAddress(13 * 4)).unwrap();
        r.mem.write_obj(0u16, GuestAddress(13 * 4 + 2)).unwrap();
        let markers = r.markers.clone();
        let trigger = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !markers.lock().unwrap().contains(&1) {
                if std::time::Instant::now() > deadline {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(50));
            irq.write(1).unwrap();
        });
        let mut v = Vcpu::new(&r.vm, 0).unwrap();
        v.configure_cpu(&r.kvm, 1).unwrap();
        v.configure_lapic().unwrap();
        v.configure_real_mode(0x1000).unwrap();
        assert_eq!(run_guarded(&mut v, &r.ctx), VcpuExitReason::PowerOff);
        trigger.join().unwrap();
        assert_eq!(*r.markers.lock().unwrap(), vec![1, 0x55]);
    }
}
