//! The host clock of every timestamp on the wire and in the histograms: CLOCK_MONOTONIC in
//! nanoseconds, the clock Python's `time.monotonic_ns()` reads on Linux, so a client on the
//! same host can compute end-to-end latency. Read through the vDSO: no system call.

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Pins the calling thread to one CPU core.
pub fn pin_current_thread(core: usize) -> Result<(), String> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it for
    // core < CPU_SETSIZE, checked first.
    unsafe {
        if core >= libc::CPU_SETSIZE as usize {
            return Err(format!("core {core} is beyond CPU_SETSIZE"));
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!("cannot pin to core {core}: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Asks the kernel to end the calling thread's timed sleeps on time: timer slack 1 ns
/// instead of the default 50 us, within which it may defer a wake-up to batch it with
/// others. (Threads under SCHED_FIFO have no slack anyway.)
pub fn tighten_timer_slack() -> Result<(), String> {
    // SAFETY: PR_SET_TIMERSLACK reads its one integer argument and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) } != 0 {
        return Err(format!("cannot set the timer slack: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Puts the calling thread under SCHED_FIFO at `priority`.
pub fn set_realtime(priority: i32) -> Result<(), String> {
    let param = libc::sched_param { sched_priority: priority };
    // SAFETY: sched_setscheduler reads the param we own; 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        return Err(format!(
            "cannot run under SCHED_FIFO priority {priority}: {} (needs root or CAP_SYS_NICE)",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
