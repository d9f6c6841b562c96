//! `featreplay::checkpoint`: round trips, atomic overwrites, simulated crashes and the errors
//! for every kind of bad file. Host-only and fast (no GPU).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::Path;

use featreplay::checkpoint::{
    self, momentum_name, Checkpoint, CheckpointMeta, CrashPoint, NamedTensor, FORMAT_VERSION, JSON_FILE, METADATA_KEY,
    SAFETENSORS_FILE,
};
use featreplay::Error;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

/// Deterministic f32 values from arbitrary bit patterns (NaN payloads, subnormals, infinities
/// and both zeros included), to check that values come back bit for bit.
fn bit_patterns(n: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            f32::from_bits(state)
        })
        .collect()
}

fn meta(epoch: usize) -> CheckpointMeta {
    let mut meta = CheckpointMeta::new(
        epoch,
        (1u64 << 40) + epoch as u64,
        u64::MAX - 7,
        json!({
            "arch": "resnet20",
            "method": "features_replay",
            "lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "batch_size": 128,
            "milestones": [150, 225],
            "nested": {"k": 4, "flag": true, "none": null},
        }),
    );
    meta.best_top1 = Some(0.9123 + epoch as f64 * 1e-3);
    meta.rng = Some(json!({"kind": "none", "state": [1, 2, 3]}));
    meta.extra["note"] = json!(format!("epoch {epoch}"));
    meta
}

/// A small ResNet-like checkpoint; `epoch` changes the values and the metadata.
fn sample(epoch: usize) -> Checkpoint {
    let seed = epoch as u32 * 1000;
    let mut ckpt = Checkpoint::new(meta(epoch));
    ckpt.push("conv1.weight", &[16, 3, 3, 3], bit_patterns(16 * 27, seed + 1)).unwrap();
    ckpt.push("layer1.0.bn1.running_mean", &[16], bit_patterns(16, seed + 2)).unwrap();
    ckpt.push("layer1.0.bn1.running_var", &[16], vec![1.0; 16]).unwrap();
    ckpt.push("layer1.0.bn1.num_batches_tracked_like_scalar", &[], vec![epoch as f32]).unwrap();
    ckpt.push("fc.weight", &[10, 64], bit_patterns(640, seed + 3)).unwrap();
    ckpt.push("empty.buffer", &[0, 4], vec![]).unwrap();
    let special = vec![0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE / 2.0, f32::MAX, 1e-45];
    ckpt.push("aaa.special", &[2, 4], special).unwrap();
    ckpt.push(momentum_name("conv1.weight"), &[16, 3, 3, 3], bit_patterns(16 * 27, seed + 4)).unwrap();
    ckpt
}

fn bits(data: &[f32]) -> Vec<u32> {
    data.iter().map(|v| v.to_bits()).collect()
}

/// Same metadata, same names in the same order, same shapes and bit-identical values.
fn assert_same(got: &Checkpoint, want: &Checkpoint) {
    assert_eq!(got.meta, want.meta);
    assert_eq!(got.names().collect::<Vec<_>>(), want.names().collect::<Vec<_>>());
    for (g, w) in got.tensors.iter().zip(&want.tensors) {
        assert_eq!(g.shape, w.shape, "shape of {}", g.name);
        assert_eq!(bits(&g.data), bits(&w.data), "values of {}", g.name);
    }
}

fn dir_listing(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
}

fn final_files() -> BTreeSet<String> {
    [SAFETENSORS_FILE, JSON_FILE].iter().map(|s| s.to_string()).collect()
}

fn json_meta(dir: &Path) -> CheckpointMeta {
    serde_json::from_str(&fs::read_to_string(dir.join(JSON_FILE)).unwrap()).unwrap()
}

/// `result` is an `Error::Data` naming `file` whose message contains every one of `needles`.
#[track_caller]
fn expect_data_error<T: std::fmt::Debug>(result: featreplay::Result<T>, file: &Path, needles: &[&str]) -> String {
    match result {
        Err(Error::Data { path, message }) => {
            assert_eq!(path, file.display().to_string(), "error names the wrong file: {message}");
            for needle in needles {
                assert!(message.contains(needle), "message {message:?} does not mention {needle:?}");
            }
            message
        }
        other => panic!("expected Error::Data for {}, got {other:?}", file.display()),
    }
}

/// A safetensors file written by the safetensors crate directly.
fn write_raw(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)], metadata: Option<HashMap<String, String>>) {
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| (*name, TensorView::new(*dtype, shape.clone(), data).unwrap()))
        .collect();
    fs::write(path, safetensors::serialize(views, metadata).unwrap()).unwrap();
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn featreplay_metadata(json: String) -> Option<HashMap<String, String>> {
    Some(HashMap::from([(METADATA_KEY.to_string(), json)]))
}

#[test]
fn round_trip_is_bit_exact_with_metadata_and_order() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = sample(3);
    assert!(!ckpt.all_finite());
    let path = checkpoint::save(dir.path(), &ckpt).unwrap();
    assert_eq!(path, dir.path().join(SAFETENSORS_FILE));
    assert_eq!(dir_listing(dir.path()), final_files());

    // By directory and by file: the same checkpoint, tensors in the order they were saved.
    let by_dir = checkpoint::load(dir.path()).unwrap();
    assert_same(&by_dir, &ckpt);
    assert_same(&checkpoint::load(&path).unwrap(), &ckpt);
    assert_eq!(by_dir.meta.format_version, FORMAT_VERSION);
    assert_eq!(by_dir.meta.seed, u64::MAX - 7);
    assert_eq!(by_dir.meta.iteration, (1u64 << 40) + 3);
    assert_eq!(by_dir.meta.config["lr"], json!(0.1));

    // checkpoint.json is a pretty-printed copy of the metadata; load_meta reads the header only.
    let text = fs::read_to_string(dir.path().join(JSON_FILE)).unwrap();
    assert!(text.contains("\n  \"epoch\": 3"), "{text}");
    assert_eq!(json_meta(dir.path()), ckpt.meta);
    assert_eq!(checkpoint::load_meta(dir.path()).unwrap(), ckpt.meta);

    // A copy under another name loads too.
    let copy = dir.path().join("epoch3.safetensors");
    fs::copy(&path, &copy).unwrap();
    assert_same(&checkpoint::load(&copy).unwrap(), &ckpt);
}

#[test]
fn file_is_plain_safetensors_with_metadata_in_header() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = sample(1);
    let path = checkpoint::save(dir.path(), &ckpt).unwrap();
    let bytes = fs::read(&path).unwrap();

    // Parse the layout by hand, as any safetensors reader (PyTorch's included) does.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(header_len % 8, 0);
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    let metadata = header["__metadata__"].as_object().unwrap();
    assert_eq!(metadata["format"], json!("pt"));
    let meta: CheckpointMeta = serde_json::from_str(metadata[METADATA_KEY].as_str().unwrap()).unwrap();
    assert_eq!(meta, ckpt.meta);
    let mut covered = 0;
    for t in &ckpt.tensors {
        let entry = &header[t.name.as_str()];
        assert_eq!(entry["dtype"], json!("F32"), "{}", t.name);
        assert_eq!(entry["shape"], json!(t.shape), "{}", t.name);
        let (start, end) = (entry["data_offsets"][0].as_u64().unwrap(), entry["data_offsets"][1].as_u64().unwrap());
        assert_eq!(&data[start as usize..end as usize], f32_bytes(&t.data).as_slice(), "{}", t.name);
        covered += end - start;
    }
    assert_eq!(covered as usize, data.len());

    // An independent consumer (candle) reads every tensor.
    let loaded = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    assert_eq!(loaded.len(), ckpt.tensors.len());
    let w = &loaded["layer1.0.bn1.running_mean"];
    assert_eq!(w.dims(), &[16]);
    assert_eq!(bits(&w.to_vec1::<f32>().unwrap()), bits(&ckpt.get("layer1.0.bn1.running_mean").unwrap().data));
    assert_eq!(loaded[&momentum_name("conv1.weight")].dims(), &[16, 3, 3, 3]);
}

#[test]
fn overwrite_keeps_only_the_latest() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(dir.path(), &sample(1)).unwrap();
    let mut second = sample(2);
    second.take("fc.weight", &[10, 64]).unwrap();
    second.push("fc2.weight", &[5], vec![1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    checkpoint::save(dir.path(), &second).unwrap();

    let loaded = checkpoint::load(dir.path()).unwrap();
    assert_same(&loaded, &second);
    assert!(loaded.get("fc.weight").is_none());
    assert_eq!(json_meta(dir.path()), second.meta);
    assert_eq!(dir_listing(dir.path()), final_files());
}

#[test]
fn crash_mid_save_leaves_previous_checkpoint_loadable() {
    for at in [CrashPoint::TornTempFile, CrashPoint::BeforeRename] {
        let dir = tempfile::tempdir().unwrap();
        let previous = sample(4);
        checkpoint::save(dir.path(), &previous).unwrap();
        checkpoint::save_interrupted(dir.path(), &sample(5), at).unwrap();

        // The crash left a temporary file behind; the checkpoint is untouched.
        let listing = dir_listing(dir.path());
        assert_eq!(listing.len(), 3, "{at:?}: {listing:?}");
        assert_same(&checkpoint::load(dir.path()).unwrap(), &previous);
        assert_eq!(json_meta(dir.path()), previous.meta, "{at:?}");

        // The next save replaces the checkpoint and deletes the stale temporary file.
        let next = sample(6);
        checkpoint::save(dir.path(), &next).unwrap();
        assert_same(&checkpoint::load(dir.path()).unwrap(), &next);
        assert_eq!(dir_listing(dir.path()), final_files(), "{at:?}");
    }
}

#[test]
fn crash_between_files_loads_new_safetensors_and_ignores_stale_json() {
    let dir = tempfile::tempdir().unwrap();
    let previous = sample(7);
    let new = sample(8);
    checkpoint::save(dir.path(), &previous).unwrap();
    checkpoint::save_interrupted(dir.path(), &new, CrashPoint::BetweenFiles).unwrap();
    assert_eq!(json_meta(dir.path()), previous.meta);
    assert_same(&checkpoint::load(dir.path()).unwrap(), &new);

    // A checkpoint.json edited by hand (or simply wrong) is ignored as well.
    fs::write(dir.path().join(JSON_FILE), "{\"epoch\": 999}").unwrap();
    assert_same(&checkpoint::load(dir.path()).unwrap(), &new);
    fs::remove_file(dir.path().join(JSON_FILE)).unwrap();
    assert_same(&checkpoint::load(dir.path()).unwrap(), &new);
}

#[test]
fn stale_temp_files_are_ignored_then_cleaned_and_other_files_kept() {
    let dir = tempfile::tempdir().unwrap();
    let previous = sample(1);
    checkpoint::save(dir.path(), &previous).unwrap();
    let stale = [".checkpoint.safetensors.tmp-999999-0", ".checkpoint.json.tmp-999999-1"];
    for name in stale {
        fs::write(dir.path().join(name), b"half-written garbage").unwrap();
    }
    let keep = ["notes.txt", ".checkpoint.safetensors.bak", "checkpoint.safetensors.tmp-not-ours"];
    for name in keep {
        fs::write(dir.path().join(name), b"user file").unwrap();
    }
    assert_same(&checkpoint::load(dir.path()).unwrap(), &previous);

    checkpoint::save(dir.path(), &sample(2)).unwrap();
    let mut want = final_files();
    want.extend(keep.iter().map(|s| s.to_string()));
    assert_eq!(dir_listing(dir.path()), want);
}

#[test]
fn save_creates_directories() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("runs").join("resnet20");
    let ckpt = sample(0);
    checkpoint::save(&nested, &ckpt).unwrap();
    assert_same(&checkpoint::load(&nested).unwrap(), &ckpt);
}

#[test]
fn truncated_files_are_data_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = checkpoint::save(dir.path(), &sample(2)).unwrap();
    let bytes = fs::read(&path).unwrap();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let cuts = [0, 3, 8, 9, 100, header_end - 1, header_end, header_end + 5, bytes.len() / 2 + 1, bytes.len() - 1];
    for cut in cuts {
        fs::write(&path, &bytes[..cut]).unwrap();
        let message = expect_data_error(checkpoint::load(dir.path()), &path, &[]);
        assert!(message.contains("truncated") || message.contains("corrupt"), "cut {cut}: {message}");
    }
    // Trailing bytes after the last tensor are corruption as well.
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 4]);
    fs::write(&path, &longer).unwrap();
    expect_data_error(checkpoint::load(&path), &path, &["corrupt"]);
}

#[test]
fn garbage_files_are_data_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.safetensors");
    let mut small_header = 16u64.to_le_bytes().to_vec();
    small_header.extend_from_slice(b"this is not json");
    let garbage: [&[u8]; 4] = [
        b"hello, this is definitely not a checkpoint\n",
        &small_header,
        b"\x08\x00\x00\x00\x00\x00\x00\x00[1,2,3] ",
        &[0xff; 64],
    ];
    for bytes in garbage {
        fs::write(&path, bytes).unwrap();
        expect_data_error(checkpoint::load(&path), &path, &["safetensors"]);
        expect_data_error(checkpoint::load_meta(&path), &path, &[]);
    }
    // Passing the JSON copy instead of the checkpoint is a clear error too.
    checkpoint::save(dir.path(), &sample(1)).unwrap();
    let json = dir.path().join(JSON_FILE);
    expect_data_error(checkpoint::load(&json), &json, &["not a safetensors file"]);
}

#[test]
fn missing_files_are_data_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let expected = dir.path().join(SAFETENSORS_FILE);
    expect_data_error(checkpoint::load(dir.path()), &expected, &["does not exist"]);
    expect_data_error(checkpoint::load_meta(dir.path()), &expected, &["does not exist"]);
    let nowhere = dir.path().join("no").join("such.safetensors");
    expect_data_error(checkpoint::load(&nowhere), &nowhere, &["does not exist"]);
}

#[test]
fn non_f32_tensors_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f64.safetensors");
    let meta = serde_json::to_string(&meta(1)).unwrap();
    let f64_bytes: Vec<u8> = [1.0f64, 2.0, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    write_raw(
        &path,
        &[("fc.bias", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0])), ("fc.weight", Dtype::F64, vec![3], f64_bytes)],
        featreplay_metadata(meta.clone()),
    );
    expect_data_error(checkpoint::load(&path), &path, &["fc.weight", "F64", "F32"]);

    write_raw(&path, &[("step", Dtype::I64, vec![1], 7i64.to_le_bytes().to_vec())], featreplay_metadata(meta));
    expect_data_error(checkpoint::load(&path), &path, &["step", "I64"]);
}

#[test]
fn missing_or_bad_metadata_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.safetensors");
    let tensor = [("w", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0]))];

    write_raw(&path, &tensor, None);
    expect_data_error(checkpoint::load(&path), &path, &["not a featreplay checkpoint", "__metadata__"]);
    expect_data_error(checkpoint::load_meta(&path), &path, &["not a featreplay checkpoint"]);

    write_raw(&path, &tensor, Some(HashMap::from([("format".to_string(), "pt".to_string())])));
    expect_data_error(checkpoint::load(&path), &path, &["not a featreplay checkpoint", METADATA_KEY]);

    write_raw(&path, &tensor, featreplay_metadata("{\"epoch\": 1,".to_string()));
    expect_data_error(checkpoint::load(&path), &path, &["not valid JSON"]);

    write_raw(&path, &tensor, featreplay_metadata("{\"epoch\": 1}".to_string()));
    expect_data_error(checkpoint::load(&path), &path, &["format_version"]);

    let mut future = serde_json::to_value(meta(1)).unwrap();
    future["format_version"] = json!(FORMAT_VERSION + 1);
    write_raw(&path, &tensor, featreplay_metadata(future.to_string()));
    expect_data_error(checkpoint::load(&path), &path, &["unsupported", "format_version"]);

    let mut incomplete = serde_json::to_value(meta(1)).unwrap();
    incomplete.as_object_mut().unwrap().remove("seed");
    write_raw(&path, &tensor, featreplay_metadata(incomplete.to_string()));
    expect_data_error(checkpoint::load(&path), &path, &["invalid", "seed"]);

    // Optional fields may be absent (older or hand-written files).
    let minimal = json!({"format_version": FORMAT_VERSION, "epoch": 2, "iteration": 10, "seed": 1});
    write_raw(&path, &tensor, featreplay_metadata(minimal.to_string()));
    let loaded = checkpoint::load(&path).unwrap();
    assert_eq!((loaded.meta.epoch, loaded.meta.iteration, loaded.meta.best_top1), (2, 10, None));
    assert_eq!(loaded.get("w").unwrap().data, vec![1.0, 2.0]);
}

#[test]
fn take_checks_names_and_shapes() {
    let mut ckpt = sample(1);
    let n = ckpt.tensors.len();
    let before = ckpt.get("conv1.weight").unwrap().data.clone();

    let err = ckpt.take("conv1.weight", &[16, 3, 7, 7]).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::Data { .. }));
    assert!(message.contains("conv1.weight") && message.contains("[16, 3, 3, 3]") && message.contains("[16, 3, 7, 7]"));
    assert_eq!(ckpt.tensors.len(), n, "a failed take leaves the tensor in place");

    let message = ckpt.take("layer1.0.bn2.running_mean", &[16]).unwrap_err().to_string();
    assert!(
        message.contains("layer1.0.bn2.running_mean") && message.contains("layer1.0.bn1.running_mean"),
        "{message}"
    );

    assert_eq!(bits(&ckpt.take("conv1.weight", &[16, 3, 3, 3]).unwrap()), bits(&before));
    assert!(ckpt.get("conv1.weight").is_none());
    assert!(ckpt.take("conv1.weight", &[16, 3, 3, 3]).is_err());
    assert_eq!(ckpt.take("layer1.0.bn1.num_batches_tracked_like_scalar", &[]).unwrap(), vec![1.0]);
    assert_eq!(ckpt.tensors.len(), n - 2);
}

#[test]
fn finiteness_is_reported_not_enforced() {
    let mut ckpt = Checkpoint::new(meta(0));
    ckpt.push("a", &[2], vec![1.0, 2.0]).unwrap();
    assert!(ckpt.all_finite());
    ckpt.push("b", &[3], vec![0.0, f32::NAN, 1.0]).unwrap();
    assert!(!ckpt.all_finite());
    assert_eq!(ckpt.first_non_finite(), Some(("b", 1)));

    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(dir.path(), &ckpt).unwrap();
    let loaded = checkpoint::load(dir.path()).unwrap();
    assert!(!loaded.all_finite());
    assert!(loaded.get("b").unwrap().data[1].is_nan());
}

#[test]
fn invalid_tensors_are_refused_and_previous_checkpoint_kept() {
    let dir = tempfile::tempdir().unwrap();
    let previous = sample(1);
    let path = checkpoint::save(dir.path(), &previous).unwrap();

    let mut bad = sample(2);
    bad.tensors.push(NamedTensor::new("short", &[2, 3], vec![0.0; 5]));
    expect_data_error(checkpoint::save(dir.path(), &bad), &path, &["short", "5 values", "[2, 3]"]);

    let mut dup = sample(2);
    dup.tensors.push(NamedTensor::new("fc.weight", &[1], vec![0.0]));
    expect_data_error(checkpoint::save(dir.path(), &dup), &path, &["fc.weight", "twice"]);

    for name in ["", "__metadata__"] {
        let mut reserved = sample(2);
        reserved.tensors.push(NamedTensor::new(name, &[1], vec![0.0]));
        expect_data_error(checkpoint::save(dir.path(), &reserved), &path, &[]);
    }

    let mut ckpt = Checkpoint::new(meta(0));
    ckpt.push("x", &[2], vec![0.0, 1.0]).unwrap();
    assert!(ckpt.push("x", &[2], vec![0.0, 1.0]).unwrap_err().to_string().contains("`x`"));
    assert!(ckpt.push("y", &[3], vec![0.0]).unwrap_err().to_string().contains("`y`"));

    assert_same(&checkpoint::load(dir.path()).unwrap(), &previous);
    assert_eq!(dir_listing(dir.path()), final_files());
}

#[test]
fn empty_checkpoint_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::new(CheckpointMeta::new(0, 0, 0, serde_json::Value::Null));
    checkpoint::save(dir.path(), &ckpt).unwrap();
    assert_same(&checkpoint::load(dir.path()).unwrap(), &ckpt);
}
