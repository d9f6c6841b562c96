//! Regenerates `assets/fashion-mnist-mini/`, the Fashion-MNIST subset embedded in the
//! library (`DatasetKind::Embedded`): the first 4000 training images and the first 1000 test
//! images of Fashion-MNIST with their labels, in the original order, as gzip IDX files.
//!
//! ```sh
//! cargo run --release --example make_fashion_mnist_mini [SOURCE_DIR] [OUT_DIR]
//! ```
//!
//! SOURCE_DIR defaults to `/usr/share/datasets/fashion-mnist` (Debian's
//! `dataset-fashion-mnist` package), OUT_DIR to `assets/fashion-mnist-mini`. The output is a
//! fixed function of the input (gzip level 9, mtime 0).

use std::path::PathBuf;

use featreplay::data::embedded::{EMBEDDED_TEST_LEN, EMBEDDED_TRAIN_LEN};
use featreplay::data::idx::{load_fashion_mnist, write_idx, DEBIAN_FASHION_MNIST};
use featreplay::data::Split;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let src = PathBuf::from(args.next().unwrap_or_else(|| DEBIAN_FASHION_MNIST.to_string()));
    let out = PathBuf::from(args.next().unwrap_or_else(|| "assets/fashion-mnist-mini".to_string()));
    std::fs::create_dir_all(&out)?;
    for (split, prefix, n) in [(Split::Train, "train", EMBEDDED_TRAIN_LEN), (Split::Test, "t10k", EMBEDDED_TEST_LEN)] {
        let full = load_fashion_mnist(&src, split)?;
        anyhow::ensure!(full.len() >= n, "{} has {} images, fewer than {n}", full.name(), full.len());
        let part = full.take(n);
        let (h, w) = (part.height(), part.width());
        let labels: Vec<u8> = part.labels().iter().map(|&l| l as u8).collect();
        let ip = out.join(format!("{prefix}-images-idx3-ubyte.gz"));
        let lp = out.join(format!("{prefix}-labels-idx1-ubyte.gz"));
        write_idx(&ip, &[n, h, w], part.images(), true)?;
        write_idx(&lp, &[n], &labels, true)?;
        println!(
            "{}: first {n} of {} images -> {} ({} bytes), {} ({} bytes); per class {:?}",
            split,
            full.len(),
            ip.display(),
            std::fs::metadata(&ip)?.len(),
            lp.display(),
            std::fs::metadata(&lp)?.len(),
            part.class_counts()
        );
    }
    Ok(())
}
