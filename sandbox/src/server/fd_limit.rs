//! The open-file limit: raised to the hard limit at start, and used to size
//! the connection cap so that idle connections can never starve the server
//! of file descriptors.

/// File descriptors kept free for everything but client connections: the
/// listener, the database, the epoll and event fds, preopened directories and
/// outbound connections of requests in flight, refusals being written.
pub const FD_RESERVE: u64 = 512;

/// The fewest connections the cap is ever lowered to.
pub const MIN_CONNECTIONS: usize = 16;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (at most 2^20) and
/// returns the soft limit now in force (`None` if it cannot be read).
pub fn raise_nofile_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let current = getrlimit(Resource::Nofile);
    let target = current.maximum.unwrap_or(u64::MAX).min(1 << 20);
    let soft = match current.current {
        Some(s) if s >= target => return Some(s),
        // Unlimited.
        None => return None,
        Some(s) => s,
    };
    let raised = Rlimit {
        current: Some(target),
        maximum: current.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::info!(from = soft, to = target, "raised the open-file limit");
            Some(target)
        }
        Err(e) => {
            tracing::warn!(limit = soft, "cannot raise the open-file limit: {e}");
            Some(soft)
        }
    }
}

/// The connection cap for `requested` under an open-file limit of `nofile`.
pub fn connection_cap(requested: usize, nofile: Option<u64>) -> usize {
    let Some(nofile) = nofile else {
        return requested;
    };
    let room = usize::try_from(nofile.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
    requested.min(room.max(MIN_CONNECTIONS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_leaves_room_for_the_reserve() {
        assert_eq!(connection_cap(4096, Some(20_000)), 4096);
        assert_eq!(connection_cap(4096, Some(1024)), 512);
        assert_eq!(connection_cap(4096, Some(100)), MIN_CONNECTIONS);
        assert_eq!(connection_cap(4096, None), 4096);
        assert!(raise_nofile_limit().is_some());
    }
}
