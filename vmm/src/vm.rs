//! Putting it together: KVM VM, memory, devices, vCPU threads.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use thiserror::Error;
use vm_memory::{GuestMemory, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::boot_marker::{BootMarker, BOOT_MARKER_PORT};
use crate::devices::serial::{Serial, COM1_IRQ, COM1_LEN, COM1_PORT};
use crate::devices::tap::Tap;
use crate::devices::vhost_user::{VhostUserDevice, VhostUserError, VhostUserKind};
use crate::devices::virtio_mmio::{regs, MmioTransport, TransportError, VirtioDevice, MMIO_LEN};
use crate::devices::virtio_net::{NetConfig, NetDevice, NetError, NetWorker};
use crate::devices::{Bus, BusError};
use crate::loader::{self, BootInfo, LoaderError, MmioDeviceInfo};
use crate::memory::{self, GuestMemoryMmap, MemoryError};
use crate::seccomp::{self, ThreadKind};
use crate::vcpu::{
    self, RunState, StartGate, Vcpu, VcpuContext, VcpuError, VcpuExitReason, VmControl,
};

/// Base of the virtio-mmio device windows.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// First GSI used by virtio-mmio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// TSS address KVM needs on Intel (3 pages below 4 GiB... in the MMIO hole).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Configuration of one VM (mirrors the command line).
#[derive(Debug, Clone, Default)]
pub struct VmConfig {
    /// vmlinux path.
    pub kernel: PathBuf,
    /// Initramfs path.
    pub initrd: Option<PathBuf>,
    /// Base kernel command line.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// virtio-fs: (vhost-user socket, tag).
    pub fs: Option<(PathBuf, String)>,
    /// virtio-vsock: (vhost-user socket, guest CID).
    pub vsock: Option<(PathBuf, u64)>,
    /// virtio-net devices on inherited taps, in the guest's order.
    pub net: Vec<NetConfig>,
    /// Console output file (None = stdout).
    pub console: Option<PathBuf>,
    /// Put every VMM thread under its seccomp filter (see [`crate::seccomp`]).
    pub seccomp: bool,
}

/// Errors building or running a VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm is unusable.
    #[error("cannot use /dev/kvm: {0}")]
    Kvm(String),
    /// A KVM VM-level ioctl failed.
    #[error("{op} failed: {source}")]
    VmIoctl {
        /// ioctl name.
        op: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loader.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// vhost-user.
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    /// virtio-net.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Transport.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Bus layout.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// Console file.
    #[error("cannot open console file {path}: {source}")]
    Console {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// eventfd / thread / signal plumbing.
    #[error("{what}: {source}")]
    Os {
        /// What failed.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Bad configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Seccomp.
    #[error("seccomp: {0}")]
    Seccomp(String),
}

/// Events reaching the VMM main loop.
#[derive(Debug)]
pub enum VmEvent {
    /// A vCPU thread ended.
    VcpuExited(u8, Result<VcpuExitReason, String>),
    /// The API asked for shutdown.
    ApiShutdown,
    /// A device's own thread stopped working (the VM fails: a guest with a
    /// dead device is not what was asked for).
    DeviceFailed(String),
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// Guest powered off (or shutdown requested through the API).
    PoweredOff,
    /// A vCPU failed.
    Failed(String),
}

/// Open /dev/kvm and create a VM with the in-kernel irqchip and PIT.
pub fn create_kvm_vm() -> Result<(Kvm, VmFd), VmError> {
    let kvm = Kvm::new().map_err(|e| VmError::Kvm(format!("open: {e}")))?;
    if kvm.get_api_version() != 12 {
        return Err(VmError::Kvm(format!(
            "unsupported KVM API version {}",
            kvm.get_api_version()
        )));
    }
    let vm = kvm
        .create_vm()
        .map_err(|e| VmError::Kvm(format!("KVM_CREATE_VM: {e}")))?;
    if let Err(e) = vm.set_tss_address(KVM_TSS_ADDRESS) {
        // Only needed (and only implemented) on some hosts.
        log::debug!("KVM_SET_TSS_ADDR: {e}");
    }
    vm.create_irq_chip().map_err(|source| VmError::VmIoctl {
        op: "KVM_CREATE_IRQCHIP",
        source,
    })?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(|source| VmError::VmIoctl {
        op: "KVM_CREATE_PIT2",
        source,
    })?;
    Ok((kvm, vm))
}

/// Register every guest memory region as a KVM memory slot.
pub fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives
        // the VM (both are kept by `Vm`); slots do not overlap.
        unsafe { vm.set_user_memory_region(r) }.map_err(|source| VmError::VmIoctl {
            op: "KVM_SET_USER_MEMORY_REGION",
            source,
        })?;
    }
    Ok(())
}

/// Route guest writes of queue index `q` to the notify register of the
/// transport at `addr` straight to the queue's kick eventfd (KVM_IOEVENTFD
/// with a 32-bit datamatch): the vCPU never exits for a kick.
pub fn register_queue_notifiers(vm: &VmFd, t: &MmioTransport, addr: u64) -> Result<(), VmError> {
    for (q, evt) in t.queue_evts().iter().enumerate() {
        vm.register_ioevent(
            evt,
            &IoEventAddress::Mmio(addr + regs::QUEUE_NOTIFY),
            q as u32,
        )
        .map_err(|source| VmError::VmIoctl {
            op: "KVM_IOEVENTFD",
            source,
        })?;
    }
    Ok(())
}

/// A fully built VM, ready to run.
pub struct Vm {
    _kvm: Kvm,
    vm: VmFd,
    mem: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    nr_vcpus: usize,
    ctx: VcpuContext,
    boot: BootInfo,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// vhost-user backend sockets (the only ones vCPU threads may message).
    backend_fds: Vec<RawFd>,
    /// Data path threads of the virtio-net devices, started by [`Vm::run`].
    net_workers: Vec<NetWorker>,
    seccomp: bool,
}

/// A virtio device before its transport exists.
enum PendingDevice {
    VhostUser(VhostUserDevice),
    Net(Tap, NetConfig),
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Os { what, source }
}

impl Vm {
    /// Build everything described by `cfg`. Nothing runs yet.
    pub fn build(cfg: &VmConfig) -> Result<Self, VmError> {
        let mem_bytes = memory::check_memory_size(cfg.memory_mib, memory::host_mem_total_kib())?;
        if cfg.vcpus == 0 || cfg.vcpus > 32 {
            return Err(VmError::Config(format!(
                "--vcpus {} is out of range (1 to 32)",
                cfg.vcpus
            )));
        }
        // Fail on a missing kernel before touching KVM.
        std::fs::File::open(&cfg.kernel).map_err(|source| LoaderError::OpenKernel {
            path: cfg.kernel.clone(),
            source,
        })?;
        // And on a bad tap: each descriptor is taken over once.
        for (i, net) in cfg.net.iter().enumerate() {
            if cfg.net[..i].iter().any(|n| n.tap_fd == net.tap_fd) {
                return Err(VmError::Config(format!(
                    "tap descriptor {} is named by two --net devices",
                    net.tap_fd
                )));
            }
        }
        let mut taps = Vec::new();
        for net in &cfg.net {
            taps.push((
                Tap::from_inherited(net.tap_fd).map_err(NetError::from)?,
                net,
            ));
        }
        let (kvm, vm) = create_kvm_vm()?;
        let mem = memory::create_guest_memory(mem_bytes)?;
        register_memory(&vm, &mem)?;

        let mut pio = Bus::new();
        let mut mmio = Bus::new();

        // Console + COM1.
        let out: Box<dyn Write + Send> = match &cfg.console {
            Some(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| VmError::Console {
                        path: path.clone(),
                        source,
                    })?,
            ),
            None => Box::new(std::io::stdout()),
        };
        let com1_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(os("creating an eventfd"))?;
        vm.register_irqfd(&com1_evt, COM1_IRQ)
            .map_err(|source| VmError::VmIoctl {
                op: "KVM_IRQFD (serial)",
                source,
            })?;
        pio.insert(
            Arc::new(Mutex::new(Serial::new(com1_evt, out))),
            u64::from(COM1_PORT),
            u64::from(COM1_LEN),
        )?;
        pio.insert(
            Arc::new(Mutex::new(BootMarker::new())),
            u64::from(BOOT_MARKER_PORT),
            1,
        )?;

        // vhost-user devices.
        let mut devices: Vec<VhostUserDevice> = Vec::new();
        if let Some((path, tag)) = &cfg.fs {
            devices.push(VhostUserDevice::connect(
                path,
                VhostUserKind::Fs { tag: tag.clone() },
            )?);
        }
        if let Some((path, cid)) = &cfg.vsock {
            devices.push(VhostUserDevice::connect(
                path,
                VhostUserKind::Vsock { cid: *cid },
            )?);
        }
        let backend_fds: Vec<RawFd> = devices.iter().map(VhostUserDevice::socket_fd).collect();
        let mut pending: Vec<PendingDevice> =
            devices.into_iter().map(PendingDevice::VhostUser).collect();
        pending.extend(
            taps.into_iter()
                .map(|(tap, net)| PendingDevice::Net(tap, net.clone())),
        );
        let mut infos = Vec::new();
        let mut transports = Vec::new();
        let mut net_workers = Vec::new();
        for (i, dev) in pending.into_iter().enumerate() {
            let addr = VIRTIO_MMIO_BASE + i as u64 * MMIO_LEN;
            let irq = VIRTIO_IRQ_BASE + i as u32;
            let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(os("creating an eventfd"))?;
            vm.register_irqfd(&irq_evt, irq)
                .map_err(|source| VmError::VmIoctl {
                    op: "KVM_IRQFD (virtio)",
                    source,
                })?;
            let (device, net_parts): (Box<dyn VirtioDevice>, _) = match dev {
                PendingDevice::VhostUser(d) => (Box::new(d), None),
                PendingDevice::Net(tap, net) => {
                    let irq_dup = irq_evt.try_clone().map_err(os("duplicating an eventfd"))?;
                    let (d, parts) = NetDevice::new(tap, net.mac, net.mtu, irq_dup)?;
                    (Box::new(d), Some(parts))
                }
            };
            let t = MmioTransport::new(mem.clone(), device, irq_evt)?;
            register_queue_notifiers(&vm, &t, addr)?;
            if let Some(parts) = net_parts {
                net_workers.push(NetWorker::new(parts, t.queue_evts())?);
            }
            let t = Arc::new(Mutex::new(t));
            mmio.insert(t.clone(), addr, MMIO_LEN)?;
            transports.push(t);
            infos.push(MmioDeviceInfo {
                addr,
                size: MMIO_LEN,
                irq,
            });
        }

        let cmdline = loader::build_cmdline(&cfg.cmdline, &infos)?;
        let boot = loader::load_linux(&mem, &cfg.kernel, cfg.initrd.as_deref(), &cmdline)?;
        crate::mptable::setup_mptable(&mem, cfg.vcpus)
            .map_err(|e| VmError::Config(format!("cannot write the MP table: {e}")))?;

        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            let v = Vcpu::new(&vm, id)?;
            v.configure_cpu(&kvm, cfg.vcpus)?;
            v.configure_lapic()?;
            if id == 0 {
                v.configure_pvh(&mem, boot.entry, boot.start_info)?;
            }
            vcpus.push(v);
        }

        Ok(Self {
            _kvm: kvm,
            vm,
            mem,
            nr_vcpus: vcpus.len(),
            vcpus,
            ctx: VcpuContext {
                pio: Arc::new(pio),
                mmio: Arc::new(mmio),
                control: Arc::new(VmControl::new()),
            },
            boot,
            transports,
            backend_fds,
            net_workers,
            seccomp: cfg.seccomp,
        })
    }

    /// Boot information (entry point, start_info, cmdline).
    pub fn boot_info(&self) -> &BootInfo {
        &self.boot
    }

    /// Run-state control (for the API server).
    pub fn control(&self) -> Arc<VmControl> {
        self.ctx.control.clone()
    }

    /// Number of vCPUs.
    pub fn nr_vcpus(&self) -> usize {
        self.nr_vcpus
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The KVM VM fd.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Registers of a not yet started vCPU (tests, diagnostics).
    pub fn vcpu_regs(
        &self,
        id: usize,
    ) -> Option<(kvm_bindings::kvm_regs, kvm_bindings::kvm_sregs)> {
        let v = self.vcpus.get(id)?;
        Some((v.fd().get_regs().ok()?, v.fd().get_sregs().ok()?))
    }

    /// Transports of the virtio devices.
    pub fn transports(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.transports
    }

    /// Spawn the vCPU threads. Each installs its own seccomp filter (when
    /// enabled) and then waits at `gate`; nothing runs in the guest before
    /// the gate opens. On error the threads already spawned are released
    /// without running.
    fn spawn_vcpus(
        &mut self,
        events: Sender<VmEvent>,
        gate: &Arc<StartGate>,
    ) -> Result<Vec<JoinHandle<()>>, VmError> {
        let mut handles = Vec::new();
        let r = self.spawn_vcpus_into(events, gate, &mut handles);
        if r.is_err() {
            gate.open(false);
        }
        r.map(|()| handles)
    }

    fn spawn_vcpus_into(
        &mut self,
        events: Sender<VmEvent>,
        gate: &Arc<StartGate>,
        handles: &mut Vec<JoinHandle<()>>,
    ) -> Result<(), VmError> {
        vcpu::install_kick_handler().map_err(os("installing the vCPU kick signal handler"))?;
        for mut v in std::mem::take(&mut self.vcpus) {
            let filter = if self.seccomp {
                Some(
                    seccomp::vcpu_filter(v.fd().as_raw_fd(), &self.backend_fds)
                        .map_err(|e| VmError::Seccomp(e.to_string()))?,
                )
            } else {
                None
            };
            let ctx = self.ctx.clone();
            let tx = events.clone();
            let gate = gate.clone();
            let h = std::thread::Builder::new()
                .name(format!("vcpu{}", v.id()))
                .spawn(move || {
                    ctx.control.register_current_thread();
                    let id = v.id();
                    if id == 0 {
                        // Reads /proc: before the filter.
                        print_metrics();
                    }
                    let r = match filter.map(|f| seccomp::apply(ThreadKind::Vcpu, &f)) {
                        Some(Err(e)) => Err(format!("vCPU {id}: {e}")),
                        _ if !gate.wait() => Ok(VcpuExitReason::Stopped),
                        _ => v.run(&ctx).map_err(|e| e.to_string()),
                    };
                    ctx.control.unregister_current_thread();
                    let _ = tx.send(VmEvent::VcpuExited(id, r));
                })
                .map_err(os("spawning a vCPU thread"))?;
            handles.push(h);
        }
        Ok(())
    }

    /// Run the VM to completion on the calling (main) thread: start the
    /// vCPUs, put the main thread under its seccomp filter, let the guest
    /// run, wait for the first decisive event, stop everything. `events`
    /// may also be fed by the API server.
    pub fn run(
        &mut self,
        tx: Sender<VmEvent>,
        rx: Receiver<VmEvent>,
    ) -> Result<VmOutcome, VmError> {
        let n = self.vcpus.len();
        let main_filter = if self.seccomp {
            Some(seccomp::main_filter().map_err(|e| VmError::Seccomp(e.to_string()))?)
        } else {
            None
        };
        // The device threads start before the main thread's filter (a
        // thread inherits its creator's) and each installs its own first.
        for (index, worker) in std::mem::take(&mut self.net_workers)
            .into_iter()
            .enumerate()
        {
            let filter = if self.seccomp {
                Some(
                    seccomp::net_filter(worker.epoll_fd())
                        .map_err(|e| VmError::Seccomp(e.to_string()))?,
                )
            } else {
                None
            };
            let events = tx.clone();
            worker.spawn(index, filter, move |e| {
                let _ = events.send(VmEvent::DeviceFailed(e));
            })?;
        }
        let gate = Arc::new(StartGate::default());
        let handles = self.spawn_vcpus(tx, &gate)?;
        if let Some(f) = main_filter {
            if let Err(e) = seccomp::apply(ThreadKind::Main, &f) {
                gate.open(false);
                return Err(VmError::Seccomp(e.to_string()));
            }
        }
        gate.open(true);
        let control = self.ctx.control.clone();
        let mut exited = 0;
        let mut outcome = None;
        while exited < n {
            let ev = match rx.recv() {
                Ok(ev) => ev,
                Err(_) => break,
            };
            match ev {
                VmEvent::VcpuExited(id, r) => {
                    exited += 1;
                    let o = match r {
                        Ok(VcpuExitReason::Stopped) => None,
                        Ok(reason) => {
                            log::info!("vCPU {id} ended: {reason:?}");
                            Some(VmOutcome::PoweredOff)
                        }
                        Err(e) => Some(VmOutcome::Failed(e)),
                    };
                    if outcome.is_none() {
                        outcome = o;
                    }
                }
                VmEvent::DeviceFailed(e) => {
                    if outcome.is_none() {
                        outcome = Some(VmOutcome::Failed(e));
                    }
                }
                VmEvent::ApiShutdown => {
                    if outcome.is_none() {
                        outcome = Some(VmOutcome::PoweredOff);
                    }
                }
            }
            if outcome.is_some() {
                control.set_state(RunState::Stopping);
                // Kicks can race with KVM_RUN entry; repeat until all are out.
                let deadline = std::time::Instant::now() + Duration::from_secs(2);
                while handles.iter().any(|h| !h.is_finished())
                    && std::time::Instant::now() < deadline
                {
                    control.kick_all();
                    std::thread::sleep(Duration::from_millis(5));
                }
                break;
            }
        }
        for h in handles {
            if h.is_finished() {
                let _ = h.join();
            }
        }
        Ok(outcome.unwrap_or(VmOutcome::PoweredOff))
    }

    /// Create the event channel used by [`Vm::run`].
    pub fn channel() -> (Sender<VmEvent>, Receiver<VmEvent>) {
        channel()
    }
}

/// A field of /proc/self/status in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| memory::parse_meminfo_field(&s, field))
        .unwrap_or(0)
}

/// VmRSS of this process in KiB.
pub fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

/// The metrics line the benchmark parses. `vmm_kib` is the VMM's own
/// memory (anonymous and file pages); `guest_kib` the shared guest RAM
/// touched so far (the loaded kernel and initramfs live there).
pub fn metrics_line() -> String {
    format!(
        "husk-vmm: metrics startup_us={} rss_kib={} vmm_kib={} guest_kib={}",
        crate::process_uptime().as_micros(),
        rss_kib(),
        status_kib("RssAnon:") + status_kib("RssFile:"),
        status_kib("RssShmem:")
    )
}

fn print_metrics() {
    eprintln!("{}", metrics_line());
}
