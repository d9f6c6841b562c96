//! `featreplay predict`: per image, the model's top-k classes and their probabilities, for
//! image files or a dataset split, as CSV or JSON lines. Inputs are normalised as the model
//! was trained (the checkpoint's stored normalisation).

use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;

use crate::data::folder::decode_image;
use crate::data::{Loader, LoaderConfig, Split};
use crate::error::{Error, Result};
use crate::train::eval::LoadedModel;

/// What to predict.
#[derive(Debug, Clone)]
pub enum Inputs {
    /// Image files (PNG, JPEG), decoded and resized to the model's input.
    Images(Vec<PathBuf>),
    /// A split of the model's dataset (the test split keeps the model's test subset).
    Dataset(Split),
}

/// One class of a prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ranked {
    pub class: usize,
    pub name: String,
    pub probability: f64,
}

/// The prediction for one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The file, or `<split>:<index>` for a dataset image.
    pub image: String,
    /// The true label, for dataset images.
    pub label: Option<u32>,
    /// The top classes, most probable first (ties: lower class index first, as PyTorch's
    /// `topk` orders them).
    pub top: Vec<Ranked>,
}

/// Softmax of one row of logits in f64, and its `k` most probable classes.
fn top_k(logits: &[f32], k: usize) -> Vec<(usize, f64)> {
    let m = logits.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64));
    let e: Vec<f64> = logits.iter().map(|&z| (z as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| e[b].total_cmp(&e[a]).then(a.cmp(&b)));
    order.into_iter().take(k).map(|c| (c, e[c] / s)).collect()
}

/// Predicts the top `k` classes of every input with `model`, `batch_size` images at a time.
pub fn predict(model: &LoadedModel, inputs: &Inputs, k: usize, batch_size: usize) -> Result<Vec<Prediction>> {
    if k == 0 || batch_size == 0 {
        return Err(Error::InvalidConfig {
            op: "predict",
            detail: "--top-k and --batch-size must be at least 1".into(),
        });
    }
    let k = k.min(model.classes);
    let [c, h, w]: [usize; 3] = model.input.as_slice().try_into().map_err(|_| Error::InvalidConfig {
        op: "predict",
        detail: format!("model input {:?} is not [C, H, W]", model.input),
    })?;
    let per = c * h * w;
    let mut out = Vec::new();
    let mut run = |images: &[f32], names: Vec<String>, labels: Vec<Option<u32>>| -> Result<()> {
        let logits = model.net.eval_logits(images, names.len())?.to_vec()?;
        model.net.sync()?;
        for ((row, image), label) in logits.chunks_exact(model.classes).zip(names).zip(labels) {
            if row.iter().any(|v| !v.is_finite()) {
                return Err(Error::Data {
                    path: image,
                    message: "the model produced NaN or infinite logits (diverged weights?)".into(),
                });
            }
            let top = top_k(row, k)
                .into_iter()
                .map(|(class, probability)| Ranked { class, name: model.class_name(class), probability })
                .collect();
            out.push(Prediction { image, label, top });
        }
        Ok(())
    };
    match inputs {
        Inputs::Images(files) => {
            // Decoded before any inference, so a bad file fails the command before work.
            let mut pixels = Vec::with_capacity(files.len());
            for f in files {
                pixels.push(decode_image(f, c, h as u32, w as u32)?);
            }
            for (chunk, names) in pixels.chunks(batch_size).zip(files.chunks(batch_size)) {
                let mut x = Vec::with_capacity(chunk.len() * per);
                for img in chunk {
                    for (i, &v) in img.iter().enumerate() {
                        x.push(model.norm.apply(i / (h * w), v));
                    }
                }
                let names = names.iter().map(|p| p.display().to_string()).collect();
                run(&x, names, vec![None; chunk.len()])?;
            }
        }
        Inputs::Dataset(split) => {
            let data = model.dataset(*split)?;
            let mut index = 0usize;
            for batch in Loader::new(data, model.norm.clone(), LoaderConfig::eval(batch_size), 0)? {
                let n = batch.len();
                let names = (index..index + n).map(|i| format!("{}:{i}", split.name())).collect();
                index += n;
                run(&batch.images, names, batch.labels.iter().map(|&l| Some(l)).collect())?;
            }
        }
    }
    Ok(out)
}

/// Writes `preds` as CSV: `image,label,class_1,name_1,prob_1,...,class_k,name_k,prob_k`.
pub fn write_csv(w: &mut impl Write, preds: &[Prediction]) -> std::io::Result<()> {
    let k = preds.iter().map(|p| p.top.len()).max().unwrap_or(0);
    let mut header = vec!["image".to_string(), "label".to_string()];
    for r in 1..=k {
        header.extend([format!("class_{r}"), format!("name_{r}"), format!("prob_{r}")]);
    }
    writeln!(w, "{}", header.join(","))?;
    let quote = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    for p in preds {
        let mut row = vec![quote(&p.image), p.label.map(|l| l.to_string()).unwrap_or_default()];
        for r in &p.top {
            row.extend([r.class.to_string(), quote(&r.name), format!("{:.6}", r.probability)]);
        }
        writeln!(w, "{}", row.join(","))?;
    }
    Ok(())
}

/// Writes `preds` as JSON lines, one object per image.
pub fn write_jsonl(w: &mut impl Write, preds: &[Prediction]) -> std::io::Result<()> {
    for p in preds {
        writeln!(w, "{}", serde_json::to_string(p).map_err(std::io::Error::other)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::top_k;

    #[test]
    fn top_k_is_a_softmax_in_order_with_ties_to_the_lower_class() {
        let t = top_k(&[1.0, 3.0, 3.0, -1.0], 3);
        assert_eq!(t.iter().map(|(c, _)| *c).collect::<Vec<_>>(), vec![1, 2, 0]);
        let z = [1f64, 3.0, 3.0, -1.0].map(f64::exp);
        let s: f64 = z.iter().sum();
        assert!((t[0].1 - z[1] / s).abs() < 1e-15 && (t[2].1 - z[0] / s).abs() < 1e-15);
        assert!((top_k(&[0.0; 10], 10).iter().map(|(_, p)| p).sum::<f64>() - 1.0).abs() < 1e-12);
    }
}
