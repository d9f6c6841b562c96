//! Training metrics on disk: one JSON line and one CSV row per epoch, and a PNG of the loss
//! and accuracy curves (plotters, with an embedded DejaVu font so no system fonts are
//! needed).
//!
//! # Crash safety
//!
//! A run can be killed at any moment (`kill -9`, out of memory, power loss), and its metrics are
//! what the user reads afterwards and what a resumed run continues. So no file here is ever
//! truncated or rewritten in place: `metrics.jsonl`, `metrics.csv`, `curves.png`, the PNGs of
//! [`plot_panels`] and the rewrites of `sigma.jsonl` go through [`write_atomic`], which writes a
//! hidden temporary file in the same directory (`.metrics.tmp-<pid>-<n>.jsonl`), flushes and
//! `sync_all`s it and renames it over the final name. A reader therefore always sees either the
//! previous or the new complete file. PNGs are rendered and encoded in memory first.
//!
//! [`SigmaLog::push`] appends instead (one synced write per measurement), since a run may take
//! thousands of measurements; a kill can at worst leave a torn last line, which [`read_sigma`]
//! skips and the next [`SigmaLog::create`] drops.
//!
//! Temporary files left by a crash are deleted by the next [`MetricsLog::create`] /
//! [`SigmaLog::create`] in that directory (one writer per directory: see `rundir::RunLock`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One epoch's summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch number.
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_top1: f64,
    pub test_loss: f64,
    pub test_top1: f64,
    pub test_top5: f64,
    pub best_test_top1: f64,
    pub epoch_seconds: f64,
    pub images_per_second: f64,
    /// Peak bytes per stage device during the epoch (tensors and runtime buffers).
    pub peak_memory_bytes: Vec<u64>,
    /// Mean sigma per stage over the epoch's measurements (empty when not measured).
    #[serde(default, with = "nan_as_null")]
    pub sigma: Vec<f64>,
    /// The training loss of each iteration of the epoch, in order (absent in runs written
    /// before it was recorded).
    #[serde(default, with = "nan_as_null")]
    pub batch_losses: Vec<f64>,
}

/// One measurement of sigma per stage (see `train::sigma`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SigmaRecord {
    pub epoch: usize,
    /// Iterations trained before the measurement.
    pub iteration: u64,
    /// Per stage; NaN (null in JSON) for a module still warming up.
    #[serde(with = "nan_as_null")]
    pub sigma: Vec<f64>,
}

impl SigmaRecord {
    /// Mean per stage over `records`, skipping NaN; empty when there are none.
    pub fn mean(records: &[SigmaRecord], stages: usize) -> Vec<f64> {
        if records.is_empty() {
            return vec![];
        }
        (0..stages)
            .map(|k| {
                let v: Vec<f64> =
                    records.iter().filter_map(|r| r.sigma.get(k).copied()).filter(|x| x.is_finite()).collect();
                if v.is_empty() {
                    f64::NAN
                } else {
                    v.iter().sum::<f64>() / v.len() as f64
                }
            })
            .collect()
    }
}

/// JSON has no NaN: a not-measured value is written as null.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|x| if x.is_finite() { Some(*x) } else { None }))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        let v: Vec<Option<f64>> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
    }
}

/// The sigma measurements file of a run directory.
pub const SIGMA_JSONL: &str = "sigma.jsonl";
/// The per-epoch metrics of a run directory, one JSON object per line.
pub const METRICS_JSONL: &str = "metrics.jsonl";
/// The same metrics as CSV, with the header [`CSV_HEADER`].
pub const METRICS_CSV: &str = "metrics.csv";
/// The loss and accuracy curves [`MetricsLog`] redraws after every epoch.
pub const CURVES_PNG: &str = "curves.png";

/// Convergence per iteration and per second ([`plot_convergence`]), redrawn with the curves.
pub const CONVERGENCE_PNG: &str = "convergence.png";
/// The first line of `metrics.csv`.
pub const CSV_HEADER: &str = "epoch,lr,train_loss,train_top1,test_loss,test_top1,test_top5,best_test_top1,epoch_seconds,images_per_second,peak_memory_bytes,sigma";

/// Marker between a temporary file's stem and its unique suffix (see [`write_atomic`]).
const TEMP_MARKER: &str = ".tmp-";

/// Sigma measurements in `sigma.jsonl`, one line per measurement.
pub struct SigmaLog {
    path: PathBuf,
    records: Vec<SigmaRecord>,
}

impl SigmaLog {
    /// Starts the log in `dir` (created if needed) holding exactly `records`: `sigma.jsonl` is
    /// replaced atomically, never truncated, so a kill leaves the old or the new file. Stale
    /// temporary files of an interrupted write are deleted.
    pub fn create(dir: &Path, records: Vec<SigmaRecord>) -> Result<SigmaLog> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        remove_stale_temps(dir, &[SIGMA_JSONL]);
        let path = dir.join(SIGMA_JSONL);
        write_atomic(&path, &jsonl(&path, &records)?)?;
        Ok(SigmaLog { path, records })
    }

    /// Starts the log in `dir`, keeping the measurements of epochs before `first_epoch` that
    /// `sigma.jsonl` holds (a resumed run); [`SigmaLog::create`] with those records.
    pub fn open(dir: &Path, first_epoch: usize) -> Result<SigmaLog> {
        let path = dir.join(SIGMA_JSONL);
        let records = if first_epoch > 1 && path.exists() {
            read_sigma(&path)?.into_iter().filter(|r| r.epoch < first_epoch).collect()
        } else {
            vec![]
        };
        Self::create(dir, records)
    }

    /// Appends one measurement: one line written with a single `write` and synced to disk. A
    /// kill during it can at worst leave a torn last line, which [`read_sigma`] skips.
    pub fn push(&mut self, r: SigmaRecord) -> Result<()> {
        let mut line = serde_json::to_string(&r).map_err(|e| data(&self.path, e.to_string()))?;
        line.push('\n');
        let mut f = OpenOptions::new().append(true).open(&self.path).map_err(io(&self.path))?;
        f.write_all(line.as_bytes()).and_then(|()| f.sync_data()).map_err(io(&self.path))?;
        self.records.push(r);
        Ok(())
    }

    /// The measurements, in order.
    pub fn records(&self) -> &[SigmaRecord] {
        &self.records
    }
}

/// Reads a `sigma.jsonl` file. A last line that is not terminated by a newline and does not
/// parse is an append cut short by a crash (see [`SigmaLog::push`]): it is skipped with a
/// warning. Any other bad line is an [`Error::Data`] naming the file and the line.
pub fn read_sigma(path: &Path) -> Result<Vec<SigmaRecord>> {
    read_jsonl(path, true)
}

/// Reads a `metrics.jsonl` file; a bad line is an [`Error::Data`] naming the file and the line.
pub fn read_metrics(path: &Path) -> Result<Vec<EpochRecord>> {
    read_jsonl(path, false)
}

fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path, torn_tail_ok: bool) -> Result<Vec<T>> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(r) => out.push(r),
            Err(e) if torn_tail_ok && !complete && i + 1 == lines.len() => {
                log::warn!("{}: skipping the torn last line {} ({e}), cut short by a crash", path.display(), i + 1);
            }
            Err(e) => return Err(data(path, format!("line {}: {e}", i + 1))),
        }
    }
    Ok(out)
}

/// The JSON lines of `records`; `path` only names the file in an error.
fn jsonl<T: Serialize>(path: &Path, records: &[T]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for r in records {
        serde_json::to_writer(&mut out, r).map_err(|e| data(path, e.to_string()))?;
        out.push(b'\n');
    }
    Ok(out)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.display().to_string(), source }
}

fn data(path: &Path, message: String) -> Error {
    Error::Data { path: path.display().to_string(), message }
}

/// Epoch records in `metrics.jsonl` and `metrics.csv` of an output directory, and their curves
/// in `curves.png`. Every write replaces the files atomically (see the module documentation).
pub struct MetricsLog {
    dir: PathBuf,
    records: Vec<EpochRecord>,
}

impl MetricsLog {
    /// Starts a log in `dir` (created if needed) holding exactly `records`: both files are
    /// replaced atomically, and `curves.png` is redrawn from them (or removed when there are
    /// none, since it would show epochs that are gone). For a resumed run `records` are the
    /// epochs its checkpoint covers. Stale temporary files of an interrupted write are deleted.
    pub fn create(dir: &Path, records: Vec<EpochRecord>) -> Result<MetricsLog> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        remove_stale_temps(dir, &[METRICS_JSONL, METRICS_CSV, CURVES_PNG, CONVERGENCE_PNG]);
        let log = MetricsLog { dir: dir.to_path_buf(), records };
        log.write_files()?;
        if !log.records.is_empty() {
            log.plots()?;
        } else {
            for name in [CURVES_PNG, CONVERGENCE_PNG] {
                let path = dir.join(name);
                if let Err(e) = fs::remove_file(&path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        return Err(io(&path)(e));
                    }
                }
            }
        }
        Ok(log)
    }

    /// Starts a log in `dir`, keeping the records of epochs before `first_epoch` that a
    /// previous run wrote (a resumed run continues the same files; later epochs it had
    /// written are dropped because they will be recomputed): [`MetricsLog::create`] with those
    /// records, so the files are replaced atomically, never truncated.
    pub fn open(dir: &Path, first_epoch: usize) -> Result<MetricsLog> {
        let path = dir.join(METRICS_JSONL);
        let records = if first_epoch > 1 && path.exists() {
            read_metrics(&path)?.into_iter().filter(|r| r.epoch < first_epoch).collect()
        } else {
            vec![]
        };
        Self::create(dir, records)
    }

    /// Appends one epoch: both files are rewritten atomically with it (O(epochs), a few KB),
    /// then `curves.png` is redrawn atomically. If a file cannot be written the record is not
    /// kept; if only the plot fails, the record is kept and the error returned.
    pub fn push(&mut self, r: EpochRecord) -> Result<()> {
        self.records.push(r);
        if let Err(e) = self.write_files() {
            self.records.pop();
            return Err(e);
        }
        self.plots()
    }

    /// Redraws `curves.png` and `convergence.png`.
    fn plots(&self) -> Result<()> {
        plot(&self.records, &self.dir.join(CURVES_PNG))?;
        plot_convergence(&self.records, &self.dir.join(CONVERGENCE_PNG))
    }

    /// The records, in order.
    pub fn records(&self) -> &[EpochRecord] {
        &self.records
    }

    /// Replaces `metrics.jsonl`, then `metrics.csv`, with the records.
    fn write_files(&self) -> Result<()> {
        let jp = self.dir.join(METRICS_JSONL);
        write_atomic(&jp, &jsonl(&jp, &self.records)?)?;
        let mut csv = format!("{CSV_HEADER}\n");
        for r in &self.records {
            csv.push_str(&csv_row(r));
        }
        write_atomic(&self.dir.join(METRICS_CSV), csv.as_bytes())
    }
}

/// One `metrics.csv` line, newline included.
fn csv_row(r: &EpochRecord) -> String {
    let mem = r.peak_memory_bytes.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(";");
    let sigma = r.sigma.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(";");
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{}\n",
        r.epoch,
        r.lr,
        r.train_loss,
        r.train_top1,
        r.test_loss,
        r.test_top1,
        r.test_top5,
        r.best_test_top1,
        r.epoch_seconds,
        r.images_per_second,
        mem,
        sigma
    )
}

/// Writes `bytes` to `path` atomically: into a hidden temporary file in the same directory
/// (`.NAME.tmp-<pid>-<n>.EXT`, keeping the extension), flushed and `sync_all`ed, then renamed
/// over `path`; the directory is synced afterwards where the platform allows it (Unix). Readers
/// and a crash at any point see the previous or the new complete file, never a torn one. The
/// directory must exist.
///
/// Errors: [`Error::Io`] naming `path`; the temporary file is removed and `path` left as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Err(data(path, "cannot write atomically: the path has no UTF-8 file name".to_string()));
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let unique = format!("{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    let temp = dir.join(temp_name(name, &unique));
    let result = File::options().write(true).create_new(true).open(&temp).and_then(|file| {
        let mut w = BufWriter::new(&file);
        w.write_all(bytes)?;
        w.flush()?;
        drop(w);
        file.sync_all()?;
        drop(file);
        fs::rename(&temp, path)
    });
    if let Err(source) = result {
        let _ = fs::remove_file(&temp);
        return Err(io(path)(source));
    }
    crate::checkpoint::sync_dir(dir);
    Ok(())
}

/// `.metrics.tmp-<unique>.jsonl` for `metrics.jsonl`: hidden, and with the final name's
/// extension kept last (image encoders pick the format from it).
fn temp_name(name: &str, unique: &str) -> String {
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => format!(".{stem}{TEMP_MARKER}{unique}.{ext}"),
        _ => format!(".{name}{TEMP_MARKER}{unique}"),
    }
}

/// Whether `name` is a temporary file of [`write_atomic`] for the final file name `final_name`
/// (also used by `rundir::clear_run_outputs`).
pub(crate) fn is_temp_of(name: &str, final_name: &str) -> bool {
    let (stem, ext) = match final_name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem, Some(ext)),
        _ => (final_name, None),
    };
    let Some(rest) =
        name.strip_prefix('.').and_then(|r| r.strip_prefix(stem)).and_then(|r| r.strip_prefix(TEMP_MARKER))
    else {
        return false;
    };
    let unique = match ext {
        Some(ext) => rest.strip_suffix(ext).and_then(|r| r.strip_suffix('.')),
        None => Some(rest),
    };
    unique.and_then(|u| u.split_once('-')).is_some_and(|(pid, n)| {
        !pid.is_empty() && !n.is_empty() && pid.bytes().chain(n.bytes()).all(|b| b.is_ascii_digit())
    })
}

/// Deletes temporary files of `names` left in `dir` by an interrupted write (best effort).
fn remove_stale_temps(dir: &Path, names: &[&str]) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else { continue };
        if names.iter().any(|n| is_temp_of(name, n)) {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => log::info!("removed {} left by an interrupted write", path.display()),
                Err(e) => log::warn!("could not remove stale temporary file {}: {e}", path.display()),
            }
        }
    }
}

/// Encodes an RGB8 buffer as PNG and writes it to `path` with [`write_atomic`].
fn write_png(path: &Path, rgb: &[u8], (width, height): (u32, u32)) -> Result<()> {
    use image::ImageEncoder;
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(rgb, width, height, image::ExtendedColorType::Rgb8)
        .map_err(|e| data(path, format!("cannot encode the PNG: {e}")))?;
    write_atomic(path, &png)
}

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // The embedded font is valid TrueType; failure would only mean unlabelled axes.
        let _ = plotters::style::register_font(
            "sans-serif",
            plotters::style::FontStyle::Normal,
            include_bytes!("../assets/fonts/DejaVuSansMono.ttf"),
        );
    });
}

/// Draws training/test loss and top-1 accuracy per epoch into a PNG, written atomically
/// ([`write_atomic`]): a reader never sees a half-drawn or truncated image.
pub fn plot(records: &[EpochRecord], path: &Path) -> Result<()> {
    const SIZE: (u32, u32) = (1100, 450);
    let mut rgb = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
    draw_curves(records, path, &mut rgb, SIZE)?;
    write_png(path, &rgb, SIZE)
}

/// Renders [`plot`]'s figure into `rgb`; `path` only names the file in an error.
fn draw_curves(records: &[EpochRecord], path: &Path, rgb: &mut [u8], size: (u32, u32)) -> Result<()> {
    use plotters::prelude::*;
    register_font();
    let err =
        |e: &dyn std::fmt::Display| Error::Data { path: path.display().to_string(), message: format!("plot: {e}") };
    let root = BitMapBackend::with_buffer(rgb, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(550);
    let epochs = records.iter().map(|r| r.epoch).max().unwrap_or(1).max(2) as f64;
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let max_loss = records.iter().flat_map(|r| [finite(r.train_loss), finite(r.test_loss)]).fold(0.1, f64::max) * 1.05;
    let series =
        |f: &dyn Fn(&EpochRecord) -> f64| records.iter().map(|r| (r.epoch as f64, finite(f(r)))).collect::<Vec<_>>();

    let mut chart = ChartBuilder::on(&left)
        .caption("loss", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(1.0..epochs, 0.0..max_loss)
        .map_err(|e| err(&e))?;
    chart.configure_mesh().x_desc("epoch").draw().map_err(|e| err(&e))?;
    for (name, color, data) in [("train", BLUE, series(&|r| r.train_loss)), ("test", RED, series(&|r| r.test_loss))] {
        chart
            .draw_series(LineSeries::new(data, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(|e| err(&e))?;

    let mut chart = ChartBuilder::on(&right)
        .caption("top-1 accuracy (%)", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(1.0..epochs, 0.0..100.0)
        .map_err(|e| err(&e))?;
    chart.configure_mesh().x_desc("epoch").draw().map_err(|e| err(&e))?;
    for (name, color, data) in
        [("train", BLUE, series(&|r| 100.0 * r.train_top1)), ("test", RED, series(&|r| 100.0 * r.test_top1))]
    {
        chart
            .draw_series(LineSeries::new(data, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The training loss of every iteration, smoothed (an exponential moving average with
/// weight 0.9, debiased as TensorBoard's), as (epoch position, seconds, loss): iteration j
/// of the n of epoch e sits at e - 1 + (j + 1) / n epochs, and at the training seconds
/// before epoch e plus (j + 1) / n of epoch e's (iteration times are interpolated within an
/// epoch, whose total is measured).
pub fn smoothed_iteration_losses(records: &[EpochRecord]) -> Vec<(f64, f64, f64)> {
    let mut out = Vec::new();
    let (mut ema, mut weight, mut seconds) = (0.0f64, 0.0f64, 0.0f64);
    for r in records {
        let n = r.batch_losses.len();
        for (j, &l) in r.batch_losses.iter().enumerate() {
            if !l.is_finite() {
                continue;
            }
            ema = 0.9 * ema + 0.1 * l;
            weight = 0.9 * weight + 0.1;
            let f = (j + 1) as f64 / n as f64;
            out.push(((r.epoch - 1) as f64 + f, seconds + f * r.epoch_seconds, ema / weight));
        }
        seconds += r.epoch_seconds;
    }
    out
}

/// Test error (1 - top-1) at the end of each epoch against the training seconds so far.
pub fn test_error_by_seconds(records: &[EpochRecord]) -> Vec<(f64, f64)> {
    let mut seconds = 0.0;
    records
        .iter()
        .map(|r| {
            seconds += r.epoch_seconds;
            (seconds, 1.0 - r.test_top1)
        })
        .collect()
}

/// Convergence as the FR paper reads it: training loss per iteration (smoothed) and test
/// error, each against epochs and against training seconds (evaluation left out).
pub fn plot_convergence(records: &[EpochRecord], path: &Path) -> Result<()> {
    let losses = smoothed_iteration_losses(records);
    let by_epoch: Vec<(f64, f64)> = losses.iter().map(|p| (p.0, p.2)).collect();
    let by_time: Vec<(f64, f64)> = losses.iter().map(|p| (p.1, p.2)).collect();
    let err_epoch: Vec<(f64, f64)> = records.iter().map(|r| (r.epoch as f64, 1.0 - r.test_top1)).collect();
    let panel = |title: &str, x: &str, y: &str, name: &str, data: Vec<(f64, f64)>| Panel {
        title: title.into(),
        x_desc: x.into(),
        y_desc: y.into(),
        series: vec![(name.into(), data)],
    };
    plot_panels(
        &[
            panel("training loss per iteration (smoothed)", "epoch", "loss", "train", by_epoch),
            panel("training loss per iteration (smoothed)", "training seconds", "loss", "train", by_time),
            panel("test error", "epoch", "1 - top-1", "test", err_epoch),
            panel("test error", "training seconds", "1 - top-1", "test", test_error_by_seconds(records)),
        ],
        path,
    )
}

/// One chart of a multi-panel figure: named series of (x, y) points.
pub struct Panel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// Draws `panels` side by side (two per row) into a PNG: every series as a line with its
/// points marked, non-finite points left out, a legend per panel. The file is written
/// atomically ([`write_atomic`]).
pub fn plot_panels(panels: &[Panel], path: &Path) -> Result<()> {
    let cols = panels.len().clamp(1, 2);
    let rows = panels.len().div_ceil(2).max(1);
    let size = (560 * cols as u32, 420 * rows as u32);
    let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
    draw_panels(panels, path, &mut rgb, size)?;
    write_png(path, &rgb, size)
}

/// Renders [`plot_panels`]' figure into `rgb`; `path` only names the file in an error.
fn draw_panels(panels: &[Panel], path: &Path, rgb: &mut [u8], size: (u32, u32)) -> Result<()> {
    use plotters::prelude::*;
    register_font();
    let err =
        |e: &dyn std::fmt::Display| Error::Data { path: path.display().to_string(), message: format!("plot: {e}") };
    let cols = panels.len().clamp(1, 2);
    let rows = panels.len().div_ceil(2).max(1);
    let root = BitMapBackend::with_buffer(rgb, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let areas = root.split_evenly((rows, cols));
    let palette = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK, RGBColor(255, 140, 0), RGBColor(128, 0, 128)];
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let pts: Vec<(f64, f64)> = panel
            .series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(*x), b.max(*x)));
        let (mut y0, mut y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), (_, y)| (a.min(*y), b.max(*y)));
        if pts.is_empty() {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if x1 - x0 < 1e-9 {
            x0 -= 0.5;
            x1 += 0.5;
        }
        let pad = ((y1 - y0) * 0.08).max(1e-6 + y1.abs() * 0.05);
        y0 = if y0 >= 0.0 && y0 - pad < 0.0 { 0.0 } else { y0 - pad };
        y1 += pad;
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(34)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(panel.x_desc.as_str())
            .y_desc(panel.y_desc.as_str())
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (name, data)) in panel.series.iter().enumerate() {
            let color = palette[i % palette.len()];
            let data: Vec<(f64, f64)> = data.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
            chart
                .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            chart.draw_series(data.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(|e| err(&e))?;
        }
        if !panel.series.is_empty() {
            chart
                .configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()
                .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
