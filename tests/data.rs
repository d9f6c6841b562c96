//! The data layer on files the tests write themselves (CIFAR binary, IDX plain and gzip,
//! image folders), the error cases, augmentation, normalisation, shuffling, the background
//! loader, the embedded dataset, and the real Fashion-MNIST when it is installed.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use featreplay::data::cifar::{load_cifar10, load_cifar100};
use featreplay::data::embedded::load_embedded;
use featreplay::data::folder::load_folder;
use featreplay::data::idx::{
    dataset_from_idx, encode_idx, load_fashion_mnist, load_idx_pair, load_mnist, read_idx, read_idx_limited, IdxArray,
};
use featreplay::data::{
    augment_params, default_max_host_bytes, epoch_order, make_batch, num_batches, parse_mem_available, transform_image,
    Augment, CropFlip, Dataset, DatasetKind, LastBatch, LoadOptions, Loader, LoaderConfig, Normalization, Split,
    FALLBACK_MAX_HOST_BYTES,
};
use featreplay::Error;

// ---------------------------------------------------------------------------------------
// helpers

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// The error message of `r`, which must be an `Err`.
fn err_msg<T: std::fmt::Debug>(r: featreplay::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.to_string(),
    }
}

/// Asserts that `r` is an error whose message contains every one of `needles`.
fn assert_err<T: std::fmt::Debug>(r: featreplay::Result<T>, needles: &[&str]) -> String {
    let msg = err_msg(r);
    for n in needles {
        assert!(msg.contains(n), "error message {msg:?} should contain {n:?}");
    }
    msg
}

/// Pixel `k` (0..3072) of CIFAR record `r` of file `f`.
fn cifar_pixel(f: usize, r: usize, k: usize) -> u8 {
    ((k * 7 + f * 31 + r * 13) % 256) as u8
}

/// A CIFAR-10 batch file of `n` records; record `r` has label `(f * 3 + r) % 10`.
fn cifar10_file(path: &Path, f: usize, n: usize) {
    let mut bytes = Vec::new();
    for r in 0..n {
        bytes.push(((f * 3 + r) % 10) as u8);
        bytes.extend((0..3072).map(|k| cifar_pixel(f, r, k)));
    }
    std::fs::write(path, bytes).unwrap();
}

/// A CIFAR-10 directory: 5 training files of 3 records, a test file of 2.
fn cifar10_dir(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in 0..5 {
        cifar10_file(&dir.join(format!("data_batch_{}.bin", f + 1)), f, 3);
    }
    cifar10_file(&dir.join("test_batch.bin"), 5, 2);
}

fn write_gz(path: &Path, bytes: &[u8]) {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    std::fs::write(path, e.finish().unwrap()).unwrap();
}

/// An IDX file written by hand (independently of the library's encoder).
fn idx_bytes(type_code: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, type_code, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    b
}

/// `n` images of `h x w` with pixel `(i, y, x) = (i * 11 + y * w + x) % 256`.
fn idx_images(n: usize, h: usize, w: usize) -> Vec<u8> {
    (0..n * h * w).map(|k| ((k / (h * w)) * 11 + k % (h * w)) as u8).collect()
}

/// Writes an MNIST-like split (`train` or `t10k`) of `n` 5x4 images, gzip or plain.
fn write_mnist_split(dir: &Path, prefix: &str, n: usize, gzip: bool) {
    let images = idx_bytes(8, &[n as u32, 5, 4], &idx_images(n, 5, 4));
    let labels = idx_bytes(8, &[n as u32], &(0..n).map(|i| (i % 10) as u8).collect::<Vec<_>>());
    let ext = if gzip { ".gz" } else { "" };
    let ip = dir.join(format!("{prefix}-images-idx3-ubyte{ext}"));
    let lp = dir.join(format!("{prefix}-labels-idx1-ubyte{ext}"));
    if gzip {
        write_gz(&ip, &images);
        write_gz(&lp, &labels);
    } else {
        std::fs::write(ip, images).unwrap();
        std::fs::write(lp, labels).unwrap();
    }
}

/// A small dataset with distinct pixels: `n` images of `c x h x w`, labels `i % classes`.
fn toy(n: usize, c: usize, h: usize, w: usize, classes: usize) -> Dataset {
    let images = (0..n * c * h * w).map(|k| (k * 37 % 251) as u8).collect();
    let labels = (0..n).map(|i| (i % classes) as u32).collect();
    Dataset::new("toy", images, labels, c, h, w, classes, None).unwrap()
}

// ---------------------------------------------------------------------------------------
// CIFAR

#[test]
fn cifar10_pixels_and_labels_land_in_place() {
    let t = tmp();
    let dir = t.path().join("cifar-10-batches-bin");
    cifar10_dir(&dir);
    // Either the directory itself or its parent.
    for root in [dir.as_path(), t.path()] {
        let train = load_cifar10(root, Split::Train).unwrap();
        assert_eq!(train.len(), 15);
        assert_eq!(train.image_shape(), [3, 32, 32]);
        assert_eq!(train.num_classes(), 10);
        assert_eq!(train.class_names().unwrap()[0], "airplane");
        for f in 0..5 {
            for r in 0..3 {
                let i = f * 3 + r;
                assert_eq!(train.label(i), ((f * 3 + r) % 10) as u32);
                let img = train.image(i);
                // channel-planar: red plane, then green, then blue; row-major 32x32.
                for (c, y, x) in [(0, 0, 0), (0, 5, 7), (1, 31, 0), (2, 17, 31), (2, 31, 31)] {
                    let k = c * 1024 + y * 32 + x;
                    assert_eq!(img[k], cifar_pixel(f, r, k), "file {f} record {r} pixel c{c} y{y} x{x}");
                }
                assert!(img.iter().enumerate().all(|(k, &p)| p == cifar_pixel(f, r, k)));
            }
        }
        let test = load_cifar10(root, Split::Test).unwrap();
        assert_eq!(test.len(), 2);
        assert_eq!(test.labels(), &[5, 6]);
        assert_eq!(test.image(1)[100], cifar_pixel(5, 1, 100));
    }
    let via_kind = DatasetKind::Cifar10.load(Split::Train, &LoadOptions::with_root(t.path())).unwrap();
    assert_eq!(via_kind.labels().len(), 15);
    assert_eq!(via_kind.name(), "cifar10-train");
}

#[test]
fn cifar100_uses_fine_labels() {
    let t = tmp();
    let dir = t.path().join("cifar-100-binary");
    std::fs::create_dir_all(&dir).unwrap();
    let record = |r: usize| {
        let mut b = vec![(r % 20) as u8, (r * 33 % 100) as u8];
        b.extend((0..3072).map(|k| ((k + r * 5) % 256) as u8));
        b
    };
    let train: Vec<u8> = (0..7).flat_map(record).collect();
    let test: Vec<u8> = (7..10).flat_map(record).collect();
    std::fs::write(dir.join("train.bin"), train).unwrap();
    std::fs::write(dir.join("test.bin"), test).unwrap();
    let names: String = (0..100).map(|i| format!("class{i}\n")).collect();
    std::fs::write(dir.join("fine_label_names.txt"), names).unwrap();

    let d = load_cifar100(t.path(), Split::Train).unwrap();
    assert_eq!(d.len(), 7);
    assert_eq!(d.num_classes(), 100);
    for r in 0..7 {
        assert_eq!(d.label(r), (r * 33 % 100) as u32);
        assert!(d.image(r).iter().enumerate().all(|(k, &p)| p == ((k + r * 5) % 256) as u8));
    }
    assert_eq!(d.class_names().unwrap()[99], "class99");
    let d = load_cifar100(&dir, Split::Test).unwrap();
    assert_eq!(d.labels(), &[(7 * 33 % 100) as u32, (8 * 33 % 100) as u32, (9 * 33 % 100) as u32]);
    assert_eq!(d.image(2)[3071], ((3071 + 9 * 5) % 256) as u8);
}

#[test]
fn cifar_errors_name_the_file() {
    let t = tmp();
    let dir = t.path().join("c10");
    cifar10_dir(&dir);

    // truncated
    let f = dir.join("data_batch_2.bin");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 5]).unwrap();
    let msg = assert_err(load_cifar10(&dir, Split::Train), &["data_batch_2.bin", "truncated", "9214 bytes", "3073"]);
    assert!(msg.contains("30730000"), "{msg}");
    std::fs::write(&f, &bytes).unwrap();

    // empty file
    std::fs::write(dir.join("test_batch.bin"), b"").unwrap();
    assert_err(load_cifar10(&dir, Split::Test), &["test_batch.bin", "empty"]);
    cifar10_file(&dir.join("test_batch.bin"), 5, 2);

    // label out of range
    let mut bad = bytes.clone();
    bad[3073] = 10;
    std::fs::write(&f, &bad).unwrap();
    assert_err(load_cifar10(&dir, Split::Train), &["data_batch_2.bin", "record 1", "label 10", "out of range"]);
    std::fs::write(&f, &bytes).unwrap();
    assert!(load_cifar10(&dir, Split::Train).is_ok());

    // missing file
    std::fs::remove_file(dir.join("data_batch_4.bin")).unwrap();
    assert_err(load_cifar10(&dir, Split::Train), &["data_batch_4.bin"]);

    // a directory with no CIFAR files, and one that does not exist
    let empty = t.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_err(load_cifar10(&empty, Split::Train), &["empty", "data_batch_1.bin", "cifar-10-batches-bin"]);
    assert_err(load_cifar10(&t.path().join("nope"), Split::Test), &["nope"]);

    // CIFAR-100: fine label out of range, wrong record size
    let c100 = t.path().join("c100");
    std::fs::create_dir_all(&c100).unwrap();
    let mut rec = vec![3u8, 100];
    rec.extend(std::iter::repeat_n(0u8, 3072));
    std::fs::write(c100.join("train.bin"), &rec).unwrap();
    assert_err(load_cifar100(&c100, Split::Train), &["train.bin", "fine label 100"]);
    std::fs::write(c100.join("test.bin"), vec![0u8; 3073 * 2]).unwrap();
    assert_err(load_cifar100(&c100, Split::Test), &["test.bin", "truncated", "3074"]);

    // no directory given
    assert_err(DatasetKind::Cifar10.load(Split::Train, &LoadOptions::default()), &["cifar10", "cifar-10-binary"]);
}

// ---------------------------------------------------------------------------------------
// IDX

#[test]
fn idx_plain_and_gzip() {
    let t = tmp();
    let plain = t.path().join("plain");
    let gz = t.path().join("gz");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::create_dir_all(&gz).unwrap();
    for prefix in ["train", "t10k"] {
        write_mnist_split(&plain, prefix, 13, false);
        write_mnist_split(&gz, prefix, 13, true);
    }
    let a = load_mnist(&plain, Split::Train).unwrap();
    let b = load_fashion_mnist(&gz, Split::Train).unwrap();
    for d in [&a, &b] {
        assert_eq!(d.len(), 13);
        assert_eq!(d.image_shape(), [1, 5, 4]);
        assert_eq!(d.num_classes(), 10);
        assert_eq!(d.images(), &idx_images(13, 5, 4)[..]);
        assert_eq!(d.label(12), 2);
        assert_eq!(d.image(3)[5], (3 * 11 + 5) as u8);
    }
    assert_eq!(a.class_names().unwrap()[7], "7");
    assert_eq!(b.class_names().unwrap()[9], "Ankle boot");
    assert_eq!(load_mnist(&gz, Split::Test).unwrap().len(), 13);

    // torchvision's layout (root/FashionMNIST/raw) and the dotted names of some mirrors
    let tv = t.path().join("tv");
    let raw = tv.join("FashionMNIST").join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    write_mnist_split(&raw, "t10k", 4, true);
    assert_eq!(DatasetKind::FashionMnist.load(Split::Test, &LoadOptions::with_root(&tv)).unwrap().len(), 4);
    let dotted = t.path().join("dotted");
    std::fs::create_dir_all(&dotted).unwrap();
    std::fs::write(dotted.join("train-images.idx3-ubyte"), idx_bytes(8, &[2, 2, 2], &[1; 8])).unwrap();
    std::fs::write(dotted.join("train-labels.idx1-ubyte"), idx_bytes(8, &[2], &[0, 9])).unwrap();
    assert_eq!(load_mnist(&dotted, Split::Train).unwrap().labels(), &[0, 9]);

    // the library's encoder round-trips through the reader
    let p = t.path().join("rt.gz");
    std::fs::write(&p, encode_idx(&[3, 2], &[1, 2, 3, 4, 5, 6], true).unwrap()).unwrap();
    let arr = read_idx(&p).unwrap();
    assert_eq!((arr.dims.as_slice(), arr.data.as_slice()), (&[3usize, 2][..], &[1u8, 2, 3, 4, 5, 6][..]));
}

#[test]
fn idx_errors_name_the_file() {
    let t = tmp();
    let d = t.path();
    let good_images = idx_bytes(8, &[3, 2, 2], &[7; 12]);
    let good_labels = idx_bytes(8, &[3], &[0, 1, 2]);
    let ip = d.join("imgs-idx3-ubyte");
    let lp = d.join("labs-idx1-ubyte");
    let load = || load_idx_pair(&ip, &lp, "x", 10, None);
    std::fs::write(&ip, &good_images).unwrap();
    std::fs::write(&lp, &good_labels).unwrap();
    assert_eq!(load().unwrap().len(), 3);

    // wrong magic
    let mut bad = good_images.clone();
    bad[0] = 0x1a;
    std::fs::write(&ip, &bad).unwrap();
    assert_err(load(), &["imgs-idx3-ubyte", "magic"]);
    // unsupported element type
    bad = good_images.clone();
    bad[2] = 0x0d;
    std::fs::write(&ip, &bad).unwrap();
    assert_err(load(), &["imgs-idx3-ubyte", "0x0d"]);
    // truncated data, truncated header, trailing bytes
    std::fs::write(&ip, &good_images[..good_images.len() - 1]).unwrap();
    assert_err(load(), &["imgs-idx3-ubyte", "truncated", "27 bytes, expected 28"]);
    std::fs::write(&ip, &good_images[..9]).unwrap();
    assert_err(load(), &["imgs-idx3-ubyte", "truncated"]);
    let mut long = good_images.clone();
    long.push(0);
    std::fs::write(&ip, &long).unwrap();
    assert_err(load(), &["imgs-idx3-ubyte", "trailing"]);
    // images file with the wrong number of dimensions
    std::fs::write(&ip, idx_bytes(8, &[3, 4], &[7; 12])).unwrap();
    assert_err(load(), &["imgs-idx3-ubyte", "3 dimensions"]);
    std::fs::write(&ip, &good_images).unwrap();

    // label out of range
    std::fs::write(&lp, idx_bytes(8, &[3], &[0, 10, 2])).unwrap();
    assert_err(load(), &["labs-idx1-ubyte", "label 10", "out of range"]);
    // mismatched counts
    std::fs::write(&lp, idx_bytes(8, &[2], &[0, 1])).unwrap();
    assert_err(load(), &["labs-idx1-ubyte", "2 labels", "3 images", "imgs-idx3-ubyte"]);
    // corrupt gzip
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(&good_labels).unwrap();
    let gz = e.finish().unwrap();
    std::fs::write(&lp, &gz[..gz.len() / 2]).unwrap();
    assert_err(load(), &["labs-idx1-ubyte", "gzip"]);
    // missing file
    std::fs::remove_file(&lp).unwrap();
    assert_err(load(), &["labs-idx1-ubyte"]);

    // a directory missing the labels file of a split
    let dir = d.join("m");
    std::fs::create_dir_all(&dir).unwrap();
    write_mnist_split(&dir, "train", 3, true);
    std::fs::remove_file(dir.join("train-labels-idx1-ubyte.gz")).unwrap();
    assert_err(load_mnist(&dir, Split::Train), &["train-labels-idx1-ubyte"]);
    assert_err(load_mnist(&dir, Split::Test), &["t10k-images-idx3-ubyte"]);
    assert_err(load_mnist(&d.join("absent"), Split::Test), &["absent"]);
}

// ---------------------------------------------------------------------------------------
// image folders

fn save_rgb(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y))).save(path).unwrap();
}

fn save_gray(path: &Path, w: u32, h: u32, v: u8) {
    image::GrayImage::from_pixel(w, h, image::Luma([v])).save(path).unwrap();
}

#[test]
fn image_folder_png_and_jpeg_resized() {
    let t = tmp();
    let root = t.path().join("pets");
    for split in ["train", "test"] {
        for class in ["dog", "cat"] {
            std::fs::create_dir_all(root.join(split).join(class)).unwrap();
        }
    }
    // train/cat: a flat PNG 40x30 and a flat JPEG 20x20; train/dog: a PNG of the output
    // size with a gradient (no resize: exact) and a grayscale PNG; a stray text file.
    save_rgb(&root.join("train/cat/a.png"), 40, 30, |_, _| [200, 100, 50]);
    save_rgb(&root.join("train/cat/b.JPG"), 20, 20, |_, _| [10, 220, 130]);
    save_rgb(&root.join("train/dog/c.png"), 16, 12, |x, y| [x as u8 * 10, y as u8 * 20, 7]);
    save_gray(&root.join("train/dog/d.png"), 8, 8, 90);
    std::fs::write(root.join("train/dog/notes.txt"), "not an image").unwrap();
    save_rgb(&root.join("test/dog/e.jpeg"), 64, 48, |_, _| [0, 0, 255]);

    let d = load_folder(&root, Split::Train, 12, 16).unwrap();
    assert_eq!(d.len(), 4);
    assert_eq!(d.image_shape(), [3, 12, 16]);
    assert_eq!(d.num_classes(), 2);
    assert_eq!(d.class_names().unwrap(), &["cat".to_string(), "dog".to_string()]);
    assert_eq!(d.labels(), &[0, 0, 1, 1]);
    let plane = 12 * 16;
    let close = |got: u8, want: u8, tol: u8| got.abs_diff(want) <= tol;
    // flat PNG resized stays flat; channels planar R, G, B
    let a = d.image(0);
    for (c, want) in [200u8, 100, 50].into_iter().enumerate() {
        assert!(a[c * plane..(c + 1) * plane].iter().all(|&p| close(p, want, 1)), "png channel {c}");
    }
    let b = d.image(1);
    for (c, want) in [10u8, 220, 130].into_iter().enumerate() {
        assert!(b[c * plane..(c + 1) * plane].iter().all(|&p| close(p, want, 4)), "jpeg channel {c}");
    }
    let c = d.image(2);
    for (y, x) in [(0, 0), (3, 5), (11, 15)] {
        assert_eq!(c[y * 16 + x], x as u8 * 10);
        assert_eq!(c[plane + y * 16 + x], y as u8 * 20);
        assert_eq!(c[2 * plane + y * 16 + x], 7);
    }
    assert!(d.image(3).iter().all(|&p| p == 90));

    let test = load_folder(&root, Split::Test, 12, 16).unwrap();
    assert_eq!(test.labels(), &[1]);
    assert_eq!(test.num_classes(), 2);

    // val/ instead of test/
    std::fs::rename(root.join("test"), root.join("val")).unwrap();
    assert_eq!(load_folder(&root, Split::Test, 12, 16).unwrap().len(), 1);
    let (tr, te) = DatasetKind::Folder
        .load_train_test(&LoadOptions { root: Some(root.clone()), image_size: (8, 8), ..Default::default() })
        .unwrap();
    assert_eq!((tr.len(), te.len(), tr.image_shape(), te.image_shape()), (4, 1, [3, 8, 8], [3, 8, 8]));
}

#[test]
fn image_folder_grayscale_and_unsplit() {
    let t = tmp();
    let root = t.path().join("digits");
    for (class, v) in [("one", 10u8), ("two", 20), ("zero", 0)] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        save_gray(&root.join(class).join("x.png"), 10, 10, v);
        save_gray(&root.join(class).join("y.png"), 5, 7, v + 1);
    }
    let d = load_folder(&root, Split::Train, 6, 6).unwrap();
    assert_eq!(d.image_shape(), [1, 6, 6]);
    assert_eq!(d.class_names().unwrap(), &["one".to_string(), "two".into(), "zero".into()]);
    assert_eq!(d.labels(), &[0, 0, 1, 1, 2, 2]);
    assert!(d.image(2).iter().all(|&p| p == 20));
    assert!(d.image(5).iter().all(|&p| p == 1));
    // No train/test split: the test split is an error that says so.
    assert_err(load_folder(&root, Split::Test, 6, 6), &["digits", "no test split"]);
    // one colour image makes the whole split RGB
    save_rgb(&root.join("one/z.png"), 3, 3, |_, _| [1, 2, 3]);
    assert_eq!(load_folder(&root, Split::Train, 6, 6).unwrap().channels(), 3);
}

#[test]
fn image_folder_errors_name_the_file() {
    let t = tmp();
    // empty root
    let empty = t.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_err(load_folder(&empty, Split::Train, 8, 8), &["empty", "no class directories"]);
    // missing root
    assert_err(load_folder(&t.path().join("missing"), Split::Train, 8, 8), &["missing"]);
    // a class directory without images
    let root = t.path().join("r");
    std::fs::create_dir_all(root.join("a")).unwrap();
    std::fs::create_dir_all(root.join("b")).unwrap();
    save_rgb(&root.join("a/ok.png"), 4, 4, |_, _| [1, 1, 1]);
    assert_err(load_folder(&root, Split::Train, 8, 8), &["b", "no .png"]);
    // a corrupt PNG
    std::fs::write(root.join("b/broken.png"), b"\x89PNG\r\n\x1a\nthis is not a png at all").unwrap();
    assert_err(load_folder(&root, Split::Train, 8, 8), &["broken.png", "decode"]);
    // a truncated PNG
    save_rgb(&root.join("b/big.png"), 64, 64, |x, y| [x as u8, y as u8, (x ^ y) as u8]);
    std::fs::remove_file(root.join("b/broken.png")).unwrap();
    assert!(load_folder(&root, Split::Train, 8, 8).is_ok());
    let bytes = std::fs::read(root.join("b/big.png")).unwrap();
    std::fs::write(root.join("b/big.png"), &bytes[..bytes.len() / 2]).unwrap();
    assert_err(load_folder(&root, Split::Train, 8, 8), &["big.png"]);
    // a test class that training does not have
    let s = t.path().join("s");
    std::fs::create_dir_all(s.join("train/a")).unwrap();
    std::fs::create_dir_all(s.join("test/zebra")).unwrap();
    save_rgb(&s.join("train/a/1.png"), 4, 4, |_, _| [1, 1, 1]);
    save_rgb(&s.join("test/zebra/1.png"), 4, 4, |_, _| [1, 1, 1]);
    assert_err(load_folder(&s, Split::Test, 8, 8), &["zebra", "not among the training classes"]);
}

// ---------------------------------------------------------------------------------------
// normalisation and augmentation

#[test]
fn normalisation_values() {
    let n = Normalization::cifar10();
    assert_eq!(n.channels(), 3);
    assert!((n.mean()[0] - 125.3 / 255.0).abs() < 1e-7 && (n.std()[2] - 66.7 / 255.0).abs() < 1e-7);
    let want = (200.0f64 / 255.0 - 123.0 / 255.0) / (62.1 / 255.0);
    assert!((n.apply(1, 200) as f64 - want).abs() < 1e-6);
    let m = Normalization::cifar100();
    assert!((m.mean()[2] - 112.4 / 255.0).abs() < 1e-7 && (m.std()[1] - 65.4 / 255.0).abs() < 1e-7);
    let id = Normalization::identity(1);
    assert_eq!((id.apply(0, 0), id.apply(0, 255)), (0.0, 1.0));
    assert!(Normalization::new(&[0.5], &[0.0]).is_err());
    assert!(Normalization::new(&[0.5, 0.5], &[0.2]).is_err());

    // exact statistics against a direct f64 computation
    let d = toy(9, 3, 5, 7, 4);
    let s = Normalization::from_dataset(&d);
    for c in 0..3 {
        let vals: Vec<f64> = (0..9).flat_map(|i| d.image(i)[c * 35..(c + 1) * 35].to_vec()).map(|v| v as f64).collect();
        let mean = vals.iter().sum::<f64>() / vals.len() as f64;
        let var = vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / vals.len() as f64;
        assert!((s.mean()[c] as f64 - mean / 255.0).abs() < 1e-7, "mean {c}");
        assert!((s.std()[c] as f64 - var.sqrt() / 255.0).abs() < 1e-7, "std {c}");
    }
    // a constant channel gets std 1 (no division by zero)
    let flat = Dataset::new("flat", vec![9; 8], vec![0, 0], 1, 2, 2, 1, None).unwrap();
    let f = Normalization::from_dataset(&flat);
    assert_eq!(f.std(), &[1.0]);
    assert!((f.mean()[0] - 9.0 / 255.0).abs() < 1e-8);
    // known statistics for CIFAR, computed for the rest
    assert_eq!(Normalization::for_kind(DatasetKind::Cifar10, &toy(2, 3, 2, 2, 2)), n);
    assert_eq!(Normalization::for_kind(DatasetKind::Folder, &d), s);
}

/// torchvision's pipeline written out literally: pad with zeros, crop at (top, left), flip.
fn reference_transform(img: &[u8], c: usize, h: usize, w: usize, pad: usize, p: CropFlip) -> Vec<u8> {
    let (ph, pw) = (h + 2 * pad, w + 2 * pad);
    let mut padded = vec![0u8; c * ph * pw];
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                padded[ch * ph * pw + (y + pad) * pw + x + pad] = img[ch * h * w + y * w + x];
            }
        }
    }
    let (top, left) = ((pad as i32 + p.dy) as usize, (pad as i32 + p.dx) as usize);
    let mut out = vec![0u8; c * h * w];
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let v = padded[ch * ph * pw + (top + y) * pw + left + x];
                let xo = if p.flip { w - 1 - x } else { x };
                out[ch * h * w + y * w + xo] = v;
            }
        }
    }
    out
}

#[test]
fn augmentation_crop_and_flip() {
    let aug = Augment::paper();
    let mut seen_dy = HashSet::new();
    let mut flips = 0;
    let mut total = 0;
    for batch in 0..50 {
        let params = augment_params(&aug, 7, 3, batch, 64);
        assert_eq!(params.len(), 64);
        for p in params {
            assert!((-4..=4).contains(&p.dy) && (-4..=4).contains(&p.dx), "{p:?}");
            seen_dy.insert((p.dy, p.dx));
            flips += p.flip as usize;
            total += 1;
        }
    }
    assert_eq!(seen_dy.len(), 81, "every crop offset occurs");
    assert!((total * 4 / 10..total * 6 / 10).contains(&flips), "{flips} flips of {total}");
    // deterministic in (seed, epoch, batch) and different when any changes
    assert_eq!(augment_params(&aug, 7, 3, 5, 32), augment_params(&aug, 7, 3, 5, 32));
    assert_ne!(augment_params(&aug, 7, 3, 5, 32), augment_params(&aug, 7, 4, 5, 32));
    assert_ne!(augment_params(&aug, 7, 3, 5, 32), augment_params(&aug, 7, 3, 6, 32));
    assert_ne!(augment_params(&aug, 7, 3, 5, 32), augment_params(&aug, 8, 3, 5, 32));
    assert!(augment_params(&Augment::none(), 7, 3, 5, 9).iter().all(|p| *p == CropFlip::IDENTITY));

    // known image: transform equals the literal pad / crop / flip, then normalisation
    let (c, h, w) = (2, 5, 6);
    let img: Vec<u8> = (0..c * h * w).map(|k| (k * 3 + 1) as u8).collect();
    let norm = Normalization::new(&[0.2, 0.6], &[0.5, 0.25]).unwrap();
    let mut out = vec![0f32; c * h * w];
    for dy in -4..=4 {
        for dx in -4..=4 {
            for flip in [false, true] {
                let p = CropFlip { dy, dx, flip };
                transform_image(&img, [c, h, w], p, &norm, &mut out).unwrap();
                let want = reference_transform(&img, c, h, w, 4, p);
                for (k, (&o, &v)) in out.iter().zip(&want).enumerate() {
                    assert_eq!(o, norm.apply(k / (h * w), v), "{p:?} at {k}");
                }
            }
        }
    }
    // the flip alone on a known row; padding is black (pixel 0) normalised, not 0.0
    transform_image(&img, [c, h, w], CropFlip { dy: 0, dx: 0, flip: true }, &norm, &mut out).unwrap();
    assert_eq!(out[0], norm.apply(0, img[w - 1]));
    assert_eq!(out[w - 1], norm.apply(0, img[0]));
    transform_image(&img, [c, h, w], CropFlip { dy: -1, dx: 0, flip: false }, &norm, &mut out).unwrap();
    assert_eq!(out[0], (0.0 - 0.2) / 0.5);
    assert_eq!(out[h * w], (0.0 - 0.6) / 0.25);
    assert_eq!(out[w], norm.apply(0, img[0]));
    assert!(transform_image(&img, [c, h, w], CropFlip::IDENTITY, &norm, &mut out[1..]).is_err());
}

#[test]
fn evaluation_has_no_augmentation() {
    let d = Arc::new(toy(23, 3, 4, 4, 5));
    let norm = Normalization::from_dataset(&d);
    let loader = Loader::new(d.clone(), norm.clone(), LoaderConfig::eval(10), 4).unwrap();
    let batches: Vec<_> = loader.collect();
    assert_eq!(batches.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![10, 10, 3]);
    for b in &batches {
        assert_eq!(b.shape, [b.len(), 3, 4, 4]);
        for (j, &i) in b.indices.iter().enumerate() {
            assert_eq!(i, b.index * 10 + j, "dataset order");
            assert_eq!(b.labels[j], d.label(i));
            let img = &b.images[j * 48..(j + 1) * 48];
            for (k, &v) in img.iter().enumerate() {
                assert_eq!(v, norm.apply(k / 16, d.image(i)[k]));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// shuffling and the loader

#[test]
fn epoch_order_is_a_seeded_permutation() {
    let n = 1000;
    let a = epoch_order(n, 42, 0);
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..n).collect::<Vec<_>>());
    assert_eq!(a, epoch_order(n, 42, 0), "same seed and epoch");
    assert_ne!(a, epoch_order(n, 42, 1), "another epoch");
    assert_ne!(a, epoch_order(n, 43, 0), "another seed");
    assert_ne!(a, (0..n).collect::<Vec<_>>());
    let orders: HashSet<Vec<usize>> = (0..20).map(|e| epoch_order(n, 42, e)).collect();
    assert_eq!(orders.len(), 20);
    // position 0 takes many different samples across epochs (no obvious bias)
    let firsts: HashSet<usize> = (0..200).map(|e| epoch_order(10, 1, e)[0]).collect();
    assert_eq!(firsts.len(), 10);
    assert!(epoch_order(0, 1, 1).is_empty());
    assert_eq!(epoch_order(1, 1, 1), vec![0]);
}

#[test]
fn loader_yields_every_sample_once_per_epoch() {
    let d = Arc::new(toy(103, 1, 3, 3, 7));
    let norm = Normalization::from_dataset(&d);
    let cfg = LoaderConfig::train(10, 5);
    assert_eq!(num_batches(103, 10, LastBatch::Keep), 11);
    assert_eq!(num_batches(103, 10, LastBatch::Drop), 10);
    let mut previous = None;
    for epoch in 0..3 {
        let loader = Loader::new(d.clone(), norm.clone(), cfg, epoch).unwrap();
        assert_eq!(loader.len(), 11);
        let batches: Vec<_> = loader.collect();
        assert_eq!(batches.len(), 11);
        assert_eq!(batches[10].len(), 3, "partial batch kept");
        let seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        assert_eq!(seen, epoch_order(103, 5, epoch));
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..103).collect::<Vec<_>>());
        for (i, b) in batches.iter().enumerate() {
            assert_eq!((b.epoch, b.index), (epoch, i));
            assert_eq!(b.images.len(), b.len() * 9);
            assert!(b.indices.iter().zip(&b.labels).all(|(&i, &l)| d.label(i) == l));
        }
        assert_ne!(previous.as_ref(), Some(&seen));
        previous = Some(seen);
    }
    // drop: 10 full batches
    let cfg_drop = LoaderConfig { last_batch: LastBatch::Drop, ..cfg };
    let batches: Vec<_> = Loader::new(d.clone(), norm.clone(), cfg_drop, 0).unwrap().collect();
    assert_eq!(batches.len(), 10);
    assert!(batches.iter().all(|b| b.len() == 10));
    // pad: 11 full batches, the last one ending with the epoch's first 7 samples
    let cfg_pad = LoaderConfig { last_batch: LastBatch::Pad, ..cfg };
    let order = epoch_order(103, 5, 0);
    let batches: Vec<_> = Loader::new(d.clone(), norm.clone(), cfg_pad, 0).unwrap().collect();
    assert_eq!(batches.len(), 11);
    assert!(batches.iter().all(|b| b.len() == 10 && b.images.len() == 90));
    let last = &batches[10];
    assert_eq!(last.indices[..3], order[100..]);
    assert_eq!(last.indices[3..], order[..7]);
    assert!(last.indices.iter().zip(&last.labels).all(|(&i, &l)| d.label(i) == l));
    // the full batches are untouched
    assert_eq!(batches[..10].iter().flat_map(|b| b.indices.clone()).collect::<Vec<_>>(), order[..100]);
    // a dataset smaller than one batch cycles through its order
    let small = Arc::new(toy(4, 1, 3, 3, 2));
    let cfg_small = LoaderConfig { last_batch: LastBatch::Pad, ..LoaderConfig::train(10, 1) };
    let b: Vec<_> = Loader::new(small.clone(), Normalization::from_dataset(&small), cfg_small, 0).unwrap().collect();
    let o = epoch_order(4, 1, 0);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].indices, [o[0], o[1], o[2], o[3], o[0], o[1], o[2], o[3], o[0], o[1]]);
    assert_eq!(num_batches(103, 10, LastBatch::Pad), 11);
    assert_eq!(num_batches(103, 10, LastBatch::Drop), 10);
    assert_eq!(num_batches(103, 10, LastBatch::Keep), 11);
}

#[test]
fn loader_is_reproducible_and_resumable() {
    let d = Arc::new(toy(57, 3, 8, 8, 3));
    let norm = Normalization::from_dataset(&d);
    let cfg = LoaderConfig { prefetch: 2, ..LoaderConfig::train(8, 11) };
    let full: Vec<_> = Loader::new(d.clone(), norm.clone(), cfg, 2).unwrap().collect();
    let again: Vec<_> = Loader::new(d.clone(), norm.clone(), cfg, 2).unwrap().collect();
    assert_eq!(full, again);
    let other: Vec<_> = Loader::new(d.clone(), norm.clone(), cfg, 3).unwrap().collect();
    assert_ne!(full[0].images, other[0].images);
    // resuming at batch 5 gives the tail of the epoch; make_batch gives any batch
    let resumed: Vec<_> = Loader::starting_at(d.clone(), norm.clone(), cfg, 2, 5).unwrap().collect();
    assert_eq!(resumed, full[5..]);
    assert_eq!(make_batch(&d, &norm, &cfg, 2, 7).unwrap(), full[7]);
    assert_eq!(Loader::starting_at(d.clone(), norm.clone(), cfg, 2, full.len()).unwrap().count(), 0);
    assert!(Loader::starting_at(d.clone(), norm.clone(), cfg, 2, full.len() + 1).is_err());
    assert!(make_batch(&d, &norm, &cfg, 2, full.len()).is_err());
    // augmentation really happens in training (some image differs from its plain version)
    let plain = Normalization::from_dataset(&d);
    let changed =
        full.iter().flat_map(|b| b.indices.iter().enumerate().map(move |(j, &i)| (b, j, i))).any(|(b, j, i)| {
            b.images[j * 192..(j + 1) * 192].iter().enumerate().any(|(k, &v)| v != plain.apply(k / 64, d.image(i)[k]))
        });
    assert!(changed);
    // bad configurations
    assert!(Loader::new(d.clone(), norm.clone(), LoaderConfig::train(0, 1), 0).is_err());
    assert!(Loader::new(d.clone(), Normalization::identity(1), cfg, 0).is_err());
}

#[test]
fn dropping_a_loader_early_does_not_hang() {
    let d = Arc::new(toy(2000, 3, 16, 16, 10));
    let norm = Normalization::from_dataset(&d);
    let cfg = LoaderConfig { prefetch: 1, ..LoaderConfig::train(4, 0) };
    let start = Instant::now();
    for _ in 0..20 {
        let mut loader = Loader::new(d.clone(), norm.clone(), cfg, 0).unwrap();
        let first = loader.next().unwrap();
        assert_eq!(first.len(), 4);
        std::thread::sleep(Duration::from_millis(2)); // let the thread block on the full channel
        drop(loader);
    }
    // an untouched loader, too
    drop(Loader::new(d.clone(), norm, cfg, 1).unwrap());
    assert!(start.elapsed() < Duration::from_secs(5), "dropping loaders took {:?}", start.elapsed());
}

// ---------------------------------------------------------------------------------------
// datasets, kinds, the embedded subset, the real Fashion-MNIST

#[test]
fn dataset_kind_names() {
    for k in DatasetKind::ALL {
        assert_eq!(k.to_string().parse::<DatasetKind>().unwrap(), k);
    }
    assert_eq!("cifar10".parse::<DatasetKind>().unwrap(), DatasetKind::Cifar10);
    assert_eq!("CIFAR-100".parse::<DatasetKind>().unwrap(), DatasetKind::Cifar100);
    assert_eq!("fashion-mnist".parse::<DatasetKind>().unwrap(), DatasetKind::FashionMnist);
    assert_eq!("fashion_mnist".parse::<DatasetKind>().unwrap(), DatasetKind::FashionMnist);
    assert_eq!("mnist".parse::<DatasetKind>().unwrap(), DatasetKind::Mnist);
    assert_eq!("folder".parse::<DatasetKind>().unwrap(), DatasetKind::Folder);
    assert_eq!("embedded".parse::<DatasetKind>().unwrap(), DatasetKind::Embedded);
    let e = "imagenet".parse::<DatasetKind>().unwrap_err();
    assert!(e.contains("imagenet") && e.contains("cifar10") && e.contains("embedded"), "{e}");
    assert_eq!("val".parse::<Split>().unwrap(), Split::Test);
    assert_eq!("train".parse::<Split>().unwrap(), Split::Train);
    assert!("dev".parse::<Split>().is_err());
}

#[test]
fn dataset_checks_and_helpers() {
    assert!(matches!(Dataset::new("x", vec![0; 5], vec![0, 0], 1, 1, 2, 1, None), Err(Error::Data { .. })));
    assert!(Dataset::new("x", vec![0; 4], vec![0, 3], 1, 1, 2, 3, None).unwrap_err().to_string().contains("label 3"));
    assert!(Dataset::new("x", vec![], vec![], 0, 1, 1, 1, None).is_err());
    assert!(Dataset::new("x", vec![0; 2], vec![0], 1, 1, 2, 2, Some(vec!["a".into()])).is_err());
    let d = toy(10, 1, 2, 2, 3);
    assert_eq!(d.class_counts(), vec![4, 3, 3]);
    let s = d.subset(&[9, 0, 9], "s").unwrap();
    assert_eq!(s.labels(), &[0, 0, 0]);
    assert_eq!(s.image(0), d.image(9));
    assert!(d.subset(&[10], "s").is_err());
    assert_eq!(d.take(4).len(), 4);
    let (rest, held) = d.split_holdout(3, 1);
    assert_eq!((rest.len(), held.len()), (7, 3));
    let mut all: Vec<Vec<u8>> =
        (0..7).map(|i| rest.image(i).to_vec()).chain((0..3).map(|i| held.image(i).to_vec())).collect();
    all.sort();
    let mut orig: Vec<Vec<u8>> = (0..10).map(|i| d.image(i).to_vec()).collect();
    orig.sort();
    assert_eq!(all, orig);
    let rgb = d.to_rgb();
    assert_eq!(rgb.image_shape(), [3, 2, 2]);
    assert_eq!(&rgb.image(1)[4..8], d.image(1));
}

#[test]
fn embedded_dataset_loads_offline() {
    let train = DatasetKind::Embedded.load(Split::Train, &LoadOptions::default()).unwrap();
    let test = load_embedded(Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (4000, 1000));
    assert_eq!(train.image_shape(), [1, 28, 28]);
    assert_eq!(train.num_classes(), 10);
    assert_eq!(train.class_names().unwrap()[0], "T-shirt/top");
    assert_eq!(train.name(), "fashion-mnist-mini-train");
    // roughly balanced
    assert!(train.class_counts().iter().all(|&c| (300..=500).contains(&c)), "{:?}", train.class_counts());
    assert!(test.class_counts().iter().all(|&c| (70..=130).contains(&c)), "{:?}", test.class_counts());
    // real images, not blank: Fashion-MNIST's mean is about 0.286
    let norm = Normalization::from_dataset(&train);
    assert!((0.25..0.32).contains(&norm.mean()[0]) && (0.3..0.4).contains(&norm.std()[0]), "{norm:?}");
    let (tr, te) = DatasetKind::Embedded.load_train_test(&LoadOptions::default()).unwrap();
    assert_eq!((tr.len(), te.len()), (4000, 1000));
}

/// The real Fashion-MNIST from Debian's `dataset-fashion-mnist` package. CI installs it, so
/// there the test runs. Where the directory is absent the test prints that it was not found
/// and returns (passes), unless FEATREPLAY_REQUIRE_FASHION_MNIST=1 is set, in which case it
/// fails with a clear message.
#[test]
fn real_fashion_mnist_if_installed() {
    let dir = Path::new(featreplay::data::idx::DEBIAN_FASHION_MNIST);
    if !dir.is_dir() {
        let required = std::env::var("FEATREPLAY_REQUIRE_FASHION_MNIST").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "FEATREPLAY_REQUIRE_FASHION_MNIST=1 but {} does not exist: install Debian's dataset-fashion-mnist package",
            dir.display()
        );
        eprintln!("{} not found: skipping the real Fashion-MNIST test", dir.display());
        return;
    }
    let train = DatasetKind::FashionMnist.load(Split::Train, &LoadOptions::with_root(dir)).unwrap();
    let test = load_fashion_mnist(dir, Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (60000, 10000));
    assert_eq!(train.image_shape(), [1, 28, 28]);
    assert_eq!(train.class_counts(), vec![6000; 10]);
    assert_eq!(test.class_counts(), vec![1000; 10]);
    // no directory given: the kind's default root is this one
    assert_eq!(DatasetKind::FashionMnist.load(Split::Test, &LoadOptions::default()).unwrap().len(), 10000);
    // the embedded subset is exactly the first images of the real files
    let mini = load_embedded(Split::Train).unwrap();
    assert_eq!(mini.images(), &train.images()[..4000 * 784]);
    assert_eq!(mini.labels(), &train.labels()[..4000]);
    let mini_test = load_embedded(Split::Test).unwrap();
    assert_eq!(mini_test.images(), &test.images()[..1000 * 784]);
    // the well-known statistics of the training set (mean 0.2860, std 0.3530)
    let norm = Normalization::from_dataset(&train);
    assert!((norm.mean()[0] - 0.2860).abs() < 5e-4 && (norm.std()[0] - 0.3530).abs() < 5e-4, "{norm:?}");
}

// ---------------------------------------------------------------------------------------
// hostile input: sizes, limits, special files, odd names

/// `LoadOptions` for `root` with a host-memory limit of `max_host_bytes`.
fn limited(root: &Path, max_host_bytes: u64) -> LoadOptions {
    LoadOptions { max_host_bytes, ..LoadOptions::with_root(root) }
}

/// A file of `len` bytes that starts with `prefix` and is a hole after it: a huge file that
/// takes no disk space, and that a loader must refuse from its size alone.
fn sparse_file(path: &Path, prefix: &[u8], len: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(prefix).unwrap();
    f.set_len(len).unwrap();
}

/// Runs `f` on another thread and returns its result, failing the test if it takes more
/// than 10 s: a loader that opens a FIFO blocks forever, and must not hang the suite.
fn within_10s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what} did not return within 10 s: blocked on a FIFO?"))
}

/// Makes a FIFO (named pipe) at `path` with `mkfifo`.
fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo").arg(path).status().expect("run mkfifo");
    assert!(status.success(), "mkfifo {} failed", path.display());
}

#[test]
fn default_host_limit_is_mem_available() {
    let meminfo = "MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   23716932 kB\n";
    assert_eq!(parse_mem_available(meminfo), Some(23716932 * 1024));
    assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
    assert_eq!(parse_mem_available("MemAvailable: lots kB\n"), None);
    assert_eq!(parse_mem_available("MemAvailable: 5 pages\n"), None);
    let default = default_max_host_bytes();
    match std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| parse_mem_available(&t)) {
        // MemAvailable moves between two reads; it does not halve or double.
        Some(now) => assert!(default / 2 < now && now < default.saturating_mul(2), "{default} vs {now}"),
        None => assert_eq!(default, FALLBACK_MAX_HOST_BYTES),
    }
    assert_eq!(FALLBACK_MAX_HOST_BYTES, 8 << 30);
    assert!(LoadOptions::default().max_host_bytes > 0);
    assert!(LoadOptions::with_root("x").max_host_bytes > 0);
}

#[test]
fn gzip_idx_is_read_only_as_far_as_its_header_declares() {
    let t = tmp();
    // A labels header (8 bytes) declaring 10 bytes, then 64 MiB of zeros: the gzip file is a few
    // dozen KiB. Truncated to half, it would fail the gzip checks if it were decompressed
    // to the end; read as far as its header declares (and one byte more), it is refused
    // for its trailing data instead, without the rest ever being inflated.
    let mut raw = idx_bytes(8, &[10], &[1; 10]);
    raw.resize(raw.len() + (64 << 20), 0);
    let p = t.path().join("bomb-labels-idx1-ubyte.gz");
    write_gz(&p, &raw);
    let gz = std::fs::read(&p).unwrap();
    assert!(gz.len() < 1 << 20, "{} bytes", gz.len());
    std::fs::write(&p, &gz[..gz.len() / 2]).unwrap();
    let msg = assert_err(
        read_idx(&p),
        &["bomb-labels-idx1-ubyte.gz", "trailing data: decompresses to more than the 18 bytes its header declares"],
    );
    assert!(!msg.contains("gzip"), "{msg}");
    // The same, whole, through the images/labels pair.
    write_gz(&p, &raw);
    let ip = t.path().join("i-idx3-ubyte.gz");
    write_gz(&ip, &idx_bytes(8, &[10, 1, 1], &[0; 10]));
    assert_err(load_idx_pair(&ip, &p, "x", 10, None), &["bomb-labels-idx1-ubyte.gz", "more than the 18 bytes"]);
    // Plain: the file's size is compared with the header before the data is read.
    let plain = t.path().join("plain-idx1-ubyte");
    std::fs::write(&plain, &raw[..(1 << 20) + 18]).unwrap();
    assert_err(
        read_idx(&plain),
        &["plain-idx1-ubyte", "trailing data: 1048594 bytes, more than the 18 bytes its header declares"],
    );
    // An exact file still reads.
    write_gz(&p, &raw[..18]);
    assert_eq!(read_idx(&p).unwrap().data, vec![1; 10]);
}

#[test]
fn idx_sizes_are_checked_before_reading() {
    let t = tmp();
    // An 8 TiB sparse file with a valid header: refused from its size, not read.
    let huge = t.path().join("huge-idx3-ubyte");
    sparse_file(&huge, &idx_bytes(8, &[3, 2, 2], &[]), 8 << 40);
    // The default limit follows the memory available now, which moves while other
    // processes run (an exact byte count here failed under load): the message must name it.
    assert_err(
        read_idx(&huge),
        &["huge-idx3-ubyte", "8.0 TiB (8796093022208 bytes)", "more than an IDX file", "host-memory limit of"],
    );
    assert_err(
        read_idx_limited(&huge, 1 << 30),
        &["huge-idx3-ubyte", "host-memory limit of 1.0 GiB (1073741824 bytes)"],
    );

    // A gzip header announcing the real Fashion-MNIST size, against a 1 MiB limit: refused
    // from the header alone (the file holds no pixels at all).
    let dir = t.path().join("fm");
    std::fs::create_dir_all(&dir).unwrap();
    write_gz(&dir.join("train-images-idx3-ubyte.gz"), &idx_bytes(8, &[60000, 28, 28], &[]));
    write_gz(&dir.join("train-labels-idx1-ubyte.gz"), &idx_bytes(8, &[60000], &[]));
    assert_err(
        DatasetKind::FashionMnist.load(Split::Train, &limited(&dir, 1 << 20)),
        &[
            "train-images-idx3-ubyte.gz",
            "the 60000x28x28 bytes its header declares need 44.9 MiB (47040000 bytes) of host memory",
            "more than the limit of 1.0 MiB (1048576 bytes)",
        ],
    );
    // A header whose product overflows.
    let p = t.path().join("overflow-idx3-ubyte.gz");
    write_gz(&p, &idx_bytes(8, &[u32::MAX, u32::MAX, u32::MAX], &[]));
    assert_err(read_idx(&p), &["overflow-idx3-ubyte.gz", "more than 2^64 bytes"]);

    // The limit is inclusive: 13 images of 5x4 take 260 bytes.
    let ok = t.path().join("ok");
    std::fs::create_dir_all(&ok).unwrap();
    write_mnist_split(&ok, "train", 13, true);
    assert_eq!(DatasetKind::Mnist.load(Split::Train, &limited(&ok, 260)).unwrap().len(), 13);
    assert_err(DatasetKind::Mnist.load(Split::Train, &limited(&ok, 259)), &["need 260 bytes", "limit of 259 bytes"]);
}

#[test]
fn idx_errors_stay_short_for_many_dimensions() {
    let t = tmp();
    let ip = t.path().join("many-idx3-ubyte");
    let lp = t.path().join("labels-idx1-ubyte");
    std::fs::write(&lp, idx_bytes(8, &[1], &[0])).unwrap();
    // 250 dimensions of 2^32 - 1: an images file is refused right after its magic number.
    std::fs::write(&ip, idx_bytes(8, &[u32::MAX; 250], &[])).unwrap();
    let msg = assert_err(
        load_idx_pair(&ip, &lp, "x", 10, None),
        &["many-idx3-ubyte", "an images file must have 3 dimensions (N x H x W), this one has 250"],
    );
    assert!(msg.len() < 200, "{} characters: {msg}", msg.len());
    // A labels file with 2.
    std::fs::write(&ip, idx_bytes(8, &[1, 1, 1], &[0])).unwrap();
    std::fs::write(&lp, idx_bytes(8, &[1, 1], &[0])).unwrap();
    assert_err(load_idx_pair(&ip, &lp, "x", 10, None), &["labels-idx1-ubyte", "1 dimension (N), this one has 2"]);
    // Read as any IDX array, the dimensions listed are capped at 8.
    let p = t.path().join("any-idx");
    std::fs::write(&p, idx_bytes(8, &[1; 255], &[])).unwrap();
    let msg = assert_err(read_idx(&p), &["any-idx", "truncated", "1x1x1x1x1x1x1x1 ... and 247 more"]);
    assert!(msg.len() < 250, "{} characters: {msg}", msg.len());
    let msg = assert_err(read_idx(&p.with_file_name("nope")), &["nope"]);
    assert!(msg.len() < 200, "{msg}");
    std::fs::write(&p, idx_bytes(8, &[u32::MAX; 255], &[])).unwrap();
    let msg = assert_err(read_idx(&p), &["any-idx", "4294967295x4294967295", "... and 247 more"]);
    assert!(msg.len() < 300, "{} characters: {msg}", msg.len());
    // Arrays made elsewhere are capped too.
    let many = IdxArray { dims: vec![1; 200], data: vec![0] };
    let one = IdxArray { dims: vec![1], data: vec![0] };
    let msg = assert_err(
        dataset_from_idx("x", many, &ip, one, &lp, 10, None),
        &["this one has 200 (1x1x1x1x1x1x1x1 ... and 192 more)"],
    );
    assert!(msg.len() < 200, "{} characters: {msg}", msg.len());
}

#[test]
fn empty_splits_are_refused() {
    let t = tmp();
    // Headers that declare no images: valid IDX files, but nothing to train on.
    let dir = t.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    write_mnist_split(&dir, "train", 0, true);
    write_mnist_split(&dir, "t10k", 3, false);
    assert_err(
        load_mnist(&dir, Split::Train),
        &["train-images-idx3-ubyte.gz", "holds no images (its header declares 0x5x4)"],
    );
    assert_err(
        DatasetKind::Mnist.load_train_test(&LoadOptions::with_root(&dir)),
        &["train-images-idx3-ubyte.gz", "no images"],
    );
    write_mnist_split(&dir, "train", 3, true);
    write_mnist_split(&dir, "t10k", 0, false);
    assert_err(
        DatasetKind::Mnist.load_train_test(&LoadOptions::with_root(&dir)),
        &["t10k-images-idx3-ubyte", "no images"],
    );
    write_mnist_split(&dir, "t10k", 2, false);
    let (train, test) = DatasetKind::Mnist.load_train_test(&LoadOptions::with_root(&dir)).unwrap();
    assert_eq!((train.len(), test.len()), (3, 2));

    // A folder whose test classes hold no image, and a CIFAR test file with no record.
    let root = t.path().join("f");
    std::fs::create_dir_all(root.join("train/a")).unwrap();
    std::fs::create_dir_all(root.join("test/a")).unwrap();
    save_rgb(&root.join("train/a/1.png"), 4, 4, |_, _| [1, 2, 3]);
    let opts = LoadOptions { image_size: (4, 4), ..LoadOptions::with_root(&root) };
    assert_err(DatasetKind::Folder.load_train_test(&opts), &["test", "no .png/.jpg/.jpeg images"]);
    let c = t.path().join("c");
    cifar10_dir(&c);
    std::fs::write(c.join("test_batch.bin"), b"").unwrap();
    assert_err(DatasetKind::Cifar10.load_train_test(&LoadOptions::with_root(&c)), &["test_batch.bin", "empty"]);
}

#[test]
fn cifar_sizes_are_checked_before_reading() {
    let t = tmp();
    let dir = t.path().join("c");
    cifar10_dir(&dir);
    // 15 training records of 3072 pixel bytes: 46080 bytes; the limit is inclusive.
    assert_eq!(DatasetKind::Cifar10.load(Split::Train, &limited(&dir, 46080)).unwrap().len(), 15);
    assert_err(
        DatasetKind::Cifar10.load(Split::Train, &limited(&dir, 10000)),
        &[
            "the 15 CIFAR-10 images of 3x32x32 of the train split need 45.0 KiB (46080 bytes) of host memory",
            "more than the limit of 9.8 KiB (10000 bytes)",
        ],
    );
    // A sparse 768 GiB data_batch_1.bin of whole records (and the 12 of the other files):
    // refused from its size.
    let records = 1u64 << 28;
    sparse_file(&dir.join("data_batch_1.bin"), &[], records * 3073);
    assert_err(load_cifar10(&dir, Split::Train), &["the 268435468 CIFAR-10 images", "768.0 GiB (824633757696 bytes)"]);
    // One of 1 TiB, not whole records: refused from its size as truncated.
    sparse_file(&dir.join("data_batch_1.bin"), &[], 1 << 40);
    assert_err(load_cifar10(&dir, Split::Train), &["data_batch_1.bin", "truncated: 1099511627776 bytes"]);
    // CIFAR-100's single file is named.
    let c100 = t.path().join("c100");
    std::fs::create_dir_all(&c100).unwrap();
    std::fs::write(c100.join("test.bin"), vec![0u8; 3074 * 4]).unwrap();
    assert_err(
        DatasetKind::Cifar100.load(Split::Test, &limited(&c100, 3 * 3072)),
        &["test.bin", "the 4 CIFAR-100 images", "limit of 9.0 KiB (9216 bytes)"],
    );
    // A class-names file larger than any list of names is refused, not read.
    cifar10_dir(&dir);
    sparse_file(&dir.join("batches.meta.txt"), b"cat\n", 1 << 40);
    assert_err(load_cifar10(&dir, Split::Test), &["batches.meta.txt", "more than a class-names file can be (1.0 MiB"]);
}

#[test]
fn folder_image_size_and_memory_are_checked_before_decoding() {
    let t = tmp();
    let root = t.path().join("r");
    std::fs::create_dir_all(root.join("a")).unwrap();
    std::fs::create_dir_all(root.join("b")).unwrap();
    for i in 0..15 {
        save_rgb(&root.join(format!("a/{i}.png")), 2, 2, |_, _| [1, 2, 3]);
        save_gray(&root.join(format!("b/{i}.png")), 2, 2, 9);
    }
    for size in [(0, 8), (8, 0), (4097, 32), (32, 1 << 20), (u32::MAX, u32::MAX)] {
        let (h, w) = size;
        let opts = LoadOptions { image_size: size, ..LoadOptions::with_root(&root) };
        let want = format!("image size {h}x{w}: each side must be 1 to 4096 pixels");
        assert_err(DatasetKind::Folder.load(Split::Train, &opts), &["r", &want]);
        assert_err(load_folder(&root, Split::Train, h, w), &[&want]);
    }
    // 30 files at 4096x4096 take 1.4 GiB decoded: over a 1 GiB limit, refused at once
    // (decoding and resizing them would take many seconds).
    let start = Instant::now();
    let opts = LoadOptions { image_size: (4096, 4096), ..limited(&root, 1 << 30) };
    assert_err(
        DatasetKind::Folder.load(Split::Train, &opts),
        &[
            "the 30 images of 3x4096x4096 of the train split need 1.4 GiB (1509949440 bytes) of host memory",
            "more than the limit of 1.0 GiB (1073741824 bytes)",
        ],
    );
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    // The limit is inclusive and counts 3 channels while decoding: 30 x 3 x 4 x 4 = 1440.
    let opts = LoadOptions { image_size: (4, 4), ..limited(&root, 1440) };
    let d = DatasetKind::Folder.load(Split::Train, &opts).unwrap();
    assert_eq!((d.len(), d.image_shape()), (30, [3, 4, 4]));
    assert!(d.image(0).chunks(16).zip([1, 2, 3]).all(|(plane, v)| plane.iter().all(|&p| p == v)));
    assert!(d.image(29).iter().all(|&p| p == 9));
    let opts = LoadOptions { image_size: (4, 4), ..limited(&root, 1439) };
    assert_err(DatasetKind::Folder.load(Split::Train, &opts), &["need 1.4 KiB (1440 bytes)"]);
    // An image file larger than the decoder could ever decode: refused from its size.
    sparse_file(&root.join("b/huge.png"), b"\x89PNG\r\n\x1a\n", 1 << 40);
    assert_err(load_folder(&root, Split::Train, 4, 4), &["huge.png", "is 1.0 TiB", "more than an image file may be"]);
}

#[test]
fn non_utf8_class_folders_stay_distinct() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let t = tmp();
    let root = t.path().join("odd");
    // Two class names that differ only in a byte that is not UTF-8: lossy conversion makes
    // both "a\u{fffd}", but they are two classes.
    let fe = OsStr::from_bytes(b"a\xfe");
    let ff = OsStr::from_bytes(b"a\xff");
    for (split, class, v) in [("train", fe, 10u8), ("train", ff, 20), ("test", ff, 30)] {
        let dir = root.join(split).join(class);
        std::fs::create_dir_all(&dir).unwrap();
        save_gray(&dir.join("x.png"), 3, 3, v);
    }
    let train = load_folder(&root, Split::Train, 3, 3).unwrap();
    assert_eq!(train.num_classes(), 2);
    assert_eq!(train.labels(), &[0, 1]);
    assert_eq!(train.class_names().unwrap(), &["a\\xfe".to_string(), "a\\xff".to_string()]);
    assert!(train.image(0).iter().all(|&p| p == 10) && train.image(1).iter().all(|&p| p == 20));
    // The test split's class is matched by its raw name.
    let test = load_folder(&root, Split::Test, 3, 3).unwrap();
    assert_eq!(test.labels(), &[1]);
    // One that training does not have is named readably.
    std::fs::create_dir_all(root.join("test").join(OsStr::from_bytes(b"a\xfd"))).unwrap();
    assert_err(
        load_folder(&root, Split::Test, 3, 3),
        &["class 'a\\xfd' is not among the training classes (a\\xfe, a\\xff)"],
    );
}

#[test]
fn idx_fifos_are_refused_not_waited_on() {
    let t = tmp();
    let d = t.path().to_path_buf();
    // A FIFO given as the labels file, read directly and through a directory.
    let ip = d.join("imgs-idx3-ubyte");
    let lp = d.join("labs-idx1-ubyte");
    std::fs::write(&ip, idx_bytes(8, &[1, 2, 2], &[0; 4])).unwrap();
    mkfifo(&lp);
    let (i, l) = (ip.clone(), lp.clone());
    let r = within_10s("load_idx_pair", move || load_idx_pair(&i, &l, "x", 10, None));
    assert_err(r, &["labs-idx1-ubyte: is not a regular file (a FIFO (named pipe))"]);
    let l = lp.clone();
    assert_err(within_10s("read_idx", move || read_idx(&l)), &["labs-idx1-ubyte", "not a regular file"]);
    let m = d.join("m");
    std::fs::create_dir_all(&m).unwrap();
    write_mnist_split(&m, "train", 2, false);
    std::fs::remove_file(m.join("train-images-idx3-ubyte")).unwrap();
    mkfifo(&m.join("train-images-idx3-ubyte"));
    let dir = m.clone();
    let r = within_10s("load_mnist", move || load_mnist(&dir, Split::Train));
    assert_err(r, &["train-images-idx3-ubyte", "not a regular file"]);
    // A symlink to a regular file is fine.
    std::fs::remove_file(&lp).unwrap();
    std::fs::write(d.join("real-labels"), idx_bytes(8, &[1], &[3])).unwrap();
    std::os::unix::fs::symlink(d.join("real-labels"), &lp).unwrap();
    assert_eq!(load_idx_pair(&ip, &lp, "x", 10, None).unwrap().labels(), &[3]);
}

#[test]
fn cifar_fifos_are_refused_not_waited_on() {
    let t = tmp();
    // A FIFO among the training batches, and as the class-names file.
    let c = t.path().join("c");
    cifar10_dir(&c);
    std::fs::remove_file(c.join("data_batch_3.bin")).unwrap();
    mkfifo(&c.join("data_batch_3.bin"));
    let dir = c.clone();
    let r = within_10s("load_cifar10", move || load_cifar10(&dir, Split::Train));
    assert_err(r, &["data_batch_3.bin", "not a regular file"]);
    mkfifo(&c.join("batches.meta.txt"));
    let dir = c.clone();
    let r = within_10s("load_cifar10", move || load_cifar10(&dir, Split::Test));
    assert_err(r, &["batches.meta.txt", "not a regular file"]);
}

#[test]
fn folder_fifos_are_refused_not_waited_on() {
    let t = tmp();
    // A FIFO named like an image is refused, not skipped in silence.
    let f = t.path().join("f");
    std::fs::create_dir_all(f.join("cat")).unwrap();
    save_rgb(&f.join("cat/a.png"), 2, 2, |_, _| [1, 2, 3]);
    mkfifo(&f.join("cat/b.png"));
    let dir = f.clone();
    let r = within_10s("load_folder", move || load_folder(&dir, Split::Train, 2, 2));
    assert_err(r, &["b.png", "not a regular file"]);
    // A symlink to a regular file is fine; a directory named like an image is skipped.
    std::fs::remove_file(f.join("cat/b.png")).unwrap();
    std::os::unix::fs::symlink(f.join("cat/a.png"), f.join("cat/b.png")).unwrap();
    std::fs::create_dir_all(f.join("cat/c.png")).unwrap();
    assert_eq!(load_folder(&f, Split::Train, 2, 2).unwrap().len(), 2);
}
