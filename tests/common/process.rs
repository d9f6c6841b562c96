//! Helpers for tests that run the `featreplay` binary or child processes: running it, the
//! one-line error every bad input must end in, and killing a child when a test fails early.
//! Included with `#[path = "common/process.rs"] mod process;` (these tests need no device).
#![allow(dead_code)]

use std::process::{Child, Command};

/// The featreplay binary of this build.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_featreplay"))
}

/// Runs featreplay: (exit code, stdout, stderr).
pub fn featreplay(args: &[&str]) -> (Option<i32>, String, String) {
    let out = bin().args(args).output().expect("run featreplay");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Asserts success; returns stdout.
pub fn succeeds(args: &[&str]) -> String {
    let (code, o, e) = featreplay(args);
    assert_eq!(code, Some(0), "{args:?} failed: {o}{e}");
    o
}

/// Asserts exit code 1 with a one-line `featreplay: error: ...` (no panic) mentioning every
/// one of `expect`; returns stderr.
pub fn fails_with_all(args: &[&str], expect: &[&str]) -> String {
    let (code, o, e) = featreplay(args);
    assert_eq!(code, Some(1), "{args:?} should fail: {o}{e}");
    assert!(e.starts_with("featreplay: error: "), "{args:?}: {e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{args:?}: not one line: {e}");
    for x in expect {
        assert!(e.contains(x), "{args:?}: '{e}' does not mention '{x}'");
    }
    assert!(!e.contains("panicked"), "{args:?}: {e}");
    e
}

/// [`fails_with_all`] with one expected fragment.
pub fn fails_with(args: &[&str], expect: &str) -> String {
    fails_with_all(args, &[expect])
}

/// Kills the child process if the test ends (or fails) before it does.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
