//! The shape arithmetic of one 2-d convolution, shared by the forward pass and both
//! gradients (and, read backwards, by the transposed convolution).

use candle_core::{Result, bail};

/// A convolution `y = conv(x, w)` with `x: [batch, c_in, h, w]`, `w: [c_out, c_in, kh, kw]`
/// and `y: [batch, c_out, oh, ow]`, no groups.
///
/// A transposed convolution is the adjoint of one of these: its input is `y`'s shape, its
/// output `x`'s, and its weight `[c_in_t, c_out_t, k, k]` is exactly `w`'s layout with
/// `c_out = c_in_t`, `c_in = c_out_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvGeometry {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeometry {
    /// The geometry of `conv2d(x, w)` with PyTorch's output size, or an error naming the
    /// shapes that do not fit.
    pub fn forward(
        x: (usize, usize, usize, usize),
        weight: (usize, usize, usize, usize),
        padding: usize,
        stride: usize,
        dilation: usize,
    ) -> Result<Self> {
        let (batch, c_in, h, w) = x;
        let (c_out, c_in_w, kh, kw) = weight;
        if c_in != c_in_w {
            bail!(
                "conv2d: input has {c_in} channels but the weight {:?} expects {c_in_w}",
                weight
            );
        }
        if stride == 0 || dilation == 0 {
            bail!("conv2d: stride {stride} and dilation {dilation} must be positive");
        }
        let out = |size: usize, k: usize| -> Result<usize> {
            let span = dilation * (k.max(1) - 1) + 1;
            let padded = size + 2 * padding;
            if k == 0 || padded < span {
                bail!(
                    "conv2d: kernel {kh}x{kw} (dilation {dilation}) does not fit the input {h}x{w} with padding {padding}"
                );
            }
            Ok((padded - span) / stride + 1)
        };
        Ok(Self {
            batch,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            stride,
            padding,
            dilation,
            oh: out(h, kh)?,
            ow: out(w, kw)?,
        })
    }

    /// The geometry of the convolution whose adjoint is `conv_transpose2d(x, w)` (PyTorch's
    /// output size `(in - 1)·stride - 2·padding + dilation·(k - 1) + output_padding + 1`).
    pub fn transposed(
        x: (usize, usize, usize, usize),
        weight: (usize, usize, usize, usize),
        padding: usize,
        output_padding: usize,
        stride: usize,
        dilation: usize,
    ) -> Result<Self> {
        let (batch, c_in_t, h_in, w_in) = x;
        let (c_in_w, c_out_t, kh, kw) = weight;
        if c_in_t != c_in_w {
            bail!(
                "conv_transpose2d: input has {c_in_t} channels but the weight {:?} expects {c_in_w}",
                weight
            );
        }
        if stride == 0 || dilation == 0 || kh == 0 || kw == 0 || h_in == 0 || w_in == 0 {
            bail!(
                "conv_transpose2d: stride {stride}, dilation {dilation}, kernel {kh}x{kw} and input {h_in}x{w_in} must be positive"
            );
        }
        if output_padding >= stride.max(dilation) {
            bail!(
                "conv_transpose2d: output padding {output_padding} must be smaller than the stride {stride} or the dilation {dilation}"
            );
        }
        let size = |i: usize, k: usize| -> Result<usize> {
            let full = (i - 1) * stride + dilation * (k - 1) + output_padding + 1;
            if full <= 2 * padding {
                bail!(
                    "conv_transpose2d: padding {padding} leaves no output for input {h_in}x{w_in} and kernel {kh}x{kw}"
                );
            }
            Ok(full - 2 * padding)
        };
        let g = Self::forward(
            (batch, c_out_t, size(h_in, kh)?, size(w_in, kw)?),
            (c_in_t, c_out_t, kh, kw),
            padding,
            stride,
            dilation,
        )?;
        debug_assert_eq!((g.oh, g.ow), (h_in, w_in));
        Ok(g)
    }

    /// Rows of the unfolded input (`c_in·kh·kw`), the GEMM's inner dimension.
    pub fn patch_len(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    /// Output positions per image (`oh·ow`).
    pub fn out_plane(&self) -> usize {
        self.oh * self.ow
    }

    /// Input elements per image.
    pub fn in_image(&self) -> usize {
        self.c_in * self.h * self.w
    }

    /// Output elements per image.
    pub fn out_image(&self) -> usize {
        self.c_out * self.out_plane()
    }

    pub fn weight_len(&self) -> usize {
        self.c_out * self.patch_len()
    }

    pub fn input_dims(&self) -> [usize; 4] {
        [self.batch, self.c_in, self.h, self.w]
    }

    pub fn output_dims(&self) -> [usize; 4] {
        [self.batch, self.c_out, self.oh, self.ow]
    }

    pub fn weight_dims(&self) -> [usize; 4] {
        [self.c_out, self.c_in, self.kh, self.kw]
    }

    /// A 1x1, stride-1, unpadded convolution reads its input as the unfolded matrix itself.
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// For the patch element at kernel column `j`, the output columns `[lo, hi)` within
    /// `[ow0, ow1)` whose input column `ow·stride + j·dilation - padding` lies inside the
    /// image, and that offset `j·dilation - padding`.
    pub fn valid_columns(&self, j: usize, ow0: usize, ow1: usize) -> (usize, usize, isize) {
        let offset = (j * self.dilation) as isize - self.padding as isize;
        let s = self.stride as isize;
        // ow·s + offset >= 0  <=>  ow >= ceil(-offset / s)
        let lo = if offset >= 0 {
            0
        } else {
            ((-offset + s - 1) / s) as usize
        };
        // ow·s + offset <= w - 1  <=>  ow <= floor((w - 1 - offset) / s)
        let last = self.w as isize - 1 - offset;
        let hi = if last < 0 { 0 } else { (last / s) as usize + 1 };
        let lo = lo.clamp(ow0, ow1);
        (lo, hi.clamp(lo, ow1), offset)
    }

    /// The input row read by output row `oh` at kernel row `i`, if inside the image.
    pub fn input_row(&self, oh: usize, i: usize) -> Option<usize> {
        let ih = (oh * self.stride + i * self.dilation) as isize - self.padding as isize;
        (ih >= 0 && (ih as usize) < self.h).then_some(ih as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_sizes_follow_pytorch() {
        let g = ConvGeometry::forward((2, 3, 7, 9), (4, 3, 3, 3), 1, 2, 1).unwrap();
        assert_eq!(g.output_dims(), [2, 4, 4, 5]);
        let g = ConvGeometry::forward((1, 1, 8, 8), (1, 1, 3, 3), 0, 1, 2).unwrap();
        assert_eq!((g.oh, g.ow), (4, 4));
        // conv_transpose2d 4x4 s2 p1 doubles the size.
        let t = ConvGeometry::transposed((2, 8, 5, 6), (8, 3, 4, 4), 1, 0, 2, 1).unwrap();
        assert_eq!(t.input_dims(), [2, 3, 10, 12]);
        assert_eq!(t.weight_dims(), [8, 3, 4, 4]);
        let t = ConvGeometry::transposed((1, 2, 5, 5), (2, 2, 3, 3), 1, 1, 2, 1).unwrap();
        assert_eq!((t.h, t.w, t.oh, t.ow), (10, 10, 5, 5));
    }

    #[test]
    fn bad_shapes_are_named() {
        let e = ConvGeometry::forward((1, 3, 8, 8), (4, 2, 3, 3), 0, 1, 1).unwrap_err();
        assert!(e.to_string().contains("3 channels"), "{e}");
        let e = ConvGeometry::forward((1, 3, 2, 2), (4, 3, 5, 5), 0, 1, 1).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        let e = ConvGeometry::transposed((1, 2, 4, 4), (2, 2, 2, 2), 0, 2, 2, 1).unwrap_err();
        assert!(e.to_string().contains("output padding"), "{e}");
    }

    #[test]
    fn valid_columns_match_brute_force() {
        for (w, k, s, p, d) in [
            (7, 3, 1, 1, 1),
            (8, 4, 2, 1, 1),
            (5, 3, 2, 2, 2),
            (9, 7, 2, 3, 1),
        ] {
            let g = ConvGeometry::forward((1, 1, 4, w), (1, 1, 1, k), p, s, d).unwrap();
            for j in 0..k {
                for (ow0, ow1) in [(0, g.ow), (1, g.ow), (0, 1)] {
                    let (lo, hi, off) = g.valid_columns(j, ow0, ow1);
                    for ow in ow0..ow1 {
                        let iw = (ow * s) as isize + off;
                        let inside = iw >= 0 && iw < w as isize;
                        assert_eq!(
                            inside,
                            (lo..hi).contains(&ow),
                            "w{w} k{k} s{s} p{p} d{d} j{j} ow{ow}"
                        );
                    }
                }
            }
        }
    }
}
