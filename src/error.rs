//! The library's typed errors. The CLI adds context with `anyhow`; the library never panics
//! on bad input, a lost device or a shader that fails validation.

/// Everything that can go wrong in featreplay's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No adapter at all: the message says what to install.
    #[error("no GPU adapter found (backends tried: {backends}). {hint}")]
    NoAdapter { backends: String, hint: String },

    /// An adapter selector (index, name substring or type) that matches nothing.
    #[error("no adapter matches '{selector}'; available adapters: {available}")]
    AdapterNotFound { selector: String, available: String },

    /// A selector that cannot be parsed.
    #[error("invalid adapter selector '{0}': use an index, 'type:discrete|integrated|virtual|cpu|other', 'backend:vulkan|metal|dx12|gl' or a name substring")]
    BadSelector(String),

    /// `request_device` failed.
    #[error("could not open a device on adapter '{adapter}': {message}")]
    RequestDevice { adapter: String, message: String },

    /// The device was lost (driver reset, out of memory in the driver, ...).
    #[error("GPU device '{adapter}' was lost: {message}")]
    DeviceLost { adapter: String, message: String },

    /// A validation or out-of-memory error reported by wgpu.
    #[error("GPU error on '{adapter}': {message}")]
    Gpu { adapter: String, message: String },

    /// A WGSL file that naga cannot parse or validate.
    #[error("shader '{name}' failed validation: {message}")]
    ShaderValidation { name: String, message: String },

    /// A shader or entry point the kernel registry does not know.
    #[error("unknown shader '{0}'")]
    UnknownShader(String),

    /// A tensor larger than the device's buffer limits.
    #[error("tensor of shape {shape:?} needs {bytes} bytes, more than the device allows ({limit} bytes, {what})")]
    TensorTooLarge { shape: Vec<usize>, bytes: u64, limit: u64, what: &'static str },

    /// Shapes passed to a launcher that do not fit together.
    #[error("shape mismatch in {op}: {detail}")]
    ShapeMismatch { op: &'static str, detail: String },

    /// Host data whose length does not match the tensor shape.
    #[error("data of {got} values does not fill a tensor of shape {shape:?} ({want} values)")]
    DataLength { shape: Vec<usize>, got: usize, want: usize },

    /// A configuration a kernel does not support (with the reason).
    #[error("unsupported {op} configuration: {detail}")]
    Unsupported { op: &'static str, detail: String },

    /// A flag or configuration value that is invalid, or conflicts with another one, with the
    /// data or with the checkpoint it applies to (found before any work is done).
    #[error("invalid {op} configuration: {detail}")]
    InvalidConfig { op: &'static str, detail: String },

    /// More host memory than is available now (estimated before anything is allocated).
    #[error("{op}: {detail}")]
    InsufficientMemory { op: &'static str, detail: String },

    /// An invariant of featreplay itself broke (a bug, never the user's input).
    #[error("internal error in {op}: {detail} (a bug in featreplay; please report it)")]
    Internal { op: &'static str, detail: String },

    /// A kernel variant name that does not exist.
    #[error("unknown kernel variant '{name}' for {op}; choose one of: {choices}")]
    UnknownVariant { op: &'static str, name: String, choices: String },

    /// A data file (dataset, image, checkpoint) that is missing, truncated, corrupt or does
    /// not match what it should hold. `path` names the file, `message` what is wrong.
    #[error("{path}: {message}")]
    Data { path: String, message: String },

    /// An I/O error on a file the user named.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },

    /// A stage's output, gradients, weights, momentum or batch-norm statistics held NaN or
    /// infinite values (found by the device-side watch; `stage` is 0-based).
    #[error("module {} produced {detail} by iteration {iteration}", stage + 1)]
    NonFinite { stage: usize, iteration: u64, detail: String },

    /// Training diverged (a non-finite loss, weight, gradient, statistic or output): the run
    /// stops without writing this epoch's checkpoint or metrics.
    #[error("training diverged in epoch {epoch}: {reason}; nothing of epoch {epoch} was written (earlier checkpoints and metrics are kept); try a lower --lr")]
    Diverged { epoch: usize, reason: String },

    /// Another live featreplay process holds the lock of an output directory (see
    /// `rundir::RunLock`). `holder` says who: `pid 1234, since 2026-05-01T12:00:00Z`.
    #[error("{dir} is in use by another featreplay run ({holder}); wait for it or choose another --out")]
    RunDirInUse { dir: String, holder: String },

    /// A new run's output directory already holds files (see `rundir::check_new_run_dir`).
    /// `found` says what, e.g. `already holds a run (checkpoint.safetensors, metrics.jsonl)`,
    /// and `hint` what to do instead.
    #[error("{dir} {found}; {hint}")]
    RunDirNotEmpty { dir: String, found: String, hint: String },

    /// A pipeline stage stopped because a neighbour it exchanges tensors with is gone: a
    /// consequence of another stage's failure, never the root cause (`stage` is 0-based).
    #[error("module {} stopped: {what} (another module failed)", stage + 1)]
    StageStopped { stage: usize, what: &'static str },

    /// The schedule lost track of its own state: a module holds more stored inputs or
    /// graphs than its delay allows, has none to replay, or the data feed ended early.
    #[error("pipeline schedule error: {detail}")]
    Schedule { detail: String },

    /// A failure injected by a test at a stage and iteration (both 0-based, as the test's
    /// `InjectedFailure` names them).
    #[error("injected failure in stage {stage} at iteration {iteration}")]
    InjectedFailure { stage: usize, iteration: u64 },

    /// Data-parallel replicas of a stage that should hold the same weights after an epoch
    /// do not (their weight hashes differ).
    #[error("stage {stage}: replica {replica}'s weights differ from replica 0's after epoch {epoch}")]
    ReplicasDiffer { stage: usize, replica: usize, epoch: usize },

    /// A stage's worker thread panicked (a bug: the panic's message went to stderr).
    #[error("module {} panicked", stage + 1)]
    StagePanicked { stage: usize },

    /// Reading a buffer back to the host failed.
    #[error("reading back a buffer from '{adapter}' failed: {message}")]
    ReadBack { adapter: String, message: String },
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
