//! Launcher for `shaders/linear.wgsl`: the fully connected layer in PyTorch layout,
//! `y = x W^T + b` with `x [N, in]`, `W [out, in]`, `b [out]`, `y [N, out]`, and its backward.
//!
//! The forward and both backward products are one register-blocked kernel (8x8 outputs per
//! invocation, strides as parameters), so the layer compiles a single pipeline.

use bytemuck::{Pod, Zeroable};

use super::{check_same_device, dims};
use crate::error::{Error, Result};
use crate::gpu::{Arg, Kernel, Tensor};

/// Invocations per workgroup (the shader's `@workgroup_size`).
const WG: u32 = 64;
/// Outputs per invocation along each dimension.
const BLOCK: usize = 8;

const MODE_PLAIN: u32 = 0;
const MODE_BIAS: u32 = 1;
const MODE_ROW_SUMS: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    depth: u32,
    total: u32,
    a_row: u32,
    a_k: u32,
    b_col: u32,
    b_k: u32,
    mode: u32,
    _pad: [u32; 3],
}

/// `out[r, c] = sum_k a[r * a_row + k * a_k] * b[c * b_col + k * b_k]` (see the shader).
struct Product {
    rows: usize,
    cols: usize,
    depth: usize,
    a_stride: (usize, usize),
    b_stride: (usize, usize),
    mode: u32,
}

impl Product {
    /// Records the dispatch. `bias` is read in MODE_BIAS, `row_sums` written in
    /// MODE_ROW_SUMS; otherwise any tensors may fill their slots.
    fn run(
        &self,
        op: &'static str,
        a: &Tensor,
        b: &Tensor,
        bias: &Tensor,
        out: &Tensor,
        row_sums: &Tensor,
    ) -> Result<()> {
        // Indices are computed in u32: every operand must have fewer than 2^32 elements (true of
        // anything that fits a storage binding, but a zero dimension lets the others grow).
        let fits = |x: usize, y: usize| x.checked_mul(y).is_some_and(|e| e < (u32::MAX - 8) as usize);
        if !fits(self.rows, self.depth) || !fits(self.cols, self.depth) || !fits(self.rows, self.cols) {
            return Err(Error::Unsupported {
                op,
                detail: format!("a {}x{}x{} product exceeds 32-bit indexing", self.rows, self.depth, self.cols),
            });
        }
        let total = self.rows.div_ceil(BLOCK) * self.cols.div_ceil(BLOCK).max(1);
        let params = Params {
            rows: self.rows as u32,
            cols: self.cols as u32,
            depth: self.depth as u32,
            total: total as u32,
            a_row: self.a_stride.0 as u32,
            a_k: self.a_stride.1 as u32,
            b_col: self.b_stride.0 as u32,
            b_k: self.b_stride.1 as u32,
            mode: self.mode,
            _pad: [0; 3],
        };
        let gpu = a.gpu();
        let args = [Arg::Storage(a), Arg::Storage(b), Arg::Storage(bias), Arg::Storage(out), Arg::Storage(row_sums)];
        gpu.dispatch(&Kernel::new("linear", "matmul"), &params, &args, gpu.grid_1d(total, WG))
    }
}

fn mismatch(op: &'static str, detail: String) -> Error {
    Error::ShapeMismatch { op, detail }
}

/// Checks `w [out, in]` against `x [N, in]`; returns (N, in, out).
fn check_xw(op: &'static str, x: &Tensor, w: &Tensor) -> Result<(usize, usize, usize)> {
    let [n, k_in] = dims(op, "x", x)?;
    let [k_out, w_in] = dims(op, "weight", w)?;
    check_same_device(op, x, w)?;
    if w_in != k_in {
        return Err(mismatch(
            op,
            format!("x {:?} has {k_in} features but weight {:?} takes {w_in}", x.shape(), w.shape()),
        ));
    }
    Ok((n, k_in, k_out))
}

/// `y = x W^T + b` into a new `[N, out]` tensor, for `x [N, in]`, `w [out, in]`, `b [out]`.
pub fn forward(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "linear forward";
    let (n, k_in, k_out) = check_xw(OP, x, w)?;
    let [b_out] = dims(OP, "bias", b)?;
    check_same_device(OP, x, b)?;
    if b_out != k_out {
        return Err(mismatch(OP, format!("bias {:?} for weight {:?}", b.shape(), w.shape())));
    }
    // Every output is written when the product has depth; an empty product is all zeros.
    let y = if k_in > 0 { x.gpu().empty(&[n, k_out])? } else { x.gpu().zeros(&[n, k_out])? };
    let product =
        Product { rows: n, cols: k_out, depth: k_in, a_stride: (k_in, 1), b_stride: (k_in, 1), mode: MODE_BIAS };
    // No row sums: `y` fills that slot (the same buffer may be bound twice read-write).
    product.run(OP, x, w, b, &y, &y)?;
    Ok(y)
}

/// Checks `dy [N, out]` against `w [out, in]`.
fn check_dy(op: &'static str, dy: &Tensor, n: Option<usize>, k_out: usize) -> Result<usize> {
    let [dn, d_out] = dims(op, "dy", dy)?;
    if d_out != k_out || n.is_some_and(|n| n != dn) {
        let want = n.map_or("N".to_string(), |n| n.to_string());
        return Err(mismatch(op, format!("dy {:?} should be [{want}, {k_out}]", dy.shape())));
    }
    Ok(dn)
}

/// The input gradient `dx = dy W` (`[N, in]`) for `w [out, in]`, `dy [N, out]`.
pub fn backward_input(w: &Tensor, dy: &Tensor) -> Result<Tensor> {
    const OP: &str = "linear backward_input";
    let [k_out, k_in] = dims(OP, "weight", w)?;
    check_same_device(OP, w, dy)?;
    let n = check_dy(OP, dy, None, k_out)?;
    let dx = if k_out > 0 { w.gpu().empty(&[n, k_in])? } else { w.gpu().zeros(&[n, k_in])? };
    if k_in > 0 {
        let product =
            Product { rows: n, cols: k_in, depth: k_out, a_stride: (k_out, 1), b_stride: (1, k_in), mode: MODE_PLAIN };
        // No bias, no row sums: `dy` and `dx` fill those slots.
        product.run(OP, dy, w, dy, &dx, &dx)?;
    }
    Ok(dx)
}

/// The parameter gradients `dW = dy^T x` (`[out, in]`) and `db = sum_n dy` (`[out]`) for
/// `x [N, in]`, `dy [N, out]`: one dispatch.
pub fn backward_params(x: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    const OP: &str = "linear backward_params";
    let [n, k_in] = dims(OP, "x", x)?;
    check_same_device(OP, x, dy)?;
    let [dn, k_out] = dims(OP, "dy", dy)?;
    if dn != n {
        return Err(mismatch(OP, format!("x {:?} and dy {:?} have different batch sizes", x.shape(), dy.shape())));
    }
    let gpu = x.gpu();
    let out = |shape: &[usize]| if n > 0 { gpu.empty(shape) } else { gpu.zeros(shape) };
    let (dw, db) = (out(&[k_out, k_in])?, out(&[k_out])?);
    let product =
        Product { rows: k_out, cols: k_in, depth: n, a_stride: (1, k_out), b_stride: (1, k_in), mode: MODE_ROW_SUMS };
    // No bias: `dy` fills that slot.
    product.run(OP, dy, x, dy, &dw, &db)?;
    Ok((dw, db))
}

/// The backward of [`forward`]: `(dx [N, in], dW [out, in], db [out])` from the layer's input
/// `x`, its weight `w` and the output gradient `dy [N, out]`. Two dispatches.
pub fn backward(x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "linear backward";
    let (n, _, k_out) = check_xw(OP, x, w)?;
    check_same_device(OP, x, dy)?;
    check_dy(OP, dy, Some(n), k_out)?;
    let dx = backward_input(w, dy)?;
    let (dw, db) = backward_params(x, dy)?;
    Ok((dx, dw, db))
}
