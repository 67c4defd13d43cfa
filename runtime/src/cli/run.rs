//! `husk run` in the foreground: the sandbox lives in this process, stdio is
//! this process's, and the exit status is the container's.

use super::bundle::Bundle;
use anyhow::Context;
use husk_runtime::config::Config;
use husk_runtime::sandbox::{HostStdio, Sandbox, SandboxConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Path to the bundle (the directory holding config.json).
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Container id.
    pub id: String,
}

pub fn run(root: &Path, args: RunArgs) -> anyhow::Result<i32> {
    if !husk_runtime::sandbox::valid_id(&args.id) {
        anyhow::bail!("invalid container id {:?}", args.id);
    }
    let bundle = Bundle::load(&args.bundle)?;
    let config = Config::load()?;
    let mut sc = SandboxConfig::new(&args.id, &config);
    sc.state_root = root.join("sandbox");
    sc.memory_mib = bundle.memory_mib(&config);
    sc.vcpus = bundle.vcpus(&config);
    let mut sandbox = Sandbox::start(&config, &sc).context("starting the sandbox")?;
    let rootfs = sandbox.share_rootfs(&args.id, &bundle.rootfs)?;
    let mut shared = HashMap::new();
    for (index, source, destination) in bundle.bind_mounts() {
        let source = if source.is_absolute() { source } else { bundle.dir.join(source) };
        shared.insert(destination, sandbox.share_path(&args.id, index, &source)?);
    }
    let stdio = HostStdio {
        stdin: Some(Box::new(std::io::stdin())),
        stdout: Some(Box::new(std::io::stdout())),
        stderr: Some(Box::new(std::io::stderr())),
        terminal: false,
    };
    let (tokens, pumps) = sandbox.connect_stdio(stdio)?;
    sandbox.create_container(&args.id, bundle.spec_json.clone(), rootfs, shared, tokens)?;
    sandbox.start_container(&args.id)?;
    let status = sandbox.wait_process(&args.id, "")?;
    pumps.finish();
    sandbox.shutdown()?;
    Ok(status.exit_code)
}
