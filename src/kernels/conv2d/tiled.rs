//! The `tiled` conv variant: shared-memory tiled implicit GEMM (`shaders/conv2d_tiled.wgsl`),
//! the kernel for discrete and integrated GPUs. The shader's header explains the tiling; this
//! file picks a tile shape per GEMM, sizes the grids and, for backward-filter, the split-K.
//!
//! Pipelines are specialised on the kernel size, the stride and the tile shape (at most three
//! shapes), never on channel counts or image sizes, so a network compiles few of them.

use bytemuck::{Pod, Zeroable};

use super::ConvShape;
use crate::error::{Error, Result};
use crate::gpu::{Arg, Gpu, Kernel, Tensor};

const SHADER: &str = "conv2d_tiled";
/// Invocations per workgroup: the size every WebGPU device supports.
const WG: u32 = 256;
/// Depth of a K tile (the shader's `BK`).
const BK: usize = 8;
/// Workgroup memory the shader declares: A tile 8 x 17 vec4s and B tile 8 x 65 vec4s.
const WORKGROUP_BYTES: u32 = (8 * 17 + 8 * 65) * 16;

/// Split-K aims for about this many workgroups in all: two waves of 256-invocation
/// workgroups on a GPU with ~100-130 compute units (one or two resident per unit). More only
/// lengthen the reduce; fewer leave backward-filter of a deep layer (a handful of output tiles
/// over a K of batch x pixels) running on a few units.
const SPLIT_TARGET_WORKGROUPS: usize = 256;
/// Each split covers at least this many K tiles (1024 products per output), so the partial
/// sums written and re-read are at most 1/512 of the GEMM's loads per output.
const SPLIT_MIN_TILES: usize = 128;
/// The partial-sum buffer is capped at 4 MiB.
const SPLIT_MAX_PARTIAL: usize = 1 << 20;
/// Outputs per workgroup of `reduce_splits` (the shader's `RED_COLS`).
const RED_COLS: usize = 32;

/// Must match the shader's `Params`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    batch: u32,
    in_c: u32,
    in_h: u32,
    in_w: u32,
    out_c: u32,
    out_h: u32,
    out_w: u32,
    pad: u32,
    tiles_m: u32,
    chunk_tiles: u32,
    splits: u32,
    n_out: u32,
}

/// A tile shape of the 256 invocations: `wg_m` invocations along M, each holding 8 x 4
/// outputs (8 rows), so the workgroup computes `8 wg_m` x `4 (256 / wg_m)` outputs.
#[derive(Clone, Copy, Debug)]
struct Tile {
    wg_m: u32,
}

impl Tile {
    fn bm(self) -> usize {
        8 * self.wg_m as usize
    }
    fn bn(self) -> usize {
        4 * (WG / self.wg_m) as usize
    }
}

/// The tile shape for an `m` x `n` GEMM: the one with the least padded work, where the
/// thinner shape's padded work counts for more because it reuses each loaded element less
/// (64x128 does about 43 FMAs per element loaded, 32x256 about 28). A 64-row tile on 32
/// channels would do 2x the useful work; 32x256 does it at about 0.67x the efficiency. (A
/// 16-row shape would need 16x512 tiles, whose B tile exceeds the 16 KiB of workgroup memory
/// every device offers; 16-channel layers run on 32x256 with half the rows padding.)
fn pick_tile(m: usize, n: usize) -> Tile {
    [(8, 1.0), (4, 0.67)]
        .into_iter()
        .map(|(wg_m, efficiency)| {
            let t = Tile { wg_m };
            let padded = (m.div_ceil(t.bm()) * t.bm()) as f64 * (n.div_ceil(t.bn()) * t.bn()) as f64;
            (padded / efficiency, t)
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, t)| t)
        .unwrap_or(Tile { wg_m: 8 })
}

fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| Error::Unsupported { op: "conv2d", detail: format!("{what} = {v} does not fit in 32 bits") })
}

fn params(s: &ConvShape) -> Result<Params> {
    Ok(Params {
        batch: u32_of(s.batch, "batch")?,
        in_c: u32_of(s.in_channels, "in_channels")?,
        in_h: u32_of(s.in_h, "in_h")?,
        in_w: u32_of(s.in_w, "in_w")?,
        out_c: u32_of(s.out_channels, "out_channels")?,
        out_h: u32_of(s.out_h(), "out_h")?,
        out_w: u32_of(s.out_w(), "out_w")?,
        pad: u32_of(s.pad, "pad")?,
        tiles_m: 0,
        chunk_tiles: 0,
        splits: 0,
        n_out: 0,
    })
}

/// Errors unless the device runs 256-invocation workgroups with the shader's workgroup memory
/// (every WebGPU device does) and `t` has `want`'s shape.
fn check(gpu: &Gpu, what: &str, t: &Tensor, want: [usize; 4]) -> Result<()> {
    let l = gpu.limits();
    if l.max_compute_invocations_per_workgroup < WG
        || l.max_compute_workgroup_size_x < WG
        || l.max_compute_workgroup_storage_size < WORKGROUP_BYTES
    {
        return Err(Error::Unsupported {
            op: "conv2d",
            detail: format!(
                "the tiled variant needs {WG} invocations and {WORKGROUP_BYTES} bytes of workgroup memory; the \
                 device allows {} and {}",
                l.max_compute_invocations_per_workgroup, l.max_compute_workgroup_storage_size
            ),
        });
    }
    if t.shape() != want {
        return Err(Error::ShapeMismatch {
            op: "conv2d",
            detail: format!("{what} has shape {:?}, expected {want:?}", t.shape()),
        });
    }
    Ok(())
}

fn constants(s: &ConvShape, t: Tile, acc: bool) -> [(&'static str, f64); 4] {
    [("KS", s.kernel as f64), ("STRIDE", s.stride as f64), ("WG_M", t.wg_m as f64), ("ACC", acc as u32 as f64)]
}

/// The grid for `tiles_n` column tiles (folded over x and y past the per-dimension limit)
/// and `z` row tiles x phases or splits.
fn grid(gpu: &Gpu, tiles_n: usize, z: usize) -> Result<[u32; 3]> {
    let [x, y, _] = gpu.grid_1d(tiles_n, 1);
    Ok([x, y, u32_of(z, "row tiles x phases or splits")?])
}

/// y = conv(x, w); overwrites y.
pub(super) fn forward(s: &ConvShape, x: &Tensor, w: &Tensor, y: &Tensor) -> Result<()> {
    let gpu = x.gpu();
    check(gpu, "input", x, s.input_shape())?;
    check(gpu, "weight", w, s.weight_shape())?;
    check(gpu, "output", y, s.output_shape())?;
    let (m, n) = (s.out_channels, s.batch * s.out_h() * s.out_w());
    let t = pick_tile(m, n);
    let tiles_m = m.div_ceil(t.bm());
    let p = Params { tiles_m: u32_of(tiles_m, "row tiles")?, ..params(s)? };
    gpu.dispatch(
        &Kernel::with(SHADER, "forward", &constants(s, t, false)),
        &p,
        &[Arg::Storage(x), Arg::Storage(w), Arg::Storage(y)],
        grid(gpu, n.div_ceil(t.bn()), tiles_m)?,
    )
}

/// dx = conv_transpose(dy, w), or dx += it with `acc` (each element is written once).
pub(super) fn backward_data(s: &ConvShape, dy: &Tensor, w: &Tensor, dx: &Tensor, acc: bool) -> Result<()> {
    let gpu = dy.gpu();
    check(gpu, "output gradient", dy, s.output_shape())?;
    check(gpu, "weight", w, s.weight_shape())?;
    check(gpu, "input gradient", dx, s.input_shape())?;
    // One GEMM per stride phase; phase (0, 0) has the most pixels, the grid is sized for it and
    // the other phases' surplus workgroups return at once.
    let (m, n) = (s.in_channels, s.batch * s.in_h.div_ceil(s.stride) * s.in_w.div_ceil(s.stride));
    let t = pick_tile(m, n);
    let tiles_m = m.div_ceil(t.bm());
    let p = Params { tiles_m: u32_of(tiles_m, "row tiles")?, ..params(s)? };
    gpu.dispatch(
        &Kernel::with(SHADER, "backward_data", &constants(s, t, acc)),
        &p,
        &[Arg::Storage(dy), Arg::Storage(w), Arg::Storage(dx)],
        grid(gpu, n.div_ceil(t.bn()), tiles_m * s.stride * s.stride)?,
    )
}

/// How many ways backward-filter's K (batch x pixels, `k_tiles` tiles) is split for an
/// output of `tiles` workgroups and `outputs` elements: enough for about
/// [`SPLIT_TARGET_WORKGROUPS`], within the chunk minimum and the partial-buffer cap.
fn pick_splits(k_tiles: usize, tiles: usize, tiles_m: usize, outputs: usize) -> (usize, usize) {
    let splits = SPLIT_TARGET_WORKGROUPS
        .div_ceil(tiles)
        .min(k_tiles.div_ceil(SPLIT_MIN_TILES))
        .min(SPLIT_MAX_PARTIAL / outputs)
        .min(u16::MAX as usize / tiles_m)
        .max(1);
    let chunk = k_tiles.div_ceil(splits);
    (k_tiles.div_ceil(chunk), chunk)
}

/// dw = sum over batch and pixels of dy * x; overwrites dw.
pub(super) fn backward_filter(s: &ConvShape, x: &Tensor, dy: &Tensor, dw: &Tensor) -> Result<()> {
    let gpu = x.gpu();
    check(gpu, "input", x, s.input_shape())?;
    check(gpu, "output gradient", dy, s.output_shape())?;
    check(gpu, "weight gradient", dw, s.weight_shape())?;
    let (m, n) = (s.out_channels, s.in_channels * s.kernel * s.kernel);
    let t = pick_tile(m, n);
    let (tiles_m, tiles_n) = (m.div_ceil(t.bm()), n.div_ceil(t.bn()));
    let k_tiles = (s.batch * s.out_h() * s.out_w()).div_ceil(BK);
    let (splits, chunk) = pick_splits(k_tiles, tiles_m * tiles_n, tiles_m, m * n);
    let p = Params {
        tiles_m: u32_of(tiles_m, "row tiles")?,
        chunk_tiles: u32_of(chunk, "K tiles per split")?,
        splits: u32_of(splits, "splits")?,
        n_out: u32_of(m * n, "weight elements")?,
        ..params(s)?
    };
    let consts = constants(s, t, false);
    let kernel = Kernel::with(SHADER, "backward_filter", &consts);
    let grid = grid(gpu, tiles_n, tiles_m * splits)?;
    if splits == 1 {
        return gpu.dispatch(&kernel, &p, &[Arg::Storage(x), Arg::Storage(dy), Arg::Storage(dw)], grid);
    }
    // Every element of the partial buffer is written by the GEMM (each split has at least
    // one K tile), so it needs no zero fill.
    let partial = gpu.empty(&[splits, m, n])?;
    gpu.dispatch(&kernel, &p, &[Arg::Storage(x), Arg::Storage(dy), Arg::Storage(&partial)], grid)?;
    // Binding 2 is unused by `reduce_splits`; the list only has to reach binding 3.
    gpu.dispatch(
        &Kernel::new(SHADER, "reduce_splits"),
        &p,
        &[Arg::Storage(&partial), Arg::Storage(&partial), Arg::Storage(dw)],
        gpu.grid_1d(m * n, RED_COLS as u32),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_shape_follows_rows() {
        assert_eq!(pick_tile(64, 100_000).wg_m, 8);
        assert_eq!(pick_tile(128, 4096).wg_m, 8);
        assert_eq!(pick_tile(32, 100_000).wg_m, 4);
        assert_eq!(pick_tile(16, 100_000).wg_m, 4);
        assert_eq!(pick_tile(3, 100_000).wg_m, 4);
    }

    #[test]
    fn splits_cover_k_exactly_once() {
        for (k_tiles, tiles, outputs) in [(1, 1, 10), (384, 1, 16 * 144), (16384, 9, 64 * 576), (7, 200, 100)] {
            let (splits, chunk) = pick_splits(k_tiles, tiles, 1, outputs);
            assert!(splits >= 1 && chunk >= 1);
            assert!((splits - 1) * chunk < k_tiles && splits * chunk >= k_tiles, "{k_tiles} {splits} {chunk}");
            assert!(splits == 1 || splits * outputs <= SPLIT_MAX_PARTIAL);
        }
    }
}
