//! Training metrics on disk: one JSON line and one CSV row per epoch, and a PNG of the loss
//! and accuracy curves (plotters, with an embedded DejaVu font so no system fonts are
//! needed).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
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

const SIGMA_JSONL: &str = "sigma.jsonl";

/// Appends sigma measurements to `sigma.jsonl` (one line per measurement).
pub struct SigmaLog {
    path: PathBuf,
    records: Vec<SigmaRecord>,
}

impl SigmaLog {
    /// Starts the log in `dir`, keeping the measurements of epochs before `first_epoch`.
    pub fn open(dir: &Path, first_epoch: usize) -> Result<SigmaLog> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(SIGMA_JSONL);
        let records = if first_epoch > 1 && path.exists() {
            read_sigma(&path)?.into_iter().filter(|r| r.epoch < first_epoch).collect()
        } else {
            vec![]
        };
        let mut f = File::create(&path).map_err(io(&path))?;
        for r in &records {
            let line = serde_json::to_string(r)
                .map_err(|e| Error::Data { path: path.display().to_string(), message: e.to_string() })?;
            writeln!(f, "{line}").map_err(io(&path))?;
        }
        Ok(SigmaLog { path, records })
    }

    pub fn push(&mut self, r: SigmaRecord) -> Result<()> {
        let mut f = OpenOptions::new().append(true).open(&self.path).map_err(io(&self.path))?;
        let line = serde_json::to_string(&r)
            .map_err(|e| Error::Data { path: self.path.display().to_string(), message: e.to_string() })?;
        writeln!(f, "{line}").map_err(io(&self.path))?;
        self.records.push(r);
        Ok(())
    }

    pub fn records(&self) -> &[SigmaRecord] {
        &self.records
    }
}

/// Reads a `sigma.jsonl` file.
pub fn read_sigma(path: &Path) -> Result<Vec<SigmaRecord>> {
    read_jsonl(path)
}

/// Reads a `metrics.jsonl` file.
pub fn read_metrics(path: &Path) -> Result<Vec<EpochRecord>> {
    read_jsonl(path)
}

fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let f = File::open(path).map_err(io(path))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line).map_err(|e| Error::Data {
                path: path.display().to_string(),
                message: format!("line {}: {e}", i + 1),
            })?,
        );
    }
    Ok(out)
}

const JSONL: &str = "metrics.jsonl";
const CSV: &str = "metrics.csv";
const CSV_HEADER: &str = "epoch,lr,train_loss,train_top1,test_loss,test_top1,test_top5,best_test_top1,epoch_seconds,images_per_second,peak_memory_bytes,sigma";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.display().to_string(), source }
}

/// Appends epoch records to `metrics.jsonl` and `metrics.csv` in an output directory.
pub struct MetricsLog {
    dir: PathBuf,
    records: Vec<EpochRecord>,
}

impl MetricsLog {
    /// Starts a log in `dir`, keeping the records of epochs before `first_epoch` that a
    /// previous run wrote (a resumed run continues the same files; later epochs it had
    /// written are dropped because they will be recomputed).
    pub fn open(dir: &Path, first_epoch: usize) -> Result<MetricsLog> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let mut records = Vec::new();
        let path = dir.join(JSONL);
        if first_epoch > 1 && path.exists() {
            let f = File::open(&path).map_err(io(&path))?;
            for (i, line) in BufReader::new(f).lines().enumerate() {
                let line = line.map_err(io(&path))?;
                if line.trim().is_empty() {
                    continue;
                }
                let r: EpochRecord = serde_json::from_str(&line).map_err(|e| Error::Data {
                    path: path.display().to_string(),
                    message: format!("line {}: {e}", i + 1),
                })?;
                if r.epoch < first_epoch {
                    records.push(r);
                }
            }
        }
        let log = MetricsLog { dir: dir.to_path_buf(), records };
        log.rewrite()?;
        Ok(log)
    }

    fn rewrite(&self) -> Result<()> {
        let jp = self.dir.join(JSONL);
        let mut j = File::create(&jp).map_err(io(&jp))?;
        let cp = self.dir.join(CSV);
        let mut c = File::create(&cp).map_err(io(&cp))?;
        writeln!(c, "{CSV_HEADER}").map_err(io(&cp))?;
        for r in &self.records {
            Self::write_one(&mut j, &jp, &mut c, &cp, r)?;
        }
        Ok(())
    }

    fn write_one(j: &mut File, jp: &Path, c: &mut File, cp: &Path, r: &EpochRecord) -> Result<()> {
        let line = serde_json::to_string(r)
            .map_err(|e| Error::Data { path: jp.display().to_string(), message: e.to_string() })?;
        writeln!(j, "{line}").map_err(io(jp))?;
        let mem = r.peak_memory_bytes.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(";");
        let sigma = r.sigma.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(";");
        writeln!(
            c,
            "{},{},{},{},{},{},{},{},{},{},{},{}",
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
        .map_err(io(cp))
    }

    /// Appends one epoch to both files and redraws the plot.
    pub fn push(&mut self, r: EpochRecord) -> Result<()> {
        let jp = self.dir.join(JSONL);
        let cp = self.dir.join(CSV);
        let mut j = OpenOptions::new().append(true).open(&jp).map_err(io(&jp))?;
        let mut c = OpenOptions::new().append(true).open(&cp).map_err(io(&cp))?;
        Self::write_one(&mut j, &jp, &mut c, &cp, &r)?;
        self.records.push(r);
        plot(&self.records, &self.dir.join("curves.png"))
    }

    pub fn records(&self) -> &[EpochRecord] {
        &self.records
    }
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

/// Draws training/test loss and top-1 accuracy per epoch into a PNG.
pub fn plot(records: &[EpochRecord], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    register_font();
    let err =
        |e: &dyn std::fmt::Display| Error::Data { path: path.display().to_string(), message: format!("plot: {e}") };
    let root = BitMapBackend::new(path, (1100, 450)).into_drawing_area();
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

/// One chart of a multi-panel figure: named series of (x, y) points.
pub struct Panel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// Draws `panels` side by side (two per row) into a PNG: every series as a line with its
/// points marked, non-finite points left out, a legend per panel.
pub fn plot_panels(panels: &[Panel], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    register_font();
    let err =
        |e: &dyn std::fmt::Display| Error::Data { path: path.display().to_string(), message: format!("plot: {e}") };
    let cols = panels.len().clamp(1, 2);
    let rows = panels.len().div_ceil(2).max(1);
    let root = BitMapBackend::new(path, (560 * cols as u32, 420 * rows as u32)).into_drawing_area();
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
