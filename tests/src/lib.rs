//! Helpers for the end-to-end tests: paths of the workspace's binaries.

use std::path::PathBuf;

/// Path of a binary built by this workspace in the same profile as the tests.
pub fn binary(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("the test binary has a path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}
