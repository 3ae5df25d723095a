//! CPU placement of the floor's latency process (`rtt:both:N`, N-PERF-3).
//!
//! One sync call at a time is a ping-pong between the server's process and its SM process.
//! Left to the kernel, the two land on the same CPU for some calls and on different CPUs for
//! others, and on this machine's 2-vCPU VM an idle vCPU halts (no guest halt-polling), so a
//! wake-up that crosses to it costs several µs more than one that stays. The latencies were
//! bimodal (modes near 45 and 58 µs, or 30 and 54), and which mode a server's median fell in
//! decided its ratio: 0.92x to 1.34x for one binary in runs of the same minute (BENCHMARKS.md).
//! Pinned, the latency process's threads share one CPU and the SM processes another, so every
//! message crosses between CPUs, as it does between a CM and an SM on another node, and the
//! relay and the controller are measured in the same placement.

/// Where the latency process and its SM processes run: CPU ids of this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    pub(crate) server: usize,
    pub(crate) sm: usize,
}

/// The first and the last of the CPUs this process may run on, or `None` when it may run on
/// fewer than two (or the platform does not say).
pub(crate) fn floor_placement() -> Option<Placement> {
    let cpus = core_affinity::get_core_ids()?;
    placement_of(&cpus.iter().map(|c| c.id).collect::<Vec<_>>())
}

fn placement_of(cpus: &[usize]) -> Option<Placement> {
    match (cpus.iter().min(), cpus.iter().max()) {
        (Some(&server), Some(&sm)) if server != sm => Some(Placement { server, sm }),
        _ => None,
    }
}

/// Restricts the calling thread, and every thread and process it starts afterwards, to `cpu`.
/// Call it before the runtime is built: its worker threads inherit the mask.
pub(crate) fn pin_to(cpu: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        core_affinity::set_for_current(core_affinity::CoreId { id: cpu }),
        "could not pin this process to CPU {cpu} (sched_setaffinity refused)"
    );
    Ok(())
}
