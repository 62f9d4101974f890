//! `x · wᵀ` with its gradient, on this workspace's f32 GEMM (`vicuna_kernels::sgemm`: AVX-512 where the CPU has
//! it, strided operands, no transposed copies) instead of candle's generic matmul.
//!
//! The forward is one product; the backward is two (`∂x = g · w`, `∂w = gᵀ · x`), the second only when `w` takes
//! part in the gradient (a frozen weight under LoRA does not). Tensors that are not f32 on the CPU take candle's
//! own matmul.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use vicuna_kernels::{sgemm, MatRef};

use crate::Result;

/// `x @ w.T` for `x: [.., in]` and a PyTorch-layout weight `w: [out, in]`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let fast = x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && w.rank() == 2;
    if !fast {
        return Ok(x.broadcast_matmul(&w.t()?)?);
    }
    let mut dims = x.dims().to_vec();
    let inner = dims.pop().unwrap_or(0);
    let rows = dims.iter().product::<usize>();
    let y = x.reshape((rows, inner))?.apply_op2(w, Product::LINEAR)?;
    dims.push(w.dim(0)?);
    Ok(y.reshape(dims)?)
}

/// `op(a) · op(b)` for 2-D f32 tensors, where `op` transposes when its flag is set.
#[derive(Clone, Copy)]
struct Product {
    transpose_a: bool,
    transpose_b: bool,
}

impl Product {
    /// `x · wᵀ`.
    const LINEAR: Product = Product { transpose_a: false, transpose_b: true };

    fn view<'a>(data: &'a [f32], layout: &Layout, transpose: bool) -> candle_core::Result<MatRef<'a>> {
        let (&[rows, cols], &[rs, cs]) = (layout.dims(), layout.stride()) else {
            candle_core::bail!("linear: 2-D operands only, got {:?}", layout.dims())
        };
        let view = MatRef::new(&data[layout.start_offset()..], rows, cols, rs, cs)
            .map_err(|e| candle_core::Error::Msg(format!("linear: {e}")))?;
        Ok(if transpose { view.t() } else { view })
    }
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "vicuna-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("linear: f32 operands only")
        };
        let a = Self::view(a, l1, self.transpose_a)?;
        let b = Self::view(b, l2, self.transpose_b)?;
        if a.cols() != b.rows() {
            candle_core::bail!("linear: cannot multiply {}x{} by {}x{}", a.rows(), a.cols(), b.rows(), b.cols());
        }
        let mut out = vec![0f32; a.rows() * b.cols()];
        sgemm(a, b, &mut out, false).map_err(|e| candle_core::Error::Msg(format!("linear: {e}")))?;
        Ok((CpuStorage::F32(out), Shape::from((a.rows(), b.cols()))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        debug_assert!(!self.transpose_a && self.transpose_b, "only x · wᵀ records a gradient");
        // y = x · wᵀ: ∂x = g · w, ∂w = gᵀ · x.
        let dx = g.apply_op2_no_bwd(w, &Product { transpose_a: false, transpose_b: false })?;
        let dw = if w.track_op() {
            Some(g.apply_op2_no_bwd(x, &Product { transpose_a: true, transpose_b: false })?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}
