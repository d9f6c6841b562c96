//! Hostile input and faults, end to end through the `featreplay` binary: a diverged run
//! fails and keeps its last good checkpoint, every checkpoint a method writes evaluates,
//! corrupt or non-finite checkpoints are refused, ties never favour the label, run
//! directories are locked and protected, kill -9 never loses a metrics row or tears a file,
//! `--resume` refuses flags that would change the run, short runs train at the base rate,
//! and bad flags or sizes fail before any work. Each test states the defect it guards.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use featreplay::checkpoint;
use process::{bin, fails_with, succeeds, KillOnDrop};
use serde_json::Value;

#[path = "common/process.rs"]
mod process;

/// A ResNet-8 on 128 embedded images, 4 iterations per epoch, 64 test images.
fn tiny(out: &Path, epochs: usize) -> Vec<String> {
    let v = [
        "train",
        "--depth",
        "8",
        "--train-subset",
        "128",
        "--test-subset",
        "64",
        "--batch-size",
        "32",
        "--lr",
        "0.05",
        "--schedule",
        "--seed",
        "3",
        "--quiet",
        "--epochs",
    ];
    let mut a: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    a.push(epochs.to_string());
    a.push("--out".into());
    a.push(out.to_str().unwrap().into());
    a
}

fn with(mut a: Vec<String>, extra: &[&str]) -> Vec<String> {
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn strs(a: &[String]) -> Vec<&str> {
    a.iter().map(String::as_str).collect()
}

fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("torn metrics line '{l}': {e}")))
        .collect()
}

fn epochs_of(rows: &[Value]) -> Vec<u64> {
    rows.iter().map(|r| r["epoch"].as_u64().unwrap()).collect()
}

// ---------------------------------------------------------------------------------------
// 1. Divergence

/// Defect: an absurd learning rate on module 1 (K = 2) made its weights NaN while the loss
/// stayed finite; the run exited 0 with 24 all-NaN tensors in its checkpoint.
#[test]
fn a_diverged_module_fails_the_run_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fr");
    let a = with(tiny(&out, 1), &["--algo", "fr", "--splits", "2", "--first-module-lr-scale", "1e30"]);
    let e = fails_with(&strs(&a), "training diverged in epoch 1");
    assert!(e.contains("module 1"), "the message names the module: {e}");
    assert!(!out.join(checkpoint::SAFETENSORS_FILE).exists(), "no checkpoint of a diverged epoch");
    assert!(metrics(&out).is_empty(), "no metrics row of a diverged epoch");
}

/// compare records such a run as diverged, says why, and goes on with the others.
#[test]
fn compare_records_a_diverged_module() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cmp");
    let o = succeeds(&[
        "compare",
        "--depth",
        "8",
        "--train-subset",
        "64",
        "--test-subset",
        "32",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--k",
        "2",
        "--methods",
        "bp,fr",
        "--first-module-lr-scale",
        "1e30",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    for m in ["bp", "fr"] {
        let row = md.lines().find(|l| l.starts_with(&format!("| {m} | 2 |"))).unwrap_or_else(|| panic!("{md}"));
        assert!(row.contains("**diverged** in epoch 1"), "{m}: {row}");
    }
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert!(summary["runs"].as_array().unwrap().iter().all(|r| r["outcome"]["status"] == "diverged"), "{summary}");
    assert!(o.contains("diverged in epoch 1"), "{o}");
}

/// A run that diverges in its second epoch exits non-zero and keeps epoch 1's checkpoint
/// (finite, loadable) and metrics row.
#[test]
fn divergence_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bp");
    let mut a = tiny(&out, 2);
    // Replace the constant schedule by a step that multiplies the rate by 1e30 at epoch 1.
    let i = a.iter().position(|s| s == "--schedule").unwrap();
    a.splice(i..=i, ["--schedule", "1", "--gammas", "1e30"].iter().map(|s| s.to_string()));
    fails_with(&strs(&a), "training diverged in epoch 2");
    let ck = checkpoint::load(&out).unwrap();
    assert_eq!(ck.meta.epoch, 1);
    assert!(ck.all_finite(), "the kept checkpoint is the good one");
    assert_eq!(epochs_of(&metrics(&out)), vec![1]);
    // And it still evaluates.
    succeeds(&["eval", out.to_str().unwrap()]);
}

// ---------------------------------------------------------------------------------------
// 2. eval on every method's checkpoint

/// Defect: eval refused every FR, DDG and DNI checkpoint ("holds tensor
/// 'pipeline.stage0.input_history.0' that this model does not have").
#[test]
fn eval_reads_checkpoints_of_every_method() {
    let tmp = tempfile::tempdir().unwrap();
    for algo in ["fr", "ddg", "dni"] {
        let out = tmp.path().join(algo);
        succeeds(&strs(&with(tiny(&out, 1), &["--algo", algo, "--splits", "3"])));
        let ck = checkpoint::load(&out).unwrap();
        assert!(
            ck.names().any(|n| n.starts_with("training.pipeline.") || n.starts_with("training.dni.")),
            "{algo}: training state"
        );
        let o = succeeds(&["eval", out.to_str().unwrap()]);
        let want = format!("top-1 {:.2}%", 100.0 * metrics(&out)[0]["test_top1"].as_f64().unwrap());
        assert!(o.contains(&want), "{algo}: eval printed {o}, the run's own evaluation says {want}");
    }
    // The DDG resume error points to eval, and eval works (above).
    let ddg = tmp.path().join("ddg");
    let e = fails_with(&["train", "--resume", ddg.to_str().unwrap(), "--epochs", "2"], "a DDG run cannot be resumed");
    assert!(e.contains("featreplay eval"), "{e}");
}

// ---------------------------------------------------------------------------------------
// 3. Corrupt and non-finite checkpoints

/// One trained checkpoint, copied per case.
fn trained(tmp: &Path) -> PathBuf {
    let out = tmp.join("base");
    succeeds(&strs(&tiny(&out, 1)));
    out
}

fn copy_run(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in [checkpoint::SAFETENSORS_FILE, "metrics.jsonl"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// Defects: 2,000 flipped bytes evaluated to loss 5.5e8 with exit 0; swapped offsets
/// loaded; NaN weights evaluated to a finite loss.
#[test]
fn corrupt_and_non_finite_checkpoints_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = trained(tmp.path());
    let bytes = std::fs::read(base.join(checkpoint::SAFETENSORS_FILE)).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;

    // 2,000 bytes of tensor data flipped.
    let flipped = tmp.path().join("flipped");
    copy_run(&base, &flipped);
    let mut b = bytes.clone();
    for i in 0..2000 {
        let at = 8 + header + (i * 7919) % (b.len() - 8 - header);
        b[at] ^= 0x5a;
    }
    std::fs::write(flipped.join(checkpoint::SAFETENSORS_FILE), &b).unwrap();
    fails_with(&["eval", flipped.to_str().unwrap()], "checksum");
    fails_with(&["train", "--resume", flipped.to_str().unwrap(), "--epochs", "2"], "checksum");

    // The data offsets of two tensors of one shape swapped in the header (same length).
    let swapped = tmp.path().join("swapped");
    copy_run(&base, &swapped);
    let text = String::from_utf8(bytes[8..8 + header].to_vec()).unwrap();
    let mut h: Value = serde_json::from_str(&text).unwrap();
    let (a, c) = ("layer1.0.bn1.weight", "layer1.0.bn1.bias");
    let (oa, oc) = (h[a]["data_offsets"].clone(), h[c]["data_offsets"].clone());
    h[a]["data_offsets"] = oc;
    h[c]["data_offsets"] = oa;
    let mut new_header = serde_json::to_string(&h).unwrap().into_bytes();
    assert!(new_header.len() <= header, "the rewritten header fits");
    new_header.resize(header, b' ');
    let mut b = bytes.clone();
    b[8..8 + header].copy_from_slice(&new_header);
    std::fs::write(swapped.join(checkpoint::SAFETENSORS_FILE), &b).unwrap();
    fails_with(&["eval", swapped.to_str().unwrap()], "checksum");

    // NaN weights written as a valid checkpoint (fresh checksum): a diverged run's weights.
    let nan = tmp.path().join("nan");
    copy_run(&base, &nan);
    let mut ck = checkpoint::load(&nan).unwrap();
    let t = ck.tensors.iter_mut().find(|t| t.name == "conv1.weight").unwrap();
    t.data[5] = f32::NAN;
    checkpoint::save(&nan, &ck).unwrap();
    fails_with(&["eval", nan.to_str().unwrap()], "NaN or infinite");
}

// ---------------------------------------------------------------------------------------
// 4. Ties

/// Defect: all-zero weights gave top-1 100%. With every logit equal, the tie goes to class
/// 0 (PyTorch's argmax), so top-1 is the share of class-0 images in the test set.
#[test]
fn all_zero_weights_score_the_share_of_class_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let base = trained(tmp.path());
    let zero = tmp.path().join("zero");
    copy_run(&base, &zero);
    let mut ck = checkpoint::load(&zero).unwrap();
    for t in ck.tensors.iter_mut().filter(|t| !t.name.contains("running_var")) {
        t.data.iter_mut().for_each(|v| *v = 0.0);
    }
    checkpoint::save(&zero, &ck).unwrap();
    let o = succeeds(&["eval", zero.to_str().unwrap(), "--test-subset", "all"]);
    let test = featreplay::data::embedded::load_embedded(featreplay::data::Split::Test).unwrap();
    let share = test.labels().iter().filter(|&&l| l == 0).count() as f64 / test.len() as f64;
    let want = format!("top-1 {:.2}%", 100.0 * share);
    assert!(o.contains(&want), "eval printed {o}; want {want} (ties go to class 0)");
    assert!(!o.contains("top-1 100.00%"), "{o}");
}

// ---------------------------------------------------------------------------------------
// 5. Run directories

/// Defects: two runs into one --out interleaved their metrics; a new run into an existing
/// run's directory truncated its metrics at once.
#[test]
fn run_directories_are_locked_and_protected() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    succeeds(&strs(&tiny(&out, 1)));
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    // A new run into it is refused before anything is touched.
    fails_with(&strs(&tiny(&out, 1)), "already holds a run");
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), before, "metrics untouched");
    // --overwrite replaces it.
    succeeds(&strs(&with(tiny(&out, 2), &["--overwrite"])));
    assert_eq!(epochs_of(&metrics(&out)), vec![1, 2]);

    // A second run while the first is training: refused, naming the holder's pid.
    let busy = tmp.path().join("busy");
    let first =
        KillOnDrop(bin().args(strs(&tiny(&busy, 50))).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    // Wait for its first checkpoint, so a resume gets as far as the lock.
    let t0 = Instant::now();
    while !busy.join(checkpoint::SAFETENSORS_FILE).exists() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let e = fails_with(&strs(&with(tiny(&busy, 1), &["--overwrite"])), "in use by another featreplay run");
    assert!(e.contains(&format!("pid {}", first.0.id())), "{e}");
    fails_with(&["train", "--resume", busy.to_str().unwrap(), "--epochs", "60"], "in use");
    drop(first); // SIGKILL, then reaped
                 // The lock died with its process (kill -9): the directory is usable again.
    succeeds(&strs(&with(tiny(&busy, 1), &["--overwrite"])));
}

// ---------------------------------------------------------------------------------------
// 6. kill -9

/// Defects: a kill during resume's rewrite left 0 of 55 metrics rows; a kill right after a
/// checkpoint lost that epoch's row for good; curves.png was left empty or torn. After a
/// kill at any moment: the checkpoint loads, metrics.jsonl parses and holds epochs 1..E or
/// 1..E-1 (E the checkpoint's epoch; the row E is in the checkpoint), every PNG decodes,
/// and a resume brings the files to exactly 1..E_final.
#[test]
fn kill_9_at_any_moment_loses_no_row_and_tears_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // One iteration per epoch, so most of a run's time is spent between epochs: writing
    // the checkpoint, the metrics and the plot.
    let args = |epochs: usize, overwrite: bool| {
        let mut a = tiny(&out, epochs);
        let i = a.iter().position(|s| s == "128").unwrap();
        a[i] = "32".into();
        let i = a.iter().position(|s| s == "64").unwrap();
        a[i] = "32".into();
        if overwrite {
            a.push("--overwrite".into());
        }
        a
    };
    let mut rng_state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let mut killed_with_checkpoint = 0;
    for round in 0..8 {
        let resume = round % 2 == 1 && out.join(checkpoint::SAFETENSORS_FILE).exists();
        let a = if resume {
            let e = checkpoint::load_meta(&out).unwrap().epoch;
            vec![
                "train".into(),
                "--resume".into(),
                out.to_str().unwrap().into(),
                "--epochs".into(),
                (e + 40).to_string(),
                "--quiet".into(),
            ]
        } else {
            args(40, true)
        };
        let before = checkpoint::load_meta(&out).ok().and_then(|m| m.checksum);
        let child = KillOnDrop(bin().args(strs(&a)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
        // Wait for this process's first checkpoint (opening the device and compiling the
        // pipelines takes seconds on lavapipe, more on a loaded machine), then kill anywhere
        // in the next epochs (about 0.6 s each: training, evaluation, checkpoint, metrics).
        let t0 = Instant::now();
        while !checkpoint::load_meta(&out).is_ok_and(|m| m.checksum != before)
            && t0.elapsed() < Duration::from_secs(180)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(next() % 1500));
        drop(child); // SIGKILL at this moment, then reaped
        check_after_kill(&out, &mut killed_with_checkpoint);
    }
    assert!(killed_with_checkpoint > 0, "no kill landed after a checkpoint: the test proved nothing");
    // A resume repairs whatever the last kill left: exactly epochs 1..E.
    let e = checkpoint::load_meta(&out).unwrap().epoch;
    succeeds(&["train", "--resume", out.to_str().unwrap(), "--epochs", &(e + 1).to_string(), "--quiet"]);
    assert_eq!(epochs_of(&metrics(&out)), (1..=e as u64 + 1).collect::<Vec<_>>());
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), e + 2, "header and one row per epoch");
}

fn check_after_kill(out: &Path, with_checkpoint: &mut usize) {
    let rows = epochs_of(&metrics(out));
    let e = match checkpoint::load(out) {
        Ok(ck) => {
            *with_checkpoint += 1;
            ck.meta.epoch as u64
        }
        Err(err) => {
            assert!(!out.join(checkpoint::SAFETENSORS_FILE).exists(), "a checkpoint that does not load: {err}");
            0
        }
    };
    let exact: Vec<u64> = (1..=e).collect();
    let behind: Vec<u64> = (1..e).collect();
    assert!(rows == exact || rows == behind, "checkpoint epoch {e} but metrics rows {rows:?}");
    for entry in std::fs::read_dir(out).unwrap().flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|x| x == "png") && !entry.file_name().to_string_lossy().starts_with('.') {
            image::open(&p).unwrap_or_else(|e| panic!("{} is torn: {e}", p.display()));
        }
    }
}

// ---------------------------------------------------------------------------------------
// 7. --resume and its flags

/// Defect: --resume silently ignored every flag but --epochs.
#[test]
fn resume_refuses_conflicting_flags_and_records_allowed_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    succeeds(&strs(&tiny(&out, 1)));
    let dir = out.to_str().unwrap();
    for (flag, value) in [
        ("--depth", "14"),
        ("--splits", "2"),
        ("--algo", "fr"),
        ("--lr", "0.2"),
        ("--dataset", "fashion-mnist"),
        ("--seed", "4"),
        ("--batch-size", "16"),
    ] {
        let e = fails_with(&["train", "--resume", dir, "--epochs", "2", flag, value], "conflicts with the checkpoint");
        assert!(e.contains(flag), "{e}");
    }
    fails_with(&["train", "--resume", dir, "--epochs", "2", "--out", "elsewhere"], "--out cannot be combined");
    fails_with(&["train", "--resume", dir], "has trained 1 of 1 epochs");
    // Flags equal to the checkpoint's are fine; --epochs and --measure-sigma are honoured.
    let o = succeeds(&["train", "--resume", dir, "--epochs", "2", "--depth", "8", "--measure-sigma", "2", "--quiet"]);
    assert!(o.contains("resume: --epochs: 1 -> 2"), "{o}");
    let ck = checkpoint::load_meta(&out).unwrap();
    assert_eq!(ck.epoch, 2);
    let resumes = ck.extra["resumes"].as_array().unwrap();
    assert_eq!(resumes.len(), 1);
    let changed = resumes[0]["changed"].to_string();
    assert!(changed.contains("--epochs") && changed.contains("--measure-sigma"), "{changed}");
    assert!(out.join("sigma.jsonl").exists());
    // A schedule that rewrites the past is refused; a step after the checkpoint is fine.
    fails_with(&["train", "--resume", dir, "--epochs", "4", "--schedule", "1"], "already trained");
    succeeds(&["train", "--resume", dir, "--epochs", "4", "--schedule", "3", "--quiet"]);
    let m = metrics(&out);
    assert_eq!(epochs_of(&m), vec![1, 2, 3, 4]);
    assert!((m[3]["lr"].as_f64().unwrap() - 0.005).abs() < 1e-9, "{}", m[3]);
}

// ---------------------------------------------------------------------------------------
// 8. Short runs

/// Defect: with --epochs 1 the default schedule was [0, 0]: the whole run at lr/100.
#[test]
fn a_one_epoch_run_starts_at_the_base_rate() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("one");
    let mut a = tiny(&out, 1);
    a.retain(|s| s != "--schedule");
    succeeds(&strs(&a));
    let m = metrics(&out);
    assert!((m[0]["lr"].as_f64().unwrap() - 0.05).abs() < 1e-9, "epoch 1 starts at --lr: {}", m[0]);
    let cfg = &checkpoint::load_meta(&out).unwrap().config;
    assert_eq!(cfg["optim"]["schedule"], serde_json::json!([0.5, 0.75]), "{cfg}");
}

// ---------------------------------------------------------------------------------------
// 9 and 10. Every flag, plan, path and size checked before work

/// Defects: compare --k 2,50 failed after the K = 2 runs; --trace naming a directory failed
/// after epoch 1; a NaN gamma and a negative first-module scale were "invalid learning
/// rate" at training time; huge sizes aborted (rc 134) or took 15 GB.
#[test]
fn bad_flags_and_sizes_fail_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cmp");
    let t0 = Instant::now();
    fails_with(&["compare", "--k", "2,50", "--out", out.to_str().unwrap()], "--k 50");
    assert!(!out.join("bp-k2").exists(), "no run started");
    let run = tmp.path().join("run");
    let traced = with(tiny(&run, 1), &["--trace", tmp.path().to_str().unwrap()]);
    fails_with(&strs(&traced), "--trace names a directory");
    assert!(!run.join("metrics.jsonl").exists(), "no epoch ran");
    let nowhere = with(tiny(&run, 1), &["--trace", "/nonexistent/dir/trace.json"]);
    fails_with(&strs(&nowhere), "does not exist");
    let r = run.to_str().unwrap();
    fails_with(&["train", "--out", r, "--schedule", "1", "--gammas", "NaN"], "--gammas NaN");
    fails_with(&["train", "--out", r, "--first-module-lr-scale=-1"], "--first-module-lr-scale -1");
    fails_with(&["train", "--out", r, "--lr", "inf"], "--lr inf");
    fails_with(&["train", "--out", r, "--momentum", "1.5"], "--momentum 1.5");
    fails_with(&["train", "--out", r, "--decay=-1"], "--decay -1");
    fails_with(&["train", "--out", r, "--schedule=-1"], "--schedule -1");
    fails_with(&["train", "--out", r, "--algo", "dni", "--splits", "2", "--dni-width", "1000000"], "GiB");
    fails_with(&["train", "--out", r, "--batch-size", "100000000"], "GiB");
    fails_with(&["train", "--out", r, "--depth", "600002"], "GiB");
    fails_with(&["demo", "--size", "100000"], "GiB");
    fails_with(&["demo", "--width", "100000"], "GiB");
    fails_with(&["demo", "--samples", "1000000000", "--batch-size", "64"], "GiB");
    fails_with(&["eval", r, "--test-subset", "ten"], "--test-subset ten");
    // Replicas and processes: refused before MPI or any device is touched.
    fails_with(&["train", "--out", r, "--replicas", "2", "--splits", "2"], "add --transport mpi");
    fails_with(&["train", "--out", r, "--replicas", "0"], "--replicas must be at least 1");
    fails_with(&["train", "--out", r, "--replicas", "2", "--algo", "dni"], "--replicas does not average");
    fails_with(&["train", "--out", r, "--replicas", "3", "--batch-size", "32"], "does not split evenly");
    for (flag, value, says) in [
        ("--allreduce", "fast", "choose ordered or mpi"),
        ("--layout", "diagonal", "choose pipeline-major or stage-major"),
    ] {
        // Refused by the argument parser (its usage message follows).
        let (code, _, e) = process::featreplay(&["train", "--out", r, flag, value]);
        assert!(code != Some(0) && e.contains(says), "{flag} {value}: {e}");
    }
    #[cfg(not(feature = "mpi"))]
    fails_with(&["train", "--out", r, "--transport", "mpi"], "built without MPI");
    assert!(!run.exists(), "nothing was written");
    assert!(t0.elapsed() < Duration::from_secs(120), "the checks took {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------
// 12 and the stored normalisation

/// Defect: eval could not override a stored --test-subset. Also: eval uses the
/// normalisation stored in the checkpoint, never statistics recomputed from a subset.
#[test]
fn eval_overrides_the_test_subset_and_uses_the_stored_normalisation() {
    let tmp = tempfile::tempdir().unwrap();
    let base = trained(tmp.path());
    let o = succeeds(&["eval", base.to_str().unwrap()]);
    assert!(o.contains("(64 images)"), "the run's own subset by default: {o}");
    let o = succeeds(&["eval", base.to_str().unwrap(), "--test-subset", "all"]);
    assert!(o.contains("(1000 images)"), "{o}");
    let o = succeeds(&["eval", base.to_str().unwrap(), "--test-subset", "10"]);
    assert!(o.contains("(10 images)"), "{o}");

    let ck = checkpoint::load(&base).unwrap();
    let data = &ck.meta.extra["data"];
    assert_eq!(data["input"], serde_json::json!([1, 28, 28]), "{data}");
    assert_eq!(data["mean"].as_array().unwrap().len(), 1);
    assert_eq!(data["class_names"].as_array().map(|c| c.len()), Some(10), "{data}");
    // Another normalisation in the metadata changes what eval computes.
    let moved = tmp.path().join("moved");
    copy_run(&base, &moved);
    let mut ck = checkpoint::load(&moved).unwrap();
    ck.meta.extra["data"]["mean"] = serde_json::json!([0.9]);
    checkpoint::save(&moved, &ck).unwrap();
    let a = succeeds(&["eval", base.to_str().unwrap()]);
    let b = succeeds(&["eval", moved.to_str().unwrap()]);
    let loss = |s: &str| s.split("loss ").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    assert_ne!(loss(&a), loss(&b), "eval read the stored mean: {a} vs {b}");
}
