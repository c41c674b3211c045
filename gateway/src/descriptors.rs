//! The process's file descriptors: its open-file limit (`RLIMIT_NOFILE`), which bounds the
//! client connections a node can hold, and the reserve descriptor that lets the accept loop refuse
//! a connection even when the limit is reached.

use std::fs::File;

use tracing::{info, warn};

/// The soft open-file limit, or `None` when it is unlimited or unknown.
pub fn nofile_limit() -> Option<u64> {
    let (soft, _) = limits()?;
    (soft != libc::RLIM_INFINITY).then_some(soft)
}

/// Raises the soft open-file limit to the hard one (the binary calls this at start; many systems
/// start processes at 1024 with a much higher hard limit).
pub fn raise_nofile_limit() {
    let Some((soft, hard)) = limits() else { return };
    if soft >= hard {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct it is given; no memory is shared.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        info!(from = soft, to = hard, "raised the open-file limit");
    } else {
        warn!(
            error = %std::io::Error::last_os_error(),
            "cannot raise the open-file limit"
        );
    }
}

fn limits() -> Option<(libc::rlim_t, libc::rlim_t)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    Some((limit.rlim_cur, limit.rlim_max))
}

/// One descriptor held back for a rainy day: when `accept` fails because the process is out of
/// descriptors, it is released, the waiting connection accepted and closed at once (so that its
/// client fails fast instead of waiting in the backlog), and the reserve taken again.
pub struct Reserve(Option<File>);

impl Reserve {
    pub fn new() -> Self {
        Reserve(open_reserve())
    }

    /// Releases the descriptor; `false` when there was none to release.
    pub fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    /// Takes the descriptor again; `false` when the process is still out of descriptors.
    pub fn refill(&mut self) -> bool {
        if self.0.is_none() {
            self.0 = open_reserve();
        }
        self.0.is_some()
    }
}

impl Default for Reserve {
    fn default() -> Self {
        Self::new()
    }
}

fn open_reserve() -> Option<File> {
    File::open("/dev/null").ok()
}

/// Whether an `accept` error means the process or the system is out of descriptors.
pub fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}
