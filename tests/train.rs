//! `featreplay train`, `eval` and `plan` end to end on a tiny configuration: the loss falls,
//! metrics, plot and checkpoint are written, a resumed run reproduces the uninterrupted one
//! exactly, and bad input ends in a one-line error.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn featreplay(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_featreplay")).args(args).output().expect("run featreplay");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// A ResNet-8 on 256 embedded Fashion-MNIST images, constant learning rate.
fn tiny(out: &Path, epochs: &str) -> Vec<String> {
    [
        "train",
        "--depth",
        "8",
        "--train-subset",
        "256",
        "--batch-size",
        "32",
        "--lr",
        "0.05",
        "--schedule",
        "--epochs",
        epochs,
        "--seed",
        "5",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The fields of a record that do not depend on timing.
fn learning(v: &Value) -> Vec<f64> {
    ["epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "best_test_top1"]
        .iter()
        .map(|k| v[k].as_f64().unwrap())
        .collect()
}

#[test]
fn train_writes_everything_and_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let args = tiny(&full, "3");
    let (ok, stdout, stderr) = featreplay(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{stdout}{stderr}");
    for f in
        ["metrics.jsonl", "metrics.csv", "curves.png", "convergence.png", "checkpoint.safetensors", "checkpoint.json"]
    {
        assert!(full.join(f).exists(), "{f} missing");
    }
    let m = metrics(&full);
    assert_eq!(m.len(), 3);
    // Every iteration's loss is recorded (256 images in batches of 32), and their mean,
    // weighted by batch size (all equal here), is the epoch's training loss.
    for r in &m {
        let b: Vec<f64> = r["batch_losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(b.len(), 8, "{r}");
        let mean = b.iter().sum::<f64>() / 8.0;
        let loss = r["train_loss"].as_f64().unwrap();
        assert!((mean - loss).abs() < 1e-5 * loss.max(1.0), "mean of batch losses {mean} vs {loss}");
    }
    let loss: Vec<f64> = m.iter().map(|r| r["train_loss"].as_f64().unwrap()).collect();
    assert!(loss[2] < loss[0], "training loss did not fall: {loss:?}");
    assert!(m[2]["test_top1"].as_f64().unwrap() > 0.3, "a ResNet-8 beats chance (10%) on Fashion-MNIST");
    let csv = std::fs::read_to_string(full.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "header and 3 rows");

    // Interrupted after 2 epochs, then resumed to 3: the same curve, bit for bit.
    let part = tmp.path().join("part");
    let (ok, o, e) = featreplay(&tiny(&part, "2").iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{o}{e}");
    let (ok, o, e) = featreplay(&["train", "--resume", part.to_str().unwrap(), "--epochs", "3", "--quiet"]);
    assert!(ok, "{o}{e}");
    let resumed = metrics(&part);
    assert_eq!(resumed.len(), 3);
    for (a, b) in m.iter().zip(&resumed) {
        assert_eq!(learning(a), learning(b), "resumed run differs from the uninterrupted one");
    }

    // eval reproduces the last epoch's test numbers from the checkpoint.
    let (ok, o, e) = featreplay(&["eval", full.to_str().unwrap()]);
    assert!(ok, "{o}{e}");
    let top1 = format!("top-1 {:.2}%", 100.0 * m[2]["test_top1"].as_f64().unwrap());
    assert!(o.contains(&top1), "eval printed {o}, expected {top1}");
}

#[test]
fn plan_prints_every_module() {
    let (ok, o, e) = featreplay(&["plan", "--depth", "56", "--splits", "4", "--split", "balanced"]);
    assert!(ok, "{o}{e}");
    assert!(o.starts_with("resnet56: 32 layers"), "{o}");
    for m in 1..=4 {
        assert!(o.lines().any(|l| l.trim_start().starts_with(&format!("{m} "))), "module {m} missing:\n{o}");
    }
}

#[test]
fn bad_input_is_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().to_str().unwrap();
    let garbage = tmp.path().join("garbage");
    std::fs::create_dir(&garbage).unwrap();
    std::fs::write(garbage.join("checkpoint.safetensors"), b"not a checkpoint").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["train", "--dataset", "imagenet9k"], "unknown dataset 'imagenet9k'"),
        (vec!["train", "--depth", "21"], "6n+2"),
        (vec!["train", "--splits", "0"], "K must be between 1 and 14"),
        (vec!["train", "--splits", "15"], "K must be between 1 and 14"),
        (vec!["train", "--split", "random"], "unknown split 'random'"),
        (vec!["train", "--arch", "vgg"], "unknown architecture 'vgg'"),
        (vec!["train", "--dataset", "cifar10", "--data-dir", empty], empty),
        (vec!["train", "--schedule", "1", "2", "--gammas", "0.1"], "one gamma per schedule step"),
        (vec!["train", "--algo", "kfac"], "choose bp, fr, ddg, dni, gpipe or dgl"),
        (vec!["train", "--measure-sigma", "0"], "--measure-sigma must be at least 1"),
        (vec!["train", "--algo", "dni", "--dni-depth", "0"], "--dni-depth must be at least 1"),
        (vec!["compare", "--methods", "bp,sgd"], "unknown method 'sgd'"),
        (vec!["compare", "--k", "0"], "--k needs"),
        (vec!["train", "--resume", empty], "checkpoint"),
        (vec!["eval", garbage.to_str().unwrap()], "checkpoint.safetensors"),
        (vec!["plan", "--depth", "110", "--splits", "100"], "K must be between 1 and 59"),
    ];
    for (args, expect) in cases {
        let (ok, o, e) = featreplay(&args);
        assert!(!ok, "{args:?} succeeded: {o}");
        assert!(e.starts_with("featreplay: error: "), "{args:?}: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{args:?}: not one line: {e}");
        assert!(e.contains(expect), "{args:?}: {e} does not mention {expect}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
}

#[test]
fn fr_trains_traces_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let fr_args = |out: &Path, epochs: &str| {
        let mut a = tiny(out, epochs);
        a.extend(["--algo", "fr", "--splits", "3"].iter().map(|s| s.to_string()));
        a
    };
    let full = tmp.path().join("full");
    let trace = tmp.path().join("trace.json");
    let mut args = fr_args(&full, "2");
    args.extend(["--trace".to_string(), trace.to_str().unwrap().to_string()]);
    let (ok, o, e) = featreplay(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{o}{e}");
    let m = metrics(&full);
    assert_eq!(m.len(), 2);
    assert!(m.iter().all(|r| r["train_loss"].as_f64().unwrap().is_finite()));
    assert_eq!(m[0]["peak_memory_bytes"].as_array().unwrap().len(), 3, "one peak per stage");

    // The trace: valid JSON, spans of every stage, the FR phases present.
    let events: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let spans: Vec<&Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    for tid in 0..3 {
        assert!(spans.iter().any(|e| e["tid"] == tid), "no span of stage {tid}");
    }
    for phase in ["play", "replay", "backward", "update", "send", "receive", "forward", "loss"] {
        assert!(spans.iter().any(|e| e["name"] == phase), "no '{phase}' span");
    }
    assert!(spans.iter().all(|e| e["dur"].as_f64().unwrap() >= 0.0 && e["ts"].as_f64().unwrap() >= 0.0));

    // Stopped after one epoch and resumed: the same curve (the checkpoint holds the
    // pipeline's input histories and the gradient in flight).
    let part = tmp.path().join("part");
    let (ok, o, e) = featreplay(&fr_args(&part, "1").iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{o}{e}");
    let (ok, o, e) = featreplay(&["train", "--resume", part.to_str().unwrap(), "--epochs", "2", "--quiet"]);
    assert!(ok, "{o}{e}");
    let resumed = metrics(&part);
    for (a, b) in m.iter().zip(&resumed) {
        assert_eq!(learning(a), learning(b), "resumed FR run differs from the uninterrupted one");
    }
}

#[test]
fn compare_writes_every_file_and_records_divergence() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cmp");
    let common = ["--depth", "8", "--train-subset", "64", "--test-subset", "32", "--batch-size", "32", "--quiet"];
    let mut args = vec!["compare", "--epochs", "2", "--k", "2", "--measure-sigma", "1", "--out", out.to_str().unwrap()];
    args.extend(common);
    let (ok, o, e) = featreplay(&args);
    assert!(ok, "{o}{e}");
    for f in ["summary.md", "summary.json", "curves-k2.png", "memory.png", "speed.png", "sigma.png"] {
        let p = out.join(f);
        assert!(p.exists() && std::fs::metadata(&p).unwrap().len() > 0, "{f} missing or empty");
    }
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    for m in ["bp", "fr", "ddg", "dni"] {
        let dir = out.join(format!("{m}-k2"));
        for f in ["metrics.jsonl", "metrics.csv", "sigma.jsonl", "curves.png", "checkpoint.safetensors"] {
            assert!(dir.join(f).exists(), "{m}: {f} missing");
        }
        assert_eq!(metrics(&dir).len(), 2, "{m}: two epochs");
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| {m} | 2 | completed |")))
            .unwrap_or_else(|| panic!("{m} row: {md}"));
        assert!(row.contains('%') && row.contains('x'), "{m}: error and speedup in {row}");
        // Two iterations per epoch, a measurement after each: four lines per run.
        let sigma = std::fs::read_to_string(dir.join("sigma.jsonl")).unwrap();
        assert_eq!(sigma.lines().count(), 4, "{m}: {sigma}");
    }
    let bp_sigma = std::fs::read_to_string(out.join("bp-k2/sigma.jsonl")).unwrap();
    let first: Value = serde_json::from_str(bp_sigma.lines().next().unwrap()).unwrap();
    assert!(first["sigma"].as_array().unwrap().iter().all(|v| (v.as_f64().unwrap() - 1.0).abs() < 1e-9), "{first}");
    // DNI keeps a predictor per module below the last, in its checkpoint.
    let ck = std::fs::read(out.join("dni-k2/checkpoint.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(ck[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&ck[8..8 + header_len]);
    assert!(header.contains("\"training.dni.stage0.out.conv.weight\""), "{header}");

    // A learning rate that overflows the weights: every run is recorded as diverged and the
    // command still succeeds with its summary.
    let bad = tmp.path().join("bad");
    let mut args = vec![
        "compare",
        "--epochs",
        "1",
        "--k",
        "1",
        "--methods",
        "bp,fr",
        "--lr",
        "1e30",
        "--out",
        bad.to_str().unwrap(),
    ];
    args.extend(common);
    let (ok, o, e) = featreplay(&args);
    assert!(ok, "{o}{e}");
    let md = std::fs::read_to_string(bad.join("summary.md")).unwrap();
    for m in ["bp", "fr"] {
        assert!(md.lines().any(|l| l.starts_with(&format!("| {m} | 1 | **diverged** in epoch 1"))), "{m}: {md}");
    }
}

#[test]
fn dni_resumes_exactly_and_ddg_refuses_to_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let args = |out: &Path, epochs: &str, algo: &str| {
        let mut a = tiny(out, epochs);
        a.extend(["--algo", algo, "--splits", "2"].iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| featreplay(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let full = tmp.path().join("full");
    let (ok, o, e) = run(args(&full, "2", "dni"));
    assert!(ok, "{o}{e}");
    let part = tmp.path().join("part");
    let (ok, o, e) = run(args(&part, "1", "dni"));
    assert!(ok, "{o}{e}");
    let (ok, o, e) = featreplay(&["train", "--resume", part.to_str().unwrap(), "--epochs", "2", "--quiet"]);
    assert!(ok, "{o}{e}");
    for (a, b) in metrics(&full).iter().zip(&metrics(&part)) {
        assert_eq!(learning(a), learning(b), "resumed DNI run differs from the uninterrupted one");
    }

    let ddg = tmp.path().join("ddg");
    let (ok, o, e) = run(args(&ddg, "1", "ddg"));
    assert!(ok, "{o}{e}");
    let before = std::fs::read(ddg.join("checkpoint.safetensors")).unwrap();
    let (ok, _, e) = featreplay(&["train", "--resume", ddg.to_str().unwrap(), "--epochs", "2", "--quiet"]);
    assert!(!ok && e.contains("a DDG run cannot be resumed") && e.trim_end().lines().count() == 1, "{e}");
    assert_eq!(std::fs::read(ddg.join("checkpoint.safetensors")).unwrap(), before, "the checkpoint is untouched");
}

#[test]
fn reference_preset_sets_each_choice_and_each_is_its_own_flag() {
    let tmp = tempfile::tempdir().unwrap();
    // 250 images in batches of 32: seven full batches and one of 26.
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut a = tiny(&out, "1");
        a.retain(|s| s != "256");
        a.insert(a.iter().position(|s| s == "--train-subset").unwrap() + 1, "250".into());
        a.extend(["--algo", "fr", "--splits", "2"].iter().chain(extra).map(|s| s.to_string()));
        let (ok, o, e) = featreplay(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "{name}: {o}{e}");
        let m = metrics(&out);
        (out, m[0].clone())
    };
    let (reference, r) = run("reference", &["--reference"]);
    let (cfg, _) = featreplay::train::run::checkpoint_config(&reference).unwrap();
    assert_eq!(cfg.fr_bn_update, featreplay::train::fr::BnUpdate::Both);
    assert_eq!(cfg.optim.first_stage_lr_scale, 2.0);
    assert_eq!(cfg.shortcut_pad, featreplay::kernels::shortcut::ChannelPad::After);
    assert_eq!(cfg.last_batch, featreplay::data::LastBatch::Pad);
    assert!(cfg.is_reference());
    assert_eq!(r["batch_losses"].as_array().unwrap().len(), 8);
    // The same four choices as separate flags give the same run, bit for bit.
    let (_, flags) = run(
        "flags",
        &["--fr-bn-update", "both", "--first-module-lr-scale", "2", "--shortcut-pad", "after", "--last-batch", "pad"],
    );
    assert_eq!(learning(&r), learning(&flags));
    assert_eq!(r["batch_losses"], flags["batch_losses"]);
    // Each choice changes the run on its own.
    let (_, base) = run("base", &[]);
    let (_, after) = run("after", &["--shortcut-pad", "after"]);
    let (_, pad) = run("pad", &["--last-batch", "pad"]);
    let (_, drop) = run("drop", &["--last-batch", "drop"]);
    let losses = |v: &Value| v["batch_losses"].as_array().unwrap().clone();
    assert_eq!(losses(&base).len(), 8);
    assert_eq!(losses(&drop).len(), 7);
    assert_ne!(losses(&base), losses(&after), "the shortcut layout changed nothing");
    // Padding changes only the last batch: the first seven are the same batches.
    assert_eq!(losses(&base)[..7], losses(&pad)[..7]);
    assert_ne!(losses(&base)[7], losses(&pad)[7]);
    assert_eq!(losses(&base)[..7], losses(&drop)[..7]);
    // eval reads the layout from the checkpoint; a resumed run keeps it.
    let (ok, o, e) = featreplay(&["eval", reference.to_str().unwrap()]);
    assert!(ok, "{o}{e}");
    let (ok, _, e) = featreplay(&["train", "--resume", reference.to_str().unwrap(), "--shortcut-pad", "both"]);
    assert!(!ok && e.contains("--shortcut-pad both conflicts with the checkpoint"), "{e}");
    let (ok, _, e) = featreplay(&["train", "--shortcut-pad", "left", "--quiet"]);
    assert!(!ok && e.contains("choose both or after"), "{e}");
    let (ok, _, e) = featreplay(&["train", "--last-batch", "drop", "--batch-size", "300", "--train-subset", "250"]);
    assert!(!ok && e.contains("leaves no batch of the 250 training images"), "{e}");
}
