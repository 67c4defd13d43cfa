//! husk-vmm command line entry point.
//!
//! Exit status: 0 when the guest powers off (or is shut down through the
//! API); 1 with exactly one `husk-vmm: <reason>` line on stderr otherwise.

use std::path::PathBuf;
use std::process::ExitCode;

use husk_vmm::api::{ApiContext, ApiServer};
use husk_vmm::vm::{Vm, VmConfig, VmOutcome};

const USAGE: &str = "usage: husk-vmm --kernel <vmlinux> [--initrd <file>] [--cmdline <str>] \
[--memory-mib <N>] [--vcpus <N>] [--fs-socket <path> --fs-tag <tag>] \
[--vsock-socket <path> --vsock-cid <N>] [--net tap-fd=<N>,mac=<xx:xx:xx:xx:xx:xx>[,mtu=<N>]]... \
[--console <file>] [--api-socket <path>] [--no-seccomp]";

const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1";

/// What the command line asks for.
#[derive(Debug)]
enum Command {
    /// `--help`: the usage on stdout, exit 0.
    Help,
    Run(Box<Args>),
}

/// Parsed command line.
#[derive(Debug, Default)]
struct Args {
    vm: VmConfig,
    api_socket: Option<PathBuf>,
}

fn parse_args(argv: &[String]) -> Result<Command, String> {
    // Like runc's and containerd's: a help flag anywhere wins.
    if argv.iter().any(|a| a == "--help" || a == "-h") {
        return Ok(Command::Help);
    }
    let mut a = Args::default();
    a.vm.memory_mib = 128;
    a.vm.vcpus = 1;
    a.vm.seccomp = true;
    a.vm.cmdline = DEFAULT_CMDLINE.to_string();
    let mut kernel = None;
    let (mut fs_socket, mut fs_tag, mut vsock_socket, mut vsock_cid) = (None, None, None, None);
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (flag.as_str(), None),
        };
        if name == "--no-seccomp" {
            a.vm.seccomp = false;
            continue;
        }
        let mut value = || -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let number = |v: String, what: &str| -> Result<u64, String> {
            v.parse::<u64>()
                .map_err(|_| format!("{what} {v:?} is not a non-negative integer"))
        };
        match name {
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--initrd" => a.vm.initrd = Some(PathBuf::from(value()?)),
            "--cmdline" => a.vm.cmdline = value()?,
            "--memory-mib" => a.vm.memory_mib = number(value()?, "--memory-mib")?,
            "--vcpus" => {
                let n = number(value()?, "--vcpus")?;
                a.vm.vcpus = u8::try_from(n)
                    .map_err(|_| format!("--vcpus {n} is out of range (1 to 32)"))?;
            }
            "--fs-socket" => fs_socket = Some(PathBuf::from(value()?)),
            "--fs-tag" => fs_tag = Some(value()?),
            "--vsock-socket" => vsock_socket = Some(PathBuf::from(value()?)),
            "--vsock-cid" => vsock_cid = Some(number(value()?, "--vsock-cid")?),
            "--net" => a.vm.net.push(
                husk_vmm::devices::virtio_net::NetConfig::parse(&value()?)
                    .map_err(|e| e.to_string())?,
            ),
            "--console" => a.vm.console = Some(PathBuf::from(value()?)),
            "--api-socket" => a.api_socket = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other:?} ({USAGE})")),
        }
    }
    a.vm.kernel = kernel.ok_or_else(|| format!("--kernel is required ({USAGE})"))?;
    a.vm.fs = match (fs_socket, fs_tag) {
        (Some(s), Some(t)) => Some((s, t)),
        (None, None) => None,
        _ => return Err("--fs-socket and --fs-tag must be given together".into()),
    };
    a.vm.vsock = match (vsock_socket, vsock_cid) {
        (Some(s), Some(c)) => Some((s, c)),
        (None, None) => None,
        _ => return Err("--vsock-socket and --vsock-cid must be given together".into()),
    };
    Ok(Command::Run(Box::new(a)))
}

/// Print the single failure line.
fn print_failure(msg: &str) {
    let one_line: String = msg
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    eprintln!("husk-vmm: {one_line}");
}

fn run(args: Args) -> Result<(), String> {
    let mut vm = Vm::build(&args.vm).map_err(|e| e.to_string())?;
    let (tx, rx) = Vm::channel();
    let api = match &args.api_socket {
        Some(path) => {
            let mut server = ApiServer::bind(path).map_err(|e| e.to_string())?;
            husk_vmm::seccomp::install_sigsys_handler(Some(path))
                .map_err(|e| format!("cannot install the SIGSYS handler: {e}"))?;
            server
                .start(
                    ApiContext {
                        control: vm.control(),
                        nr_vcpus: vm.nr_vcpus(),
                        events: tx.clone(),
                    },
                    args.vm.seccomp,
                )
                .map_err(|e| e.to_string())?;
            Some(server)
        }
        None => {
            husk_vmm::seccomp::install_sigsys_handler(None)
                .map_err(|e| format!("cannot install the SIGSYS handler: {e}"))?;
            None
        }
    };
    let outcome = vm.run(tx, rx).map_err(|e| e.to_string());
    if let Some(mut api) = api {
        api.cleanup();
    }
    match outcome? {
        VmOutcome::PoweredOff => Ok(()),
        VmOutcome::Failed(e) => Err(e),
    }
}

fn main() -> ExitCode {
    husk_vmm::mark_process_start();
    let level = match std::env::var("HUSK_VMM_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("info") => log::LevelFilter::Info,
        Ok("warn") => log::LevelFilter::Warn,
        _ => log::LevelFilter::Off,
    };
    husk_vmm::logger::init(level);
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(Command::Run(a)) => *a,
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            print_failure(&e);
            return ExitCode::from(1);
        }
    };
    // A bound API socket is removed by its ApiServer on every path, or by
    // the SIGSYS handler: once the guest runs, the main thread's seccomp
    // filter allows no other file system call than that unlink.
    match run(args) {
        // Exit right away: vCPU threads that missed their kick must not
        // keep the process alive.
        Ok(()) => std::process::exit(0),
        Err(e) => {
            print_failure(&e);
            std::process::exit(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Args, String> {
        match parse_args(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())? {
            Command::Run(a) => Ok(*a),
            Command::Help => Err("help".into()),
        }
    }

    #[test]
    fn help_anywhere_asks_for_the_usage() {
        for argv in [&["--help"][..], &["-h"], &["--kernel", "k", "--help"]] {
            let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
            assert!(matches!(parse_args(&argv), Ok(Command::Help)), "{argv:?}");
        }
    }

    #[test]
    fn parses_the_runtime_contract() {
        let a = p(&[
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--cmdline",
            "console=ttyS0 quiet",
            "--memory-mib",
            "256",
            "--vcpus",
            "2",
            "--fs-socket",
            "/fs.sock",
            "--fs-tag",
            "rootfs",
            "--vsock-socket",
            "/v.sock",
            "--vsock-cid",
            "3",
            "--net",
            "tap-fd=7,mac=02:00:00:00:00:01",
            "--net=tap-fd=9,mac=02:00:00:00:00:02,mtu=9000",
            "--console",
            "/c.log",
            "--api-socket",
            "/api.sock",
        ])
        .unwrap();
        assert_eq!(a.vm.kernel, PathBuf::from("/k"));
        assert_eq!(a.vm.initrd, Some(PathBuf::from("/i")));
        assert_eq!(a.vm.cmdline, "console=ttyS0 quiet");
        assert_eq!((a.vm.memory_mib, a.vm.vcpus), (256, 2));
        assert_eq!(a.vm.fs, Some((PathBuf::from("/fs.sock"), "rootfs".into())));
        assert_eq!(a.vm.vsock, Some((PathBuf::from("/v.sock"), 3)));
        let nets: Vec<_> = a.vm.net.iter().map(|n| (n.tap_fd, n.mac, n.mtu)).collect();
        assert_eq!(
            nets,
            [
                (7, [2, 0, 0, 0, 0, 1], None),
                (9, [2, 0, 0, 0, 0, 2], Some(9000))
            ]
        );
        assert_eq!(a.vm.console, Some(PathBuf::from("/c.log")));
        assert_eq!(a.api_socket, Some(PathBuf::from("/api.sock")));
        assert!(a.vm.seccomp);
        let d = p(&["--kernel=/k", "--no-seccomp"]).unwrap();
        assert_eq!((d.vm.memory_mib, d.vm.vcpus, d.vm.seccomp), (128, 1, false));
        assert_eq!(d.vm.cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn rejects_bad_arguments() {
        assert!(p(&[]).unwrap_err().contains("--kernel is required"));
        assert!(p(&["--kernel"]).unwrap_err().contains("needs a value"));
        assert!(p(&["--kernel", "k", "--memory-mib", "lots"]).is_err());
        assert!(p(&["--kernel", "k", "--vcpus", "300"]).is_err());
        assert!(p(&["--kernel", "k", "--fs-socket", "s"]).is_err());
        assert!(p(&["--kernel", "k", "--vsock-cid", "3"]).is_err());
        assert!(p(&["--kernel", "k", "--bogus"]).is_err());
        for (net, why) in [
            ("mac=02:00:00:00:00:01", "tap-fd is required"),
            ("tap-fd=7", "mac is required"),
            ("tap-fd=2,mac=02:00:00:00:00:01", "above 2"),
            ("tap-fd=x,mac=02:00:00:00:00:01", "above 2"),
            ("tap-fd=7,mac=02:00:00:00:01", "six hex octets"),
            ("tap-fd=7,mac=02:00:00:00:00:01:02", "six hex octets"),
            ("tap-fd=7,mac=02:00:00:00:00:zz", "six hex octets"),
            ("tap-fd=7,mac=01:00:5e:00:00:01", "multicast"),
            ("tap-fd=7,mac=02:00:00:00:00:01,mtu=67", "mtu"),
            ("tap-fd=7,mac=02:00:00:00:00:01,mtu=65533", "mtu"),
            ("tap-fd=7,tap-fd=8,mac=02:00:00:00:00:01", "given twice"),
            ("tap-fd=7,mac=02:00:00:00:00:01,queues=2", "unknown key"),
            ("tap-fd=7,mac", "key=value"),
        ] {
            let err = p(&["--kernel", "k", "--net", net]).unwrap_err();
            assert!(err.contains(why), "{net}: {err}");
            assert!(err.contains("--net"), "{net}: {err}");
        }
    }
}
