//! An exclusive flock on a named file, for claims that must hold exactly as
//! long as their holder lives (the kernel drops a flock with its process).
//! Shared by the CLI's create/delete lock and the jail's uid claims.

use std::path::Path;

/// A held lock; dropping it unlocks.
pub type HeldLock = nix::fcntl::Flock<std::fs::File>;

/// Takes an exclusive flock on `path` (created 0600 if missing), waiting
/// for it or, with `wait` false, answering None when someone holds it.
/// A holder that removed the file while we waited leaves us a lock on a
/// name nobody else opens: then the current file is locked instead.
pub fn lock_exclusive(path: &Path, wait: bool) -> std::io::Result<Option<HeldLock>> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let arg = if wait {
        nix::fcntl::FlockArg::LockExclusive
    } else {
        nix::fcntl::FlockArg::LockExclusiveNonblock
    };
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)?;
        let lock = match nix::fcntl::Flock::lock(file, arg) {
            Ok(lock) => lock,
            Err((_, nix::Error::EWOULDBLOCK)) if !wait => return Ok(None),
            Err((_, e)) => return Err(e.into()),
        };
        let held = lock.metadata()?.ino();
        if std::fs::metadata(path).map(|m| m.ino()).ok() == Some(held) {
            return Ok(Some(lock));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_refused_until_dropped_or_removed() {
        let path = std::env::temp_dir().join(format!("husk-lockfile-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let first = lock_exclusive(&path, false).unwrap().expect("free");
        assert!(lock_exclusive(&path, false).unwrap().is_none());
        drop(first);
        let second = lock_exclusive(&path, false).unwrap().expect("free again");
        // Removed while held: the next taker locks the new file.
        std::fs::remove_file(&path).unwrap();
        let third = lock_exclusive(&path, false).unwrap().expect("a new file");
        drop((second, third));
        let _ = std::fs::remove_file(&path);
    }
}
