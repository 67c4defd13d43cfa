//! First contact: the set-up scripts a new user's `make demo` runs, on their
//! uncached paths, with relative and absolute paths from another directory;
//! and every binary's `--help`.
//!
//! The long steps (the kernel build, `cargo install` of the backends) are
//! replaced by stand-ins given through PATH and the environment, so the
//! scripts' own logic — where they build, where they cache, where the
//! result lands — runs for real in seconds.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use husk_tests::{workspace_root, TestDir};

fn write_exe(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod stand-in");
}

/// PATH with `dir` in front.
fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn lines_of(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A stand-in kernel tree: a tarball holding an empty `linux-source-6.1/`,
/// a `make` that turns the fragment into `.config` and writes a fake
/// vmlinux (logging each call), and a `dpkg-query` that names a version.
struct KernelStandIn {
    bin: PathBuf,
    tarball: PathBuf,
    make_log: PathBuf,
}

impl KernelStandIn {
    fn new(root: &Path) -> Self {
        let bin = root.join("standin-bin");
        fs::create_dir_all(&bin).expect("stand-in bin");
        let tree = root.join("standin-src");
        fs::create_dir_all(tree.join("linux-source-6.1")).expect("stand-in tree");
        let tarball = root.join("linux-source-standin.tar");
        let out = Command::new("tar")
            .arg("-C")
            .arg(&tree)
            .arg("-cf")
            .arg(&tarball)
            .arg("linux-source-6.1")
            .output()
            .expect("tar");
        check(&out, "tar of the stand-in tree");
        let make_log = root.join("make.log");
        write_exe(
            &bin.join("make"),
            &format!(
                r#"#!/bin/sh
# Stand-in for the kernel's make: records where it ran and what it was asked.
echo "$PWD $*" >> {log}
for arg in "$@"; do
    case "$arg" in
        KCONFIG_ALLCONFIG=*) fragment=${{arg#KCONFIG_ALLCONFIG=}} ;;
        allnoconfig) grep -E '^CONFIG_' "$fragment" > .config ;;
        vmlinux) printf '\177ELF stand-in vmlinux\n' > vmlinux ;;
    esac
done
"#,
                log = make_log.display()
            ),
        );
        write_exe(&bin.join("dpkg-query"), "#!/bin/sh\nprintf '0.0-standin'\n");
        KernelStandIn {
            bin,
            tarball,
            make_log,
        }
    }
}

#[test]
fn the_first_kernel_build_lands_where_a_relative_output_asked() {
    let t = TestDir::new("setup-kernel");
    let stand_in = KernelStandIn::new(&t.path);
    let caller = t.path.join("caller");
    let tmp = t.path.join("tmp");
    fs::create_dir_all(&caller).expect("caller dir");
    fs::create_dir_all(&tmp).expect("tmp dir");
    let script = workspace_root().join("guest-kernel/build.sh");

    // Uncached, everything relative to the caller's directory: the output,
    // the cache and the tarball.
    let out = Command::new(&script)
        .arg("target/guest/vmlinux")
        .current_dir(&caller)
        .env("PATH", path_with(&stand_in.bin))
        .env("HUSK_CACHE", "cache")
        .env("HUSK_KERNEL_TARBALL", "../linux-source-standin.tar")
        .env("TMPDIR", &tmp)
        .output()
        .expect("running guest-kernel/build.sh");
    check(&out, "uncached build.sh with a relative output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("building"),
        "not the uncached path: {stdout}"
    );
    let built = caller.join("target/guest/vmlinux");
    let bytes = fs::read(&built)
        .unwrap_or_else(|e| panic!("{} not where it was asked: {e}", built.display()));
    assert!(bytes.starts_with(b"\x7fELF stand-in"), "wrong vmlinux");
    // It built in the unpacked tree, and really ran both steps there.
    let calls = lines_of(&stand_in.make_log);
    assert_eq!(calls.len(), 2, "make calls: {calls:?}");
    assert!(calls[0].contains("/linux-source-6.1 ") && calls[0].contains("allnoconfig"));
    assert!(calls[1].contains("vmlinux"));
    // The cache is under the caller's relative HUSK_CACHE, with the config.
    let cached: Vec<PathBuf> = fs::read_dir(caller.join("cache/kernel"))
        .expect("cache/kernel under the caller's directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(cached.len(), 1, "cache entries: {cached:?}");
    assert!(cached[0].join("vmlinux").is_file() && cached[0].join("config").is_file());
    // Nothing left of the temporary tree.
    let left: Vec<_> = fs::read_dir(&tmp).expect("tmp").collect();
    assert!(left.is_empty(), "temporary tree left behind: {left:?}");

    // Cached: from another directory, to an absolute output; no build.
    let elsewhere = t.path.join("elsewhere");
    fs::create_dir_all(&elsewhere).expect("elsewhere");
    let absolute = t.path.join("abs/vmlinux");
    let run = |output: &Path, cwd: &Path| {
        Command::new(&script)
            .arg(output)
            .current_dir(cwd)
            .env("PATH", path_with(&stand_in.bin))
            .env("HUSK_CACHE", caller.join("cache"))
            .env("HUSK_KERNEL_TARBALL", &stand_in.tarball)
            .env("TMPDIR", &tmp)
            .output()
            .expect("running guest-kernel/build.sh")
    };
    for (output, cwd) in [
        (absolute.as_path(), &t.path),
        (Path::new("rel/vmlinux"), &elsewhere),
    ] {
        let out = run(output, cwd);
        check(&out, "cached build.sh");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("building"),
            "the cached path rebuilt"
        );
    }
    assert_eq!(lines_of(&stand_in.make_log).len(), 2, "make ran again");
    assert_eq!(fs::read(&absolute).expect("absolute output"), bytes);
    assert_eq!(
        fs::read(elsewhere.join("rel/vmlinux")).expect("relative output"),
        bytes
    );
}

#[test]
fn a_fragment_option_that_does_not_survive_fails_the_build_and_leaves_nothing() {
    let t = TestDir::new("setup-kernel-bad");
    let stand_in = KernelStandIn::new(&t.path);
    // This make drops every option: the check must catch it.
    write_exe(
        &stand_in.bin.join("make"),
        "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = allnoconfig ] && : > .config; done; exit 0\n",
    );
    let tmp = t.path.join("tmp");
    fs::create_dir_all(&tmp).expect("tmp");
    let out = Command::new(workspace_root().join("guest-kernel/build.sh"))
        .arg("out/vmlinux")
        .current_dir(&t.path)
        .env("PATH", path_with(&stand_in.bin))
        .env("HUSK_CACHE", "cache")
        .env("HUSK_KERNEL_TARBALL", &stand_in.tarball)
        .env("TMPDIR", &tmp)
        .output()
        .expect("running guest-kernel/build.sh");
    assert!(!out.status.success(), "a broken .config was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not in .config: CONFIG_") && stderr.contains("did not survive"),
        "{stderr}"
    );
    assert!(!t.path.join("out/vmlinux").exists());
    let cache = t.path.join("cache/kernel");
    let entries: Vec<_> = fs::read_dir(&cache)
        .map(|d| d.filter_map(|e| e.ok()).collect())
        .unwrap_or_default();
    assert!(
        entries.iter().all(|e| !e.path().join("vmlinux").exists()),
        "a cache entry was left: {entries:?}"
    );
    assert_eq!(fs::read_dir(&tmp).expect("tmp").count(), 0);
}

#[test]
fn install_tools_caches_under_a_relative_husk_cache() {
    let t = TestDir::new("setup-tools");
    let bin = t.path.join("standin-bin");
    fs::create_dir_all(&bin).expect("bin");
    let log = t.path.join("cargo.log");
    // Stand-in `cargo install --root DIR NAME --version V`: makes DIR/bin/NAME.
    write_exe(
        &bin.join("cargo"),
        &format!(
            r#"#!/bin/sh
echo "$PWD $*" >> {log}
root= name= prev=
for a in "$@"; do
    case "$prev" in --root) root=$a ;; esac
    case "$a" in -*|install|[0-9]*) ;; *) [ "$prev" = --root ] || [ "$prev" = --version ] || name=$a ;; esac
    prev=$a
done
mkdir -p "$root/bin"
printf '#!/bin/sh\necho %s\n' "$name" > "$root/bin/$name"
chmod +x "$root/bin/$name"
"#,
            log = log.display()
        ),
    );
    let caller = t.path.join("caller");
    fs::create_dir_all(&caller).expect("caller");
    let run = || {
        Command::new(workspace_root().join("scripts/install-tools.sh"))
            .current_dir(&caller)
            .env("PATH", path_with(&bin))
            .env("HUSK_CACHE", "cache")
            .output()
            .expect("running scripts/install-tools.sh")
    };
    check(&run(), "install-tools.sh, uncached");
    for tool in [
        "virtiofsd-1.14.0/bin/virtiofsd",
        "vhost-device-vsock-0.3.0/bin/vhost-device-vsock",
    ] {
        let p = caller.join("cache/tools").join(tool);
        assert!(p.is_file(), "{} not installed", p.display());
    }
    let tmp_left: Vec<_> = fs::read_dir(caller.join("cache/tools"))
        .expect("tools dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(tmp_left.is_empty(), "{tmp_left:?}");
    assert_eq!(lines_of(&log).len(), 2);
    // Cached: nothing is built again.
    check(&run(), "install-tools.sh, cached");
    assert_eq!(lines_of(&log).len(), 2, "cargo install ran again");
}

#[test]
fn build_initramfs_takes_relative_paths_from_any_directory() {
    let t = TestDir::new("setup-initramfs");
    let caller = t.path.join("caller");
    fs::create_dir_all(&caller).expect("caller");
    // Not a real agent, but not dynamically linked either: the script's
    // packing is what is under test.
    write_exe(&caller.join("agent"), "#!/bin/sh\necho agent\n");
    let out = Command::new(workspace_root().join("agent/build-initramfs.sh"))
        .args(["agent", "out/initramfs.img"])
        .current_dir(&caller)
        .output()
        .expect("running agent/build-initramfs.sh");
    check(&out, "build-initramfs.sh with relative paths");
    let img = caller.join("out/initramfs.img");
    let listing = Command::new("cpio")
        .args(["-t", "--quiet"])
        .stdin(fs::File::open(&img).unwrap_or_else(|e| panic!("{}: {e}", img.display())))
        .output()
        .expect("cpio -t");
    check(&listing, "cpio -t");
    let names = String::from_utf8_lossy(&listing.stdout);
    for want in ["init", "dev/console", "proc", "sys"] {
        assert!(
            names.lines().any(|l| l.trim_start_matches("./") == want),
            "{want} missing from the initramfs: {names}"
        );
    }
}

/// Every binary the project builds answers `--help` as runc and containerd
/// do: the usage once, on stdout, exit 0, nothing on stderr.
#[test]
fn every_binary_prints_its_usage_for_help() {
    let root = workspace_root().join("target");
    let bins = [
        root.join("release/husk"),
        root.join("release/husk-vmm"),
        root.join("release/containerd-shim-husk-v2"),
        root.join("release/husk-cri"),
        root.join("x86_64-unknown-linux-gnu/release/husk-agent"),
    ];
    for bin in &bins {
        assert!(
            bin.is_file(),
            "{} is missing: run `make build` first",
            bin.display()
        );
        for flag in ["--help", "-h"] {
            let out = Command::new(bin)
                .arg(flag)
                .output()
                .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{} {flag}: {} ({})",
                bin.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.stderr.is_empty(),
                "{} {flag} wrote to stderr",
                bin.display()
            );
            assert_eq!(
                stdout.to_lowercase().matches("usage:").count(),
                1,
                "{} {flag} printed:\n{stdout}",
                bin.display()
            );
        }
    }
}
