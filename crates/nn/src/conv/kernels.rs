//! CPU convolution as GEMM over column tiles of the unfolded input.
//!
//! candle 0.11 unfolds the whole input with scalar loops, then multiplies; its input
//! gradient is a direct loop with no GEMM at all. Here every pass is a matrix product
//! (the `gemm` crate's AVX-512/AVX2 kernels, the ones candle's matmul uses) on a tile of
//! a few hundred KiB of unfolded input that stays in cache:
//!
//! - forward: `y[b][:, tile] = W · cols(x[b], tile)`
//! - input gradient: `dcols = Wᵀ · dy[b][:, tile]`, folded back into `dx[b]`
//! - weight gradient: `dW += dy[b][:, tile] · cols(x[b], tile)ᵀ`
//!
//! Unfolding copies whole contiguous row segments (a `memcpy` at stride 1). Tiles run in
//! parallel on rayon's pool, each with its own reused scratch buffer; when there are too
//! few tiles to share out, the GEMM itself runs in parallel instead. The weight gradient
//! runs blocks of its rows in parallel, each summing every tile in one order. No pass
//! depends on the thread count for its result (tests/thread_count.rs).

use std::cell::RefCell;
use std::ops::{AddAssign, Range};

use gemm::Parallelism;
use rayon::prelude::*;

use super::geometry::ConvGeometry;
use crate::storage::written_by;

/// The float types the kernels run on.
pub(crate) trait Real: Copy + Send + Sync + Default + AddAssign + 'static {
    const ZERO: Self;
    const ONE: Self;

    /// Runs `f` on this thread's scratch buffer of at least `len` elements (contents
    /// unspecified). The buffer is taken out while in use, so a nested call (rayon may run
    /// another tile on this thread while a parallel GEMM waits) gets a fresh one.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

macro_rules! real {
    ($t:ty, $key:ident) => {
        thread_local! {
            static $key: RefCell<Vec<$t>> = const { RefCell::new(Vec::new()) };
        }
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;

            fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                let mut buf = $key.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
                if buf.len() < len {
                    buf.resize(len, 0.0);
                }
                let out = f(&mut buf[..len]);
                $key.with(|cell| {
                    let mut slot = cell.borrow_mut();
                    if slot.len() < buf.len() {
                        *slot = buf;
                    }
                });
                out
            }
        }
    };
}
real!(f32, SCRATCH_F32);
real!(f64, SCRATCH_F64);

/// The widest layer (output channels) whose weight gradient accumulates transposed
/// ([`weight_gradient`]).
const TRANSPOSED_WEIGHT_GRADIENT_MAX_C_OUT: usize = 128;

/// Unfolded-input elements per tile of the forward pass and the input gradient: 64 Ki
/// (256 KiB in f32) keeps a tile in L2 next to the GEMM's packed panels. The weight
/// gradient's GEMM sums over the tile's columns, so it gets wider tiles, 128 Ki elements
/// (512 KiB in f32): fewer, longer products into the same weight-sized accumulator.
/// Measured on the conv_ops bench.
const TILE_ELEMENTS: usize = 1 << 16;
const WEIGHT_GRADIENT_TILE_ELEMENTS: usize = 1 << 17;

/// Output positions per tile: a multiple of 64, at least 256, at most one image.
fn tile_width(g: &ConvGeometry, elements: usize) -> usize {
    let n = g.out_plane();
    let wanted = (elements / g.patch_len().max(1)).max(256) / 64 * 64;
    wanted.clamp(1, n)
}

fn tiles(g: &ConvGeometry, elements: usize) -> Vec<(usize, usize)> {
    let (n, nt) = (g.out_plane(), tile_width(g, elements));
    (0..n.div_ceil(nt))
        .map(|t| (t * nt, ((t + 1) * nt).min(n)))
        .collect()
}

/// A raw pointer that tiles writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: the pointer is only dereferenced by tasks that write disjoint ranges of a buffer
// that outlives them (each caller says which); `T: Send` moves the values themselves.
unsafe impl<T: Send> Send for SharedMut<T> {}
// SAFETY: as for Send: shared access never writes one element from two tasks.
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    fn at(self, offset: usize) -> *mut T {
        // SAFETY of callers: offsets stay inside the buffer this pointer came from.
        self.0.wrapping_add(offset)
    }
}

/// Visits each (patch row r, output row oh, columns [ow0, ow1)) segment of the tile
/// `[n0, n1)` of the unfolded image, for the patch rows `rows`, with the input row it
/// reads (if any) and the valid column range. `seg` is the segment's offset within the
/// tile row.
#[inline]
fn for_each_segment(
    g: &ConvGeometry,
    n0: usize,
    n1: usize,
    rows: Range<usize>,
    mut visit: impl FnMut(usize, usize, usize, usize, Option<usize>, (usize, usize, isize)),
) {
    for r in rows {
        let (c, i, j) = (r / (g.kh * g.kw), r / g.kw % g.kh, r % g.kw);
        let mut q = n0;
        while q < n1 {
            let (oh, ow0) = (q / g.ow, q % g.ow);
            let ow1 = g.ow.min(ow0 + (n1 - q));
            let ih = g.input_row(oh, i).map(|ih| c * g.h * g.w + ih * g.w);
            visit(r, q - n0, ow0, ow1, ih, g.valid_columns(j, ow0, ow1));
            q += ow1 - ow0;
        }
    }
}

/// `cols[r - rows.start, q - n0]` for `q` in the tile and `r` in `rows`: the input value
/// patch row `r` reads at output position `q` (zero in the padding). `cols` is
/// `[rows.len(), n1 - n0]`.
fn unfold<T: Real>(
    g: &ConvGeometry,
    x: &[T],
    n0: usize,
    n1: usize,
    rows: Range<usize>,
    cols: &mut [T],
) {
    let (nt, first_row) = (n1 - n0, rows.start);
    for_each_segment(g, n0, n1, rows, |r, seg, ow0, ow1, row, (lo, hi, off)| {
        let at = (r - first_row) * nt + seg;
        let out = &mut cols[at..at + (ow1 - ow0)];
        let Some(row) = row else {
            out.fill(T::ZERO);
            return;
        };
        out[..lo - ow0].fill(T::ZERO);
        out[hi - ow0..].fill(T::ZERO);
        if lo == hi {
            return;
        }
        let first = (row as isize + (lo * g.stride) as isize + off) as usize;
        let dst = &mut out[lo - ow0..hi - ow0];
        if g.stride == 1 {
            dst.copy_from_slice(&x[first..first + dst.len()]);
        } else {
            for (k, d) in dst.iter_mut().enumerate() {
                *d = x[first + k * g.stride];
            }
        }
    });
}

/// The adjoint of [`unfold`]: adds `cols` back into the image `dx`.
fn fold<T: Real>(g: &ConvGeometry, cols: &[T], n0: usize, n1: usize, dx: &mut [T]) {
    let nt = n1 - n0;
    for_each_segment(
        g,
        n0,
        n1,
        0..g.patch_len(),
        |r, seg, ow0, _ow1, row, (lo, hi, off)| {
            let Some(row) = row.filter(|_| lo < hi) else {
                return;
            };
            let first = (row as isize + (lo * g.stride) as isize + off) as usize;
            let src = &cols[r * nt + seg + (lo - ow0)..r * nt + seg + (hi - ow0)];
            if g.stride == 1 {
                for (d, s) in dx[first..first + src.len()].iter_mut().zip(src) {
                    *d += *s;
                }
            } else {
                for (k, s) in src.iter().enumerate() {
                    dx[first + k * g.stride] += *s;
                }
            }
        },
    );
}

/// Row-major matrix view: element (r, c) at `ptr + r·row + c·col`.
#[derive(Clone, Copy)]
pub(crate) struct View<T> {
    ptr: *const T,
    row: isize,
    col: isize,
}

pub(crate) fn view<T>(ptr: *const T, row: usize) -> View<T> {
    View {
        ptr,
        row: row as isize,
        col: 1,
    }
}

pub(crate) fn transposed<T>(ptr: *const T, row: usize) -> View<T> {
    View {
        ptr,
        row: 1,
        col: row as isize,
    }
}

/// `dst[m, n] (row stride dst_row) = (accumulate ? dst : 0) + lhs[m, k] · rhs[k, n]`.
///
/// # Safety
/// Every view must cover its whole matrix inside live buffers, and `dst` must not alias
/// `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul<T: Real>(
    mkn: (usize, usize, usize),
    dst: *mut T,
    dst_row: usize,
    accumulate: bool,
    lhs: View<T>,
    rhs: View<T>,
    parallelism: Parallelism,
) {
    // SAFETY: forwarded from the caller.
    unsafe { matmul_scaled(mkn, dst, dst_row, accumulate, T::ONE, lhs, rhs, parallelism) }
}

/// [`matmul`] with the product scaled: `dst = (accumulate ? dst : 0) + scale · lhs · rhs`.
///
/// # Safety
/// As [`matmul`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_scaled<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_row: usize,
    accumulate: bool,
    scale: T,
    lhs: View<T>,
    rhs: View<T>,
    parallelism: Parallelism,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row as isize,
            accumulate,
            lhs.ptr,
            lhs.col,
            lhs.row,
            rhs.ptr,
            rhs.col,
            rhs.row,
            if accumulate { T::ONE } else { T::ZERO },
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// One GEMM over all threads (or none when there is one).
pub(crate) fn all_threads() -> Parallelism {
    match threads() {
        1 => Parallelism::None,
        t => Parallelism::Rayon(t),
    }
}

/// Runs the tasks in parallel when there are enough to keep every thread busy, each with
/// a single-threaded GEMM; otherwise one after the other, each with a parallel GEMM.
fn run_tasks(count: usize, task: impl Fn(usize, Parallelism) + Sync) {
    let threads = threads();
    if threads > 1 && count >= threads {
        (0..count)
            .into_par_iter()
            .for_each(|t| task(t, Parallelism::None));
    } else {
        let par = all_threads();
        (0..count).for_each(|t| task(t, par));
    }
}

/// `y = conv2d(x, w)`: `x` is `[batch, c_in, h, w]`, `w` `[c_out, c_in, kh, kw]`, both
/// contiguous; returns `[batch, c_out, oh, ow]`.
pub(crate) fn forward<T: Real>(g: &ConvGeometry, x: &[T], w: &[T]) -> Vec<T> {
    let tiles = tiles(g, TILE_ELEMENTS);
    // SAFETY: the tiles of every image cover all its columns, and each GEMM overwrites
    // all `c_out` rows of its columns (no accumulation), so every element is written.
    unsafe {
        written_by(g.batch * g.out_image(), |y| {
            forward_into(g, x, w, &tiles, y)
        })
    }
}

/// [`forward`] into the `[batch, c_out, oh, ow]` buffer at `y`.
fn forward_into<T: Real>(g: &ConvGeometry, x: &[T], w: &[T], tiles: &[(usize, usize)], y: *mut T) {
    let (n, k) = (g.out_plane(), g.patch_len());
    let out = SharedMut(y);
    run_tasks(g.batch * tiles.len(), |t, par| {
        let (b, (n0, n1)) = (t / tiles.len(), tiles[t % tiles.len()]);
        let x_b = &x[b * g.in_image()..(b + 1) * g.in_image()];
        let dst = out.at(b * g.out_image() + n0);
        let weights = view(w.as_ptr(), k);
        // SAFETY: the tile writes columns [n0, n1) of image b's rows only; views are in bounds.
        if g.is_pointwise() {
            // SAFETY: see above.
            unsafe {
                matmul(
                    (g.c_out, n1 - n0, k),
                    dst,
                    n,
                    false,
                    weights,
                    view(x_b[n0..].as_ptr(), n),
                    par,
                )
            }
        } else {
            T::with_scratch(k * (n1 - n0), |cols| {
                unfold(g, x_b, n0, n1, 0..k, cols);
                // SAFETY: see above; `cols` holds the unfolded tile, k x (n1 - n0).
                unsafe {
                    matmul(
                        (g.c_out, n1 - n0, k),
                        dst,
                        n,
                        false,
                        weights,
                        view(cols.as_ptr(), n1 - n0),
                        par,
                    )
                }
            })
        }
    });
}

/// The gradient with respect to the input of [`forward`] given `dy` (`[batch, c_out, oh,
/// ow]`); also the forward pass of the transposed convolution.
pub(crate) fn input_gradient<T: Real>(g: &ConvGeometry, dy: &[T], w: &[T]) -> Vec<T> {
    let mut dx = vec![T::ZERO; g.batch * g.in_image()];
    let (n, k) = (g.out_plane(), g.patch_len());
    let tiles = tiles(g, TILE_ELEMENTS);
    let out = SharedMut(dx.as_mut_ptr());
    // Tiles of one image overlap in dx, so the parallel unit is the image.
    run_tasks(g.batch, |b, par| {
        let dy_b = &dy[b * g.out_image()..];
        let weights_t = transposed(w.as_ptr(), k);
        if g.is_pointwise() {
            // SAFETY: image b's slice of dx is written by this task only.
            unsafe {
                matmul(
                    (k, n, g.c_out),
                    out.at(b * g.in_image()),
                    n,
                    false,
                    weights_t,
                    view(dy_b.as_ptr(), n),
                    par,
                )
            };
            return;
        }
        // SAFETY: as above; the slice is rebuilt from the shared pointer for this task.
        let dx_b =
            unsafe { std::slice::from_raw_parts_mut(out.at(b * g.in_image()), g.in_image()) };
        for &(n0, n1) in &tiles {
            T::with_scratch(k * (n1 - n0), |cols| {
                // SAFETY: `cols` is this task's scratch of k x (n1 - n0); the reads of
                // `weights_t` and `dy_b` are in bounds of their slices.
                unsafe {
                    matmul(
                        (k, n1 - n0, g.c_out),
                        cols.as_mut_ptr(),
                        n1 - n0,
                        false,
                        weights_t,
                        view(dy_b[n0..].as_ptr(), n),
                        par,
                    )
                };
                fold(g, cols, n0, n1, dx_b);
            });
        }
    });
    dx
}

/// The blocks of patch rows of [`weight_gradient`], about two per thread (one on one
/// thread), that run in parallel.
///
/// Each output element is summed by one block, in one order, however many blocks there
/// are, as long as the `gemm` crate sums each block's inner dimension as it would the
/// whole product's. It picks how by the product's size: in steps of 512 when both sides
/// are at most 64, of 1024 by a horizontal kernel when the output has at most 256
/// elements, otherwise by cache size. So every block has more than 64 rows and more than
/// 256 outputs (the last takes the remainder), and the weight gradient is the same, bit for
/// bit, at any thread count: the one this kernel gave on one thread before the blocks.
fn weight_gradient_blocks(patch_len: usize, c_out: usize) -> Vec<(usize, usize)> {
    let min_rows = 80.max(256 / c_out.max(1) + 1);
    let threads = threads();
    let rows = if threads == 1 {
        patch_len
    } else {
        patch_len.div_ceil(2 * threads).max(min_rows)
    };
    let blocks = (patch_len / rows.max(1)).max(1);
    (0..blocks)
        .map(|b| {
            (
                b * rows,
                if b + 1 == blocks {
                    patch_len
                } else {
                    (b + 1) * rows
                },
            )
        })
        .collect()
}

/// The gradient with respect to the weight of [`forward`]: `[c_out, c_in, kh, kw]`.
///
/// The weight's patch rows are split into blocks that run in parallel; each block sums
/// the products of every tile in one order (image by image, tile by tile). Splitting the
/// tiles among threads instead, each with its own accumulator, made the float sums, and
/// so a whole training run, depend on the thread count (on ISIC one seed's test Dice
/// moved by 8 points between one and two threads).
pub(crate) fn weight_gradient<T: Real>(g: &ConvGeometry, x: &[T], dy: &[T]) -> Vec<T> {
    let (n, k) = (g.out_plane(), g.patch_len());
    let tiles = tiles(g, WEIGHT_GRADIENT_TILE_ELEMENTS);
    let count = g.batch * tiles.len();
    // Accumulating dwᵀ (`[k, c_out]`, transposed once at the end) ran the `gemm` crate
    // 1.05-1.9x faster on tiles of layers with 16-128 output channels (the UNet's weight
    // gradients 10-20% faster); at 1024 channels (short tiles of a long patch) the
    // `[c_out, k]` order was 1.4x faster.
    let accumulate_transposed = g.c_out <= TRANSPOSED_WEIGHT_GRADIENT_MAX_C_OUT;
    let blocks = weight_gradient_blocks(k, g.c_out);
    let mut dw = vec![T::ZERO; g.weight_len()];
    let out = SharedMut(dw.as_mut_ptr());
    run_tasks(blocks.len(), |block, par| {
        let (r0, r1) = blocks[block];
        for t in 0..count {
            let (b, (n0, n1)) = (t / tiles.len(), tiles[t % tiles.len()]);
            let x_b = &x[b * g.in_image()..(b + 1) * g.in_image()];
            let dy_tile = dy[b * g.out_image() + n0..].as_ptr();
            // `src` holds rows [r0, r1) of the tile's unfolded input, `[r1 - r0, n1 - n0]`
            // with row stride `stride`.
            let product = |src: *const T, stride: usize| {
                // SAFETY: the block writes only its own rows (columns, untransposed) of dw;
                // views are in bounds.
                unsafe {
                    if accumulate_transposed {
                        matmul(
                            (r1 - r0, g.c_out, n1 - n0),
                            out.at(r0 * g.c_out),
                            g.c_out,
                            t > 0,
                            view(src, stride),
                            transposed(dy_tile, n),
                            par,
                        )
                    } else {
                        matmul(
                            (g.c_out, r1 - r0, n1 - n0),
                            out.at(r0),
                            k,
                            t > 0,
                            view(dy_tile, n),
                            transposed(src, stride),
                            par,
                        )
                    }
                }
            };
            if g.is_pointwise() {
                // A 1 x 1 kernel at stride 1: patch row r is input channel r.
                product(x_b[r0 * n + n0..].as_ptr(), n);
            } else {
                T::with_scratch((r1 - r0) * (n1 - n0), |cols| {
                    unfold(g, x_b, n0, n1, r0..r1, cols);
                    product(cols.as_ptr(), n1 - n0);
                })
            }
        }
    });
    if accumulate_transposed {
        // [k, c_out] -> [c_out, k]
        let mut out = Vec::with_capacity(dw.len());
        for co in 0..g.c_out {
            out.extend(dw.iter().skip(co).step_by(g.c_out));
        }
        dw = out;
    }
    dw
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct-loop reference for the three passes, in f64.
    fn reference(
        g: &ConvGeometry,
        x: &[f64],
        w: &[f64],
        dy: &[f64],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut y = vec![0.0; g.batch * g.out_image()];
        let mut dx = vec![0.0; g.batch * g.in_image()];
        let mut dw = vec![0.0; g.weight_len()];
        for b in 0..g.batch {
            for o in 0..g.c_out {
                for oh in 0..g.oh {
                    for ow in 0..g.ow {
                        let yi = ((b * g.c_out + o) * g.oh + oh) * g.ow + ow;
                        for c in 0..g.c_in {
                            for i in 0..g.kh {
                                for j in 0..g.kw {
                                    let ih = (oh * g.stride + i * g.dilation) as isize
                                        - g.padding as isize;
                                    let iw = (ow * g.stride + j * g.dilation) as isize
                                        - g.padding as isize;
                                    if ih < 0 || iw < 0 || ih >= g.h as isize || iw >= g.w as isize
                                    {
                                        continue;
                                    }
                                    let xi =
                                        ((b * g.c_in + c) * g.h + ih as usize) * g.w + iw as usize;
                                    let wi = ((o * g.c_in + c) * g.kh + i) * g.kw + j;
                                    y[yi] += x[xi] * w[wi];
                                    dx[xi] += dy[yi] * w[wi];
                                    dw[wi] += dy[yi] * x[xi];
                                }
                            }
                        }
                    }
                }
            }
        }
        (y, dx, dw)
    }

    fn values(n: usize, seed: u64) -> Vec<f64> {
        (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f64 / 500.0) - 1.0)
            .collect()
    }

    fn assert_close(a: &[f64], b: &[f64], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-9 * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    #[test]
    fn passes_match_direct_loops() {
        // (x, w, padding, stride, dilation), including tiles that split output rows.
        let cases = [
            ((2, 3, 9, 11), (4, 3, 3, 3), 1, 1, 1),
            ((1, 2, 8, 8), (3, 2, 4, 4), 1, 2, 1),
            ((3, 1, 7, 6), (2, 1, 7, 7), 3, 2, 1),
            ((2, 4, 6, 5), (5, 4, 1, 1), 0, 1, 1),
            ((1, 2, 10, 9), (2, 2, 3, 3), 2, 1, 2),
            ((1, 3, 40, 37), (2, 3, 3, 3), 1, 1, 1),
            // 576 patch rows: 448-column tiles, the second starting mid-row.
            ((2, 64, 23, 29), (2, 64, 3, 3), 1, 1, 1),
            ((1, 64, 20, 31), (3, 64, 4, 4), 1, 2, 1),
            // Padding 0 and k - 1.
            ((2, 3, 6, 7), (4, 3, 3, 3), 0, 1, 1),
            ((1, 2, 5, 5), (3, 2, 3, 3), 2, 1, 1),
            ((1, 2, 4, 3), (2, 2, 1, 1), 0, 1, 1),
            ((2, 2, 9, 8), (3, 2, 5, 5), 2, 1, 1),
            // Over TRANSPOSED_WEIGHT_GRADIENT_MAX_C_OUT: the [c_out, k] accumulator.
            ((2, 2, 5, 4), (130, 2, 3, 3), 1, 1, 1),
            ((1, 3, 4, 4), (129, 3, 1, 1), 0, 1, 1),
        ];
        for (xs, ws, p, s, d) in cases {
            let g = ConvGeometry::forward(xs, ws, p, s, d).unwrap();
            let x = values(g.batch * g.in_image(), 1);
            let w = values(g.weight_len(), 2);
            let dy = values(g.batch * g.out_image(), 3);
            let (y, dx, dw) = reference(&g, &x, &w, &dy);
            let what = format!("{g:?}");
            assert_close(&forward(&g, &x, &w), &y, &format!("forward {what}"));
            assert_close(
                &input_gradient(&g, &dy, &w),
                &dx,
                &format!("input gradient {what}"),
            );
            assert_close(
                &weight_gradient(&g, &x, &dy),
                &dw,
                &format!("weight gradient {what}"),
            );
        }
    }
}
