//! The `tiled` conv variant: shared-memory tiled implicit GEMM (`shaders/conv2d_tiled.wgsl`),
//! the kernel for discrete and integrated GPUs. The shader's header explains the tiling; this
//! file picks a tile shape per GEMM, sizes the grids and, for backward-filter, the split-K.
//!
//! Pipelines are specialised on the kernel size, the stride and the tile configuration (six
//! shapes, each at the deepest K tile the device's workgroup memory holds), never on channel
//! counts or image sizes, so a network compiles few of them.

use bytemuck::{Pod, Zeroable};

use super::{check_shape, ConvShape};
use crate::error::{Error, Result};
use crate::gpu::{Arg, Gpu, Kernel, Tensor};

const SHADER: &str = "conv2d_tiled";

/// Tile shapes as (invocations, invocations along M), best reuse first; each invocation holds
/// 8 x 4 outputs, so the tiles are 64x128, 32x256, 64x64, 32x128, 64x32 and 32x64.
const SHAPES: [(u32, u32); 6] = [(256, 8), (256, 4), (128, 8), (128, 4), (64, 8), (64, 4)];
/// K-tile depths as (BK, double-buffered), in the order they are preferred: each halves the
/// barriers per K value of the next but one.
const DEPTHS: [(u32, bool); 4] = [(16, true), (8, true), (16, false), (8, false)];

/// Forward and backward-data aim for at least this many workgroups: two waves of workgroups on
/// a GPU with ~100-130 compute units (wgpu does not say how many a device has). Split-K aims
/// for the same number in backward-filter.
const TARGET_WORKGROUPS: usize = 256;
/// Each split covers at least this many K values, so the partial sums written and re-read are
/// at most 1/512 of the GEMM's loads per output.
const SPLIT_MIN_K: usize = 1024;
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

/// One configuration of the tiled kernel: `wg` invocations, `wg_m` of them along M, each
/// holding 8 x 4 outputs, so a workgroup computes `8 wg_m` x `4 wg / wg_m` outputs; K tiles of
/// `bk`, in one workgroup buffer or two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    wg: u32,
    wg_m: u32,
    bk: u32,
    double_buffer: bool,
}

impl Tile {
    /// Rows x columns of the output block a workgroup computes.
    pub fn block(self) -> (usize, usize) {
        (self.bm(), self.bn())
    }
    fn bm(self) -> usize {
        8 * self.wg_m as usize
    }
    fn bn(self) -> usize {
        4 * (self.wg / self.wg_m) as usize
    }
    fn bk(self) -> usize {
        self.bk as usize
    }
    /// The shader's two workgroup arrays: per buffer BK rows of BM/4 + 1 and BN/4 + 1 vec4s.
    fn workgroup_bytes(self) -> u32 {
        let rows = (self.bm() / 4 + 1 + self.bn() / 4 + 1) as u32;
        (1 + self.double_buffer as u32) * self.bk * rows * 16
    }
    /// FMAs per element loaded into workgroup memory, relative to the 64x128 tile's 43.
    fn reuse(self) -> f64 {
        let (bm, bn) = (self.bm() as f64, self.bn() as f64);
        (bm * bn / (bm + bn)) / (64.0 * 128.0 / 192.0)
    }
    fn fits(self, limits: &wgpu::Limits) -> bool {
        limits.max_compute_invocations_per_workgroup >= self.wg
            && limits.max_compute_workgroup_size_x >= self.wg
            && limits.max_compute_workgroup_storage_size >= self.workgroup_bytes()
    }
    fn constants(self, s: &ConvShape, acc: bool) -> [(&'static str, f64); 7] {
        [
            ("KS", s.kernel as f64),
            ("STRIDE", s.stride as f64),
            ("WG", self.wg as f64),
            ("WG_M", self.wg_m as f64),
            ("BK", self.bk as f64),
            ("DB", self.double_buffer as u32 as f64),
            ("ACC", acc as u32 as f64),
        ]
    }
}

impl std::fmt::Display for Tile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let buffers = if self.double_buffer { "double-buffered" } else { "single buffer" };
        write!(f, "{}x{} ({} invocations), BK {}, {buffers}", self.bm(), self.bn(), self.wg, self.bk)
    }
}

/// Every configuration a device with `limits` runs: each shape at every depth that fits.
pub(super) fn all_tiles(limits: &wgpu::Limits) -> Vec<Tile> {
    SHAPES
        .into_iter()
        .flat_map(|(wg, wg_m)| DEPTHS.into_iter().map(move |(bk, double_buffer)| Tile { wg, wg_m, bk, double_buffer }))
        .filter(|t| t.fits(limits))
        .collect()
}

/// The configurations the launcher chooses from: each shape at its preferred depth that fits
/// (an iterator: the pick runs at every conv dispatch and allocates nothing).
fn candidate_tiles(limits: &wgpu::Limits) -> impl Iterator<Item = Tile> + '_ {
    SHAPES.into_iter().filter_map(move |(wg, wg_m)| {
        DEPTHS.into_iter().map(|(bk, double_buffer)| Tile { wg, wg_m, bk, double_buffer }).find(|t| t.fits(limits))
    })
}

/// The tile for an `m` x `n` GEMM run `copies` times (stride phases): the least padded work,
/// where a shape counts for more when it reuses each loaded element less and when the grid has
/// fewer than `wanted` workgroups (the GPU's units then idle). Backward-filter passes
/// `wanted` = 1: its split-K fills the GPU instead.
fn pick_tile(m: usize, n: usize, copies: usize, wanted: usize, limits: &wgpu::Limits) -> Result<Tile> {
    candidate_tiles(limits)
        .map(|t| {
            let (tiles_m, tiles_n) = (m.div_ceil(t.bm()), n.div_ceil(t.bn()));
            let padded = (tiles_m * t.bm()) as f64 * (tiles_n * t.bn()) as f64;
            let workgroups = tiles_m * tiles_n * copies;
            let idle = (wanted as f64 / workgroups as f64).max(1.0);
            (padded / t.reuse() * idle, t)
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, t)| t)
        .ok_or_else(|| Error::Unsupported {
            op: "conv2d",
            detail: format!(
                "the tiled variant needs at least 64 invocations and {} bytes of workgroup memory per workgroup; \
                 the device allows {} and {}",
                Tile { wg: 64, wg_m: 8, bk: 8, double_buffer: false }.workgroup_bytes(),
                limits.max_compute_invocations_per_workgroup,
                limits.max_compute_workgroup_storage_size
            ),
        })
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

/// `tile`, or the chosen one; errors where the device cannot run `tile`.
fn tile_or_pick(gpu: &Gpu, tile: Option<Tile>, pick: impl FnOnce(&wgpu::Limits) -> Result<Tile>) -> Result<Tile> {
    match tile {
        Some(t) if !t.fits(gpu.limits()) => Err(Error::Unsupported {
            op: "conv2d",
            detail: format!(
                "tile {t} needs {} invocations and {} bytes of workgroup memory; the device allows {} and {}",
                t.wg,
                t.workgroup_bytes(),
                gpu.limits().max_compute_invocations_per_workgroup,
                gpu.limits().max_compute_workgroup_storage_size
            ),
        }),
        Some(t) => Ok(t),
        None => pick(gpu.limits()),
    }
}

/// The grid for `tiles_n` column tiles (folded over x and y past the per-dimension limit)
/// and `z` row tiles x phases or splits.
fn grid(gpu: &Gpu, tiles_n: usize, z: usize) -> Result<[u32; 3]> {
    let [x, y, _] = gpu.grid_1d(tiles_n, 1);
    Ok([x, y, u32_of(z, "row tiles x phases or splits")?])
}

/// y = conv(x, w) with `tile` (None: the chosen one); overwrites y.
pub(super) fn forward(s: &ConvShape, x: &Tensor, w: &Tensor, y: &Tensor, tile: Option<Tile>) -> Result<()> {
    let gpu = x.gpu();
    check_shape("input", x, s.input_shape())?;
    check_shape("weight", w, s.weight_shape())?;
    check_shape("output", y, s.output_shape())?;
    let (m, n) = (s.out_channels, s.batch * s.out_h() * s.out_w());
    let t = tile_or_pick(gpu, tile, |l| pick_tile(m, n, 1, TARGET_WORKGROUPS, l))?;
    let tiles_m = m.div_ceil(t.bm());
    let p = Params { tiles_m: u32_of(tiles_m, "row tiles")?, ..params(s)? };
    gpu.dispatch(
        &Kernel::with(SHADER, "forward", &t.constants(s, false)),
        &p,
        &[Arg::Storage(x), Arg::Storage(w), Arg::Storage(y)],
        grid(gpu, n.div_ceil(t.bn()), tiles_m)?,
    )
}

/// dx = conv_transpose(dy, w), or dx += it with `acc` (each element is written once).
pub(super) fn backward_data(
    s: &ConvShape,
    dy: &Tensor,
    w: &Tensor,
    dx: &Tensor,
    acc: bool,
    tile: Option<Tile>,
) -> Result<()> {
    let gpu = dy.gpu();
    check_shape("output gradient", dy, s.output_shape())?;
    check_shape("weight", w, s.weight_shape())?;
    check_shape("input gradient", dx, s.input_shape())?;
    // One GEMM per stride phase; phase (0, 0) has the most pixels, the grid is sized for it and
    // the other phases' surplus workgroups return at once.
    let phases = s.stride * s.stride;
    let (m, n) = (s.in_channels, s.batch * s.in_h.div_ceil(s.stride) * s.in_w.div_ceil(s.stride));
    let t = tile_or_pick(gpu, tile, |l| pick_tile(m, n, phases, TARGET_WORKGROUPS, l))?;
    let tiles_m = m.div_ceil(t.bm());
    let p = Params { tiles_m: u32_of(tiles_m, "row tiles")?, ..params(s)? };
    gpu.dispatch(
        &Kernel::with(SHADER, "backward_data", &t.constants(s, acc)),
        &p,
        &[Arg::Storage(dy), Arg::Storage(w), Arg::Storage(dx)],
        grid(gpu, n.div_ceil(t.bn()), tiles_m * phases)?,
    )
}

/// How many ways backward-filter's K (batch x pixels, `k_tiles` tiles of `bk`) is split for
/// an output of `tiles` workgroups and `outputs` elements: enough for about
/// [`TARGET_WORKGROUPS`], within the split minimum and the partial-buffer cap.
fn pick_splits(k_tiles: usize, bk: usize, tiles: usize, tiles_m: usize, outputs: usize) -> (usize, usize) {
    let splits = TARGET_WORKGROUPS
        .div_ceil(tiles)
        .min(k_tiles.div_ceil(SPLIT_MIN_K.div_ceil(bk)))
        .min(SPLIT_MAX_PARTIAL / outputs)
        .min(u16::MAX as usize / tiles_m)
        .max(1);
    let chunk = k_tiles.div_ceil(splits);
    (k_tiles.div_ceil(chunk), chunk)
}

/// dw = sum over batch and pixels of dy * x; overwrites dw.
pub(super) fn backward_filter(s: &ConvShape, x: &Tensor, dy: &Tensor, dw: &Tensor, tile: Option<Tile>) -> Result<()> {
    let gpu = x.gpu();
    check_shape("input", x, s.input_shape())?;
    check_shape("output gradient", dy, s.output_shape())?;
    check_shape("weight gradient", dw, s.weight_shape())?;
    let (m, n) = (s.out_channels, s.in_channels * s.kernel * s.kernel);
    let t = tile_or_pick(gpu, tile, |l| pick_tile(m, n, 1, 1, l))?;
    let (tiles_m, tiles_n) = (m.div_ceil(t.bm()), n.div_ceil(t.bn()));
    let k_tiles = (s.batch * s.out_h() * s.out_w()).div_ceil(t.bk());
    let (splits, chunk) = pick_splits(k_tiles, t.bk(), tiles_m * tiles_n, tiles_m, m * n);
    let p = Params {
        tiles_m: u32_of(tiles_m, "row tiles")?,
        chunk_tiles: u32_of(chunk, "K tiles per split")?,
        splits: u32_of(splits, "splits")?,
        n_out: u32_of(m * n, "weight elements")?,
        ..params(s)?
    };
    let consts = t.constants(s, false);
    let kernel = Kernel::with(SHADER, "backward_filter", &consts);
    let grid = grid(gpu, tiles_n, tiles_m * splits)?;
    if splits == 1 {
        return gpu.dispatch(&kernel, &p, &[Arg::Storage(x), Arg::Storage(dy), Arg::Storage(dw)], grid);
    }
    // Every element of the partial buffer is written by the GEMM (each split has at least
    // one K tile), so it needs no zero fill. It comes from the device's pool, so in a training
    // run it is the same buffer every step (no buffer is created once the pool is warm).
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

    /// WebGPU's guaranteed limits (16 KiB of workgroup memory) and a discrete GPU's (48 KiB).
    fn limits(workgroup_bytes: u32) -> wgpu::Limits {
        wgpu::Limits { max_compute_workgroup_storage_size: workgroup_bytes, ..wgpu::Limits::default() }
    }

    #[test]
    fn depth_is_the_deepest_that_fits() {
        let depth = |bytes, wg, wg_m| {
            let t = candidate_tiles(&limits(bytes)).find(|t| t.wg == wg && t.wg_m == wg_m).unwrap();
            (t.bk, t.double_buffer, t.workgroup_bytes())
        };
        // The figures in the shader's header.
        assert_eq!(depth(16384, 256, 8), (8, true, 12800));
        assert_eq!(depth(16384, 256, 4), (8, false, 9472));
        assert_eq!(depth(16384, 64, 8), (16, true, 13312));
        assert_eq!(depth(32768, 256, 8), (16, true, 25600));
        assert_eq!(depth(49152, 256, 4), (16, true, 37888));
        assert!(all_tiles(&limits(16384)).iter().all(|t| t.workgroup_bytes() <= 16384));
        assert_eq!(all_tiles(&limits(49152)).len(), SHAPES.len() * DEPTHS.len());
    }

    #[test]
    fn tile_shape_follows_the_gemm() {
        let l = limits(16384);
        let pick = |m, n, copies, wanted| pick_tile(m, n, copies, wanted, &l).unwrap().block();
        // Big GEMMs: the most reuse without padding rows.
        assert_eq!(pick(64, 100_000, 1, TARGET_WORKGROUPS), (64, 128));
        assert_eq!(pick(16, 131_072, 1, TARGET_WORKGROUPS), (32, 256));
        // 32 channels at 16x16, batch 128: 32x256 would give 128 workgroups.
        assert_eq!(pick(32, 32_768, 1, TARGET_WORKGROUPS), (32, 128));
        // 64 channels at 8x8: 64x128 would give 64 workgroups, 64x32 gives 256.
        assert_eq!(pick(64, 8192, 1, TARGET_WORKGROUPS), (64, 32));
        // Stride phases multiply the workgroups.
        assert_eq!(pick(64, 8192, 4, TARGET_WORKGROUPS), (64, 128));
        // Backward-filter (split-K fills the GPU): reuse and padding only.
        assert_eq!(pick(64, 576, 1, 1), (64, 128));
        assert_eq!(pick(16, 144, 1, 1), (32, 256));
        for (m, n) in [(3, 1), (1, 100_000), (1000, 7)] {
            let t = pick_tile(m, n, 1, TARGET_WORKGROUPS, &l).unwrap();
            assert!(t.fits(&l));
        }
    }

    #[test]
    fn no_tile_fits_is_an_error() {
        let l = wgpu::Limits { max_compute_workgroup_storage_size: 1024, ..wgpu::Limits::default() };
        assert!(matches!(pick_tile(64, 64, 1, 1, &l), Err(Error::Unsupported { .. })));
    }

    #[test]
    fn splits_cover_k_exactly_once() {
        for bk in [8, 16] {
            for (k_tiles, tiles, outputs) in [(1, 1, 10), (384, 1, 16 * 144), (16384, 9, 64 * 576), (7, 200, 100)] {
                let (splits, chunk) = pick_splits(k_tiles, bk, tiles, 1, outputs);
                assert!(splits >= 1 && chunk >= 1);
                assert!((splits - 1) * chunk < k_tiles && splits * chunk >= k_tiles, "{k_tiles} {splits} {chunk}");
                assert!(splits == 1 || splits * outputs <= SPLIT_MAX_PARTIAL);
                assert!(splits == 1 || chunk * bk >= SPLIT_MIN_K, "{bk} {k_tiles} {chunk}");
            }
        }
    }
}
