//! What the planner may learn from the guest's file systems.
//!
//! Planning checks a few facts before anything is created (the rootfs is a
//! directory, `process.args[0]` resolves to an executable inside it, a bind
//! source exists, a namespace path exists, the guest kernel has a sysctl).
//! Those questions go through [`GuestFs`], so the planner is a function of
//! (spec, request, answers): the agent answers from its own file systems
//! ([`LiveFs`]), tests and fuzz targets from a table ([`MapFs`]).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

/// What is at a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Dir,
    /// A regular file; `executable` when any execute bit is set.
    File {
        executable: bool,
    },
    /// A symbolic link and its target (only from [`GuestFs::lstat`]).
    Symlink(PathBuf),
    /// A device node, fifo or socket.
    Other,
}

/// The file system questions the planner asks.
pub trait GuestFs {
    /// What is at `path`, following symbolic links.
    fn stat(&self, path: &Path) -> io::Result<Entry>;
    /// What is at `path` itself: a final symbolic link is
    /// [`Entry::Symlink`].
    fn lstat(&self, path: &Path) -> io::Result<Entry>;
    /// The contents of a small text file (a `/proc/<pid>/uid_map`).
    fn read_to_string(&self, path: &Path) -> Option<String>;

    fn exists(&self, path: &Path) -> bool {
        self.stat(path).is_ok()
    }
    fn is_dir(&self, path: &Path) -> bool {
        matches!(self.stat(path), Ok(Entry::Dir))
    }
    /// The target of the symbolic link at `path`, if it is one.
    fn read_link(&self, path: &Path) -> Option<PathBuf> {
        match self.lstat(path) {
            Ok(Entry::Symlink(target)) => Some(target),
            _ => None,
        }
    }
}

fn entry(meta: &std::fs::Metadata, path: &Path) -> io::Result<Entry> {
    use std::os::unix::fs::PermissionsExt;
    let kind = meta.file_type();
    Ok(if kind.is_dir() {
        Entry::Dir
    } else if kind.is_file() {
        Entry::File {
            executable: meta.permissions().mode() & 0o111 != 0,
        }
    } else if kind.is_symlink() {
        Entry::Symlink(std::fs::read_link(path)?)
    } else {
        Entry::Other
    })
}

/// The agent's own view: the guest's file systems through `std::fs`.
pub struct LiveFs;

impl GuestFs for LiveFs {
    fn stat(&self, path: &Path) -> io::Result<Entry> {
        entry(&std::fs::metadata(path)?, path)
    }
    fn lstat(&self, path: &Path) -> io::Result<Entry> {
        entry(&std::fs::symlink_metadata(path)?, path)
    }
    fn read_to_string(&self, path: &Path) -> Option<String> {
        std::fs::read_to_string(path).ok()
    }
}

/// A file system given as a table (for tests and fuzz targets): every
/// listed path exists as its entry, its parents as directories, nothing
/// else exists. Symbolic links are followed as the kernel would, up to 40.
#[derive(Debug, Default)]
pub struct MapFs {
    entries: HashMap<PathBuf, Entry>,
    files: HashMap<PathBuf, String>,
}

/// The kernel's limit on symbolic links followed in one lookup.
const MAX_SYMLINKS: usize = 40;

impl MapFs {
    pub fn new() -> Self {
        MapFs::default()
    }

    /// Adds `entry` at `path` (absolute), and its parents as directories.
    pub fn insert(&mut self, path: impl Into<PathBuf>, entry: Entry) {
        let path = path.into();
        for parent in path.ancestors().skip(1) {
            self.entries
                .entry(parent.to_path_buf())
                .or_insert(Entry::Dir);
        }
        self.entries.insert(path, entry);
    }

    /// Adds a regular file with `text` as its contents.
    pub fn insert_text(&mut self, path: impl Into<PathBuf>, text: impl Into<String>) {
        let path = path.into();
        self.insert(path.clone(), Entry::File { executable: false });
        self.files.insert(path, text.into());
    }

    /// Resolves every symbolic link in `path`; the final one too when
    /// `follow_last`.
    fn resolve(&self, path: &Path, follow_last: bool) -> io::Result<PathBuf> {
        let enoent = || io::Error::from_raw_os_error(libc::ENOENT);
        let mut pending: Vec<PathBuf> = vec![path.to_path_buf()];
        let mut followed = 0;
        'again: while let Some(current) = pending.pop() {
            let mut out = PathBuf::from("/");
            let parts: Vec<_> = current.components().collect();
            for (i, part) in parts.iter().enumerate() {
                match part {
                    std::path::Component::Normal(name) => out.push(name),
                    std::path::Component::ParentDir => {
                        out.pop();
                        continue;
                    }
                    _ => continue,
                }
                let last = i + 1 == parts.len();
                match self.entries.get(&out) {
                    Some(Entry::Symlink(target)) if follow_last || !last => {
                        followed += 1;
                        if followed > MAX_SYMLINKS {
                            return Err(io::Error::from_raw_os_error(libc::ELOOP));
                        }
                        out.pop();
                        let mut next = out.join(target);
                        for rest in &parts[i + 1..] {
                            next.push(rest);
                        }
                        pending.push(next);
                        continue 'again;
                    }
                    Some(Entry::Dir) | Some(Entry::Symlink(_)) => {}
                    Some(_) if last => {}
                    Some(_) => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
                    None => return Err(enoent()),
                }
            }
            return Ok(out);
        }
        Err(enoent())
    }
}

impl GuestFs for MapFs {
    fn stat(&self, path: &Path) -> io::Result<Entry> {
        let path = self.resolve(path, true)?;
        Ok(self.entries.get(&path).cloned().unwrap_or(Entry::Dir))
    }
    fn lstat(&self, path: &Path) -> io::Result<Entry> {
        let path = self.resolve(path, false)?;
        Ok(self.entries.get(&path).cloned().unwrap_or(Entry::Dir))
    }
    fn read_to_string(&self, path: &Path) -> Option<String> {
        self.files.get(&self.resolve(path, true).ok()?).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_fs_follows_links_like_the_kernel() {
        let mut fs = MapFs::new();
        fs.insert("/r/bin/busybox", Entry::File { executable: true });
        fs.insert("/r/bin/sh", Entry::Symlink("busybox".into()));
        fs.insert("/r/usr/bin", Entry::Symlink("../bin".into()));
        fs.insert("/r/loop", Entry::Symlink("loop".into()));
        assert_eq!(
            fs.stat(Path::new("/r/usr/bin/sh")).unwrap(),
            Entry::File { executable: true }
        );
        assert_eq!(
            fs.lstat(Path::new("/r/bin/sh")).unwrap(),
            Entry::Symlink("busybox".into())
        );
        assert!(fs.is_dir(Path::new("/r")));
        assert!(!fs.exists(Path::new("/r/nope")));
        assert_eq!(
            fs.stat(Path::new("/r/loop")).unwrap_err().raw_os_error(),
            Some(libc::ELOOP)
        );
        assert_eq!(
            fs.stat(Path::new("/r/bin/busybox/x"))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENOTDIR)
        );
    }

    #[test]
    fn live_fs_sees_the_real_tree() {
        let dir = std::env::temp_dir().join(format!("husk-plan-fs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f"), "x").unwrap();
        std::os::unix::fs::symlink("f", dir.join("l")).unwrap();
        assert_eq!(LiveFs.stat(&dir).unwrap(), Entry::Dir);
        assert_eq!(
            LiveFs.stat(&dir.join("l")).unwrap(),
            Entry::File { executable: false }
        );
        assert_eq!(LiveFs.read_link(&dir.join("l")), Some(PathBuf::from("f")));
        assert_eq!(LiveFs.read_to_string(&dir.join("f")).as_deref(), Some("x"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
