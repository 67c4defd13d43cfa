//! `husk check`: every prerequisite, then a probe sandbox booted, its agent
//! asked for health and version, shut down and cleaned up, with timings.

use husk_runtime::artifacts;
use husk_runtime::config::{Config, HypervisorChoice};
use husk_runtime::hypervisor::{self, kvm};
use husk_runtime::sandbox::{Sandbox, SandboxConfig, Timings};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Output format: text or json.
    #[arg(long, default_value = "text")]
    pub format: String,
    /// Share this existing directory with the probe sandbox.
    #[arg(long)]
    pub shared_dir: Option<PathBuf>,
}

#[derive(Serialize)]
struct Item {
    name: &'static str,
    ok: bool,
    detail: String,
}

/// One probe sandbox's result, per hypervisor backend.
#[derive(Serialize, Default, Clone)]
struct Probe {
    hypervisor: String,
    acceleration: String,
    timings: Option<Timings>,
    shutdown_ms: f64,
    error: Option<String>,
}

#[derive(Serialize, Default)]
struct Report {
    ok: bool,
    items: Vec<Item>,
    hypervisor: String,
    acceleration: String,
    hypervisor_reason: String,
    guest_kernel: String,
    agent_version: String,
    timings: Option<Timings>,
    shutdown_ms: f64,
    error: Option<String>,
    /// Where KVM runs guests: every backend probed, side by side.
    backends: Vec<Probe>,
    /// The warm pool's state (None: no pool configured).
    pool: Option<husk_runtime::pool::PoolStatus>,
    /// Why the pool's state could not be read.
    pool_error: Option<String>,
}

fn version_of(program: &Path, arg: &str) -> String {
    std::process::Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_default()
}

fn cgroup_mode() -> String {
    let fs = nix::sys::statfs::statfs("/sys/fs/cgroup").map(|s| s.filesystem_type());
    match fs {
        Ok(t) if t == nix::sys::statfs::CGROUP2_SUPER_MAGIC => "unified (cgroup v2)".into(),
        Ok(_) if Path::new("/sys/fs/cgroup/unified").exists() => {
            "hybrid (v1 controllers, cgroup2 at /sys/fs/cgroup/unified)".into()
        }
        Ok(_) => "legacy (cgroup v1)".into(),
        Err(e) => format!("unknown ({e})"),
    }
}

fn prerequisites(config: &Config, report: &mut Report) {
    let mut add = |name, r: Result<String, String>| {
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        report.items.push(Item { name, ok, detail });
    };
    add(
        "root",
        if nix::unistd::geteuid().is_root() {
            Ok("running as root".into())
        } else {
            Err("husk needs root (it mounts and creates cgroups)".into())
        },
    );
    add("cgroups", Ok(cgroup_mode()));
    add(
        "kvm",
        Ok(match kvm::probe() {
            kvm::KvmSupport::Usable => "usable: hardware KVM can run guests".into(),
            kvm::KvmSupport::Unusable(why) => format!("not usable for guests: {why}"),
        }),
    );
    let selection = hypervisor::select(config.hypervisor, config);
    match &selection {
        Ok(s) => add(
            "hypervisor",
            Ok(format!(
                "{} with {} ({})",
                s.hypervisor.name(),
                s.hypervisor.acceleration(),
                s.reason
            )),
        ),
        Err(e) => add("hypervisor", Err(e.to_string())),
    }
    if matches!(&selection, Ok(s) if s.hypervisor.name() == "qemu") {
        add(
            "qemu",
            artifacts::qemu(config.qemu.as_deref())
                .map(|p| format!("{} ({})", p.display(), version_of(&p, "--version")))
                .map_err(|e| e.to_string()),
        );
    }
    add(
        "virtiofsd",
        artifacts::virtiofsd(config.virtiofsd.as_deref())
            .map(|p| format!("{} ({})", p.display(), version_of(&p, "--version")))
            .map_err(|e| e.to_string()),
    );
    add(
        "vsock backend",
        artifacts::vsock_backend(config.vsock_backend.as_deref())
            .map(|p| format!("{} ({})", p.display(), version_of(&p, "--version")))
            .map_err(|e| e.to_string()),
    );
    add(
        "kernel",
        artifacts::kernel(config.kernel.as_deref())
            .map(|p| p.display().to_string())
            .map_err(|e| e.to_string()),
    );
    add(
        "initramfs",
        artifacts::initramfs(config.initramfs.as_deref())
            .map(|p| p.display().to_string())
            .map_err(|e| e.to_string()),
    );
}

fn probe(
    config: &Config,
    root: &Path,
    shared_dir: Option<PathBuf>,
    report: &mut Report,
) -> Result<(), String> {
    let mut sc = SandboxConfig::new(&format!("husk-check-{}", std::process::id()), config);
    sc.state_root = root.join("sandbox");
    sc.shared_dir = shared_dir;
    let mut sandbox = Sandbox::start(config, &sc).map_err(|e| format!("probe sandbox: {e}"))?;
    report.hypervisor = sandbox.hypervisor.to_string();
    report.acceleration = sandbox.acceleration.to_string();
    report.hypervisor_reason = sandbox.hypervisor_reason.clone();
    let info = sandbox.agent().guest_info();
    let info = info.map_err(|e| format!("probe sandbox: {}", sandbox.explain(e)))?;
    report.guest_kernel = format!(
        "Linux {} ({} CPU, {} MiB)",
        info.kernel_release,
        info.cpus,
        info.memory_total_bytes >> 20
    );
    report.agent_version = info.agent_version;
    report.timings = Some(sandbox.timings.clone());
    let shutdown = sandbox
        .shutdown()
        .map_err(|e| format!("probe sandbox shutdown: {e}"))?;
    report.shutdown_ms = shutdown.as_secs_f64() * 1000.0;
    Ok(())
}

fn print_text(r: &Report) {
    println!("husk check");
    for i in &r.items {
        println!(
            "  {:<14} {} {}",
            i.name,
            if i.ok { "ok  " } else { "FAIL" },
            i.detail
        );
    }
    if let Some(t) = &r.timings {
        println!(
            "probe sandbox ({} with {}: {})",
            r.hypervisor, r.acceleration, r.hypervisor_reason
        );
        println!(
            "  guest                          {}, agent {}",
            r.guest_kernel, r.agent_version
        );
        println!("  device backends spawned        {:8.1} ms", t.backends_ms);
        println!("  VMM start                      {:8.1} ms", t.vmm_start_ms);
        println!(
            "  kernel boot to agent ready     {:8.1} ms (guest clock, boot marker)",
            t.kernel_boot_to_agent_ms
        );
        println!(
            "  VMM spawn to agent answering   {:8.1} ms (host clock)",
            t.vmm_spawn_to_agent_ms
        );
        println!("  first RPC round trip           {:8.3} ms", t.first_rpc_ms);
        println!("  shutdown                       {:8.1} ms", r.shutdown_ms);
    }
    if !r.backends.is_empty() {
        println!("both backends (KVM can run guests here):");
        println!(
            "  {:<10} {:>22} {:>22}",
            "backend", "kernel boot to agent", "VMM spawn to agent"
        );
        for b in &r.backends {
            match (&b.timings, &b.error) {
                (Some(t), None) => println!(
                    "  {:<10} {:>19.1} ms {:>19.1} ms",
                    b.hypervisor, t.kernel_boot_to_agent_ms, t.vmm_spawn_to_agent_ms
                ),
                (_, e) => println!(
                    "  {:<10} FAILED: {}",
                    b.hypervisor,
                    e.as_deref().unwrap_or("no timings")
                ),
            }
        }
    }
    match (&r.pool, &r.pool_error) {
        (Some(p), _) => print!("{}", super::pool::status_text(p)),
        (None, Some(e)) => println!("pool: {e}"),
        (None, None) => println!("pool: off (no [[pool]] entry in the configuration)"),
    }
    match &r.error {
        None => println!("ok"),
        Some(e) => println!("FAILED: {e}"),
    }
}

pub fn check(root: &Path, args: CheckArgs) -> anyhow::Result<i32> {
    if args.format != "text" && args.format != "json" {
        anyhow::bail!("--format {:?}: use text or json", args.format);
    }
    let config = Config::load()?;
    let mut report = Report::default();
    prerequisites(&config, &mut report);
    let failed = report
        .items
        .iter()
        .find(|i| !i.ok)
        .map(|i| format!("{}: {}", i.name, i.detail));
    report.error = match failed {
        Some(f) => Some(f),
        None => probe(&config, root, args.shared_dir.clone(), &mut report).err(),
    };
    if report.error.is_none() && kvm::probe().is_usable() {
        // Both backends can run here: boot a probe with each, side by side.
        for choice in [HypervisorChoice::Qemu, HypervisorChoice::HuskVmm] {
            let mut c = config.clone();
            c.hypervisor = choice;
            let mut r = Report::default();
            let error = probe(&c, root, args.shared_dir.clone(), &mut r).err();
            report.backends.push(Probe {
                hypervisor: r.hypervisor,
                acceleration: r.acceleration,
                timings: r.timings,
                shutdown_ms: r.shutdown_ms,
                error,
            });
        }
        report.error = report.backends.iter().find_map(|b| {
            b.error
                .as_ref()
                .map(|e| format!("{} probe: {e}", b.hypervisor))
        });
    }
    if !config.pool.is_empty() {
        match husk_runtime::pool::status(&config) {
            Ok(p) => report.pool = Some(p),
            Err(e) => report.pool_error = Some(e.to_string()),
        }
    }
    report.ok = report.error.is_none();
    if args.format == "json" {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    if let Some(e) = &report.error {
        eprintln!("husk check: {e}");
        return Ok(1);
    }
    Ok(0)
}
