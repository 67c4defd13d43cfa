//! A thread under its husk-vmm seccomp filter can allocate and free a large
//! heap. glibc opens /proc/sys/vm/overcommit_memory the first time it
//! shrinks a thread's heap, which no filter allows; `seccomp::apply` turns
//! heap trimming off first.
//!
//! Its own test binary (a fresh process, one test): glibc remembers the
//! answer once read, so any earlier shrink in the process would hide the
//! problem. A regression kills this test process with SIGSYS.

use husk_vmm::seccomp::{api_filter, apply, main_filter, vcpu_filter, ThreadKind};

/// Grow this thread's heap well past the trim threshold, free it all, and
/// allocate again (small and large blocks).
fn churn_heap() -> usize {
    let mut total = 0;
    for round in 1..=3 {
        let blocks: Vec<Box<[u8; 1000]>> =
            (0..2000 * round).map(|_| Box::new([1u8; 1000])).collect();
        total += blocks.len();
        drop(blocks);
        let big = vec![7u8; 300_000 * round];
        total += big.len();
    }
    total
}

#[test]
fn filtered_threads_allocate_and_free_a_large_heap() {
    let filters = [
        (ThreadKind::Vcpu, vcpu_filter(0, &[]).unwrap()),
        (ThreadKind::Api, api_filter(0).unwrap()),
        (ThreadKind::Main, main_filter().unwrap()),
    ];
    for (kind, filter) in filters {
        let churned = std::thread::spawn(move || {
            apply(kind, &filter).unwrap();
            churn_heap()
        })
        .join()
        .unwrap();
        assert!(churned > 1_000_000, "{kind:?}: {churned}");
    }
}
