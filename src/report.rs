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
}

const JSONL: &str = "metrics.jsonl";
const CSV: &str = "metrics.csv";
const CSV_HEADER: &str = "epoch,lr,train_loss,train_top1,test_loss,test_top1,test_top5,best_test_top1,epoch_seconds,images_per_second,peak_memory_bytes";

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
        writeln!(
            c,
            "{},{},{},{},{},{},{},{},{},{},{}",
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
            mem
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
