//! Run output directories: one run at a time per directory, and no new run over an old one.
//!
//! Two runs writing into one `--out` directory interleave their metrics and overwrite each
//! other's checkpoints, and a new run started in an existing run's directory used to truncate
//! its metrics at once. The trainer therefore:
//!
//! 1. takes the directory's [`RunLock`] for the whole run (new or resumed), which refuses a
//!    directory another live featreplay process is using;
//! 2. for a new run, calls [`check_new_run_dir`], which refuses a directory that already holds
//!    files unless `--overwrite` was given, and then, with `--overwrite`, [`clear_run_outputs`]
//!    to delete the old run's outputs before writing new ones.
//!
//! # The lock
//!
//! The lock is an exclusive advisory lock (`flock(2)` on Unix, `LockFileEx` on Windows, through
//! std's [`File::try_lock`]) on the file `DIR/.featreplay.lock` ([`LOCK_FILE`]). The kernel
//! releases it when the holder closes the file or dies in any way, `kill -9` and power loss
//! included, so a crashed run never leaves a directory locked: a lock file that exists but is
//! not locked is stale and is taken over silently. The holder writes its pid and start time into
//! the file, only so that the error another process gets can say who holds it.
//!
//! The lock file is never deleted, not even on release: deleting it would let a process that
//! had opened the old file lock it while a third process creates and locks a new one, and both
//! would believe they hold the directory.
//!
//! The lock is per open file, not per process: a second [`RunLock::acquire`] of the same
//! directory in the same process fails too. It is advisory: it protects against other
//! featreplay runs, not against other programs writing into the directory. On a file system
//! without locking support (some network file systems) the run goes ahead unprotected, with a
//! warning.

use std::fs::{self, File, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::{checkpoint, report};

/// The lock file [`RunLock::acquire`] creates in a run directory. [`check_new_run_dir`] ignores
/// it and [`clear_run_outputs`] keeps it.
pub const LOCK_FILE: &str = ".featreplay.lock";

/// The files a featreplay training run writes into its output directory, the ones
/// [`clear_run_outputs`] deletes (with their temporary files). A `--trace` file is named by the
/// user and is not among them.
pub const RUN_OUTPUTS: [&str; 7] = [
    checkpoint::SAFETENSORS_FILE,
    checkpoint::JSON_FILE,
    report::METRICS_JSONL,
    report::METRICS_CSV,
    report::SIGMA_JSONL,
    report::CURVES_PNG,
    report::CONVERGENCE_PNG,
];

/// How many names an error lists before summarising the rest as a count.
const LISTED: usize = 4;

/// Exclusive use of a run directory, held for a run's life. Released when dropped, and by the
/// operating system when the process dies (see the module documentation).
#[derive(Debug)]
pub struct RunLock {
    /// The locked lock file; closing it releases the lock.
    file: File,
    dir: PathBuf,
    path: PathBuf,
}

impl RunLock {
    /// Takes the lock of run directory `dir`, creating the directory if needed.
    ///
    /// Errors: [`Error::RunDirInUse`] when another live process (or another `RunLock` of this
    /// process) holds it, naming its pid and start time; [`Error::Io`] naming the directory or
    /// lock file when it cannot be created, opened or written. A lock file left by a process
    /// that is gone is taken over (logged at info level).
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(LOCK_FILE);
        // Not truncated on open: until we hold the lock, the contents are the holder's.
        let file =
            File::options().read(true).write(true).create(true).truncate(false).open(&path).map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(Error::RunDirInUse { dir: dir.display().to_string(), holder: read_holder(&file) });
            }
            Err(TryLockError::Error(e)) if e.kind() == io::ErrorKind::Unsupported => {
                log::warn!(
                    "{}: this file system does not support file locks, so nothing stops another featreplay run from writing into {} at the same time",
                    path.display(),
                    dir.display()
                );
            }
            Err(TryLockError::Error(e)) => return Err(io(&path)(e)),
        }
        let previous = read_holder_text(&file);
        if !previous.trim().is_empty() {
            log::info!(
                "{}: taking over the lock left by a featreplay run that is gone ({})",
                path.display(),
                describe_holder(&previous)
            );
        }
        let lock = RunLock { file, dir: dir.to_path_buf(), path };
        lock.write_holder().map_err(io(&lock.path))?;
        Ok(lock)
    }

    /// The locked run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The lock file, `dir/.featreplay.lock`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the lock file's contents with this process's pid and the current time.
    fn write_holder(&self) -> io::Result<()> {
        let mut f = &self.file;
        f.set_len(0)?;
        f.seek(SeekFrom::Start(0))?;
        f.write_all(format!("pid {}\nsince {}\n", std::process::id(), utc_now()).as_bytes())?;
        f.flush()
    }
}

/// Checks that `dir` may receive a new (not resumed) run: it must not exist, or hold nothing
/// but the lock file. With `overwrite` any directory is accepted (the caller then deletes the
/// old outputs with [`clear_run_outputs`]).
///
/// Errors: [`Error::RunDirNotEmpty`] listing what the directory holds and what to do, e.g.
/// `runs/a already holds a run (checkpoint.safetensors, metrics.jsonl); resume it with
/// --resume runs/a, choose another --out, or pass --overwrite`; [`Error::Data`] when `dir` is a
/// file; [`Error::Io`] when it cannot be read.
pub fn check_new_run_dir(dir: &Path, overwrite: bool) -> Result<()> {
    let entries = match list_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory || dir.is_file() => {
            return Err(Error::Data {
                path: dir.display().to_string(),
                message: "is a file, not a directory: choose another --out".to_string(),
            })
        }
        Err(e) => return Err(io(dir)(e)),
    };
    if overwrite || entries.is_empty() {
        return Ok(());
    }
    let d = dir.display();
    let ours: Vec<&String> = entries.iter().filter(|e| is_run_output(e)).collect();
    let (found, hint) = if entries.iter().any(|e| e == checkpoint::SAFETENSORS_FILE) {
        ("already holds a run", format!("resume it with --resume {d}, choose another --out, or pass --overwrite"))
    } else if !ours.is_empty() {
        (
            "already holds a run's outputs but no checkpoint to resume from",
            "choose another --out, or pass --overwrite".to_string(),
        )
    } else {
        ("is not empty", "choose another --out, or pass --overwrite to write the run beside these files".to_string())
    };
    // featreplay's own files first, the checkpoint leading: they are what the user most needs
    // to recognise. Then temporary files, then everything else, by name.
    let rank = |name: &str| RUN_OUTPUTS.iter().position(|o| *o == name).unwrap_or(RUN_OUTPUTS.len());
    let mut listed: Vec<&String> = ours;
    listed.sort_by_key(|name| rank(name));
    listed.extend(entries.iter().filter(|e| !is_run_output(e)));
    Err(Error::RunDirNotEmpty { dir: d.to_string(), found: format!("{found} ({})", summarise(&listed)), hint })
}

/// Deletes featreplay's own outputs from run directory `dir` ([`RUN_OUTPUTS`] and the
/// temporary files of their atomic writes), for `--overwrite`. Everything else is kept: the
/// lock file, a trace file, the user's own files. A missing directory or file is not an error.
///
/// Errors: [`Error::Io`] naming the file that cannot be deleted (the ones before it are gone).
pub fn clear_run_outputs(dir: &Path) -> Result<()> {
    let entries = match list_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(dir)(e)),
    };
    for name in entries.iter().filter(|e| is_run_output(e)) {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => log::info!("--overwrite: removed {}", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
    }
    Ok(())
}

/// Whether `name` is one of featreplay's run outputs or a temporary file of one.
fn is_run_output(name: &str) -> bool {
    RUN_OUTPUTS.contains(&name)
        || checkpoint::is_temp_name(name)
        || RUN_OUTPUTS.iter().any(|output| report::is_temp_of(name, output))
}

/// The names in `dir` other than the lock file, sorted.
fn list_dir(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name != LOCK_FILE {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// `a, b, c, d, and 3 more`.
fn summarise(names: &[&String]) -> String {
    let mut text = names.iter().take(LISTED).map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
    if names.len() > LISTED {
        text.push_str(&format!(", and {} more", names.len() - LISTED));
    }
    text
}

fn read_holder_text(file: &File) -> String {
    let mut text = String::new();
    let mut f = file;
    // Best effort: the contents only feed messages.
    if f.seek(SeekFrom::Start(0)).is_err() || f.take(4096).read_to_string(&mut text).is_err() {
        text.clear();
    }
    text
}

/// Who holds the lock, from the lock file's contents, for [`Error::RunDirInUse`].
fn read_holder(file: &File) -> String {
    describe_holder(&read_holder_text(file))
}

/// `pid 1234, since 2026-05-01T12:00:00Z` from the lines `pid 1234` and `since ...`.
fn describe_holder(text: &str) -> String {
    let field =
        |key: &str| text.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' '))).map(str::trim);
    match (field("pid"), field("since")) {
        (Some(pid), Some(since)) => format!("pid {pid}, since {since}"),
        (Some(pid), None) => format!("pid {pid}"),
        // The holder locks first and writes second; a reader can come in between.
        _ => "pid not yet recorded".to_string(),
    }
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ` (UTC), without a date-time dependency.
fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The proleptic Gregorian date of `days` since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn io(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.display().to_string(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
