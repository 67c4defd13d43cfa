//! The container's root file system, set up in the child: mounts, /dev
//! nodes, masked and read-only paths, then pivot_root.

use super::{fail, StepNames};
use husk_agent::plan::{DeviceNode, RootfsPlan};

/// # Safety
/// Only between fork and exec.
pub(super) unsafe fn setup_rootfs(
    r: &RootfsPlan,
    names: &StepNames,
    diag: libc::c_int,
) -> std::io::Result<()> {
    let null = std::ptr::null::<libc::c_char>();
    check!(
        diag,
        &names.make_private,
        libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null()
        )
    );
    check!(
        diag,
        &names.bind_root,
        libc::mount(
            r.root.as_ptr(),
            r.root.as_ptr(),
            null,
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null()
        )
    );
    for m in &r.mounts {
        for d in &m.mkdirs {
            // SAFETY: mkdir of a prepared path; EEXIST is fine.
            if unsafe { libc::mkdir(d.as_ptr(), 0o755) } < 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
            {
                return Err(fail(diag, &names.mkdir));
            }
        }
        if m.target_is_file {
            // SAFETY: creating an empty file as the bind mount point.
            let fd = unsafe {
                libc::open(
                    m.target.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                )
            };
            if fd >= 0 {
                // SAFETY: closing the fd opened above.
                unsafe { libc::close(fd) };
            }
        }
        let src = m.source.as_ref().map_or(null, |s| s.as_ptr());
        let fstype = m.fstype.as_ref().map_or(null, |s| s.as_ptr());
        let data = m
            .data
            .as_ref()
            .map_or(std::ptr::null(), |s| s.as_ptr().cast());
        check!(
            diag,
            &m.what,
            libc::mount(src, m.target.as_ptr(), fstype, m.flags, data)
        );
        if let Some(flags) = m.remount_flags {
            check!(diag, &m.what, remount(&m.target, flags));
        }
        if let Some(p) = m.propagation {
            check!(
                diag,
                &m.what,
                libc::mount(null, m.target.as_ptr(), null, p, std::ptr::null())
            );
        }
    }
    for dir in &r.device_dirs {
        // SAFETY: mkdir of a prepared path; EEXIST is fine.
        if unsafe { libc::mkdir(dir.as_ptr(), 0o755) } < 0
            && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
        {
            return Err(fail(diag, &names.device));
        }
    }
    for d in &r.devices {
        if r.bind_devices {
            // SAFETY: forwarded from the caller's contract.
            unsafe { bind_device(d, names, diag)? };
            continue;
        }
        // SAFETY: mknod of a prepared path in the container's /dev.
        if unsafe { libc::mknod(d.path.as_ptr(), d.mode, d.dev) } < 0 {
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                return Err(fail(diag, &names.mknod));
            }
            if d.owner.is_some() {
                // A configured device replaces whatever is there.
                // SAFETY: unlink and mknod of a prepared path.
                unsafe { libc::unlink(d.path.as_ptr()) };
                check!(
                    diag,
                    &names.device,
                    libc::mknod(d.path.as_ptr(), d.mode, d.dev)
                );
            }
        }
        // mknod applies the umask: set the mode exactly (the defaults are
        // 0666, as runc makes them, not 0644).
        check!(
            diag,
            &names.device,
            libc::chmod(d.path.as_ptr(), d.mode & 0o7777)
        );
        if let Some((uid, gid)) = d.owner {
            check!(diag, &names.device, libc::chown(d.path.as_ptr(), uid, gid));
        }
    }
    for (target, link) in &r.symlinks {
        // SAFETY: symlink of prepared paths; an existing link is fine.
        unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) };
    }
    for p in &r.masked {
        // Files get /dev/null bound over them, directories an empty read-only
        // tmpfs; paths that do not exist need no mask.
        // SAFETY: mount calls on prepared paths.
        let rc = unsafe {
            libc::mount(
                c"/dev/null".as_ptr(),
                p.as_ptr(),
                null,
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if rc < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ENOENT) => {}
                Some(libc::ENOTDIR) => {
                    check!(
                        diag,
                        &names.mask,
                        libc::mount(
                            c"tmpfs".as_ptr(),
                            p.as_ptr(),
                            c"tmpfs".as_ptr(),
                            libc::MS_RDONLY,
                            std::ptr::null()
                        )
                    );
                }
                _ => return Err(fail(diag, &names.mask)),
            }
        }
    }
    for p in &r.readonly {
        // SAFETY: mount calls on prepared paths.
        if unsafe {
            libc::mount(
                p.as_ptr(),
                p.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
        } < 0
        {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT) {
                continue;
            }
            return Err(fail(diag, &names.mask));
        }
        check!(
            diag,
            &names.mask,
            remount(
                p,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC
            )
        );
    }
    check!(diag, &names.pivot, libc::chdir(r.root.as_ptr()));
    if r.no_pivot {
        check!(
            diag,
            &names.pivot,
            libc::mount(
                c".".as_ptr(),
                c"/".as_ptr(),
                null,
                libc::MS_MOVE,
                std::ptr::null()
            )
        );
        check!(diag, &names.pivot, libc::chroot(c".".as_ptr()));
    } else {
        check!(
            diag,
            &names.pivot,
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int
        );
        check!(
            diag,
            &names.pivot,
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
        );
    }
    check!(diag, &names.pivot, libc::chdir(c"/".as_ptr()));
    if let Some(p) = r.propagation {
        check!(
            diag,
            &names.propagation,
            libc::mount(null, c"/".as_ptr(), null, p, std::ptr::null())
        );
    }
    if r.readonly_root {
        check!(
            diag,
            &names.readonly_root,
            remount(c"/", libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY)
        );
    }
    Ok(())
}

/// The kernel's `struct statfs` on x86_64 (every field 64 bits).
#[repr(C)]
#[derive(Default)]
struct KernelStatfs {
    f_type: i64,
    f_bsize: i64,
    f_blocks: u64,
    f_bfree: u64,
    f_bavail: u64,
    f_files: u64,
    f_ffree: u64,
    f_fsid: [i32; 2],
    f_namelen: i64,
    f_frsize: i64,
    f_flags: i64,
    f_spare: [i64; 4],
}

/// A bind remount (mount(2) with MS_REMOUNT | MS_BIND) that keeps the flags
/// a user namespace locks: a mount copied into a mount namespace owned by a
/// user namespace keeps its nosuid, nodev, noexec, read-only and atime
/// flags, and a remount that would clear one fails with EPERM. Then the
/// mount's current flags (statfs) are added and it is tried again, as runc
/// does. Without a user namespace nothing is locked and the first call
/// stands.
///
/// # Safety
/// Only between fork and exec; a raw syscall wrapper.
unsafe fn remount(target: &std::ffi::CStr, flags: libc::c_ulong) -> libc::c_int {
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: mount of a prepared path.
    let rc = unsafe { libc::mount(null, target.as_ptr(), null, flags, std::ptr::null()) };
    if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return rc;
    }
    let mut st = KernelStatfs::default();
    // SAFETY: statfs(2) of a prepared path into a buffer of the kernel's
    // struct statfs size (the libc crate does not expose f_flags).
    if unsafe { libc::syscall(libc::SYS_statfs, target.as_ptr(), &mut st) } < 0 {
        return -1;
    }
    let mut locked = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flags as libc::c_ulong & st_flag != 0 {
            locked |= ms_flag;
        }
    }
    // SAFETY: mount of a prepared path.
    unsafe {
        libc::mount(
            null,
            target.as_ptr(),
            null,
            flags | locked,
            std::ptr::null(),
        )
    }
}

/// Puts a device node in the container's /dev by bind-mounting `bind_from`
/// onto an empty file: mknod needs CAP_MKNOD in the initial user namespace,
/// and nodes on a file system mounted in a user namespace do not open. The
/// source carries mode and owner.
///
/// # Safety
/// Only between fork and exec.
unsafe fn bind_device(d: &DeviceNode, names: &StepNames, diag: libc::c_int) -> std::io::Result<()> {
    let Some(src) = &d.bind_from else {
        // SAFETY: setting errno for the report below.
        unsafe { *libc::__errno_location() = libc::EINVAL };
        return Err(fail(diag, &names.bind_device));
    };
    // SAFETY: creating the empty mount point file (a regular file needs no
    // CAP_MKNOD); whatever is already there serves as well.
    if unsafe { libc::mknod(d.path.as_ptr(), libc::S_IFREG | 0o644, 0) } < 0
        && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
    {
        return Err(fail(diag, &names.bind_device));
    }
    check!(
        diag,
        &names.bind_device,
        libc::mount(
            src.as_ptr(),
            d.path.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null()
        )
    );
    Ok(())
}
