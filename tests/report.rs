//! `featreplay::report` on disk: exact contents, atomic replacement (never an in-place
//! truncation), resumption, stale temporary files, and metrics that survive `kill -9` at random
//! moments. Host-only (no GPU).

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use featreplay::report::{
    self, read_metrics, read_sigma, write_atomic, EpochRecord, MetricsLog, Panel, SigmaLog, SigmaRecord,
    CONVERGENCE_PNG, CSV_HEADER, CURVES_PNG, METRICS_CSV, METRICS_JSONL, SIGMA_JSONL,
};
use featreplay::Error;
use process::KillOnDrop;
use rand::Rng;

#[path = "common/process.rs"]
mod process;

fn record(epoch: usize) -> EpochRecord {
    let e = epoch as f64;
    EpochRecord {
        epoch,
        lr: 0.1 / e,
        train_loss: 2.0 / e,
        train_top1: 1.0 - 0.5 / e,
        test_loss: 2.2 / e,
        test_top1: 1.0 - 0.6 / e,
        test_top5: 1.0 - 0.1 / e,
        best_test_top1: 1.0 - 0.6 / e,
        epoch_seconds: 12.5,
        images_per_second: 4000.0 + e,
        peak_memory_bytes: vec![1 << 20, 3 << 20],
        sigma: vec![0.5, f64::NAN],
        batch_losses: vec![2.1 / e, 1.9 / e],
    }
}

fn sigma(epoch: usize, iteration: u64) -> SigmaRecord {
    SigmaRecord { epoch, iteration, sigma: vec![0.25, iteration as f64, f64::NAN] }
}

fn listing(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn epochs(records: &[EpochRecord]) -> Vec<usize> {
    records.iter().map(|r| r.epoch).collect()
}

/// `metrics.csv`'s data rows, each checked to have every column.
fn csv_rows(dir: &Path) -> Vec<String> {
    let text = fs::read_to_string(dir.join(METRICS_CSV)).unwrap();
    assert!(text.ends_with('\n'), "{text:?}");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(CSV_HEADER));
    let columns = CSV_HEADER.split(',').count();
    lines
        .map(|l| {
            assert_eq!(l.split(',').count(), columns, "{l}");
            l.to_string()
        })
        .collect()
}

/// A complete PNG of the given size (decoding reads every row, so a torn file fails).
#[track_caller]
fn assert_whole_png(path: &Path, size: (u32, u32)) {
    let img = image::load_from_memory(&fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not a whole PNG: {e}", path.display()));
    assert_eq!((img.width(), img.height()), size, "{}", path.display());
}

#[cfg(unix)]
fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().ino()
}

#[test]
fn create_writes_exactly_the_records_and_push_appends() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let mut log = MetricsLog::create(&dir, vec![record(1), record(2)]).unwrap();
    // Records carry NaN (not PartialEq-equal to itself): compare their JSON.
    let as_json = |r: &[EpochRecord]| serde_json::to_value(r).unwrap();
    assert_eq!(as_json(&read_metrics(&dir.join(METRICS_JSONL)).unwrap()), as_json(&[record(1), record(2)]));
    assert_eq!(epochs(&read_metrics(&dir.join(METRICS_JSONL)).unwrap()), vec![1, 2]);
    assert_eq!(csv_rows(&dir).len(), 2);
    assert!(csv_rows(&dir)[1].starts_with("2,0.05,1,"), "{:?}", csv_rows(&dir));
    assert_whole_png(&dir.join(CURVES_PNG), (1100, 450));

    log.push(record(3)).unwrap();
    assert_eq!(epochs(log.records()), vec![1, 2, 3]);
    let back = read_metrics(&dir.join(METRICS_JSONL)).unwrap();
    assert_eq!(epochs(&back), vec![1, 2, 3]);
    // NaN sigma goes through JSON as null and comes back as NaN.
    assert_eq!(back[2].sigma[0], 0.5);
    assert!(back[2].sigma[1].is_nan());
    assert_eq!(back[2].peak_memory_bytes, record(3).peak_memory_bytes);
    assert_eq!(csv_rows(&dir).len(), 3);
    assert_whole_png(&dir.join(CURVES_PNG), (1100, 450));
    // No temporary file is left behind.
    assert_eq!(listing(&dir), names(&[METRICS_JSONL, METRICS_CSV, CURVES_PNG, CONVERGENCE_PNG]));

    // Creating with fewer records (a resumed run whose checkpoint is older) drops the rest;
    // with none, the curves (of epochs now gone) are removed.
    MetricsLog::create(&dir, vec![record(1)]).unwrap();
    assert_eq!(epochs(&read_metrics(&dir.join(METRICS_JSONL)).unwrap()), vec![1]);
    MetricsLog::create(&dir, vec![]).unwrap();
    assert_eq!(read_metrics(&dir.join(METRICS_JSONL)).unwrap(), vec![]);
    assert_eq!(csv_rows(&dir).len(), 0);
    assert_eq!(listing(&dir), names(&[METRICS_JSONL, METRICS_CSV]));
}

#[test]
fn open_keeps_earlier_epochs_for_a_resumed_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut log = MetricsLog::open(dir, 1).unwrap();
    for e in 1..=5 {
        log.push(record(e)).unwrap();
    }
    // Resumed from the checkpoint of epoch 3: epochs 4 and 5 will be recomputed.
    let log = MetricsLog::open(dir, 4).unwrap();
    assert_eq!(epochs(log.records()), vec![1, 2, 3]);
    assert_eq!(epochs(&read_metrics(&dir.join(METRICS_JSONL)).unwrap()), vec![1, 2, 3]);
    assert_eq!(csv_rows(dir).len(), 3);
    // A new run (first epoch 1) starts empty.
    let log = MetricsLog::open(dir, 1).unwrap();
    assert!(log.records().is_empty());
    assert_eq!(read_metrics(&dir.join(METRICS_JSONL)).unwrap(), vec![]);

    // A corrupt metrics.jsonl is an error naming the file and the line, and is left alone.
    fs::write(dir.join(METRICS_JSONL), "{\"epoch\": 1}\n").unwrap();
    match MetricsLog::open(dir, 2) {
        Err(Error::Data { path, message }) => {
            assert_eq!(path, dir.join(METRICS_JSONL).display().to_string());
            assert!(message.starts_with("line 1: "), "{message}");
        }
        other => panic!("expected Error::Data, got {:?}", other.map(|l| l.records().len())),
    }
    assert_eq!(fs::read_to_string(dir.join(METRICS_JSONL)).unwrap(), "{\"epoch\": 1}\n");
}

/// The old `open` truncated metrics.jsonl in place and then wrote it again: a kill in between
/// lost every row. Now the file is replaced by a rename: a reader that had it open (like a
/// process killed mid-write would leave the disk) still sees the complete old contents.
#[cfg(unix)]
#[test]
fn files_are_replaced_never_truncated_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut log = MetricsLog::create(dir, (1..=5).map(record).collect()).unwrap();
    let mut sigma_log = SigmaLog::create(dir, vec![sigma(1, 10), sigma(2, 20)]).unwrap();
    let paths = [dir.join(METRICS_JSONL), dir.join(METRICS_CSV), dir.join(CURVES_PNG), dir.join(SIGMA_JSONL)];
    let before: Vec<(u64, Vec<u8>, fs::File)> =
        paths.iter().map(|p| (inode(p), fs::read(p).unwrap(), fs::File::open(p).unwrap())).collect();

    log.push(record(6)).unwrap();
    MetricsLog::open(dir, 4).unwrap();
    SigmaLog::open(dir, 2).unwrap();

    for (path, (ino, bytes, mut file)) in paths.iter().zip(before) {
        assert_ne!(inode(path), ino, "{} was rewritten in place", path.display());
        let mut old = Vec::new();
        file.read_to_end(&mut old).unwrap();
        assert_eq!(old, bytes, "{}: the old file was modified", path.display());
    }
    assert_eq!(read_sigma(&dir.join(SIGMA_JSONL)).unwrap().len(), 1);
    // Appending a measurement does not replace sigma.jsonl, it extends it.
    let ino = inode(&dir.join(SIGMA_JSONL));
    sigma_log.push(sigma(2, 30)).unwrap();
    assert_eq!(inode(&dir.join(SIGMA_JSONL)), ino);
}

#[test]
fn sigma_log_round_trips_and_skips_a_torn_last_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = dir.join(SIGMA_JSONL);
    let mut log = SigmaLog::create(dir, vec![sigma(1, 5)]).unwrap();
    log.push(sigma(1, 10)).unwrap();
    log.push(sigma(2, 15)).unwrap();
    let back = read_sigma(&path).unwrap();
    assert_eq!(back.iter().map(|r| r.iteration).collect::<Vec<_>>(), vec![5, 10, 15]);
    assert_eq!(back[1].sigma[..2], [0.25, 10.0]);
    assert!(back[1].sigma[2].is_nan());
    assert_eq!(log.records().len(), 3);

    // An append cut short by a crash: the torn tail is skipped, and the next create drops it.
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str("{\"epoch\":2,\"iterat");
    fs::write(&path, &text).unwrap();
    assert_eq!(read_sigma(&path).unwrap().len(), 3);
    let log = SigmaLog::open(dir, 3).unwrap();
    assert_eq!(log.records().len(), 3);
    assert!(fs::read_to_string(&path).unwrap().ends_with("}\n"));
    // A bad line that is not the torn tail is corruption.
    fs::write(&path, "{\"epoch\":1}\n{\"epoch\":1,\"iteration\":2,\"sigma\":[]}\n").unwrap();
    let err = read_sigma(&path).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}: line 1: ", path.display())), "{err}");
    // A resumed run keeps the measurements of earlier epochs only.
    SigmaLog::create(dir, vec![sigma(1, 5), sigma(2, 10), sigma(3, 15)]).unwrap();
    let log = SigmaLog::open(dir, 3).unwrap();
    assert_eq!(log.records().iter().map(|r| r.epoch).collect::<Vec<_>>(), vec![1, 2]);
}

#[test]
fn write_atomic_replaces_whole_files_and_names_the_file_on_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("summary.md");
    write_atomic(&path, b"first version, longer than the second\n").unwrap();
    write_atomic(&path, b"second\n").unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "second\n");
    write_atomic(&tmp.path().join("noext"), b"x").unwrap();
    assert_eq!(listing(tmp.path()), names(&["summary.md", "noext"]));

    let missing = tmp.path().join("no").join("such").join("summary.json");
    match write_atomic(&missing, b"{}") {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().starts_with(&missing.display().to_string()), "{e}"),
        other => panic!("expected Error::Io, got {other:?}"),
    }
    assert!(!tmp.path().join("no").exists());
}

#[test]
fn stale_temporary_files_are_removed_by_create_and_others_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let stale = [".metrics.tmp-4000000-0.jsonl", ".metrics.tmp-4000000-1.csv", ".curves.tmp-4000000-2.png"];
    let kept = [".metrics.tmp-x-0.jsonl", "metrics.tmp-1-0.jsonl", ".curves.tmp-1-2.jpg", "notes.txt"];
    for name in stale.iter().chain(&kept).chain(&[".sigma.tmp-12-3.jsonl"]) {
        fs::write(dir.join(name), b"half").unwrap();
    }
    MetricsLog::create(dir, vec![record(1)]).unwrap();
    let mut want = names(&kept);
    want.extend(names(&[METRICS_JSONL, METRICS_CSV, CURVES_PNG, CONVERGENCE_PNG, ".sigma.tmp-12-3.jsonl"]));
    assert_eq!(listing(dir), want);
    SigmaLog::create(dir, vec![]).unwrap();
    want.remove(".sigma.tmp-12-3.jsonl");
    want.insert(SIGMA_JSONL.to_string());
    assert_eq!(listing(dir), want);
}

#[test]
fn plot_panels_writes_a_whole_png() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("memory.png");
    let panel = |t: &str| Panel {
        title: t.to_string(),
        x_desc: "K".to_string(),
        y_desc: "MiB".to_string(),
        series: vec![("bp".to_string(), vec![(2.0, 10.0), (3.0, f64::NAN), (4.0, 30.0)])],
    };
    report::plot_panels(&[panel("a"), panel("b"), panel("c")], &path).unwrap();
    assert_whole_png(&path, (1120, 840));
    assert_eq!(listing(tmp.path()), names(&["memory.png"]));
    let missing = tmp.path().join("missing").join("x.png");
    assert!(matches!(report::plot_panels(&[panel("a")], &missing), Err(Error::Io { .. })));
}

/// Set in a child copy of this test binary: write metrics into the directory it names in a loop
/// until killed.
const WRITER_ENV: &str = "FEATREPLAY_TEST_METRICS_WRITER";
const WRITER_TEST: &str = "metrics_survive_kill_9_at_random_moments";

/// Child mode: continue the run in `dir` as a resumed run does (open with the next epoch), then
/// push an epoch and some sigma measurements after another, forever.
fn writer_loop(dir: &Path) -> ! {
    let done = match read_metrics(&dir.join(METRICS_JSONL)) {
        Ok(records) => records.len(),
        Err(_) => 0,
    };
    let mut log = MetricsLog::open(dir, done + 1).unwrap();
    let mut sigma_log = SigmaLog::open(dir, done + 1).unwrap();
    for epoch in done + 1.. {
        for i in 0..3 {
            sigma_log.push(sigma(epoch, (epoch * 3 + i) as u64)).unwrap();
        }
        log.push(record(epoch)).unwrap();
    }
    unreachable!("the epochs never run out")
}

#[test]
fn metrics_survive_kill_9_at_random_moments() {
    if let Some(dir) = std::env::var_os(WRITER_ENV) {
        writer_loop(Path::new(&dir));
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    fs::create_dir(&dir).unwrap();
    let mut rng = rand::rng();
    let mut rows = 0usize;
    let mut kills_with_data = 0;
    for round in 0..20 {
        let mut child = KillOnDrop(
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", WRITER_TEST, "--test-threads=1"])
                .env(WRITER_ENV, &dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        std::thread::sleep(Duration::from_millis(rng.random_range(20..400)));
        child.0.kill().unwrap();
        let status = child.0.wait().unwrap();
        assert!(status.code().is_none(), "round {round}: the writer stopped by itself ({status:?})");

        let jsonl = dir.join(METRICS_JSONL);
        if !jsonl.exists() {
            assert_eq!(rows, 0, "round {round}: metrics.jsonl vanished");
            continue;
        }
        kills_with_data += 1;
        // Every line parses, the epochs are 1..=n, and no row a previous writer had written is
        // lost (a resumed writer keeps them all).
        let records = read_metrics(&jsonl).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let n = records.len();
        assert_eq!(epochs(&records), (1..=n).collect::<Vec<_>>(), "round {round}");
        assert!(n >= rows, "round {round}: {n} rows after the kill, {rows} before");
        rows = n;
        // metrics.csv is written right after metrics.jsonl: at most one row behind.
        if dir.join(METRICS_CSV).exists() {
            let csv = csv_rows(&dir).len();
            assert!(csv == n || csv + 1 == n, "round {round}: {csv} CSV rows for {n} JSON rows");
        }
        let curves = dir.join(CURVES_PNG);
        if curves.exists() {
            assert_whole_png(&curves, (1100, 450));
        }
        if dir.join(SIGMA_JSONL).exists() {
            read_sigma(&dir.join(SIGMA_JSONL)).unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        // At most one temporary file per output can be in flight when the writer dies.
        let temps = listing(&dir).into_iter().filter(|n| n.starts_with('.')).count();
        assert!(temps <= 3, "round {round}: {:?}", listing(&dir));
    }
    assert!(kills_with_data > 0 && rows > 0, "the writer never got to write anything");
    // The next writer cleans up what the kills left.
    MetricsLog::open(&dir, rows + 1).unwrap();
    SigmaLog::open(&dir, rows + 1).unwrap();
    assert_eq!(listing(&dir), names(&[METRICS_JSONL, METRICS_CSV, CURVES_PNG, CONVERGENCE_PNG, SIGMA_JSONL]));
}
