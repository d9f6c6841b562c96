//! `featreplay::checkpoint`: round trips, atomic overwrites, simulated crashes and the errors
//! for every kind of bad file. Host-only and fast (no GPU).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::Path;

use featreplay::checkpoint::{
    self, momentum_name, Checkpoint, CheckpointMeta, CrashPoint, NamedTensor, CHECKSUM_PREFIX, FORMAT_VERSION,
    JSON_FILE, METADATA_KEY, MOMENTUM_PREFIX, OLDEST_FORMAT_VERSION, SAFETENSORS_FILE,
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

/// The metadata `save` writes for `ckpt`: the given one in the current format version, with
/// the checksum of its tensors.
fn saved_meta(ckpt: &Checkpoint) -> CheckpointMeta {
    CheckpointMeta { format_version: FORMAT_VERSION, checksum: Some(ckpt.checksum()), ..ckpt.meta.clone() }
}

/// Same metadata (as saved), same names in the same order, same shapes and bit-identical values.
fn assert_same(got: &Checkpoint, want: &Checkpoint) {
    assert_eq!(got.meta, saved_meta(want));
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
    assert_eq!(FORMAT_VERSION, 2, "version 2 added the checksum");
    assert_eq!(by_dir.meta.format_version, FORMAT_VERSION);
    assert_eq!(by_dir.meta.seed, u64::MAX - 7);
    assert_eq!(by_dir.meta.iteration, (1u64 << 40) + 3);
    assert_eq!(by_dir.meta.config["lr"], json!(0.1));

    // checkpoint.json is a pretty-printed copy of the metadata; load_meta reads the header only.
    let text = fs::read_to_string(dir.path().join(JSON_FILE)).unwrap();
    assert!(text.contains("\n  \"epoch\": 3"), "{text}");
    assert_eq!(json_meta(dir.path()), saved_meta(&ckpt));
    assert_eq!(checkpoint::load_meta(dir.path()).unwrap(), saved_meta(&ckpt));

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
    assert_eq!(meta, saved_meta(&ckpt));
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
    assert_eq!(json_meta(dir.path()), saved_meta(&second));
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
        assert_eq!(json_meta(dir.path()), saved_meta(&previous), "{at:?}");

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
    assert_eq!(json_meta(dir.path()), saved_meta(&previous));
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
fn tensors_neither_f32_nor_i64_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f64.safetensors");
    // A checksum that cannot match: the dtype is reported first, as the more useful message.
    let meta = serde_json::to_string(&CheckpointMeta { checksum: Some("crc32c:00000000".into()), ..meta(1) }).unwrap();
    let f64_bytes: Vec<u8> = [1.0f64, 2.0, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    write_raw(
        &path,
        &[("fc.bias", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0])), ("fc.weight", Dtype::F64, vec![3], f64_bytes)],
        featreplay_metadata(meta.clone()),
    );
    expect_data_error(checkpoint::load(&path), &path, &["fc.weight", "F64", "F32"]);

    write_raw(&path, &[("half", Dtype::F16, vec![2], vec![0, 60, 0, 64])], featreplay_metadata(meta.clone()));
    expect_data_error(checkpoint::load(&path), &path, &["half", "F16"]);
    // I64 is read (PyTorch's num_batches_tracked): here the checksum is what fails.
    write_raw(&path, &[("step", Dtype::I64, vec![1], 7i64.to_le_bytes().to_vec())], featreplay_metadata(meta));
    expect_data_error(checkpoint::load(&path), &path, &["checksum mismatch"]);
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

    let mut ancient = serde_json::to_value(meta(1)).unwrap();
    ancient["format_version"] = json!(OLDEST_FORMAT_VERSION - 1);
    write_raw(&path, &tensor, featreplay_metadata(ancient.to_string()));
    expect_data_error(checkpoint::load(&path), &path, &["unsupported", "format_version 0", "versions 1 to 2"]);

    // Optional fields may be absent (older or hand-written files; version 1 needs no checksum).
    let minimal = json!({"format_version": 1, "epoch": 2, "iteration": 10, "seed": 1});
    write_raw(&path, &tensor, featreplay_metadata(minimal.to_string()));
    let loaded = checkpoint::load(&path).unwrap();
    assert_eq!((loaded.meta.epoch, loaded.meta.iteration, loaded.meta.best_top1), (2, 10, None));
    assert_eq!(loaded.get("w").unwrap().data, vec![1.0, 2.0]);

    // From version 2 on the checksum is mandatory, in load and load_meta alike.
    let unchecked = json!({"format_version": 2, "epoch": 2, "iteration": 10, "seed": 1});
    write_raw(&path, &tensor, featreplay_metadata(unchecked.to_string()));
    expect_data_error(checkpoint::load(&path), &path, &["format_version 2 requires a checksum"]);
    expect_data_error(checkpoint::load_meta(&path), &path, &["requires a checksum"]);
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

// ---------------------------------------------------------------------------------------------
// Integrity: the checksum, format versions and the messages of `take`.

/// A saved checkpoint file split into its JSON header and its data bytes.
fn split_file(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + header_len]).unwrap(), bytes[8 + header_len..].to_vec())
}

/// Writes a safetensors file from a (possibly edited) header and data, as a hand-editing tool
/// would: the header re-serialised and padded, its length field updated.
fn join_file(path: &Path, header: &serde_json::Value, data: &[u8]) {
    let mut json = serde_json::to_vec(header).unwrap();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(data);
    fs::write(path, bytes).unwrap();
}

/// The featreplay metadata inside a header, as JSON.
fn header_meta(header: &serde_json::Value) -> serde_json::Value {
    serde_json::from_str(header["__metadata__"][METADATA_KEY].as_str().unwrap()).unwrap()
}

fn set_header_meta(header: &mut serde_json::Value, meta: &serde_json::Value) {
    header["__metadata__"][METADATA_KEY] = json!(meta.to_string());
}

#[test]
fn checksum_is_stored_in_the_header_and_the_json_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut ckpt = sample(2);
    let checksum = ckpt.checksum();
    let hex = checksum.strip_prefix(CHECKSUM_PREFIX).unwrap_or_else(|| panic!("{checksum}"));
    assert!(hex.len() == 8 && hex.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{checksum}");

    // Whatever checksum the caller's metadata carries, save stores the tensors' own.
    ckpt.meta.checksum = Some("crc32c:00000000".to_string());
    let path = checkpoint::save(dir.path(), &ckpt).unwrap();
    let (header, _) = split_file(&path);
    assert_eq!(header_meta(&header)["checksum"], json!(checksum));
    assert_eq!(header_meta(&header)["format_version"], json!(FORMAT_VERSION));
    assert_eq!(json_meta(dir.path()).checksum.as_deref(), Some(checksum.as_str()));
    assert_eq!(checkpoint::load(dir.path()).unwrap().meta.checksum.as_deref(), Some(checksum.as_str()));

    // The checksum depends on the values, the names and the shapes.
    let mut other = sample(2);
    other.tensors[0].data[5] = f32::from_bits(other.tensors[0].data[5].to_bits() ^ 1);
    assert_ne!(other.checksum(), checksum);
    let mut renamed = sample(2);
    renamed.tensors[1].name.push('x');
    assert_ne!(renamed.checksum(), checksum);
    let mut reshaped = sample(2);
    reshaped.tensors[0].shape = vec![16, 27];
    assert_ne!(reshaped.checksum(), checksum);
}

#[test]
fn flipped_data_bytes_are_a_checksum_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = checkpoint::save(dir.path(), &sample(3)).unwrap();
    let (header, data) = split_file(&path);
    let stored = header_meta(&header)["checksum"].as_str().unwrap().to_string();

    // 2,000 flipped bytes spread over the data, then a single flipped bit: both caught.
    let mut flipped = data.clone();
    for i in 0..2000 {
        let at = (i * 7919) % flipped.len();
        flipped[at] ^= 0x5a;
    }
    let mut one_bit = data.clone();
    one_bit[data.len() / 3] ^= 0x01;
    for bad in [flipped, one_bit] {
        join_file(&path, &header, &bad);
        let message = expect_data_error(
            checkpoint::load(dir.path()),
            &path,
            &["checksum mismatch: the file is corrupt", &format!("stored {stored}"), "computed crc32c:"],
        );
        assert!(!message.contains('\n'), "{message}");
        // load_meta reads the header only and does not verify the data.
        assert_eq!(checkpoint::load_meta(dir.path()).unwrap().checksum.as_deref(), Some(stored.as_str()));
    }

    // The untouched bytes load again.
    join_file(&path, &header, &data);
    assert_same(&checkpoint::load(dir.path()).unwrap(), &sample(3));
}

#[test]
fn swapped_offsets_of_same_shape_tensors_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = checkpoint::save(dir.path(), &sample(1)).unwrap();
    let (mut header, data) = split_file(&path);
    let (a, b) = ("conv1.weight".to_string(), momentum_name("conv1.weight"));
    assert_eq!(header[&a]["shape"], header[&b]["shape"]);
    let offsets_a = header[&a]["data_offsets"].clone();
    header[&a]["data_offsets"] = header[&b]["data_offsets"].clone();
    header[&b]["data_offsets"] = offsets_a;
    join_file(&path, &header, &data);
    expect_data_error(checkpoint::load(&path), &path, &["checksum mismatch"]);

    // Without the checksum (as a version 1 file) the same edit loads silently, the two
    // tensors' values exchanged: safetensors alone cannot see it.
    let mut v1 = header_meta(&header);
    v1["format_version"] = json!(1);
    v1.as_object_mut().unwrap().remove("checksum");
    set_header_meta(&mut header, &v1);
    join_file(&path, &header, &data);
    let loaded = checkpoint::load(&path).unwrap();
    let original = sample(1);
    assert_eq!(bits(&loaded.get(&a).unwrap().data), bits(&original.get(&b).unwrap().data));
}

#[test]
fn edited_header_shapes_and_checksums_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = checkpoint::save(dir.path(), &sample(1)).unwrap();
    let (header, data) = split_file(&path);

    // The same number of values in another shape: only the checksum can tell.
    let mut reshaped = header.clone();
    reshaped["conv1.weight"]["shape"] = json!([16, 27]);
    join_file(&path, &reshaped, &data);
    expect_data_error(checkpoint::load(&path), &path, &["checksum mismatch"]);

    // A shape that no longer matches the offsets: safetensors' own check.
    let mut grown = header.clone();
    grown["conv1.weight"]["shape"] = json!([16, 3, 3, 4]);
    join_file(&path, &grown, &data);
    let message = expect_data_error(checkpoint::load(&path), &path, &[]);
    assert!(message.contains("corrupt") || message.contains("checksum"), "{message}");

    // An edited stored checksum, and a malformed one.
    for bogus in ["crc32c:deadbeef", "sha256:abc", ""] {
        let mut meta = header_meta(&header);
        meta["checksum"] = json!(bogus);
        let mut edited = header.clone();
        set_header_meta(&mut edited, &meta);
        join_file(&path, &edited, &data);
        expect_data_error(checkpoint::load(&path), &path, &["checksum mismatch", &format!("stored {bogus},")]);
    }
}

#[test]
fn version_1_files_load_unverified_and_are_saved_as_version_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(SAFETENSORS_FILE);
    // A version 1 file as featreplay wrote it before checksums: metadata without the field.
    let mut v1 = serde_json::to_value(meta(4)).unwrap();
    v1["format_version"] = json!(1);
    assert!(v1.get("checksum").is_none());
    let weight = bit_patterns(12, 9);
    let momentum = vec![0.5; 12];
    let metadata =
        HashMap::from([(METADATA_KEY.to_string(), v1.to_string()), ("format".to_string(), "pt".to_string())]);
    write_raw(
        &path,
        &[
            ("fc.weight", Dtype::F32, vec![3, 4], f32_bytes(&weight)),
            ("optimizer.momentum.fc.weight", Dtype::F32, vec![3, 4], f32_bytes(&momentum)),
        ],
        Some(metadata),
    );

    let meta_only = checkpoint::load_meta(dir.path()).unwrap();
    assert_eq!((meta_only.format_version, meta_only.checksum.clone(), meta_only.epoch), (1, None, 4));
    let loaded = checkpoint::load(dir.path()).unwrap();
    assert_eq!(loaded.meta.format_version, 1);
    assert_eq!(loaded.meta.checksum, None);
    assert_eq!(loaded.meta.config, meta(4).config);
    assert_eq!(bits(&loaded.get("fc.weight").unwrap().data), bits(&weight));
    assert_eq!(loaded.get("optimizer.momentum.fc.weight").unwrap().data, momentum);

    // Saving it again writes the current version with a checksum, verified on the next load.
    checkpoint::save(dir.path(), &loaded).unwrap();
    let again = checkpoint::load(dir.path()).unwrap();
    assert_eq!(again.meta.format_version, FORMAT_VERSION);
    assert_eq!(again.meta.checksum, Some(loaded.checksum()));
    assert_same(&again, &loaded);
}

#[test]
fn missing_tensor_messages_count_the_tensors_loaded() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(dir.path(), &sample(1)).unwrap();
    let mut ckpt = checkpoint::load(dir.path()).unwrap();
    let held = ckpt.tensors.len();
    assert_eq!(ckpt.held_tensors(), held);
    // A model takes everything it knows; the count of the file must not shrink with it.
    let names: Vec<(String, Vec<usize>)> = ckpt.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
    for (name, shape) in &names {
        ckpt.take(name, shape).unwrap();
    }
    assert_eq!(ckpt.held_tensors(), held);
    let message = ckpt.take("layer2.0.conv1.weight", &[32, 16, 3, 3]).unwrap_err().to_string();
    assert!(message.contains(&format!("held {held} tensors when loaded (0 not yet used)")), "{message}");
    assert!(!message.contains("holds 0 tensors"), "{message}");

    // A momentum buffer missing beside others is a mismatch, reported like any other tensor.
    let message = ckpt.take(&momentum_name("fc.weight"), &[10, 64]).unwrap_err().to_string();
    assert!(message.contains("no tensor named") && !message.contains("optimizer state"), "{message}");
}

#[test]
fn missing_momentum_in_a_weights_only_file_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut weights_only = Checkpoint::new(meta(2));
    weights_only.push("conv1.weight", &[4, 3, 3, 3], vec![0.25; 108]).unwrap();
    weights_only.push("fc.weight", &[10, 4], vec![0.5; 40]).unwrap();
    weights_only.push("fc.bias", &[10], vec![0.0; 10]).unwrap();
    checkpoint::save(dir.path(), &weights_only).unwrap();
    let mut ckpt = checkpoint::load(dir.path()).unwrap();
    ckpt.take("conv1.weight", &[4, 3, 3, 3]).unwrap();

    let err = ckpt.take(&momentum_name("conv1.weight"), &[4, 3, 3, 3]).unwrap_err();
    assert!(matches!(err, Error::Data { .. }));
    let message = err.to_string();
    for needle in ["has no optimizer state", "optimizer.momentum.conv1.weight", "3 tensors", "(a weights-only file?)"] {
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }
    assert!(MOMENTUM_PREFIX.starts_with("optimizer.momentum"));
    assert_eq!(ckpt.tensors.len(), 2, "a failed take changes nothing");
}

#[test]
fn non_finite_tensors_are_counted_per_tensor() {
    let mut ckpt = Checkpoint::new(meta(0));
    ckpt.push("a", &[3], vec![1.0, 2.0, 3.0]).unwrap();
    ckpt.push("b", &[4], vec![f32::NAN, 1.0, f32::INFINITY, f32::NEG_INFINITY]).unwrap();
    ckpt.push("c", &[2], vec![0.0, -0.0]).unwrap();
    ckpt.push(momentum_name("b"), &[2], vec![f32::NAN, f32::NAN]).unwrap();
    assert_eq!(ckpt.non_finite_tensors(|_| true), vec![("b", 3), ("optimizer.momentum.b", 2)]);
    assert_eq!(ckpt.non_finite_tensors(|name| !name.starts_with(MOMENTUM_PREFIX)), vec![("b", 3)]);
    assert_eq!(ckpt.non_finite_tensors(|name| name != "b" && !name.starts_with(MOMENTUM_PREFIX)), vec![]);

    // A saved and loaded checkpoint reports the same (values are kept as they are).
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(dir.path(), &ckpt).unwrap();
    let loaded = checkpoint::load(dir.path()).unwrap();
    assert_eq!(loaded.non_finite_tensors(|_| true), vec![("b", 3), ("optimizer.momentum.b", 2)]);
}

#[test]
fn i64_tensors_round_trip_are_checksummed_and_typed() {
    let dir = tempfile::tempdir().unwrap();
    let mut ckpt = sample(3);
    ckpt.push_i64("bn1.num_batches_tracked", &[], vec![1 << 40]).unwrap();
    ckpt.push_i64("steps", &[2], vec![-1, 7]).unwrap();
    assert!(ckpt.push_i64("bn1.num_batches_tracked", &[], vec![0]).is_err(), "duplicate name");
    assert!(ckpt.push_i64("conv1.weight", &[], vec![0]).is_err(), "a name taken by an f32 tensor");
    assert!(ckpt.push_i64("bad", &[3], vec![0]).is_err(), "values must fill the shape");
    let path = checkpoint::save(dir.path(), &ckpt).unwrap();
    let mut loaded = checkpoint::load(dir.path()).unwrap();
    assert_eq!(loaded.int_tensors, ckpt.int_tensors);
    assert!(loaded.names().any(|n| n == "steps"));
    let e = loaded.take("steps", &[2]).unwrap_err().to_string();
    assert!(e.contains("I64 in the checkpoint but F32 is expected"), "{e}");
    let e = loaded.take_i64("conv1.weight", &[16, 3, 3, 3]).unwrap_err().to_string();
    assert!(e.contains("F32 in the checkpoint but I64 is expected"), "{e}");
    assert_eq!(loaded.take_i64("bn1.num_batches_tracked", &[]).unwrap(), vec![1 << 40]);
    // The i64 data is covered by the checksum: its last 8 bytes are the second `steps` value.
    let mut bytes = fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 8] ^= 1;
    fs::write(&path, &bytes).unwrap();
    expect_data_error(checkpoint::load(dir.path()), &path, &["checksum mismatch"]);
    // A plain file (no featreplay metadata) reads through load_weights only.
    let plain = dir.path().join("plain.safetensors");
    let v = 5i64.to_le_bytes();
    let views = vec![("x".to_string(), TensorView::new(Dtype::I64, vec![], &v).unwrap())];
    fs::write(&plain, safetensors::serialize(views, None).unwrap()).unwrap();
    assert!(checkpoint::load(&plain).is_err());
    let w = checkpoint::load_weights(&plain).unwrap();
    assert!(w.is_plain() && w.int_tensors[0].data == vec![5]);
}
