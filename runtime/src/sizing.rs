//! Sizing a VM from what a client asked for. The numbers are the user's
//! (a spec's memory limit, an annotation): every conversion is checked, and
//! a size the host cannot give is refused with an error naming the field,
//! instead of wrapping to something small or booting a VM that cannot run.

/// The most vCPUs husk gives one VM, whichever the hypervisor: husk-vmm's
/// MP table holds 32 (`husk_vmm::mptable::MAX_VCPUS`, checked equal by a
/// test), and a sandbox's size must not depend on the backend.
pub const MAX_VCPUS: u32 = 32;

/// A requested size the host cannot give.
#[derive(Debug, thiserror::Error)]
pub enum SizeError {
    #[error("{field}: {requested_mib} MiB of guest memory (with the guest's overhead) is more than this host has ({host_mib} MiB)")]
    MoreThanHost {
        field: &'static str,
        requested_mib: u64,
        host_mib: u64,
    },
}

/// The host's memory in MiB (MemTotal), None where it cannot be read.
pub fn host_memory_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// Guest memory for a container whose memory limit is `limit_bytes`: the
/// limit rounded up to MiB plus `overhead_mib`, checked against the host.
pub fn memory_for_limit(
    field: &'static str,
    limit_bytes: i64,
    overhead_mib: u32,
    host_mib: Option<u64>,
) -> Result<u32, SizeError> {
    let mib = u64::try_from(limit_bytes)
        .unwrap_or(0)
        .div_ceil(1 << 20)
        .saturating_add(u64::from(overhead_mib));
    checked_memory(field, mib, host_mib)
}

/// `mib` of guest memory, if the host has that much (and it fits a u32).
pub fn checked_memory(
    field: &'static str,
    mib: u64,
    host_mib: Option<u64>,
) -> Result<u32, SizeError> {
    let limit = host_mib.unwrap_or(u64::from(u32::MAX));
    match u32::try_from(mib) {
        Ok(m) if mib <= limit => Ok(m),
        _ => Err(SizeError::MoreThanHost {
            field,
            requested_mib: mib,
            host_mib: limit,
        }),
    }
}

/// vCPUs for a CPU quota of `quota` per `period` (the kernel's default
/// period, 100 ms, when it is not positive): rounded up, 1 to `max`.
pub fn vcpus_for_quota(quota: i64, period: i64, max: u32) -> u32 {
    let quota = u64::try_from(quota).unwrap_or(0);
    let period = u64::try_from(period)
        .ok()
        .filter(|p| *p > 0)
        .unwrap_or(100_000);
    u32::try_from(quota.div_ceil(period))
        .unwrap_or(max)
        .clamp(1, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_rounded_up_with_the_overhead() {
        assert_eq!(
            memory_for_limit("m", 100 << 20, 64, Some(1024)).ok(),
            Some(164)
        );
        assert_eq!(
            memory_for_limit("m", (100 << 20) + 1, 64, Some(1024)).ok(),
            Some(165)
        );
    }

    #[test]
    fn memory_the_host_lacks_is_refused_naming_the_field() {
        let e = memory_for_limit("linux.resources.memory.limit", i64::MAX, 64, Some(24_000))
            .expect_err("i64::MAX accepted")
            .to_string();
        assert!(e.starts_with("linux.resources.memory.limit: "), "{e}");
        assert!(e.contains("24000 MiB"), "{e}");
        // Not wrapped to a small number where u32 would have cut it.
        assert!(memory_for_limit("m", (1i64 << 52) + (1 << 20), 0, None).is_err());
        assert!(checked_memory("m", 24_001, Some(24_000)).is_err());
        assert!(checked_memory("m", 24_000, Some(24_000)).is_ok());
    }

    #[test]
    fn quota_vcpus_are_clamped() {
        assert_eq!(vcpus_for_quota(150_000, 100_000, 64), 2);
        assert_eq!(vcpus_for_quota(i64::MAX, 1, 64), 64);
        assert_eq!(vcpus_for_quota(-5, 100_000, 64), 1);
        assert_eq!(vcpus_for_quota(5, 0, 64), 1);
    }

    #[test]
    fn this_host_reports_its_memory() {
        assert!(host_memory_mib().is_some_and(|m| m > 0));
    }
}
