//! Conversions of `linux.resources` that both sides apply: the agent to the
//! container's cgroup in the guest, the runtime to the sandbox's cgroup on
//! the host. One definition, so the two never drift.

/// cgroup v1 CPU shares (2..262144) as a cgroup v2 weight (1..10000), the
/// conversion runc and crun use.
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9_999) / 262_142
}

#[cfg(test)]
mod tests {
    use super::shares_to_weight;

    #[test]
    fn shares_convert_to_weight_like_runc() {
        assert_eq!(shares_to_weight(0), 1);
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(u64::MAX), 10_000);
    }
}
