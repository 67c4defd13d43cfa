//! The agent API served over ttrpc on vsock.

use crate::container::{ContainerError, Containers, ProcessStreams};
use crate::phases::Laps;
use crate::process::Reaper;
use crate::streams::{StreamError, StreamRegistry};
use crate::{power, stats};
use husk_agent::network::{self, NetworkConfig, NetworkError};
use husk_protocol::agent::*;
use husk_protocol::agent_ttrpc::{create_agent, Agent};
use husk_protocol::ErrorKind;
use husk_protocol::{AGENT_PORT, VERSION};
use std::os::fd::AsFd;
use std::sync::{Arc, OnceLock};
use ttrpc::{Error as RpcError, TtrpcContext};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("serving ttrpc on vsock port {AGENT_PORT}: {0}")]
    Ttrpc(#[from] ttrpc::Error),
}

pub struct AgentService {
    containers: Containers,
    streams: Arc<StreamRegistry>,
    ready_boottime_ns: OnceLock<u64>,
}

fn boottime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

impl ContainerError {
    /// What kind of failure this is, for the host to act on without
    /// reading the message.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ContainerError::NotFound(_) | ContainerError::NoProcess { .. } => ErrorKind::NotFound,
            ContainerError::Exists(_) => ErrorKind::AlreadyExists,
            ContainerError::NotRunning(_)
            | ContainerError::Running(_)
            | ContainerError::AlreadyStarted(_) => ErrorKind::FailedPrecondition,
            ContainerError::Spec(_) | ContainerError::Hook(_) | ContainerError::Parse(_) => {
                ErrorKind::InvalidArgument
            }
            ContainerError::Stream(StreamError::NotArrived(_)) => ErrorKind::DeadlineExceeded,
            ContainerError::NoShare
            | ContainerError::Cgroup(_)
            | ContainerError::Spawn { .. }
            | ContainerError::Stream(StreamError::Listen { .. })
            | ContainerError::Userns(_)
            | ContainerError::Devices(_)
            | ContainerError::StageDevice { .. }
            | ContainerError::Io(_) => ErrorKind::Internal,
        }
    }
}

impl From<ContainerError> for RpcError {
    fn from(e: ContainerError) -> Self {
        e.kind().rpc_error(e)
    }
}

impl AgentService {
    pub fn new(reaper: Arc<Reaper>, streams: Arc<StreamRegistry>) -> Self {
        AgentService {
            containers: Containers::new(reaper),
            streams,
            ready_boottime_ns: OnceLock::new(),
        }
    }

    fn take_streams(&self, stdio: Option<&Stdio>) -> Result<ProcessStreams, RpcError> {
        let Some(s) = stdio else {
            return Ok(ProcessStreams::default());
        };
        let take = |t| {
            self.streams
                .take(t)
                .map_err(|e| ErrorKind::DeadlineExceeded.rpc_error(e))
        };
        Ok(ProcessStreams {
            stdin: take(s.stdin)?,
            stdout: take(s.stdout)?,
            stderr: take(s.stderr)?,
        })
    }
}

impl Agent for AgentService {
    fn health(&self, _: &TtrpcContext, _: HealthRequest) -> ttrpc::Result<HealthResponse> {
        Ok(HealthResponse {
            version: VERSION.to_string(),
            ready_boottime_ns: self.ready_boottime_ns.get().copied().unwrap_or(0),
            now_boottime_ns: boottime_ns(),
            ..Default::default()
        })
    }

    fn guest_info(
        &self,
        _: &TtrpcContext,
        _: GuestInfoRequest,
    ) -> ttrpc::Result<GuestInfoResponse> {
        let uts = nix::sys::utsname::uname().map_err(|e| ErrorKind::Internal.rpc_error(e))?;
        let mem_kib = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("MemTotal:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .unwrap_or(0);
        let controllers =
            std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
        Ok(GuestInfoResponse {
            kernel_release: uts.release().to_string_lossy().into_owned(),
            kernel_version: uts.version().to_string_lossy().into_owned(),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            memory_total_bytes: mem_kib * 1024,
            cgroup_controllers: controllers.split_whitespace().map(String::from).collect(),
            agent_version: VERSION.to_string(),
            ..Default::default()
        })
    }

    fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateResponse> {
        let mut laps = Laps::new();
        let streams = self.take_streams(req.stdio.as_ref())?;
        laps.lap("stdio streams");
        self.containers.create(&req, streams, &mut laps)?;
        Ok(CreateResponse {
            phases: laps.into_steps(),
            ..Default::default()
        })
    }

    fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StartResponse> {
        #[cfg(feature = "hostile-test")]
        crate::hostile::on_start_container(_ctx);
        let mut laps = Laps::new();
        let pid = self.containers.start(&req.container_id, &mut laps)?;
        Ok(StartResponse {
            pid,
            phases: laps.into_steps(),
            ..Default::default()
        })
    }

    fn remove_container(
        &self,
        _: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.remove(&req.container_id, req.force)?;
        Ok(Empty::default())
    }

    fn pause_container(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.freeze(&req.container_id, true)?;
        Ok(Empty::default())
    }

    fn resume_container(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.freeze(&req.container_id, false)?;
        Ok(Empty::default())
    }

    fn update_resources(
        &self,
        _: &TtrpcContext,
        req: UpdateResourcesRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .update(&req.container_id, &req.resources_json)?;
        Ok(Empty::default())
    }

    fn update_network(&self, _: &TtrpcContext, req: UpdateNetworkRequest) -> ttrpc::Result<Empty> {
        let rpc = |e: NetworkError| e.kind().rpc_error(e);
        // The whole request is checked before anything changes.
        let config = NetworkConfig::from_request(&req).map_err(rpc)?;
        let target = self.containers.net_namespace(&req.container_id)?;
        // The guest's root namespace, where virtio-net devices appear: the
        // agent's own (its serving threads never leave it).
        let root = std::fs::File::open("/proc/self/ns/net").map_err(|source| {
            rpc(NetworkError::Namespace {
                which: "guest's root",
                source,
            })
        })?;
        network::apply(&config, root.as_fd(), target.as_fd()).map_err(rpc)?;
        Ok(Empty::default())
    }

    fn stats(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<StatsResponse> {
        Ok(stats::read(&self.containers.cgroup(&req.container_id)?))
    }

    fn list_processes(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let processes = self
            .containers
            .processes(&req.container_id)?
            .into_iter()
            .map(|(pid, command)| ProcessInfo {
                pid,
                command,
                ..Default::default()
            })
            .collect();
        Ok(ListProcessesResponse {
            processes,
            ..Default::default()
        })
    }

    fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<StartResponse> {
        #[cfg(feature = "hostile-test")]
        crate::hostile::on_exec_process()?;
        let mut laps = Laps::new();
        let streams = self.take_streams(req.stdio.as_ref())?;
        laps.lap("stdio streams");
        let pid = self.containers.exec(
            &req.container_id,
            &req.exec_id,
            &req.process_json,
            streams,
            &mut laps,
        )?;
        Ok(StartResponse {
            pid,
            phases: laps.into_steps(),
            ..Default::default()
        })
    }

    fn signal_process(&self, _: &TtrpcContext, req: SignalProcessRequest) -> ttrpc::Result<Empty> {
        self.containers
            .signal(&req.container_id, &req.exec_id, req.signal as i32, req.all)?;
        Ok(Empty::default())
    }

    fn wait_process(
        &self,
        _: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let mut laps = Laps::new();
        let (info, oom_killed) =
            self.containers
                .wait(&req.container_id, &req.exec_id, &mut laps)?;
        let reply = WaitProcessResponse {
            exit_code: info.exit_code,
            signal: info.signal,
            oom_killed,
            exited_at_unix_ns: info.exited_at_unix_ns,
            phases: laps.into_steps(),
            ..Default::default()
        };
        #[cfg(feature = "hostile-test")]
        let reply = crate::hostile::on_wait_process(reply);
        Ok(reply)
    }

    fn resize_tty(&self, _: &TtrpcContext, req: ResizeTtyRequest) -> ttrpc::Result<Empty> {
        let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
        self.containers.resize(
            &req.container_id,
            &req.exec_id,
            clamp(req.rows),
            clamp(req.cols),
        )?;
        Ok(Empty::default())
    }

    fn close_stdin(&self, _: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        self.containers
            .close_stdin(&req.container_id, &req.exec_id)?;
        Ok(Empty::default())
    }

    fn warm_up(&self, _: &TtrpcContext, _: WarmUpRequest) -> ttrpc::Result<CreateResponse> {
        let mut laps = Laps::new();
        crate::warm::warm_up(&self.containers, &mut laps)?;
        Ok(CreateResponse {
            phases: laps.into_steps(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _: &TtrpcContext, _: ShutdownRequest) -> ttrpc::Result<Empty> {
        // Synced before the answer: once answered, nothing in the guest
        // needs the VM any more, and the host ends it without waiting for
        // the guest's own restart (a hundred milliseconds under TCG).
        power::sync_if_dirty();
        // The VM ends right after the answer, if the host has not ended it
        // first. The pause is a grace for the reply to leave (ttrpc sends
        // it after this returns, with no event to wait on), not a poll.
        std::thread::spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            power::power_off();
        });
        Ok(Empty::default())
    }
}

/// Writes the boot marker: a console line with the guest's own clock, and a
/// byte to I/O port 0x3f0, which husk-vmm timestamps (QEMU ignores it).
fn mark_ready(boottime: u64) {
    eprintln!("husk-agent: ready boottime_ns={boottime}");
    if std::process::id() == 1 {
        // SAFETY: ioperm grants this process access to one I/O port; the
        // out instruction writes one byte to it and touches no memory.
        unsafe {
            if libc::ioperm(0x3f0, 1, 1) == 0 {
                std::arch::asm!("out dx, al", in("dx") 0x3f0u16, in("al") 1u8, options(nomem, nostack));
            }
        }
    }
}

/// Serves the agent API until the VM ends.
pub fn serve(service: AgentService) -> Result<(), ServeError> {
    let service = Arc::new(service);
    let methods = create_agent(Arc::clone(&service) as Arc<dyn Agent + Send + Sync>);
    let mut server = ttrpc::Server::new()
        .bind(&format!("vsock://-1:{AGENT_PORT}"))?
        .register_service(methods)
        .set_thread_count_max(256);
    server.start()?;
    let ready = boottime_ns();
    let _ = service.ready_boottime_ns.set(ready);
    mark_ready(ready);
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each kind of container error leaves the agent as a status whose code
    /// and kind (in its details) the host reads back as the same kind.
    #[test]
    fn container_errors_carry_their_kind_and_code() {
        let id = || "c".to_string();
        let cases = [
            (ContainerError::NotFound(id()), ErrorKind::NotFound),
            (
                ContainerError::NoProcess {
                    id: id(),
                    exec_id: "e".into(),
                },
                ErrorKind::NotFound,
            ),
            (ContainerError::Exists(id()), ErrorKind::AlreadyExists),
            (
                ContainerError::Parse("x".into()),
                ErrorKind::InvalidArgument,
            ),
            (
                ContainerError::NotRunning(id()),
                ErrorKind::FailedPrecondition,
            ),
            (ContainerError::Running(id()), ErrorKind::FailedPrecondition),
            (
                ContainerError::AlreadyStarted(id()),
                ErrorKind::FailedPrecondition,
            ),
            (
                ContainerError::Stream(StreamError::NotArrived(7)),
                ErrorKind::DeadlineExceeded,
            ),
            (ContainerError::NoShare, ErrorKind::Internal),
            (
                ContainerError::Io(std::io::Error::other("x")),
                ErrorKind::Internal,
            ),
        ];
        for (error, kind) in cases {
            let message = error.to_string();
            let RpcError::RpcStatus(status) = RpcError::from(error) else {
                panic!("not a status");
            };
            assert_eq!(status.code(), kind.code(), "{message}");
            assert_eq!(status.message, message);
            assert_eq!(ErrorKind::of_status(&status), kind, "{message}");
        }
    }
}
