//! The registry of containers in the guest: each one's cgroup, staged
//! devices, seccomp program, parked child, init and exec'd processes; the
//! verbs of the agent API on them. Planning is `husk_agent::plan`, the fork
//! `launch`, stdio `stdio`.

mod launch;
mod stdio;

pub use crate::error::ContainerError;
use crate::phases::Laps;
pub use stdio::ProcessStreams;

use crate::cgroup;
use crate::cgroup::devices as device_filter;
use crate::child::{self, Launch};
use crate::init::{shared_dir_mounted, CGROUP_ROOT, SHARED_DIR};
use crate::process::{ExitInfo, Reaper};
use husk_agent::plan::fs::LiveFs;
use husk_agent::plan::{self, ContainerRequest, SeccompProgram, StagedDevice};
use husk_protocol::agent::CreateContainerRequest;
use launch::{kill_holder, park, release, spawn, Parked, Proc};
use oci_spec::runtime::{LinuxResources, Spec};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where the agent makes the linux.devices nodes of containers with a
/// user namespace (see `StagedDevice`): its own devtmpfs, where nodes open.
const DEVICE_STAGE_ROOT: &str = "/dev/.husk-devices";

/// The device filter of a container, kept for updates.
struct DeviceFilterState {
    cgroup_dir: OwnedFd,
    prog: OwnedFd,
}

pub struct Container {
    root: PathBuf,
    /// Directory of staged linux.devices nodes, removed with the container.
    device_stage: PathBuf,
    device_filter: Mutex<Option<DeviceFilterState>>,
    /// linux.seccomp as compiled by the planner, applied to exec'd
    /// processes too.
    seccomp: Option<Arc<SeccompProgram>>,
    pub cgroup: PathBuf,
    parked: Mutex<Option<Parked>>,
    init: Mutex<Option<Arc<Proc>>>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
}

pub struct Containers {
    reaper: Arc<Reaper>,
    table: Mutex<HashMap<String, Arc<Container>>>,
    /// The guest's own network namespace was granted to a container
    /// (`guest_network_namespace`): at most one per guest, even if its
    /// create failed after (its sandbox is then torn down).
    guest_netns_granted: AtomicBool,
}

/// A poisoned lock still guards consistent data here (no panics while
/// held change state halfway): take it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes the linux.devices nodes of a container with a user namespace in
/// the agent's /dev, with their mode and (mapped) owner, for the child to
/// bind-mount: the child cannot mknod in its user namespace.
fn stage_devices(stage: &Path, staged: &[StagedDevice]) -> Result<(), ContainerError> {
    use std::os::unix::fs::DirBuilderExt;
    if staged.is_empty() {
        return Ok(());
    }
    let err = |path: &Path| {
        let path = path.display().to_string();
        move |source| ContainerError::StageDevice { path, source }
    };
    // Searchable: the child binds the nodes as the root of its user
    // namespace, which is not the guest's root.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(stage)
        .map_err(err(stage))?;
    for d in staged {
        nix::sys::stat::mknod(
            &d.path,
            nix::sys::stat::SFlag::from_bits_truncate(d.mode & libc::S_IFMT),
            nix::sys::stat::Mode::from_bits_truncate(d.mode & 0o7777),
            d.dev,
        )
        .map_err(|e| err(&d.path)(e.into()))?;
        // mknod applies the umask: set the mode exactly, then the owner.
        nix::sys::stat::fchmodat(
            None,
            &d.path,
            nix::sys::stat::Mode::from_bits_truncate(d.mode & 0o7777),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(|e| err(&d.path)(e.into()))?;
        std::os::unix::fs::chown(&d.path, Some(d.uid), Some(d.gid)).map_err(err(&d.path))?;
    }
    Ok(())
}

impl Containers {
    pub fn new(reaper: Arc<Reaper>) -> Self {
        Containers {
            reaper,
            table: Mutex::new(HashMap::new()),
            guest_netns_granted: AtomicBool::new(false),
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        lock(&self.table)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.to_string()))
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Proc>, ContainerError> {
        let c = self.get(id)?;
        let p = if exec_id.is_empty() {
            lock(&c.init).clone()
        } else {
            lock(&c.execs).get(exec_id).cloned()
        };
        p.ok_or_else(|| ContainerError::NoProcess {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
        })
    }

    pub fn create(
        &self,
        req: &CreateContainerRequest,
        streams: ProcessStreams,
        laps: &mut Laps,
    ) -> Result<(), ContainerError> {
        let CreateContainerRequest {
            container_id: id,
            oci_spec_json: spec_json,
            rootfs,
            shared_mounts,
            no_pivot,
            bundle,
            guest_network_namespace,
            ..
        } = req;
        let (id, no_pivot) = (id.as_str(), *no_pivot);
        if lock(&self.table).contains_key(id) {
            return Err(ContainerError::Exists(id.to_string()));
        }
        let spec: Spec =
            serde_json::from_slice(spec_json).map_err(|e| ContainerError::Parse(e.to_string()))?;
        if !shared_dir_mounted() {
            return Err(ContainerError::NoShare);
        }
        let root = plan::join_inside(Path::new(SHARED_DIR), Path::new(rootfs));
        self.create_at(
            id,
            &spec,
            root,
            shared_mounts,
            no_pivot,
            *guest_network_namespace,
            bundle,
            streams,
            laps,
        )
    }

    /// Creates container `id` from `spec` with its rootfs at `root` (a
    /// path in the guest): `create`'s work once the request is read.
    #[allow(clippy::too_many_arguments)]
    pub fn create_at(
        &self,
        id: &str,
        spec: &Spec,
        root: PathBuf,
        shared_mounts: &HashMap<String, String>,
        no_pivot: bool,
        guest_network_namespace: bool,
        bundle: &str,
        streams: ProcessStreams,
        laps: &mut Laps,
    ) -> Result<(), ContainerError> {
        let cgroup = match spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) {
            Some(p) => plan::join_inside(
                Path::new(CGROUP_ROOT),
                &PathBuf::from(p.display().to_string().replace(':', "/")),
            ),
            None => Path::new(CGROUP_ROOT).join("husk").join(id),
        };
        static STAGE_SEQ: AtomicU64 = AtomicU64::new(0);
        let device_stage = Path::new(DEVICE_STAGE_ROOT)
            .join(STAGE_SEQ.fetch_add(1, Ordering::Relaxed).to_string());
        let cgroup_procs = cgroup.join("cgroup.procs");
        let request = ContainerRequest {
            root: &root,
            shared_dir: Path::new(SHARED_DIR),
            shared_mounts,
            cgroup_procs: &cgroup_procs,
            no_pivot,
            device_stage: &device_stage,
            guest_network_namespace: guest_network_namespace
                && !self.guest_netns_granted.swap(true, Ordering::AcqRel),
        };
        laps.lap("parse spec");
        let plan = plan::plan_container(spec, &request, &LiveFs)?;
        let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
        // Checked before anything exists, like the rest of the spec.
        let device_rules = device_filter::rules_from_spec(
            resources.as_ref().and_then(|r| r.devices().as_deref()),
        )?;
        let hooks = crate::hooks::plan(spec, id, bundle)?;
        laps.lap("plan");
        cgroup::ensure_cgroup(&cgroup)?;
        let undo = |e: ContainerError| {
            let _ = std::fs::remove_dir_all(&device_stage);
            let _ = std::fs::remove_dir(&cgroup);
            e
        };
        if let Some(r) = &resources {
            cgroup::apply_resources(&cgroup, r).map_err(|e| undo(e.into()))?;
        }
        let filter =
            cgroup::load_device_filter(&cgroup, &device_rules).map_err(|e| undo(e.into()))?;
        let kept = DeviceFilterState {
            cgroup_dir: filter
                .cgroup_dir()
                .try_clone()
                .map_err(|e| undo(e.into()))?,
            prog: filter.prog().try_clone().map_err(|e| undo(e.into()))?,
        };
        laps.lap("cgroup and device filter");
        if let Some(rootfs) = &plan.rootfs {
            stage_devices(&device_stage, &rootfs.staged_devices).map_err(undo)?;
        }
        let container = Arc::new(Container {
            root,
            device_stage: device_stage.clone(),
            device_filter: Mutex::new(Some(kept)),
            seccomp: plan.seccomp.clone(),
            cgroup: cgroup.clone(),
            parked: Mutex::new(None),
            init: Mutex::new(None),
            execs: Mutex::new(HashMap::new()),
        });
        {
            let mut table = lock(&self.table);
            if table.contains_key(id) {
                return Err(undo(ContainerError::Exists(id.to_string())));
            }
            table.insert(id.to_string(), Arc::clone(&container));
        }
        let launch = Launch {
            plan,
            hooks,
            park: None,
            device_filter: Some(filter),
        };
        laps.lap("stage devices");
        match park(&self.reaper, launch, streams) {
            Ok(parked) => {
                laps.lap("fork to parked");
                for (name, ns) in parked.steps() {
                    laps.push(&format!("  {name}"), u128::from(ns));
                }
                *lock(&container.parked) = Some(parked);
                Ok(())
            }
            Err(e) => {
                lock(&self.table).remove(id);
                Err(undo(e))
            }
        }
    }

    pub fn start(&self, id: &str, laps: &mut Laps) -> Result<u32, ContainerError> {
        let c = self.get(id)?;
        let parked = lock(&c.parked)
            .take()
            .ok_or_else(|| ContainerError::AlreadyStarted(id.to_string()))?;
        let proc = release(&self.reaper, parked, child::START)?;
        laps.lap("release to exec");
        let pid = proc.pid;
        *lock(&c.init) = Some(proc);
        Ok(pid as u32)
    }

    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        streams: ProcessStreams,
        laps: &mut Laps,
    ) -> Result<u32, ContainerError> {
        let c = self.get(id)?;
        let init = lock(&c.init)
            .clone()
            .ok_or_else(|| ContainerError::NotRunning(id.to_string()))?;
        if self.reaper.try_wait(init.pid).is_some() {
            return Err(ContainerError::NotRunning(id.to_string()));
        }
        if lock(&c.execs).contains_key(exec_id) {
            return Err(ContainerError::Exists(format!("{id}/{exec_id}")));
        }
        let process: oci_spec::runtime::Process = serde_json::from_slice(process_json)
            .map_err(|e| ContainerError::Parse(format!("process: {e}")))?;
        let plan = plan::plan_exec(
            &process,
            init.pid,
            &c.root,
            &c.cgroup.join("cgroup.procs"),
            c.seccomp.clone(),
            &LiveFs,
        )?;
        let launch = Launch {
            plan,
            hooks: None,
            park: None,
            device_filter: None,
        };
        laps.lap("plan");
        let proc = spawn(&self.reaper, launch, streams)?;
        laps.lap("fork to exec");
        let pid = proc.pid;
        lock(&c.execs).insert(exec_id.to_string(), proc);
        Ok(pid as u32)
    }

    pub fn wait(
        &self,
        id: &str,
        exec_id: &str,
        laps: &mut Laps,
    ) -> Result<(ExitInfo, bool), ContainerError> {
        let c = self.get(id)?;
        let p = self.process(id, exec_id)?;
        let info = *p.exit.get_or_init(|| {
            let info = self.reaper.wait(p.pid);
            if exec_id.is_empty() {
                // The init's end ends the container, as a pid namespace would.
                cgroup::kill_cgroup(&c.cgroup, libc::SIGKILL);
                kill_holder(&p);
            }
            info
        });
        let waited = crate::child::now_ns();
        let copiers: Vec<_> = std::mem::take(&mut *lock(&p.copiers));
        for h in copiers {
            let _ = h.join();
        }
        let drained = crate::child::now_ns();
        laps.push(
            "reaped to waited (container killed)",
            u128::from(waited.saturating_sub(info.reaped_ns)),
        );
        laps.push("output drained", u128::from(drained.saturating_sub(waited)));
        let oom = info.signal == libc::SIGKILL as u32 && cgroup::oom_kills(&c.cgroup) > 0;
        Ok((info, oom))
    }

    pub fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        if all {
            cgroup::kill_cgroup(&c.cgroup, signal);
            return Ok(());
        }
        let p = self
            .process(id, exec_id)
            .map_err(|_| ContainerError::NotRunning(id.to_string()))?;
        if self.reaper.try_wait(p.pid).is_some() {
            return Err(ContainerError::NotRunning(id.to_string()));
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.pid),
            nix::sys::signal::Signal::try_from(signal).map_err(|e| ContainerError::Io(e.into()))?,
        )
        .map_err(|e| ContainerError::Io(e.into()))
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        let p = self.process(id, exec_id)?;
        lock(&p.stdin).take();
        Ok(())
    }

    pub fn resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u16,
        cols: u16,
    ) -> Result<(), ContainerError> {
        let p = self.process(id, exec_id)?;
        if let Some(master) = &p.pty_master {
            let ws = libc::winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ on our pty master with a valid winsize.
            if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        Ok(())
    }

    pub fn freeze(&self, id: &str, frozen: bool) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        Ok(cgroup::write_cgroup(
            &c.cgroup,
            "cgroup.freeze",
            if frozen { "1" } else { "0" },
        )?)
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        let r: LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| ContainerError::Parse(format!("linux.resources: {e}")))?;
        if let Some(devices) = r.devices() {
            self.update_devices(&c, devices)?;
        }
        Ok(cgroup::apply_resources(&c.cgroup, &r)?)
    }

    /// New device rules: a running container's filter is swapped in one
    /// step (BPF_F_REPLACE); before start the pending one is.
    fn update_devices(
        &self,
        c: &Container,
        devices: &[oci_spec::runtime::LinuxDeviceCgroup],
    ) -> Result<(), ContainerError> {
        let rules = device_filter::rules_from_spec(Some(devices))?;
        let mut state = lock(&c.device_filter);
        let Some(current) = state.as_mut() else {
            return Ok(());
        };
        let new = device_filter::load(&device_filter::compile(&rules))?;
        if lock(&c.parked).is_some() {
            // The parked child attaches the filter it was created with just
            // before exec; there is no attached program to replace yet.
            return Err(ContainerError::Io(std::io::Error::other(
                "linux.resources.devices of a created container can be updated once it has started",
            )));
        }
        device_filter::replace(
            &current.cgroup_dir,
            &current.prog,
            &new,
            &c.cgroup.display().to_string(),
        )?;
        current.prog = new;
        Ok(())
    }

    /// The network namespace of the container's init, parked or started
    /// and not yet exited (UpdateNetwork configures it before the start).
    pub fn net_namespace(&self, id: &str) -> Result<OwnedFd, ContainerError> {
        let c = self.get(id)?;
        // The locks stay held while the namespace opens: the child is not
        // released or replaced meanwhile, and the reaper keeps an exited
        // child's pid until it is waited for.
        let parked = lock(&c.parked);
        let init = lock(&c.init);
        let pid = match (parked.as_ref(), init.as_ref()) {
            (Some(p), _) => p.pid(),
            (None, Some(p)) if p.exit.get().is_none() => p.pid,
            _ => return Err(ContainerError::NotRunning(id.to_string())),
        };
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
        Ok(ns.into())
    }

    pub fn cgroup(&self, id: &str) -> Result<PathBuf, ContainerError> {
        Ok(self.get(id)?.cgroup.clone())
    }

    pub fn processes(&self, id: &str) -> Result<Vec<(u32, String)>, ContainerError> {
        let c = self.get(id)?;
        Ok(cgroup::cgroup_pids(&c.cgroup)
            .into_iter()
            .map(|pid| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                (pid as u32, comm.trim().to_string())
            })
            .collect())
    }

    pub fn remove(&self, id: &str, force: bool) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        // A created container's parked child ends without exec.
        if let Some(parked) = lock(&c.parked).take() {
            let _ = release(&self.reaper, parked, b'x');
        }
        let init = lock(&c.init).clone();
        if let Some(init) = &init {
            if self.reaper.try_wait(init.pid).is_none() {
                if !force {
                    return Err(ContainerError::Running(id.to_string()));
                }
                let _ = std::fs::write(c.cgroup.join("cgroup.freeze"), "0");
                cgroup::kill_cgroup(&c.cgroup, libc::SIGKILL);
                self.reaper.wait(init.pid);
            }
        }
        cgroup::kill_cgroup(&c.cgroup, libc::SIGKILL);
        // The cgroup empties once the killed processes are reaped: wait for
        // its notification (up to a second, as long as before), then remove.
        cgroup::wait_empty(&c.cgroup, Duration::from_secs(1));
        let _ = std::fs::remove_dir(&c.cgroup);
        if let Some(init) = init {
            kill_holder(&init);
            self.reaper.forget(init.pid);
        }
        for p in lock(&c.execs).values() {
            self.reaper.forget(p.pid);
        }
        let _ = std::fs::remove_dir_all(&c.device_stage);
        lock(&self.table).remove(id);
        Ok(())
    }
}
