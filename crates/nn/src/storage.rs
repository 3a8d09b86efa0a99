//! What the CPU custom ops share: when they run, the contiguous slice of a candle storage,
//! the one dispatch from candle's dtype-tagged storages to kernels written once for f32 and
//! f64, and output buffers written without a zero fill.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Tensor, WithDType, bail};

use rayon::prelude::*;

use crate::conv::Real;

/// Whether the CPU kernels take these tensors: all on the CPU, all f32 or all f64.
/// Otherwise the ops fall back to candle's (cuDNN on CUDA).
pub(crate) fn on_cpu_kernels(tensors: &[&Tensor]) -> bool {
    let Some(first) = tensors.first() else {
        return false;
    };
    matches!(first.dtype(), DType::F32 | DType::F64)
        && tensors
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == first.dtype())
}

/// `v` in the kernel's element type (NaN if it does not convert).
pub(crate) fn cast<T: num_traits::Float>(v: f64) -> T {
    T::from(v).unwrap_or_else(T::nan)
}

/// The element types the CPU kernels run on (f32 and f64).
pub(crate) trait Element: num_traits::Float + WithDType + Real {
    /// The storage's elements, if it holds this type.
    fn storage_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;

    /// The error function: for f32 a rational approximation that vectorises (absolute error
    /// below 5e-7, [`crate::ops::erf_f32`]), for f64 libm's (candle's).
    fn erf(self) -> Self;

    /// `e^x`: for f32 a polynomial approximation that vectorises (relative error below
    /// 3e-7, [`crate::ops::exp_f32`]), for f64 the standard library's.
    fn exp_fast(self) -> Self;
}

impl Element for f32 {
    fn storage_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
        match storage {
            CpuStorage::F32(data) => Some(data),
            _ => None,
        }
    }

    fn erf(self) -> Self {
        crate::ops::erf_f32(self)
    }

    fn exp_fast(self) -> Self {
        crate::ops::exp_f32(self)
    }
}

impl Element for f64 {
    fn storage_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
        match storage {
            CpuStorage::F64(data) => Some(data),
            _ => None,
        }
    }

    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }

    fn exp_fast(self) -> Self {
        self.exp()
    }
}

/// A kernel from `N` contiguous inputs to a new buffer.
pub(crate) trait Kernel<const N: usize> {
    fn run<T: Element>(&self, inputs: [&[T]; N], layouts: [&Layout; N]) -> Result<Vec<T>>;
}

/// The `cpu_fwd` of a candle `CustomOp1/2/3` whose CPU work is this type's [`Kernel`]:
/// `kernel_cpu_fwd!(|self, l1, l2| output shape)`, the closure-like head naming `self`
/// and the inputs' layouts for the shape expression (which may use `?`); `self` is
/// passed in so that the expression's `self` is the method's.
macro_rules! kernel_cpu_fwd {
    (|$this:ident, $l1:ident| $shape:expr) => {
        fn cpu_fwd(
            &$this,
            s1: &candle_core::CpuStorage,
            $l1: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            let out = $crate::storage::run_kernel($this, $this.name(), [(s1, $l1)])?;
            Ok((out, $shape))
        }
    };
    (|$this:ident, $l1:ident, $l2:ident| $shape:expr) => {
        fn cpu_fwd(
            &$this,
            s1: &candle_core::CpuStorage,
            $l1: &candle_core::Layout,
            s2: &candle_core::CpuStorage,
            $l2: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            let out = $crate::storage::run_kernel($this, $this.name(), [(s1, $l1), (s2, $l2)])?;
            Ok((out, $shape))
        }
    };
    (|$this:ident, $l1:ident, $l2:ident, $l3:ident| $shape:expr) => {
        fn cpu_fwd(
            &$this,
            s1: &candle_core::CpuStorage,
            $l1: &candle_core::Layout,
            s2: &candle_core::CpuStorage,
            $l2: &candle_core::Layout,
            s3: &candle_core::CpuStorage,
            $l3: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            let out = $crate::storage::run_kernel(
                $this,
                $this.name(),
                [(s1, $l1), (s2, $l2), (s3, $l3)],
            )?;
            Ok((out, $shape))
        }
    };
}
pub(crate) use kernel_cpu_fwd;

/// A kernel that updates its target in place from `N` contiguous inputs.
pub(crate) trait InplaceKernel<const N: usize> {
    fn run<T: Element>(&self, target: &mut [T], inputs: [&[T]; N]);
}

/// Runs `kernel` on `inputs` (all f32 or all f64, contiguous), or errors naming `op`.
pub(crate) fn run_kernel<const N: usize, K: Kernel<N>>(
    kernel: &K,
    op: &str,
    inputs: [(&CpuStorage, &Layout); N],
) -> Result<CpuStorage> {
    let layouts = inputs.map(|(_, l)| l);
    match dtype_of(op, &inputs, None)? {
        DType::F32 => Ok(f32::to_cpu_storage_owned(
            kernel.run(slices(op, &inputs)?, layouts)?,
        )),
        _ => Ok(f64::to_cpu_storage_owned(
            kernel.run(slices(op, &inputs)?, layouts)?,
        )),
    }
}

/// Runs `kernel` on `target` (updated in place) and `inputs`, all f32 or all f64 and
/// contiguous, or errors naming `op`.
pub(crate) fn run_inplace_kernel<const N: usize, K: InplaceKernel<N>>(
    kernel: &K,
    op: &str,
    target: (&mut CpuStorage, &Layout),
    inputs: [(&CpuStorage, &Layout); N],
) -> Result<()> {
    let (storage, layout) = target;
    match dtype_of(op, &inputs, Some(storage.dtype()))? {
        DType::F32 => kernel.run(
            target_slice::<f32>(op, storage, layout)?,
            slices(op, &inputs)?,
        ),
        _ => kernel.run(
            target_slice::<f64>(op, storage, layout)?,
            slices(op, &inputs)?,
        ),
    }
    Ok(())
}

/// A buffer of `len` elements written in parallel, `chunk` at a time, by
/// `fill(chunk index, chunk)`; it spares the zero fill of `vec![0; len]`, a full pass over
/// memory the kernel then overwrites (with the heap reused between steps, `calloc` has to
/// clear it).
///
/// # Safety
/// `fill` must write every element of every chunk it is given.
pub(crate) unsafe fn par_written<T: Send>(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    // SAFETY: the chunks cover the buffer, and the caller's `fill` writes each of them.
    unsafe {
        written_by(len, |ptr: *mut T| {
            // SAFETY: `ptr` is the start of `len` elements of spare capacity.
            let spare = std::slice::from_raw_parts_mut(ptr.cast::<MaybeUninit<T>>(), len);
            spare
                .par_chunks_mut(chunk.max(1))
                .enumerate()
                .for_each(|(i, c)| fill(i, c));
        })
    }
}

/// A buffer of `len` elements that `fill` writes through the pointer, without a zero fill
/// first (for writes that are not in contiguous chunks, like a GEMM's tiles of columns).
///
/// # Safety
/// `fill` must write every element of the buffer (and read none before writing it).
pub(crate) unsafe fn written_by<T>(len: usize, fill: impl FnOnce(*mut T)) -> Vec<T> {
    let mut buf = Vec::with_capacity(len);
    fill(buf.as_mut_ptr());
    // SAFETY: all `len` elements were written (the caller's contract); a panic in `fill`
    // leaves the length at 0.
    unsafe { buf.set_len(len) };
    buf
}

/// The one dtype (f32 or f64) of the target and inputs, or an error naming `op`.
fn dtype_of(op: &str, inputs: &[(&CpuStorage, &Layout)], target: Option<DType>) -> Result<DType> {
    let dtypes: Vec<DType> = target
        .into_iter()
        .chain(inputs.iter().map(|(s, _)| s.dtype()))
        .collect();
    match dtypes.first() {
        Some(&d @ (DType::F32 | DType::F64)) if dtypes.iter().all(|&x| x == d) => Ok(d),
        _ => bail!("{op}: runs on f32 or f64 inputs of one dtype, got {dtypes:?}"),
    }
}

fn slices<'a, T: Element, const N: usize>(
    op: &str,
    inputs: &[(&'a CpuStorage, &Layout); N],
) -> Result<[&'a [T]; N]> {
    let mut out: [&[T]; N] = [&[]; N];
    for (slot, (storage, layout)) in out.iter_mut().zip(inputs) {
        *slot = contiguous(T::cpu_storage_as_slice(storage)?, layout, op)?;
    }
    Ok(out)
}

fn target_slice<'a, T: Element>(
    op: &str,
    storage: &'a mut CpuStorage,
    layout: &Layout,
) -> Result<&'a mut [T]> {
    let dtype = storage.dtype();
    let Some(data) = T::storage_mut(storage) else {
        bail!("{op}: target holds {dtype:?}, expected {:?}", T::DTYPE);
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut data[start..end]),
        None => bail!(
            "{op}: the updated tensor must be contiguous, got strides {:?}",
            layout.stride()
        ),
    }
}

/// The elements of a contiguous tensor, or an error naming `op`.
fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!(
            "{op}: inputs must be contiguous, got strides {:?}",
            layout.stride()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    struct Sum;
    impl Kernel<2> for Sum {
        fn run<T: Element>(&self, [a, b]: [&[T]; 2], _: [&Layout; 2]) -> Result<Vec<T>> {
            Ok(a.iter().zip(b).map(|(&x, &y)| x + y).collect())
        }
    }

    fn storage(t: &Tensor) -> (CpuStorage, Layout) {
        let (s, l) = t.storage_and_layout();
        match &*s {
            candle_core::Storage::Cpu(c) => (c.clone(), l.clone()),
            _ => unreachable!("CPU test tensors"),
        }
    }

    #[test]
    fn dispatches_on_the_dtype_and_names_the_op_in_errors() -> Result<()> {
        let a = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
        let (sa, la) = storage(&a);
        let out = run_kernel(&Sum, "sum", [(&sa, &la), (&sa, &la)])?;
        assert_eq!(out.as_slice::<f32>()?, &[2.0, 4.0]);

        let b = Tensor::new(&[1f64, 2.0], &Device::Cpu)?;
        let (sb, lb) = storage(&b);
        let err = run_kernel(&Sum, "sum", [(&sa, &la), (&sb, &lb)]).unwrap_err();
        assert!(err.to_string().contains("sum: runs on f32 or f64"), "{err}");

        let t = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?.t()?;
        let (st, lt) = storage(&t);
        let err = run_kernel(&Sum, "sum", [(&st, &lt), (&st, &lt)]).unwrap_err();
        assert!(err.to_string().contains("must be contiguous"), "{err}");
        Ok(())
    }
}
