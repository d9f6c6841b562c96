//! Checkpoints a PyTorch user can use both ways: the model tensors are exactly the
//! `state_dict()` of the CIFAR ResNet most PyTorch users have (names, shapes and dtypes
//! against `tests/fixtures/pytorch_resnet20_state_dict.json`, which
//! `examples/pytorch_interop.py fixture` regenerates), the training state sits under
//! `optimizer.` and `training.`, a plain state_dict (no metadata, no optimiser state, int64
//! buffers) is evaluated and trained from, format-1 checkpoints still load, and `predict`
//! gives per-image top-k classes consistent with `eval`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use featreplay::checkpoint;
use process::{fails_with_all, succeeds};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::Value;

#[path = "common/process.rs"]
mod process;

/// A ResNet-8 trained for one epoch on 256 embedded images (evaluated on 64).
fn trained(dir: &Path, extra: &[&str]) -> PathBuf {
    let out = dir.join("run");
    let mut a = vec![
        "train",
        "--depth",
        "8",
        "--train-subset",
        "256",
        "--test-subset",
        "64",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    a.extend(extra);
    succeeds(&a);
    out
}

/// The model tensors of a checkpoint (not `optimizer.` / `training.`): name -> (shape, dtype).
fn model_tensors(ck: &checkpoint::Checkpoint) -> HashMap<String, (Vec<usize>, &'static str)> {
    let keep = |n: &str| !n.starts_with("optimizer.") && !n.starts_with("training.");
    let mut m: HashMap<String, (Vec<usize>, &'static str)> =
        ck.tensors.iter().filter(|t| keep(&t.name)).map(|t| (t.name.clone(), (t.shape.clone(), "float32"))).collect();
    m.extend(ck.int_tensors.iter().filter(|t| keep(&t.name)).map(|t| (t.name.clone(), (t.shape.clone(), "int64"))));
    m
}

/// Writes `tensors` as a plain safetensors file with no metadata, as
/// `safetensors.torch.save_file(model.state_dict(), path)` does.
fn write_plain(path: &Path, ck: &checkpoint::Checkpoint, rename: impl Fn(&str) -> Option<String>) {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for t in &ck.tensors {
        if let Some(n) = rename(&t.name) {
            owned.push((n, Dtype::F32, t.shape.clone(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect()));
        }
    }
    for t in &ck.int_tensors {
        if let Some(n) = rename(&t.name) {
            owned.push((n, Dtype::I64, t.shape.clone(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect()));
        }
    }
    let views: Vec<(String, TensorView)> =
        owned.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn model_only(n: &str) -> Option<String> {
    (!n.starts_with("optimizer.") && !n.starts_with("training.")).then(|| n.to_string())
}

/// The numbers of an `eval` line: (images, loss, top-1).
fn eval_numbers(line: &str) -> (String, String, String) {
    let after = |k: &str| line.split(k).nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    let images = line.split(" images)").next().unwrap().rsplit('(').next().unwrap().to_string();
    (images, after("loss "), after("top-1 "))
}

#[test]
fn resnet20_tensors_are_pytorchs_state_dict() {
    // A ResNet-20 on 3x32x32 images of 10 classes, as CIFAR-10's: from an image folder.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    for split in ["train", "test"] {
        for c in 0..10u8 {
            let dir = data.join(split).join(format!("class{c}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..2u8 {
                let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([c * 20, i * 50 + x as u8, y as u8 * 3]));
                img.save(dir.join(format!("{i}.png"))).unwrap();
            }
        }
    }
    let out = tmp.path().join("run");
    let d = data.to_str().unwrap();
    succeeds(&[
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        d,
        "--batch-size",
        "10",
        "--epochs",
        "1",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    let ck = checkpoint::load(&out).unwrap();
    let ours = model_tensors(&ck);
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string("tests/fixtures/pytorch_resnet20_state_dict.json").unwrap())
            .unwrap();
    let theirs: HashMap<String, (Vec<usize>, &str)> = fixture["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let shape = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            (t["name"].as_str().unwrap().to_string(), (shape, t["dtype"].as_str().unwrap()))
        })
        .collect();
    assert_eq!(theirs.len(), 116, "the fixture holds ResNet-20's state_dict");
    let mut missing: Vec<&String> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
    let mut extra: Vec<&String> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
    missing.sort();
    extra.sort();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, unexpected {extra:?}");
    for (name, (shape, dtype)) in &theirs {
        assert_eq!(&ours[name].0, shape, "{name}");
        assert_eq!(ours[name].1, *dtype, "{name}");
    }
    // Everything else is training state under the two prefixes.
    assert!(ck.names().all(|n| theirs.contains_key(n) || n.starts_with("optimizer.") || n.starts_with("training.")));
    // One running-statistics update per iteration: 2 batches.
    assert_eq!(ck.int_tensors.iter().find(|t| t.name == "bn1.num_batches_tracked").unwrap().data, vec![2]);
    // The metadata describes the data.
    let data = &ck.meta.extra["data"];
    assert_eq!(data["input"], serde_json::json!([3, 32, 32]));
    assert_eq!(data["class_names"][3], "class3");
}

#[test]
fn a_plain_state_dict_evaluates_trains_and_reports_what_differs() {
    let tmp = tempfile::tempdir().unwrap();
    let run = trained(tmp.path(), &[]);
    let ck = checkpoint::load(&run).unwrap();
    let data = &ck.meta.extra["data"];
    let (mean, std) = (data["mean"][0].as_f64().unwrap().to_string(), data["std"][0].as_f64().unwrap().to_string());
    let plain = tmp.path().join("plain.safetensors");
    write_plain(&plain, &ck, model_only);
    let p = plain.to_str().unwrap();
    let base = ["--arch", "resnet", "--depth", "8", "--dataset", "embedded", "--test-subset", "64"];
    let mut a = vec!["eval", p];
    a.extend(base);
    a.extend(["--mean", &mean, "--std", &std]);
    let from_plain = succeeds(&a);
    assert!(from_plain.contains("(plain state_dict)"), "{from_plain}");
    let from_ck = succeeds(&["eval", run.to_str().unwrap()]);
    assert_eq!(eval_numbers(&from_plain), eval_numbers(&from_ck), "{from_plain} vs {from_ck}");

    // Without --mean/--std the dataset's own statistics apply (the embedded set's, over its
    // 4,000 training images, not the run's 256): a different loss.
    let mut a = vec!["eval", p];
    a.extend(base);
    let own = succeeds(&a);
    assert_ne!(eval_numbers(&own).1, eval_numbers(&from_ck).1);

    // Old names, a missing buffer and a wrong shape are listed, as PyTorch's strict load does.
    let renamed = tmp.path().join("renamed.safetensors");
    write_plain(&renamed, &ck, |n| {
        model_only(n).filter(|n| n != "layer1.0.bn1.running_var").map(|n| n.replace("linear.", "fc."))
    });
    let mut a = vec!["eval", renamed.to_str().unwrap()];
    a.extend(base);
    fails_with_all(&a, &["missing 3", "linear.weight", "layer1.0.bn1.running_var", "unexpected 2", "fc.weight"]);
    let mut a = vec!["eval", p, "--arch", "resnet", "--depth", "14", "--dataset", "embedded"];
    a.extend(["--test-subset", "8"]);
    fails_with_all(&a, &["does not fit resnet14", "missing"]);
    // A featreplay checkpoint knows its architecture.
    fails_with_all(&["eval", run.to_str().unwrap(), "--depth", "20"], &["--depth 20", "resnet"]);

    // train --init-from: the run starts from the file's weights (momentum fresh) and says so.
    let tuned = tmp.path().join("tuned");
    succeeds(&[
        "train",
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
        "--lr",
        "1e-9",
        "--decay",
        "0",
        "--quiet",
        "--init-from",
        p,
        "--out",
        tuned.to_str().unwrap(),
    ]);
    let t = checkpoint::load(&tuned).unwrap();
    assert!(t.meta.extra["init_from"].as_str().unwrap().contains("plain state_dict"), "{}", t.meta.extra);
    let before = ck.get("layer2.0.conv1.weight").unwrap();
    let after = t.get("layer2.0.conv1.weight").unwrap();
    let moved = before.data.iter().zip(&after.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(moved < 1e-6, "at lr 1e-9 the weights stay those of the file: moved {moved}");
    // --init-from refuses a model of another shape before training.
    fails_with_all(
        &["train", "--depth", "14", "--quiet", "--init-from", p, "--out", tmp.path().join("bad").to_str().unwrap()],
        &["does not fit resnet14"],
    );
}

#[test]
fn format_1_checkpoints_still_load() {
    let tmp = tempfile::tempdir().unwrap();
    let run = trained(tmp.path(), &["--algo", "fr", "--splits", "2"]);
    let ck = checkpoint::load(&run).unwrap();
    // Rewrite it as featreplay 0.1 wrote version 1: the classifier `fc`, the pipeline state
    // under `pipeline.`, no num_batches_tracked, no checksum.
    let old = tmp.path().join("old");
    std::fs::create_dir_all(&old).unwrap();
    let mut meta = serde_json::to_value(&ck.meta).unwrap();
    meta["format_version"] = serde_json::json!(1);
    meta.as_object_mut().unwrap().remove("checksum");
    let mut views = Vec::new();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = ck
        .tensors
        .iter()
        .map(|t| {
            let n = t.name.replace("linear.", "fc.").replace("training.pipeline.", "pipeline.");
            (n, t.shape.clone(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        })
        .collect();
    for (n, s, b) in &bytes {
        views.push((n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()));
    }
    let info = HashMap::from([("featreplay".to_string(), meta.to_string()), ("format".to_string(), "pt".to_string())]);
    std::fs::write(old.join("checkpoint.safetensors"), safetensors::serialize(views, Some(info)).unwrap()).unwrap();
    let a = succeeds(&["eval", old.to_str().unwrap()]);
    let b = succeeds(&["eval", run.to_str().unwrap()]);
    assert_eq!(eval_numbers(&a), eval_numbers(&b), "{a} vs {b}");
    // And it resumes: the next checkpoint is version 2 with today's names.
    std::fs::copy(run.join("metrics.jsonl"), old.join("metrics.jsonl")).unwrap();
    succeeds(&["train", "--resume", old.to_str().unwrap(), "--epochs", "2", "--quiet"]);
    let new = checkpoint::load(&old).unwrap();
    assert_eq!(new.meta.format_version, 2);
    assert!(new.get("linear.weight").is_some() && new.names().any(|n| n.starts_with("training.pipeline.")));
    assert!(new.int_tensors.iter().any(|t| t.name == "bn1.num_batches_tracked"));
}

#[test]
fn predict_gives_top_k_per_image_consistent_with_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let run = trained(tmp.path(), &[]);
    let r = run.to_str().unwrap();
    let csv = succeeds(&["predict", r, "--top-k", "3"]);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "image,label,class_1,name_1,prob_1,class_2,name_2,prob_2,class_3,name_3,prob_3");
    assert_eq!(lines.len(), 65, "a header and the run's 64 test images");
    let mut correct = 0;
    for l in &lines[1..] {
        let f: Vec<&str> = l.split(',').collect();
        let p: Vec<f64> = [4, 7, 10].iter().map(|&i| f[i].parse().unwrap()).collect();
        assert!(p[0] >= p[1] && p[1] >= p[2] && p.iter().sum::<f64>() <= 1.0 + 1e-6, "{l}");
        correct += (f[1] == f[2]) as usize;
    }
    let eval = succeeds(&["eval", r]);
    let top1: f64 = eval_numbers(&eval).2.trim_end_matches('%').parse().unwrap();
    assert!((100.0 * correct as f64 / 64.0 - top1).abs() < 0.01, "predict's top-1 {correct}/64 vs eval's {top1}%");

    // JSON lines, and image files: the same pixels give the same classes.
    let jsonl = succeeds(&["predict", r, "--format", "jsonl", "--test-subset", "3"]);
    let rows: Vec<Value> = jsonl.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["top"].as_array().unwrap().len(), 5);
    let test = featreplay::data::embedded::load_embedded(featreplay::data::Split::Test).unwrap();
    let mut files = Vec::new();
    for i in 0..3 {
        let f = tmp.path().join(format!("img{i}.png"));
        image::GrayImage::from_raw(28, 28, test.image(i).to_vec()).unwrap().save(&f).unwrap();
        files.push(f.to_str().unwrap().to_string());
    }
    let mut a = vec!["predict", r, "--format", "jsonl", "--images"];
    a.extend(files.iter().map(String::as_str));
    let out = tmp.path().join("pred.jsonl");
    a.extend(["--output", out.to_str().unwrap()]);
    succeeds(&a);
    let from_files: Vec<Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (x, y) in rows.iter().zip(&from_files) {
        assert_eq!(x["top"], y["top"], "{x} vs {y}");
        assert!(y["label"].is_null() && y["image"].as_str().unwrap().ends_with(".png"));
    }
    fails_with_all(&["predict", r, "--images", "/nonexistent.png"], &["/nonexistent.png"]);
    fails_with_all(&["predict", r, "--format", "xml"], &["--format xml"]);
}
