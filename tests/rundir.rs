//! `featreplay::rundir`: the run-directory lock (within a process, across processes, after
//! `kill -9`) and the protection of an existing run's directory. Host-only (no GPU).

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use featreplay::rundir::{self, RunLock, LOCK_FILE, RUN_OUTPUTS};
use featreplay::Error;
use process::KillOnDrop;

#[path = "common/process.rs"]
mod process;

fn listing(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The `pid` line of a lock file.
fn lock_pid(dir: &Path) -> String {
    let text = fs::read_to_string(dir.join(LOCK_FILE)).unwrap();
    text.lines().find_map(|l| l.strip_prefix("pid ")).unwrap_or_else(|| panic!("no pid in {text:?}")).to_string()
}

/// `result` is `Error::RunDirInUse` for `dir` held by `pid`; returns the message.
#[track_caller]
fn expect_in_use<T: std::fmt::Debug>(result: featreplay::Result<T>, dir: &Path, pid: u32) -> String {
    match result {
        Err(e @ Error::RunDirInUse { .. }) => {
            let message = e.to_string();
            let want = format!("{} is in use by another featreplay run (pid {pid}, since ", dir.display());
            assert!(message.starts_with(&want), "{message:?} does not start with {want:?}");
            assert!(message.ends_with("); wait for it or choose another --out"), "{message}");
            assert!(!message.contains('\n'), "{message}");
            message
        }
        other => panic!("expected Error::RunDirInUse, got {other:?}"),
    }
}

#[test]
fn second_acquire_in_the_same_process_fails_until_the_first_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("runs").join("a");
    let lock = RunLock::acquire(&dir).unwrap();
    assert!(dir.is_dir(), "acquire creates the directory");
    assert_eq!(lock.dir(), dir);
    assert_eq!(lock.path(), dir.join(LOCK_FILE));
    assert_eq!(lock_pid(&dir), std::process::id().to_string());

    // flock locks belong to an open file description: a second open in this process is refused.
    let message = expect_in_use(RunLock::acquire(&dir), &dir, std::process::id());
    // The start time is a UTC timestamp, YYYY-MM-DDTHH:MM:SSZ.
    let since = message.split("since ").nth(1).unwrap().split(')').next().unwrap();
    assert_eq!(since.len(), 20, "{since}");
    assert!(since.ends_with('Z') && since.as_bytes()[10] == b'T', "{since}");
    assert!(since[..4].parse::<u32>().unwrap() >= 2024, "{since}");

    drop(lock);
    let again = RunLock::acquire(&dir).unwrap();
    assert_eq!(lock_pid(&dir), std::process::id().to_string());
    // Other directories are independent.
    let other = tmp.path().join("b");
    let _b = RunLock::acquire(&other).unwrap();
    drop(again);
}

#[test]
fn a_stale_lock_file_is_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    // Left by a run that died: the file exists, nobody holds the lock.
    fs::write(tmp.path().join(LOCK_FILE), "pid 4000000\nsince 2020-01-01T00:00:00Z\n").unwrap();
    let lock = RunLock::acquire(tmp.path()).unwrap();
    let text = fs::read_to_string(lock.path()).unwrap();
    assert_eq!(lock_pid(tmp.path()), std::process::id().to_string());
    assert!(!text.contains("2020-01-01"), "{text}");
    // A lock file with garbage in it is stale too.
    drop(lock);
    fs::write(tmp.path().join(LOCK_FILE), "\0\0\0 not a lock file").unwrap();
    RunLock::acquire(tmp.path()).unwrap();
    assert_eq!(lock_pid(tmp.path()), std::process::id().to_string());
}

/// Set in a child copy of this test binary: hold the lock of the directory it names forever.
const HOLDER_ENV: &str = "FEATREPLAY_TEST_LOCK_HOLDER";
const HOLDER_TEST: &str = "a_lock_held_by_another_process_blocks_until_it_is_killed";
const READY: &str = "lock-holder: locked";

#[test]
fn a_lock_held_by_another_process_blocks_until_it_is_killed() {
    if let Some(dir) = std::env::var_os(HOLDER_ENV) {
        // Child mode: take the lock, tell the parent, and wait to be killed.
        let _lock = RunLock::acquire(Path::new(&dir)).unwrap();
        println!("{READY}");
        std::io::stdout().flush().unwrap();
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    }

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", HOLDER_TEST, "--nocapture", "--test-threads=1"])
            .env(HOLDER_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    // libtest prints `test NAME ... ` before the test's own output, on the same line. Read in a
    // thread, so that a child that never gets there fails the test instead of hanging it.
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ready = BufReader::new(stdout).lines().map_while(|l| l.ok()).any(|l| l.trim_end().ends_with(READY));
        let _ = tx.send(ready);
    });
    let ready = rx.recv_timeout(Duration::from_secs(60)).unwrap_or(false);
    assert!(ready, "the child did not report holding the lock: {:?}", child.0.try_wait());

    let pid = child.0.id();
    assert_eq!(lock_pid(&dir), pid.to_string());
    expect_in_use(RunLock::acquire(&dir), &dir, pid);

    // kill -9: no destructor runs in the child; the kernel releases its lock all the same.
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }
    assert!(!status.success());
    assert_eq!(lock_pid(&dir), pid.to_string(), "the dead child's lock file is left behind");
    let lock = RunLock::acquire(&dir).unwrap();
    assert_eq!(lock_pid(&dir), std::process::id().to_string());
    drop(lock);
}

/// `result` is `Error::RunDirNotEmpty`; returns the message.
#[track_caller]
fn expect_not_empty(result: featreplay::Result<()>) -> String {
    match result {
        Err(e @ Error::RunDirNotEmpty { .. }) => {
            let message = e.to_string();
            assert!(!message.contains('\n'), "{message}");
            message
        }
        other => panic!("expected Error::RunDirNotEmpty, got {other:?}"),
    }
}

#[test]
fn a_new_run_refuses_a_directory_that_holds_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    // A new directory, an empty one and one holding only the lock are all fine.
    rundir::check_new_run_dir(&dir, false).unwrap();
    fs::create_dir(&dir).unwrap();
    rundir::check_new_run_dir(&dir, false).unwrap();
    let lock = RunLock::acquire(&dir).unwrap();
    rundir::check_new_run_dir(&dir, false).unwrap();

    for name in ["metrics.jsonl", "checkpoint.safetensors", "metrics.csv", "checkpoint.json", "curves.png"] {
        fs::write(dir.join(name), b"x").unwrap();
    }
    fs::write(dir.join("notes.txt"), b"mine").unwrap();
    let message = expect_not_empty(rundir::check_new_run_dir(&dir, false));
    let d = dir.display();
    assert_eq!(
        message,
        format!(
            "{d} already holds a run (checkpoint.safetensors, checkpoint.json, metrics.jsonl, metrics.csv, and 2 more); resume it with --resume {d}, choose another --out, or pass --overwrite"
        )
    );
    // --overwrite accepts it; nothing is deleted by the check itself.
    rundir::check_new_run_dir(&dir, true).unwrap();
    assert_eq!(listing(&dir).len(), 7);

    // Metrics without a checkpoint (a run killed in its first epoch) cannot be resumed.
    fs::remove_file(dir.join("checkpoint.safetensors")).unwrap();
    let message = expect_not_empty(rundir::check_new_run_dir(&dir, false));
    assert!(message.contains("already holds a run's outputs but no checkpoint to resume from"), "{message}");
    assert!(!message.contains("--resume"), "{message}");

    // Someone else's files only.
    drop(lock);
    let other = tmp.path().join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("notes.txt"), b"mine").unwrap();
    let message = expect_not_empty(rundir::check_new_run_dir(&other, false));
    assert!(message.starts_with(&format!("{} is not empty (notes.txt); ", other.display())), "{message}");
    rundir::check_new_run_dir(&other, true).unwrap();

    // A file where the directory should be.
    let file = tmp.path().join("file");
    fs::write(&file, b"x").unwrap();
    match rundir::check_new_run_dir(&file, false) {
        Err(Error::Data { path, message }) => {
            assert_eq!(path, file.display().to_string());
            assert!(message.contains("not a directory"), "{message}");
        }
        other => panic!("expected Error::Data, got {other:?}"),
    }
}

#[test]
fn overwrite_clears_only_featreplays_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _lock = RunLock::acquire(dir).unwrap();
    let temps = [
        ".checkpoint.safetensors.tmp-123-0",
        ".checkpoint.json.tmp-123-1",
        ".metrics.tmp-123-2.jsonl",
        ".metrics.tmp-123-3.csv",
        ".sigma.tmp-123-4.jsonl",
        ".curves.tmp-123-5.png",
    ];
    let kept = ["notes.txt", "trace.json", "checkpoint.safetensors.bak", "metrics.jsonl.old"];
    for name in RUN_OUTPUTS.iter().chain(&temps).chain(&kept) {
        fs::write(dir.join(name), b"x").unwrap();
    }
    rundir::clear_run_outputs(dir).unwrap();
    let mut want = names(&kept);
    want.insert(LOCK_FILE.to_string());
    assert_eq!(listing(dir), want);
    // Clearing again, or a directory that does not exist, is not an error.
    rundir::clear_run_outputs(dir).unwrap();
    rundir::clear_run_outputs(&dir.join("missing")).unwrap();
    // What is left is not a run: a new run is refused only because of the user's files.
    let message = expect_not_empty(rundir::check_new_run_dir(dir, false));
    assert!(message.contains("is not empty (checkpoint.safetensors.bak, metrics.jsonl.old, notes.txt, trace.json)"));
}
