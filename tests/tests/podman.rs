//! podman drives husk as its OCI runtime (through conmon, as it drives runc):
//! run --rm, a detached container with exec (with and without a tty), stop,
//! rm, exit codes. The test installs and configures podman itself: a local
//! busybox image imported from a tarball, no registry, private storage.

use husk_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Podman {
    dir: TestDir,
}

impl Podman {
    fn new() -> Podman {
        require_guest();
        let setup = workspace_root().join("scripts/podman-test-setup.sh");
        let out = Command::new(&setup).output().expect("podman setup");
        assert!(
            out.status.success(),
            "installing podman: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = TestDir::new("podman");
        let p = &dir.path;
        // husk's state for this test lives under the test directory.
        let wrapper = p.join("husk-runtime");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec {} --root {} \"$@\"\n",
                husk_bin().display(),
                p.join("husk-root").display()
            ),
        )
        .expect("wrapper");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // Root here lacks CAP_SYS_RESOURCE, so podman's default rlimits are dropped.
        std::fs::write(
            p.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"husk\"\n[engine.runtimes]\nhusk = [\"{}\"]\n",
                wrapper.display()
            ),
        )
        .expect("containers.conf");
        std::fs::write(
            p.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                p.join("run").display(),
                p.join("storage").display()
            ),
        )
        .expect("storage.conf");
        busybox_rootfs(&p.join("rootfs"));
        let tar = p.join("rootfs.tar");
        let out = Command::new("tar")
            .arg("-C")
            .arg(p.join("rootfs"))
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .expect("tar");
        assert!(out.status.success());
        let podman = Podman { dir };
        let out = podman.run(&[
            "import",
            tar.to_str().unwrap_or_default(),
            "localhost/husk-busybox:latest",
        ]);
        assert!(out.status.success(), "podman import: {}", stderr(&out));
        podman
    }

    fn run(&self, args: &[&str]) -> Output {
        let p = &self.dir.path;
        Command::new("timeout")
            .arg("120")
            .arg("podman")
            .args(args)
            .env("CONTAINERS_CONF", p.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", p.join("storage.conf"))
            .stdin(std::process::Stdio::null())
            .output()
            .expect("podman")
    }

    fn husk_root(&self) -> PathBuf {
        self.dir.path.join("husk-root")
    }
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

fn no_leftovers(podman: &Podman, root: &Path) {
    let sandboxes = std::fs::read_dir(root.join("sandbox"))
        .map(|d| d.count())
        .unwrap_or(0);
    let containers = std::fs::read_dir(root.join("containers"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!((sandboxes, containers), (0, 0), "husk state left behind");
    assert_eq!(
        leftovers_settled(root, &podman.dir.path.join("no-such-state")),
        Vec::<String>::new()
    );
}

#[test]
fn podman_runs_execs_stops_and_removes_husk_containers() {
    let podman = Podman::new();
    let img = "localhost/husk-busybox:latest";
    let out = podman.run(&["run", "--rm", "--network", "none", img, "echo", "hi"]);
    assert_eq!(ok(&out, "podman run --rm"), "hi\n");
    let out = podman.run(&[
        "run",
        "--rm",
        "--network",
        "none",
        img,
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "exit code through podman: {}",
        stderr(&out)
    );

    ok(
        &podman.run(&[
            "run",
            "-d",
            "--name",
            "c1",
            "--network",
            "none",
            img,
            "sleep",
            "1000",
        ]),
        "podman run -d",
    );
    let out = podman.run(&["exec", "c1", "sh", "-c", "echo from-exec"]);
    assert_eq!(ok(&out, "podman exec"), "from-exec\n");
    let out = podman.run(&["exec", "-t", "c1", "tty"]);
    assert!(
        ok(&out, "podman exec -t").contains("/dev/pts/"),
        "no tty in exec -t"
    );
    let ps = ok(
        &podman.run(&["ps", "--format", "{{.Names}} {{.Status}}"]),
        "podman ps",
    );
    assert!(ps.contains("c1 Up"), "{ps}");
    ok(&podman.run(&["stop", "-t", "10", "c1"]), "podman stop");
    let st = ok(
        &podman.run(&["inspect", "--format", "{{.State.Status}}", "c1"]),
        "inspect",
    );
    assert_eq!(st.trim(), "exited");
    ok(&podman.run(&["rm", "c1"]), "podman rm");
    no_leftovers(&podman, &podman.husk_root());
}
