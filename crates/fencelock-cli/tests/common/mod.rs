//! Helpers shared by the CLI's end-to-end tests.

use std::path::Path;
use std::time::{Duration, Instant};

/// Waits (bounded) for a child to end, killing it if it does not.
pub(crate) fn finish(mut child: std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    panic!("fencelock did not exit within {limit:?}");
}

/// Waits (bounded) until `path` exists.
pub(crate) fn wait_for_file(path: &Path, limit: Duration) {
    let started = Instant::now();
    while !path.exists() {
        assert!(
            started.elapsed() < limit,
            "{} did not appear within {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
