//! `husk-cri`: the few CRI calls husk's tests make (crictl is not packaged
//! here). Speaks `runtime.v1` gRPC over HTTP/2 on containerd's Unix socket.
//!
//! ```text
//! husk-cri SOCKET version
//! husk-cri SOCKET runp name=N uid=U ns=NS log-dir=DIR [handler=husk] [pid=node]
//!                                                                          -> pod id
//! husk-cri SOCKET create pod=ID name=N uid=U ns=NS log-dir=DIR cname=C image=I log=FILE
//!                        [mount=HOST:CTR[:OPT,…]]... [handler=husk] [pid=node] [caps=ALL]
//!                        -- CMD...                                         -> container id
//! (mount options: ro (readonly), rro (readonly and recursive_read_only),
//!  rslave (propagation host to container), rshared (bidirectional).
//!  pid=node: the node's pid namespace, hostPID; in husk, the guest's.
//!  caps=C,…: capabilities added to the container's.)
//! husk-cri SOCKET start|rm CID     husk-cri SOCKET stop CID [TIMEOUT]
//! husk-cri SOCKET stopp|rmp POD    husk-cri SOCKET status CID              -> STATE EXIT_CODE
//! husk-cri SOCKET exec CID -- CMD...  (ExecSync: its stdout, stderr and exit code)
//! husk-cri SOCKET update CID memory=BYTES  (UpdateContainerResources)
//! husk-cri shim ADDRESS create ID BUNDLE | start ID | kill ID | wait ID | delete ID | shutdown
//!          (a shim's task API directly, bypassing containerd)
//! ```

/// Generated from proto/api.proto (Kubernetes CRI runtime.v1).
#[allow(clippy::all)]
mod cri {
    include!(concat!(env!("OUT_DIR"), "/cri/mod.rs"));
}

use cri::api::*;
use protobuf::Message;
use std::collections::HashMap;
use std::io::Write;

struct Client {
    socket: String,
}

impl Client {
    async fn call<Req: Message, Resp: Message>(
        &self,
        service: &str,
        method: &str,
        req: &Req,
    ) -> anyhow::Result<Resp> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to {}: {e}", self.socket))?;
        let (client, conn) = h2::client::handshake(stream).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut client = client.ready().await?;
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://localhost/runtime.v1.{service}/{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let (response, mut send) = client.send_request(request, false)?;
        let body = req.write_to_bytes()?;
        let mut frame = Vec::with_capacity(body.len() + 5);
        frame.push(0);
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        send.send_data(frame.into(), true)?;
        let response = response.await?;
        let (parts, mut body) = response.into_parts();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await?.unwrap_or_default();
        let get = |k: &str| {
            trailers
                .get(k)
                .or_else(|| parts.headers.get(k))
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let status = get("grpc-status").unwrap_or_else(|| "0".into());
        if status != "0" {
            let message = percent_decode(&get("grpc-message").unwrap_or_default());
            anyhow::bail!("{method}: {message} (grpc status {status})");
        }
        if data.len() < 5 {
            anyhow::bail!("{method}: short response ({} bytes)", data.len());
        }
        Ok(Resp::parse_from_bytes(&data[5..])?)
    }

    async fn runtime<Req: Message, Resp: Message>(
        &self,
        method: &str,
        req: &Req,
    ) -> anyhow::Result<Resp> {
        self.call("RuntimeService", method, req).await
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `k=v` words before `--`, and the words after it.
fn parse(args: &[String]) -> (HashMap<String, Vec<String>>, Vec<String>) {
    let mut kv: HashMap<String, Vec<String>> = HashMap::new();
    let mut rest = Vec::new();
    let mut after = false;
    for a in args {
        if after {
            rest.push(a.clone());
        } else if a == "--" {
            after = true;
        } else if let Some((k, v)) = a.split_once('=') {
            kv.entry(k.to_string()).or_default().push(v.to_string());
        } else {
            rest.push(a.clone());
        }
    }
    (kv, rest)
}

fn one(kv: &HashMap<String, Vec<String>>, k: &str) -> anyhow::Result<String> {
    kv.get(k)
        .and_then(|v| v.last().cloned())
        .ok_or_else(|| anyhow::anyhow!("missing {k}=…"))
}

fn pod_config(kv: &HashMap<String, Vec<String>>) -> anyhow::Result<PodSandboxConfig> {
    let mut c = PodSandboxConfig::new();
    let mut m = PodSandboxMetadata::new();
    m.name = one(kv, "name")?;
    m.uid = one(kv, "uid")?;
    m.namespace = one(kv, "ns")?;
    c.metadata = Some(m).into();
    c.hostname = one(kv, "name")?;
    c.log_directory = one(kv, "log-dir")?;
    let mut linux = LinuxPodSandboxConfig::new();
    if let Some(parent) = kv.get("cgroup-parent").and_then(|v| v.first()) {
        linux.cgroup_parent = parent.clone();
    }
    let mut sc = LinuxSandboxSecurityContext::new();
    sc.namespace_options = Some(namespace_options(kv)).into();
    linux.security_context = Some(sc).into();
    c.linux = Some(linux).into();
    Ok(c)
}

/// The pod's namespaces: its own network and IPC; its containers' pid
/// namespaces of their own unless `pid=node`.
fn namespace_options(kv: &HashMap<String, Vec<String>>) -> NamespaceOption {
    let mut ns = NamespaceOption::new();
    ns.network = NamespaceMode::POD.into();
    ns.pid = match kv.get("pid").and_then(|v| v.last()).map(String::as_str) {
        Some("node") => NamespaceMode::NODE.into(),
        _ => NamespaceMode::CONTAINER.into(),
    };
    ns.ipc = NamespaceMode::POD.into();
    ns
}

const USAGE: &str = "usage: husk-cri SOCKET COMMAND ARGS…
A small CRI client for husk's tests: COMMAND is one of the CRI calls this
file implements (version, runp, create, start, exec, stop, rm, …; see the source).";

async fn run(args: Vec<String>) -> anyhow::Result<i32> {
    // Only in front: what follows a COMMAND may be a container's own argv.
    if matches!(args.first().map(String::as_str), Some("--help" | "-h")) {
        println!("{USAGE}");
        return Ok(0);
    }
    if args.len() < 2 {
        anyhow::bail!("{USAGE}");
    }
    let client = Client {
        socket: args[0].clone(),
    };
    let (kv, rest) = parse(&args[2..]);
    let mut out = std::io::stdout();
    match args[1].as_str() {
        "version" => {
            let r: VersionResponse = client.runtime("Version", &VersionRequest::new()).await?;
            writeln!(
                out,
                "{} {} {}",
                r.runtime_name, r.runtime_version, r.runtime_api_version
            )?;
        }
        "runp" => {
            let mut req = RunPodSandboxRequest::new();
            req.config = Some(pod_config(&kv)?).into();
            req.runtime_handler = kv
                .get("handler")
                .and_then(|v| v.last().cloned())
                .unwrap_or_else(|| "husk".into());
            let r: RunPodSandboxResponse = client.runtime("RunPodSandbox", &req).await?;
            writeln!(out, "{}", r.pod_sandbox_id)?;
        }
        "create" => {
            let mut cc = ContainerConfig::new();
            let mut m = ContainerMetadata::new();
            m.name = one(&kv, "cname")?;
            cc.metadata = Some(m).into();
            let mut image = ImageSpec::new();
            image.image = one(&kv, "image")?;
            cc.image = Some(image).into();
            cc.command = rest.clone();
            cc.log_path = one(&kv, "log")?;
            for spec in kv.get("mount").cloned().unwrap_or_default() {
                cc.mounts.push(volume(&spec)?);
            }
            let mut linux = LinuxContainerConfig::new();
            let mut sc = LinuxContainerSecurityContext::new();
            sc.namespace_options = Some(namespace_options(&kv)).into();
            if let Some(caps) = kv.get("caps").and_then(|v| v.last()) {
                let mut c = Capability::new();
                c.add_capabilities = caps.split(',').map(String::from).collect();
                sc.capabilities = Some(c).into();
            }
            linux.security_context = Some(sc).into();
            cc.linux = Some(linux).into();
            let mut req = CreateContainerRequest::new();
            req.pod_sandbox_id = one(&kv, "pod")?;
            req.config = Some(cc).into();
            req.sandbox_config = Some(pod_config(&kv)?).into();
            let r: CreateContainerResponse = client.runtime("CreateContainer", &req).await?;
            writeln!(out, "{}", r.container_id)?;
        }
        "start" => {
            let mut req = StartContainerRequest::new();
            req.container_id = rest.first().cloned().unwrap_or_default();
            let _: StartContainerResponse = client.runtime("StartContainer", &req).await?;
        }
        "stop" => {
            let mut req = StopContainerRequest::new();
            req.container_id = rest.first().cloned().unwrap_or_default();
            req.timeout = rest.get(1).and_then(|t| t.parse().ok()).unwrap_or(10);
            let _: StopContainerResponse = client.runtime("StopContainer", &req).await?;
        }
        "rm" => {
            let mut req = RemoveContainerRequest::new();
            req.container_id = rest.first().cloned().unwrap_or_default();
            let _: RemoveContainerResponse = client.runtime("RemoveContainer", &req).await?;
        }
        "stopp" => {
            let mut req = StopPodSandboxRequest::new();
            req.pod_sandbox_id = rest.first().cloned().unwrap_or_default();
            let _: StopPodSandboxResponse = client.runtime("StopPodSandbox", &req).await?;
        }
        "rmp" => {
            let mut req = RemovePodSandboxRequest::new();
            req.pod_sandbox_id = rest.first().cloned().unwrap_or_default();
            let _: RemovePodSandboxResponse = client.runtime("RemovePodSandbox", &req).await?;
        }
        "update" => {
            let mut req = UpdateContainerResourcesRequest::new();
            req.container_id = rest.first().cloned().unwrap_or_default();
            let mut linux = LinuxContainerResources::new();
            linux.memory_limit_in_bytes = one(&kv, "memory")?.parse()?;
            req.linux = Some(linux).into();
            let _: UpdateContainerResourcesResponse =
                client.runtime("UpdateContainerResources", &req).await?;
        }
        "podip" => {
            let mut req = PodSandboxStatusRequest::new();
            req.pod_sandbox_id = rest.first().cloned().unwrap_or_default();
            let r: PodSandboxStatusResponse = client.runtime("PodSandboxStatus", &req).await?;
            let s = r.status.into_option().unwrap_or_default();
            writeln!(out, "{}", s.network.into_option().unwrap_or_default().ip)?;
        }
        "status" => {
            let mut req = ContainerStatusRequest::new();
            req.container_id = rest.first().cloned().unwrap_or_default();
            let r: ContainerStatusResponse = client.runtime("ContainerStatus", &req).await?;
            let s = r.status.into_option().unwrap_or_default();
            writeln!(out, "{:?} {}", s.state.enum_value_or_default(), s.exit_code)?;
        }
        "exec" => {
            let mut req = ExecSyncRequest::new();
            req.container_id = rest.first().cloned().unwrap_or_default();
            req.cmd = rest[1..].to_vec();
            req.timeout = 60;
            let r: ExecSyncResponse = client.runtime("ExecSync", &req).await?;
            out.write_all(&r.stdout)?;
            std::io::stderr().write_all(&r.stderr)?;
            return Ok(r.exit_code);
        }
        other => anyhow::bail!("unknown command {other:?}"),
    }
    Ok(0)
}

/// `husk-cri shim ADDRESS COMMAND ARGS…`: calls a shim's task service.
fn shim(args: &[String]) -> anyhow::Result<i32> {
    use containerd_shim_protos::api;
    use containerd_shim_protos::shim_sync::TaskClient;
    let address = args
        .first()
        .ok_or_else(|| anyhow::anyhow!("shim: ADDRESS missing"))?;
    let path = address.strip_prefix("unix://").unwrap_or(address);
    let stream = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| anyhow::anyhow!("connecting to {path}: {e}"))?;
    let client = TaskClient::new(ttrpc::Client::new(std::os::fd::IntoRawFd::into_raw_fd(
        stream,
    ))?);
    let ctx = || ttrpc::context::with_timeout(120_000_000_000);
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let show = |e: ttrpc::Error| match e {
        ttrpc::Error::RpcStatus(s) => anyhow::anyhow!("{:?}: {}", s.code(), s.message()),
        other => anyhow::anyhow!("{other}"),
    };
    match arg(1).as_str() {
        "create" => {
            let req = api::CreateTaskRequest {
                id: arg(2),
                bundle: arg(3),
                ..Default::default()
            };
            let r = client.create(ctx(), &req).map_err(show)?;
            println!("{}", r.pid);
        }
        "start" => {
            let req = api::StartRequest {
                id: arg(2),
                ..Default::default()
            };
            client.start(ctx(), &req).map_err(show)?;
        }
        "kill" => {
            let req = api::KillRequest {
                id: arg(2),
                signal: 9,
                all: true,
                ..Default::default()
            };
            client.kill(ctx(), &req).map_err(show)?;
        }
        "wait" => {
            let req = api::WaitRequest {
                id: arg(2),
                ..Default::default()
            };
            let r = client.wait(ctx(), &req).map_err(show)?;
            println!("{}", r.exit_status);
        }
        "delete" => {
            let req = api::DeleteRequest {
                id: arg(2),
                ..Default::default()
            };
            let r = client.delete(ctx(), &req).map_err(show)?;
            println!("{}", r.exit_status);
        }
        "shutdown" => {
            let _ = client.shutdown(ctx(), &api::ShutdownRequest::default());
        }
        other => anyhow::bail!("shim: unknown command {other:?}"),
    }
    Ok(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("shim") {
        match shim(&args[1..]) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("husk-cri: {e:#}");
                std::process::exit(1);
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("husk-cri: {e}");
            std::process::exit(1);
        }
    };
    match rt.block_on(run(args)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("husk-cri: {e:#}");
            std::process::exit(1);
        }
    }
}

/// A CRI volume from `HOST:CTR[:OPT,…]` (options as the usage says).
fn volume(spec: &str) -> anyhow::Result<Mount> {
    let mut parts = spec.splitn(3, ':');
    let (Some(host), Some(ctr)) = (parts.next(), parts.next()) else {
        anyhow::bail!("mount={spec}: want HOST:CTR[:OPT,…]");
    };
    let mut mount = Mount::new();
    mount.host_path = host.into();
    mount.container_path = ctr.into();
    for opt in parts.next().map(|o| o.split(',')).into_iter().flatten() {
        match opt {
            "ro" => mount.readonly = true,
            "rro" => {
                mount.readonly = true;
                mount.recursive_read_only = true;
            }
            "rslave" => mount.propagation = MountPropagation::PROPAGATION_HOST_TO_CONTAINER.into(),
            "rshared" => mount.propagation = MountPropagation::PROPAGATION_BIDIRECTIONAL.into(),
            other => {
                anyhow::bail!("mount={spec}: unknown option {other:?} (ro, rro, rslave, rshared)")
            }
        }
    }
    Ok(mount)
}
