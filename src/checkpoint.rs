//! Checkpoints: named f32 (and i64) tensors plus JSON metadata, in one safetensors file written
//! atomically.
//!
//! # What a checkpoint holds
//!
//! - Named f32 tensors with the names a PyTorch user expects from a `state_dict`: weights
//!   (`conv1.weight`, `layer1.0.conv1.weight`, `linear.bias`), batch-norm running statistics
//!   (`layer1.0.bn1.running_mean`, `layer1.0.bn1.running_var`) and the optimizer's state under
//!   [`MOMENTUM_PREFIX`] (`optimizer.momentum.layer1.0.conv1.weight`, see [`momentum_name`]);
//!   i64 tensors for PyTorch's int64 buffers (`layer1.0.bn1.num_batches_tracked`), stored after
//!   the f32 ones. What the names mean is the trainer's business (`train::run`).
//! - [`CheckpointMeta`]: format version, epoch, iteration (global step), seed, best test
//!   accuracy so far, the full training configuration, an optional RNG-state field and free-form
//!   extra fields. Data order and augmentation are deterministic functions of
//!   (seed, epoch, batch), so seed/epoch/iteration are all a resumed run needs; `rng` is kept for
//!   future use.
//!
//! # Files
//!
//! [`save`] writes two files into a directory:
//!
//! - `checkpoint.safetensors` ([`SAFETENSORS_FILE`]): the checkpoint itself, a standard
//!   safetensors file (tensors `F32` or `I64`, little endian, C order) whose header's `__metadata__`
//!   map holds the metadata as a JSON string under the key `featreplay` ([`METADATA_KEY`]) and
//!   `"format": "pt"`. This file alone is a complete checkpoint; PyTorch opens it with
//!   `safetensors.torch.load_file(path)` and reads the metadata with
//!   `json.loads(safetensors.safe_open(path, "pt").metadata()["featreplay"])`. Tensors are
//!   stored in the order given to [`save`], and [`load`] returns them in that order.
//! - `checkpoint.json` ([`JSON_FILE`]): a pretty-printed copy of the same metadata, for humans
//!   and scripts. It is written after the safetensors file, so after a crash between the two it
//!   may describe the previous checkpoint. [`load`] never reads it: the safetensors file is the
//!   source of truth and a disagreeing `checkpoint.json` is ignored.
//!
//! # Atomicity
//!
//! Each file is written to a hidden temporary file in the same directory
//! (`.checkpoint.safetensors.tmp-<pid>-<n>`), flushed and `sync_all`ed, then renamed over the
//! final name; the directory is synced afterwards where the platform allows it (Unix). A crash
//! at any point therefore leaves either the previous or the new complete
//! `checkpoint.safetensors`, never a torn one. Temporary files left by a crash are ignored by
//! [`load`] and deleted by the next [`save`] into the same directory (so one directory must
//! have one writer at a time).
//!
//! # Integrity
//!
//! safetensors itself only checks that the header's offsets tile the data: flipped bytes in the
//! tensor data, or the offsets of two same-shape tensors swapped in the header, still load. So
//! [`save`] stores a CRC-32C in the metadata ([`CheckpointMeta::checksum`], e.g.
//! `"crc32c:1a2b3c4d"`) computed over every tensor in file order: its name, dtype, shape and
//! data bytes, each length-prefixed (see [`Checkpoint::checksum`]). Because names are hashed
//! together with the data at their position, swapped offsets change the checksum just like
//! flipped data does, and so does a shape edited in the header. [`load`] verifies it on every
//! load. The metadata JSON itself is not covered (the checksum lives inside it); a damaged JSON
//! string almost always fails to parse instead.
//!
//! Format versions: version 2 ([`FORMAT_VERSION`]) files must carry a checksum. Version 1 files
//! (written before checksums existed) still load, with a warning that they are unverified; the
//! next [`save`] writes version 2.
//!
//! # Validation
//!
//! [`load`] reports [`Error::Data`] naming the file for a missing file, a file that is not
//! safetensors, a truncated or corrupt file, a checksum mismatch, a tensor that is neither `F32`
//! nor `I64`,
//! missing or unparsable metadata and an unsupported `format_version`; other I/O failures are
//! [`Error::Io`]. Non-finite values are loaded as they are (a diverged run's checkpoint is still
//! data): see [`Checkpoint::all_finite`] and [`Checkpoint::non_finite_tensors`].

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// The `format_version` of a [`Checkpoint`] read by [`load_weights`] from a plain safetensors
/// file that has no featreplay metadata (never written).
pub const PLAIN_FORMAT_VERSION: u32 = 0;

/// The checkpoint format version this build writes. [`load`] reads this one and every version
/// from [`OLDEST_FORMAT_VERSION`] on.
///
/// History: 1, tensors and metadata; 2, adds the mandatory [`CheckpointMeta::checksum`].
pub const FORMAT_VERSION: u32 = 2;
/// The oldest checkpoint format version [`load`] still reads (version 1: no checksum, loaded
/// unverified with a warning).
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// The algorithm prefix of [`CheckpointMeta::checksum`]: `crc32c:` and 8 lowercase hex digits.
pub const CHECKSUM_PREFIX: &str = "crc32c:";
/// The checkpoint file [`save`] writes into its directory.
pub const SAFETENSORS_FILE: &str = "checkpoint.safetensors";
/// The human-readable copy of the metadata [`save`] writes beside [`SAFETENSORS_FILE`].
pub const JSON_FILE: &str = "checkpoint.json";
/// The key of the metadata JSON in the safetensors header's `__metadata__` map.
pub const METADATA_KEY: &str = "featreplay";
/// The prefix of SGD momentum buffers: `optimizer.momentum.<parameter name>`.
pub const MOMENTUM_PREFIX: &str = "optimizer.momentum.";

/// Marker between the final file name and the unique suffix of a temporary file.
const TEMP_MARKER: &str = ".tmp-";
/// The safetensors crate refuses headers larger than this.
const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Size of the little-endian header-length field that starts every safetensors file.
const LEN_FIELD: usize = 8;

/// The checkpoint name of the SGD momentum buffer of parameter `param`
/// (`layer1.0.conv1.weight` -> `optimizer.momentum.layer1.0.conv1.weight`).
pub fn momentum_name(param: &str) -> String {
    format!("{MOMENTUM_PREFIX}{param}")
}

/// One host-side f32 tensor of a checkpoint, in C (row-major) order.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// PyTorch-style name, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    /// The shape; `[]` is a scalar (one value).
    pub shape: Vec<usize>,
    /// The values; `data.len()` must equal the product of `shape`.
    pub data: Vec<f32>,
}

impl NamedTensor {
    /// A tensor from its parts (checked by [`save`] and [`Checkpoint::push`], not here).
    pub fn new(name: impl Into<String>, shape: &[usize], data: Vec<f32>) -> Self {
        NamedTensor { name: name.into(), shape: shape.to_vec(), data }
    }
}

/// One host-side i64 tensor of a checkpoint (PyTorch's `num_batches_tracked` buffers are
/// int64 scalars), in C order.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedIntTensor {
    pub name: String,
    /// The shape; `[]` is a scalar (one value).
    pub shape: Vec<usize>,
    pub data: Vec<i64>,
}

/// Everything about a checkpoint except its tensors. Stored as JSON in the safetensors header
/// and copied to `checkpoint.json`.
///
/// Floats go through JSON: `best_top1` and numbers inside `config` come back equal for all
/// practical purposes (serde_json's parser may differ from the written value in the last bit in
/// rare cases), and a non-finite `best_top1` is written as `null` and reads back as `None`.
/// `rng: Some(Value::Null)` also reads back as `None`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CheckpointMeta {
    /// The checkpoint format version; [`save`] always writes [`FORMAT_VERSION`] and [`load`]
    /// accepts [`OLDEST_FORMAT_VERSION`] to [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The featreplay version that wrote the checkpoint (informative only).
    #[serde(default)]
    pub featreplay_version: String,
    /// Epochs fully completed when the checkpoint was taken; a resumed run starts with epoch
    /// index `epoch` (0-based).
    pub epoch: usize,
    /// Optimizer steps taken so far (the global step).
    pub iteration: u64,
    /// The run's seed; with `epoch` and `iteration` it determines the data order and
    /// augmentation of the rest of the run.
    pub seed: u64,
    /// Best test top-1 accuracy so far (a fraction or a percentage, as the trainer chooses).
    #[serde(default)]
    pub best_top1: Option<f64>,
    /// The full training configuration, as the trainer serialised it.
    #[serde(default)]
    pub config: Value,
    /// Reserved for an RNG state; featreplay's randomness is a function of (seed, epoch, batch)
    /// so this is `None` today.
    #[serde(default)]
    pub rng: Option<Value>,
    /// Free-form fields (an object by default).
    #[serde(default)]
    pub extra: Value,
    /// The integrity checksum of the tensors, `"crc32c:<8 hex digits>"` (see
    /// [`Checkpoint::checksum`]). [`save`] ignores the value given and stores the checksum of
    /// the tensors it writes; [`load`] returns the stored one after verifying it. `None` in a
    /// checkpoint built in memory and in version 1 files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

impl CheckpointMeta {
    /// Metadata of the current format version with no best accuracy, no RNG state and an
    /// empty `extra` object.
    pub fn new(epoch: usize, iteration: u64, seed: u64, config: Value) -> Self {
        CheckpointMeta {
            format_version: FORMAT_VERSION,
            featreplay_version: env!("CARGO_PKG_VERSION").to_string(),
            epoch,
            iteration,
            seed,
            best_top1: None,
            config,
            rng: None,
            extra: Value::Object(serde_json::Map::new()),
            checksum: None,
        }
    }
}

/// A checkpoint in host memory: metadata and named tensors (in file order after [`load`]).
///
/// Besides its public fields it remembers the names of the tensors [`Checkpoint::take`] removed,
/// so that an error about a missing tensor can say how many tensors the checkpoint held when it
/// was loaded (not how many are left) and whether it had any optimizer state at all. Equality
/// compares `meta` and `tensors` only.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Epoch, iteration, seed, configuration and the rest.
    pub meta: CheckpointMeta,
    /// The f32 tensors, names unique.
    pub tensors: Vec<NamedTensor>,
    /// The i64 tensors (stored after the f32 ones), names unique across both lists.
    pub int_tensors: Vec<NamedIntTensor>,
    /// Names removed by [`Checkpoint::take`], in the order taken.
    taken: Vec<String>,
}

impl PartialEq for Checkpoint {
    /// What was taken is bookkeeping for error messages, not content.
    fn eq(&self, other: &Self) -> bool {
        self.meta == other.meta && self.tensors == other.tensors && self.int_tensors == other.int_tensors
    }
}

impl Checkpoint {
    /// A checkpoint with no tensors yet.
    pub fn new(meta: CheckpointMeta) -> Self {
        Checkpoint { meta, tensors: Vec::new(), int_tensors: Vec::new(), taken: Vec::new() }
    }

    /// Appends an i64 tensor (checked like [`Checkpoint::push`]).
    pub fn push_i64(&mut self, name: impl Into<String>, shape: &[usize], data: Vec<i64>) -> Result<()> {
        let name = name.into();
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel != Some(data.len()) {
            return Err(self
                .error(format!("tensor `{name}` has {} values, but its shape {shape:?} needs {numel:?}", data.len())));
        }
        check_tensor(&NamedTensor::new(name.clone(), &[0], vec![])).map_err(|message| self.error(message))?;
        if self.names().any(|n| n == name) {
            return Err(self.error(format!("tensor `{name}` is already in the checkpoint")));
        }
        self.int_tensors.push(NamedIntTensor { name, shape: shape.to_vec(), data });
        Ok(())
    }

    /// Removes the i64 tensor called `name` and returns its values, checking its shape (see
    /// [`Checkpoint::take`]).
    pub fn take_i64(&mut self, name: &str, expected_shape: &[usize]) -> Result<Vec<i64>> {
        let Some(index) = self.int_tensors.iter().position(|t| t.name == name) else {
            if self.get(name).is_some() {
                return Err(self.error(format!("tensor `{name}` is F32 in the checkpoint but I64 is expected")));
            }
            return Err(self.error(self.missing_message(name)));
        };
        let shape = &self.int_tensors[index].shape;
        if shape.as_slice() != expected_shape {
            return Err(self.error(format!(
                "tensor `{name}` has shape {shape:?} in the checkpoint but {expected_shape:?} is expected"
            )));
        }
        let tensor = self.int_tensors.remove(index);
        self.taken.push(tensor.name);
        Ok(tensor.data)
    }

    /// Whether this came from a plain safetensors file without featreplay's metadata (a
    /// PyTorch `state_dict` saved with `save_file`; see [`load_weights`]).
    pub fn is_plain(&self) -> bool {
        self.meta.format_version == PLAIN_FORMAT_VERSION
    }

    /// Appends a tensor, checking that `data` fills `shape` and that the name is valid and new.
    pub fn push(&mut self, name: impl Into<String>, shape: &[usize], data: Vec<f32>) -> Result<()> {
        let tensor = NamedTensor::new(name, shape, data);
        check_tensor(&tensor).map_err(|message| self.error(message))?;
        if self.get(&tensor.name).is_some() {
            return Err(self.error(format!("tensor `{}` is already in the checkpoint", tensor.name)));
        }
        self.tensors.push(tensor);
        Ok(())
    }

    /// The tensor called `name`, if any.
    pub fn get(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Removes the tensor called `name` and returns its values, after checking that its shape
    /// is exactly `expected_shape` (`[64]` and `[1, 64, 1, 1]` differ). On error (no such
    /// tensor, or another shape) the checkpoint is left unchanged and the error names the
    /// tensor. After taking everything a model needs, [`Checkpoint::names`] lists what the
    /// model did not use.
    pub fn take(&mut self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        let Some(index) = self.tensors.iter().position(|t| t.name == name) else {
            if self.int_tensors.iter().any(|t| t.name == name) {
                return Err(self.error(format!("tensor `{name}` is I64 in the checkpoint but F32 is expected")));
            }
            return Err(self.error(self.missing_message(name)));
        };
        let shape = &self.tensors[index].shape;
        if shape.as_slice() != expected_shape {
            return Err(self.error(format!(
                "tensor `{name}` has shape {shape:?} in the checkpoint but {expected_shape:?} is expected"
            )));
        }
        let tensor = self.tensors.remove(index);
        self.taken.push(tensor.name);
        Ok(tensor.data)
    }

    /// The tensor names, in order (the f32 tensors, then the i64 ones).
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.tensors.iter().map(|t| t.name.as_str()).chain(self.int_tensors.iter().map(|t| t.name.as_str()))
    }

    /// Whether every value of every tensor is finite (no NaN, no infinity).
    pub fn all_finite(&self) -> bool {
        self.first_non_finite().is_none()
    }

    /// The first non-finite value: the tensor's name and the flat index of the value.
    pub fn first_non_finite(&self) -> Option<(&str, usize)> {
        self.tensors.iter().find_map(|t| t.data.iter().position(|v| !v.is_finite()).map(|i| (t.name.as_str(), i)))
    }

    /// Every tensor whose name passes `filter` and that holds NaN or infinite values, with how
    /// many such values it holds, in tensor order. Empty when all of them are finite.
    ///
    /// For callers that refuse to resume from or evaluate a diverged checkpoint: the first entry
    /// names the first offending tensor, e.g.
    /// `"tensor `fc.weight` has 12 non-finite values of 640 (and 3 more tensors)"`. The filter
    /// lets them skip tensors where non-finite values are legitimate or irrelevant, e.g.
    /// `|name| !name.starts_with(MOMENTUM_PREFIX)`.
    pub fn non_finite_tensors(&self, filter: impl Fn(&str) -> bool) -> Vec<(&str, usize)> {
        self.tensors
            .iter()
            .filter(|t| filter(&t.name))
            .filter_map(|t| {
                let count = t.data.iter().filter(|v| !v.is_finite()).count();
                (count > 0).then_some((t.name.as_str(), count))
            })
            .collect()
    }

    /// The number of tensors the checkpoint held before any [`Checkpoint::take`]: for a loaded
    /// checkpoint, the number of tensors in the file.
    pub fn held_tensors(&self) -> usize {
        self.tensors.len() + self.int_tensors.len() + self.taken.len()
    }

    /// The integrity checksum of the tensors as they are now, in order: `"crc32c:<8 hex
    /// digits>"`, the value [`save`] stores in [`CheckpointMeta::checksum`].
    ///
    /// CRC-32C over, for each tensor (the f32 ones, then the i64 ones), the name, the dtype
    /// (`F32` or `I64`), the shape and the data bytes
    /// (little-endian), each preceded by its length (or rank) as a little-endian u64 so
    /// that no two different sequences of tensors hash the same bytes.
    pub fn checksum(&self) -> String {
        let mut crc = TensorCrc::default();
        for t in &self.tensors {
            crc.tensor(&t.name, Dtype::F32, &t.shape, &f32_le_bytes(&t.data));
        }
        for t in &self.int_tensors {
            crc.tensor(&t.name, Dtype::I64, &t.shape, &i64_le_bytes(&t.data));
        }
        crc.value()
    }

    /// An [`Error::Data`] about this in-memory checkpoint (it has no file name).
    fn error(&self, message: String) -> Error {
        Error::Data {
            path: format!("checkpoint (epoch {}, iteration {})", self.meta.epoch, self.meta.iteration),
            message,
        }
    }

    fn missing_message(&self, name: &str) -> String {
        let held = self.held_tensors();
        let left =
            if self.taken.is_empty() { String::new() } else { format!(" ({} not yet used)", self.tensors.len()) };
        // A weights-only file (exported for inference, or written by another tool) is the usual
        // reason for a missing momentum buffer; listing similar names would only obscure that.
        let has_momentum =
            self.names().chain(self.taken.iter().map(String::as_str)).any(|n| n.starts_with(MOMENTUM_PREFIX));
        if name.starts_with(MOMENTUM_PREFIX) && !has_momentum {
            return format!(
                "has no optimizer state: no tensor named `{name}`, and none of its {held} tensors is an SGD momentum buffer (`{MOMENTUM_PREFIX}*`) (a weights-only file?)"
            );
        }
        let group = name.split('.').next().unwrap_or(name);
        let similar: Vec<&str> = self.names().filter(|n| n.split('.').next() == Some(group)).take(6).collect();
        let hint = if similar.is_empty() {
            let first: Vec<&str> = self.names().take(6).collect();
            format!("e.g. {first:?}")
        } else {
            format!("those starting with `{group}`: {similar:?}")
        };
        format!("no tensor named `{name}`; the checkpoint held {held} tensors when loaded{left}, {hint}")
    }
}

/// Writes `ckpt` atomically into `dir` (created if needed) as `dir/checkpoint.safetensors` and
/// `dir/checkpoint.json`, replacing the previous checkpoint there, and returns the path of the
/// safetensors file. Stale temporary files from an interrupted save are deleted first.
///
/// Errors: [`Error::Data`] (naming the file that would be written) for a tensor whose data does
/// not fill its shape, an empty, reserved (`__metadata__`) or duplicate name; [`Error::Io`] for
/// I/O failures, after which the previous checkpoint is still in place.
pub fn save(dir: &Path, ckpt: &Checkpoint) -> Result<PathBuf> {
    save_inner(dir, ckpt, None)
}

/// Where [`save_interrupted`] stops, simulating a crash (for tests of crash safety).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// The temporary safetensors file is left half written.
    TornTempFile,
    /// The temporary safetensors file is complete and synced but not renamed.
    BeforeRename,
    /// The new safetensors file is in place; `checkpoint.json` still holds the old metadata.
    BetweenFiles,
}

/// [`save`] that stops at `at`, as if the process had died there. For tests only.
#[doc(hidden)]
pub fn save_interrupted(dir: &Path, ckpt: &Checkpoint, at: CrashPoint) -> Result<()> {
    save_inner(dir, ckpt, Some(at)).map(|_| ())
}

fn save_inner(dir: &Path, ckpt: &Checkpoint, crash: Option<CrashPoint>) -> Result<PathBuf> {
    let final_path = dir.join(SAFETENSORS_FILE);
    // The file is written in this build's format whatever the caller's metadata says (it may
    // come from a loaded version 1 file), with the checksum of exactly the tensors written.
    let (meta, header) = header_of(&final_path, ckpt)?;
    let json = serde_json::to_vec_pretty(&meta)
        .map_err(|e| data_error(&dir.join(JSON_FILE), format!("cannot serialise the metadata: {e}")))?;

    fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;
    clean_stale_temps(dir);

    let written = write_atomic(dir, SAFETENSORS_FILE, crash, |w| write_file(w, &header, ckpt))?;
    if !written || crash == Some(CrashPoint::BetweenFiles) {
        return Ok(final_path);
    }
    write_atomic(dir, JSON_FILE, None, |w| {
        w.write_all(&json)?;
        w.write_all(b"\n")
    })?;
    sync_dir(dir);
    log::debug!(
        "saved checkpoint {} (epoch {}, iteration {}, {} tensors, {})",
        final_path.display(),
        meta.epoch,
        meta.iteration,
        ckpt.tensors.len(),
        meta.checksum.as_deref().unwrap_or_default()
    );
    Ok(final_path)
}

/// The metadata written for `ckpt` (this build's format, whatever the caller's metadata
/// says, with the checksum of exactly the tensors written) and the header holding it.
fn header_of(path: &Path, ckpt: &Checkpoint) -> Result<(CheckpointMeta, Vec<u8>)> {
    let meta = CheckpointMeta { format_version: FORMAT_VERSION, checksum: Some(ckpt.checksum()), ..ckpt.meta.clone() };
    let header = build_header(&meta, ckpt).map_err(|message| data_error(path, message))?;
    Ok((meta, header))
}

/// Writes a whole safetensors file: the header's length, the header, then the tensors.
fn write_file(w: &mut impl Write, header: &[u8], ckpt: &Checkpoint) -> io::Result<()> {
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(header)?;
    for tensor in &ckpt.tensors {
        write_f32s(w, &tensor.data)?;
    }
    for tensor in &ckpt.int_tensors {
        w.write_all(&i64_le_bytes(&tensor.data))?;
    }
    Ok(())
}

/// The bytes [`save`] would write to `checkpoint.safetensors`, in memory (a stage's state
/// sent to the process that writes the run's checkpoint). `what` names them in errors.
pub fn to_bytes(what: &Path, ckpt: &Checkpoint) -> Result<Vec<u8>> {
    let (_, header) = header_of(what, ckpt)?;
    let mut bytes = Vec::new();
    write_file(&mut bytes, &header, ckpt).map_err(|source| io_error(what, source))?;
    Ok(bytes)
}

/// The checkpoint [`to_bytes`] made, its checksum verified.
pub fn from_bytes(what: &Path, bytes: &[u8]) -> Result<Checkpoint> {
    parse(what, bytes)
}

/// Reads a checkpoint: `dir_or_file` is a directory holding `checkpoint.safetensors` or the
/// path of a checkpoint safetensors file (any name). `checkpoint.json` is not read. The
/// checksum is verified on every load (a version 1 file has none and is loaded unverified,
/// with a warning). See the module documentation for the errors.
pub fn load(dir_or_file: &Path) -> Result<Checkpoint> {
    let path = resolve(dir_or_file);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found(&path)),
        Err(source) => return Err(io_error(&path, source)),
    };
    parse(&path, &bytes)
}

/// Reads the weights of a featreplay checkpoint (as [`load`], checksum verified) or of a
/// plain safetensors file without featreplay's metadata, such as a PyTorch
/// `safetensors.torch.save_file(model.state_dict(), path)`: its tensors (F32, and I64 for
/// `num_batches_tracked`) with a placeholder metadata ([`Checkpoint::is_plain`]).
pub fn load_weights(dir_or_file: &Path) -> Result<Checkpoint> {
    let path = resolve(dir_or_file);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found(&path)),
        Err(source) => return Err(io_error(&path, source)),
    };
    parse_as(&path, &bytes, true)
}

/// Reads only the metadata of a checkpoint (the safetensors header), without reading or
/// checking the tensor data (the checksum is not verified, only required in a version 2
/// file): a cheap look at the epoch or configuration of a large checkpoint. [`load`] still
/// validates everything.
pub fn load_meta(dir_or_file: &Path) -> Result<CheckpointMeta> {
    let path = resolve(dir_or_file);
    let mut file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found(&path)),
        Err(source) => return Err(io_error(&path, source)),
    };
    let file_len = file.metadata().map_err(|source| io_error(&path, source))?.len();
    if file_len < LEN_FIELD as u64 {
        return Err(too_short(&path, file_len));
    }
    let mut len_field = [0u8; LEN_FIELD];
    file.read_exact(&mut len_field).map_err(|source| io_error(&path, source))?;
    let header_len = check_header_len(&path, u64::from_le_bytes(len_field), file_len)?;
    let mut header = vec![0u8; header_len];
    file.read_exact(&mut header).map_err(|source| io_error(&path, source))?;
    let header: Value = serde_json::from_slice(&header)
        .map_err(|e| data_error(&path, format!("not a safetensors file (or corrupt): invalid JSON header: {e}")))?;
    if !header.is_object() {
        return Err(data_error(&path, "not a safetensors file (or corrupt): the header is not a JSON object"));
    }
    let map = header.get("__metadata__").and_then(Value::as_object).map(|m| {
        m.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string()))).collect::<HashMap<_, _>>()
    });
    parse_meta(&path, map.as_ref())
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Checks one tensor's name and length; the message names the tensor.
fn check_tensor(t: &NamedTensor) -> std::result::Result<usize, String> {
    if t.name.is_empty() {
        return Err("a tensor has an empty name".to_string());
    }
    if t.name == "__metadata__" {
        return Err("`__metadata__` is reserved by safetensors and cannot name a tensor".to_string());
    }
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|n| n.checked_mul(4).is_some())
        .ok_or_else(|| format!("tensor `{}` has shape {:?}, too large to store", t.name, t.shape))?;
    if t.data.len() != numel {
        return Err(format!(
            "tensor `{}` has {} values, but its shape {:?} needs {numel}",
            t.name,
            t.data.len(),
            t.shape
        ));
    }
    Ok(numel)
}

/// The safetensors header (JSON, space-padded to a multiple of 8 bytes) for `meta` and
/// `tensors`, tensors laid out in the given order.
fn build_header(meta: &CheckpointMeta, ckpt: &Checkpoint) -> std::result::Result<Vec<u8>, String> {
    let n = ckpt.tensors.len() + ckpt.int_tensors.len();
    let mut seen = HashSet::with_capacity(n);
    let mut infos = Vec::with_capacity(n);
    let mut offset = 0usize;
    let ints = ckpt.int_tensors.iter().map(|t| {
        let numel: usize = t.shape.iter().product();
        let len = if numel == t.data.len() {
            Ok(numel * 8)
        } else {
            Err(format!("tensor `{}` does not fill its shape", t.name))
        };
        (t.name.as_str(), Dtype::I64, &t.shape, len)
    });
    let floats = ckpt.tensors.iter().map(|t| (t.name.as_str(), Dtype::F32, &t.shape, check_tensor(t).map(|n| n * 4)));
    for (name, dtype, shape, bytes) in floats.chain(ints) {
        let bytes = bytes?;
        if !seen.insert(name) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        let end = offset.checked_add(bytes).ok_or_else(|| "the tensors are too large to store".to_string())?;
        infos.push((name.to_string(), TensorInfo { dtype, shape: shape.clone(), data_offsets: (offset, end) }));
        offset = end;
    }
    let meta_json = serde_json::to_string(meta).map_err(|e| format!("cannot serialise the metadata: {e}"))?;
    let map = HashMap::from([(METADATA_KEY.to_string(), meta_json), ("format".to_string(), "pt".to_string())]);
    let metadata = Metadata::new(Some(map), infos).map_err(|e| format!("invalid tensor layout: {e}"))?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| format!("cannot serialise the header: {e}"))?;
    header.resize(header.len().next_multiple_of(LEN_FIELD), b' ');
    if header.len() as u64 > MAX_HEADER_BYTES {
        return Err(format!("the header would take {} bytes, more than safetensors allows", header.len()));
    }
    Ok(header)
}

/// The little-endian bytes of i64 values (the file's encoding).
fn i64_le_bytes(data: &[i64]) -> Vec<u8> {
    data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(target_endian = "little")]
fn write_f32s(w: &mut impl Write, data: &[f32]) -> io::Result<()> {
    w.write_all(bytemuck::cast_slice(data))
}

/// The little-endian bytes of `data` (the file's encoding), borrowed where the host's already is.
#[cfg(target_endian = "little")]
fn f32_le_bytes(data: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    std::borrow::Cow::Borrowed(bytemuck::cast_slice(data))
}

#[cfg(target_endian = "big")]
fn f32_le_bytes(data: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    std::borrow::Cow::Owned(data.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// The running CRC-32C of [`Checkpoint::checksum`]; the same code hashes the tensors being saved
/// and the raw bytes of the file being loaded.
#[derive(Default)]
struct TensorCrc(u32);

impl TensorCrc {
    fn bytes(&mut self, bytes: &[u8]) {
        self.0 = crc32c::crc32c_append(self.0, bytes);
    }

    /// Length-prefixed, so that bytes cannot move between fields without changing the CRC.
    fn field(&mut self, bytes: &[u8]) {
        self.bytes(&(bytes.len() as u64).to_le_bytes());
        self.bytes(bytes);
    }

    fn tensor(&mut self, name: &str, dtype: Dtype, shape: &[usize], data: &[u8]) {
        self.field(name.as_bytes());
        self.field(dtype.to_string().as_bytes());
        self.bytes(&(shape.len() as u64).to_le_bytes());
        for &d in shape {
            self.bytes(&(d as u64).to_le_bytes());
        }
        self.field(data);
    }

    fn value(&self) -> String {
        format!("{CHECKSUM_PREFIX}{:08x}", self.0)
    }
}

#[cfg(target_endian = "big")]
fn write_f32s(w: &mut impl Write, data: &[f32]) -> io::Result<()> {
    for chunk in data.chunks(16384) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write_all(&bytes)?;
    }
    Ok(())
}

/// Writes `dir/name` through a synced temporary file and a rename. Returns whether the file was
/// renamed into place (`false` only when `crash` stops it before the rename).
fn write_atomic(
    dir: &Path,
    name: &str,
    crash: Option<CrashPoint>,
    write: impl FnOnce(&mut BufWriter<&File>) -> io::Result<()>,
) -> Result<bool> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let final_path = dir.join(name);
    let temp_path =
        dir.join(format!(".{name}{TEMP_MARKER}{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let file =
        File::options().write(true).create_new(true).open(&temp_path).map_err(|source| io_error(&temp_path, source))?;
    if let Err(source) = write_synced(&file, write) {
        drop(file);
        let _ = fs::remove_file(&temp_path);
        return Err(io_error(&temp_path, source));
    }
    match crash {
        Some(CrashPoint::TornTempFile) => {
            let len = file.metadata().map_err(|source| io_error(&temp_path, source))?.len();
            file.set_len(len / 2).map_err(|source| io_error(&temp_path, source))?;
            return Ok(false);
        }
        Some(CrashPoint::BeforeRename) => return Ok(false),
        Some(CrashPoint::BetweenFiles) | None => {}
    }
    drop(file);
    if let Err(source) = fs::rename(&temp_path, &final_path) {
        let _ = fs::remove_file(&temp_path);
        return Err(io_error(&final_path, source));
    }
    Ok(true)
}

/// Writes through a buffer, flushes and syncs `file` to disk.
fn write_synced(file: &File, write: impl FnOnce(&mut BufWriter<&File>) -> io::Result<()>) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, file);
    write(&mut w)?;
    w.flush()?;
    drop(w);
    file.sync_all()
}

/// Whether `name` is a temporary file of [`write_atomic`] (also used by
/// `rundir::clear_run_outputs`).
pub(crate) fn is_temp_name(name: &str) -> bool {
    [SAFETENSORS_FILE, JSON_FILE].iter().any(|f| {
        name.strip_prefix('.').and_then(|rest| rest.strip_prefix(f)).is_some_and(|rest| rest.starts_with(TEMP_MARKER))
    })
}

/// Deletes temporary files left in `dir` by an interrupted save (best effort).
fn clean_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_str().is_some_and(is_temp_name) {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => log::info!("removed {} left by an interrupted checkpoint save", path.display()),
                Err(e) => log::warn!("could not remove stale temporary file {}: {e}", path.display()),
            }
        }
    }
}

/// Makes the renames in `dir` durable where the platform supports syncing a directory (also
/// used by `report::write_atomic`).
pub(crate) fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        if let Err(e) = d.sync_all() {
            log::debug!("could not sync directory {}: {e}", dir.display());
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
}

// ---------------------------------------------------------------------------------------------
// Reading

fn resolve(dir_or_file: &Path) -> PathBuf {
    if dir_or_file.is_dir() {
        dir_or_file.join(SAFETENSORS_FILE)
    } else {
        dir_or_file.to_path_buf()
    }
}

fn data_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Data { path: path.display().to_string(), message: message.into() }
}

fn io_error(path: &Path, source: io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source }
}

fn not_found(path: &Path) -> Error {
    data_error(path, format!("no checkpoint here: the file does not exist (save writes <dir>/{SAFETENSORS_FILE})"))
}

fn too_short(path: &Path, len: u64) -> Error {
    data_error(path, format!("truncated or not a safetensors file: {len} bytes, too short for the header length"))
}

/// Checks the header length field against the file size; returns it as usize.
fn check_header_len(path: &Path, header_len: u64, file_len: u64) -> Result<usize> {
    if header_len > MAX_HEADER_BYTES {
        return Err(data_error(
            path,
            format!("not a safetensors file (or corrupt): the header length field reads {header_len} bytes"),
        ));
    }
    let available = file_len.saturating_sub(LEN_FIELD as u64);
    if header_len > available {
        return Err(data_error(
            path,
            format!("truncated or not a safetensors file: the header needs {header_len} bytes but {available} follow"),
        ));
    }
    // At most MAX_HEADER_BYTES, so it fits.
    Ok(header_len as usize)
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Checkpoint> {
    parse_as(path, bytes, false)
}

/// Parses a safetensors file; with `plain_ok`, one without featreplay's metadata too (its
/// meta says [`PLAIN_FORMAT_VERSION`] and there is no checksum to verify).
fn parse_as(path: &Path, bytes: &[u8], plain_ok: bool) -> Result<Checkpoint> {
    let file_len = bytes.len() as u64;
    let Some(len_field) = bytes.get(..LEN_FIELD) else {
        return Err(too_short(path, file_len));
    };
    let mut len_bytes = [0u8; LEN_FIELD];
    len_bytes.copy_from_slice(len_field);
    check_header_len(path, u64::from_le_bytes(len_bytes), file_len)?;
    let (header_len, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| match e {
        SafeTensorError::MetadataIncompleteBuffer => {
            data_error(path, "truncated or corrupt: the tensor data in the file does not match the sizes in its header")
        }
        SafeTensorError::InvalidHeader(_) | SafeTensorError::InvalidHeaderDeserialization(_) => {
            data_error(path, format!("not a safetensors file (or corrupt): {e}"))
        }
        e => data_error(path, format!("corrupt safetensors file: {e}")),
    })?;
    let has_ours = metadata.metadata().as_ref().is_some_and(|m| m.contains_key(METADATA_KEY));
    let meta = if plain_ok && !has_ours {
        CheckpointMeta { format_version: PLAIN_FORMAT_VERSION, ..CheckpointMeta::new(0, 0, 0, Value::Null) }
    } else {
        parse_meta(path, metadata.metadata().as_ref())?
    };

    let mut crc = TensorCrc::default();
    let data_start = LEN_FIELD + header_len;
    let names = metadata.offset_keys();
    let mut tensors = Vec::with_capacity(names.len());
    let mut int_tensors = Vec::new();
    for name in names {
        let Some(info) = metadata.info(&name) else {
            return Err(data_error(path, format!("tensor `{name}` is listed but has no entry in the header")));
        };
        if info.dtype != Dtype::F32 && info.dtype != Dtype::I64 {
            return Err(data_error(
                path,
                format!(
                    "tensor `{name}` has dtype {}, but featreplay reads F32 tensors (and I64 ones, such as num_batches_tracked) only",
                    info.dtype
                ),
            ));
        }
        let (start, end) = info.data_offsets;
        let raw = data_start
            .checked_add(start)
            .zip(data_start.checked_add(end))
            .and_then(|(s, e)| bytes.get(s..e))
            .ok_or_else(|| data_error(path, format!("tensor `{name}` lies outside the file")))?;
        crc.tensor(&name, info.dtype, &info.shape, raw);
        if info.dtype == Dtype::I64 {
            let data = raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
            int_tensors.push(NamedIntTensor { name, shape: info.shape.clone(), data });
        } else {
            let data = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            tensors.push(NamedTensor { name, shape: info.shape.clone(), data });
        }
    }
    if meta.format_version == PLAIN_FORMAT_VERSION {
        return Ok(Checkpoint { meta, tensors, int_tensors, taken: Vec::new() });
    }
    let computed = crc.value();
    match &meta.checksum {
        Some(stored) if *stored == computed => {}
        Some(stored) => {
            return Err(data_error(
                path,
                format!("checksum mismatch: the file is corrupt (stored {stored}, computed {computed})"),
            ))
        }
        // parse_meta lets a missing checksum through for version 1 only.
        None => log::warn!(
            "{}: checkpoint format version {} has no checksum, so its {} tensors are loaded unverified (the next save writes version {FORMAT_VERSION}, with one)",
            path.display(),
            meta.format_version,
            tensors.len()
        ),
    }
    Ok(Checkpoint { meta, tensors, int_tensors, taken: Vec::new() })
}

/// Parses the featreplay metadata out of a safetensors header's `__metadata__` map.
fn parse_meta(path: &Path, map: Option<&HashMap<String, String>>) -> Result<CheckpointMeta> {
    let Some(map) = map else {
        return Err(data_error(
            path,
            "not a featreplay checkpoint: the safetensors header has no __metadata__ (a plain weights file?)",
        ));
    };
    let Some(json) = map.get(METADATA_KEY) else {
        return Err(data_error(
            path,
            format!("not a featreplay checkpoint: the safetensors header's __metadata__ has no `{METADATA_KEY}` entry"),
        ));
    };
    let value: Value = serde_json::from_str(json)
        .map_err(|e| data_error(path, format!("the `{METADATA_KEY}` metadata is not valid JSON: {e}")))?;
    let Some(version) = value.get("format_version").and_then(Value::as_u64) else {
        return Err(data_error(path, format!("the `{METADATA_KEY}` metadata has no valid format_version")));
    };
    if !(u64::from(OLDEST_FORMAT_VERSION)..=u64::from(FORMAT_VERSION)).contains(&version) {
        return Err(data_error(
            path,
            format!(
                "unsupported checkpoint format_version {version}: featreplay {} reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}",
                env!("CARGO_PKG_VERSION")
            ),
        ));
    }
    let meta: CheckpointMeta = serde_json::from_value(value)
        .map_err(|e| data_error(path, format!("the `{METADATA_KEY}` metadata is invalid: {e}")))?;
    // From version 2 on, save always stores a checksum: one without is damaged or forged, and
    // loading it unverified would defeat the check.
    if meta.format_version >= 2 && meta.checksum.is_none() {
        return Err(data_error(
            path,
            format!(
                "corrupt checkpoint: format_version {} requires a checksum but the metadata has none",
                meta.format_version
            ),
        ));
    }
    Ok(meta)
}
