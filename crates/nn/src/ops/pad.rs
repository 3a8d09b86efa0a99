//! Reflection and replication padding of `[.., H, W]` tensors (PyTorch `ReflectionPad2d`,
//! `ReplicationPad2d`).
//!
//! Both are gathers along one axis at a time: an index tensor maps each output row/column to
//! its source, and `index_select` (whose backward is `index_add`) does the copy, so the
//! gradient of a padded border element flows back to the element it mirrors.

use candle_core::{Result, Tensor, bail};

/// Gathers `x` along `dim` (counted from the end: 1 = W, 2 = H) through `source`, which maps
/// each output position in `-before .. n + after` to an input index.
fn pad_axis(
    x: &Tensor,
    dim_from_end: usize,
    before: usize,
    after: usize,
    source: impl Fn(isize, isize) -> isize,
) -> Result<Tensor> {
    if before == 0 && after == 0 {
        return Ok(x.clone());
    }
    let dim = x.rank() - dim_from_end;
    let n = x.dim(dim)? as isize;
    let idx: Vec<u32> = (-(before as isize)..n + after as isize)
        .map(|i| source(i, n) as u32)
        .collect();
    let idx = Tensor::from_vec(idx, before + n as usize + after, x.device())?;
    x.index_select(&idx, dim)
}

fn check_rank(x: &Tensor, op: &str) -> Result<()> {
    if x.rank() < 2 {
        bail!(
            "{op}: expected a tensor with at least 2 dims ([.., H, W]), got shape {:?}",
            x.dims()
        );
    }
    Ok(())
}

/// Pads the last two dims of `x` by mirroring across the edge without repeating it
/// (`[a b c]` padded by 2 on the left gives `[c b a b c]`), like PyTorch's `ReflectionPad2d`
/// with padding `(left, right, top, bottom)`. Each pad must be smaller than its dimension.
pub fn reflection_pad2d(
    x: &Tensor,
    left: usize,
    right: usize,
    top: usize,
    bottom: usize,
) -> Result<Tensor> {
    check_rank(x, "reflection_pad2d")?;
    let (h, w) = (x.dim(x.rank() - 2)?, x.dim(x.rank() - 1)?);
    if left >= w || right >= w || top >= h || bottom >= h {
        bail!(
            "reflection_pad2d: padding (left {left}, right {right}, top {top}, bottom {bottom}) \
             must be smaller than the input size H={h}, W={w} (shape {:?})",
            x.dims()
        );
    }
    let reflect = |i: isize, n: isize| {
        if i < 0 {
            -i
        } else if i >= n {
            2 * (n - 1) - i
        } else {
            i
        }
    };
    let y = pad_axis(x, 1, left, right, reflect)?;
    pad_axis(&y, 2, top, bottom, reflect)
}

/// Pads the last two dims of `x` by repeating the edge value, like PyTorch's
/// `ReplicationPad2d` with padding `(left, right, top, bottom)`.
pub fn replication_pad2d(
    x: &Tensor,
    left: usize,
    right: usize,
    top: usize,
    bottom: usize,
) -> Result<Tensor> {
    check_rank(x, "replication_pad2d")?;
    let (h, w) = (x.dim(x.rank() - 2)?, x.dim(x.rank() - 1)?);
    if h == 0 || w == 0 {
        bail!(
            "replication_pad2d: cannot pad an empty input of shape {:?}",
            x.dims()
        );
    }
    let clamp = |i: isize, n: isize| i.clamp(0, n - 1);
    let y = pad_axis(x, 1, left, right, clamp)?;
    pad_axis(&y, 2, top, bottom, clamp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOptions, check_gradients};
    use crate::ops::test_inputs::{uniform, weighted_sum};
    use candle_core::{DType, Device};

    fn grid_3x3() -> anyhow::Result<Tensor> {
        Ok(Tensor::arange(0f32, 9.0, &Device::Cpu)?.reshape((1, 1, 3, 3))?)
    }

    /// PyTorch `nn.ReflectionPad2d((2, 1, 1, 0))(torch.arange(9.).view(1, 1, 3, 3))`:
    /// columns -2..4 map to [2, 1, 0, 1, 2, 1], rows -1..3 map to [1, 0, 1, 2].
    #[test]
    fn reflection_values() -> anyhow::Result<()> {
        let y = reflection_pad2d(&grid_3x3()?, 2, 1, 1, 0)?;
        assert_eq!(y.dims(), [1, 1, 4, 6]);
        let want = vec![
            vec![5f32, 4.0, 3.0, 4.0, 5.0, 4.0],
            vec![2.0, 1.0, 0.0, 1.0, 2.0, 1.0],
            vec![5.0, 4.0, 3.0, 4.0, 5.0, 4.0],
            vec![8.0, 7.0, 6.0, 7.0, 8.0, 7.0],
        ];
        assert_eq!(y.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?, want);
        Ok(())
    }

    /// PyTorch `nn.ReplicationPad2d((1, 2, 0, 1))` on the same grid.
    #[test]
    fn replication_values() -> anyhow::Result<()> {
        let y = replication_pad2d(&grid_3x3()?, 1, 2, 0, 1)?;
        let want = vec![
            vec![0f32, 0.0, 1.0, 2.0, 2.0, 2.0],
            vec![3.0, 3.0, 4.0, 5.0, 5.0, 5.0],
            vec![6.0, 6.0, 7.0, 8.0, 8.0, 8.0],
            vec![6.0, 6.0, 7.0, 8.0, 8.0, 8.0],
        ];
        assert_eq!(y.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?, want);
        Ok(())
    }

    #[test]
    fn zero_padding_is_identity_and_oversized_padding_is_an_error() -> anyhow::Result<()> {
        let x = grid_3x3()?;
        let y = reflection_pad2d(&x, 0, 0, 0, 0)?;
        assert_eq!(y.dims(), x.dims());
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?
        );
        let err = reflection_pad2d(&x, 3, 0, 0, 0).unwrap_err().to_string();
        assert!(err.contains("left 3") && err.contains("W=3"), "{err}");
        let err = reflection_pad2d(&x, 0, 0, 0, 3).unwrap_err().to_string();
        assert!(err.contains("bottom 3") && err.contains("H=3"), "{err}");
        let one = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
        assert!(replication_pad2d(&one, 1, 1, 1, 1).is_err());
        Ok(())
    }

    #[test]
    fn gradcheck_reflection_and_replication() -> anyhow::Result<()> {
        let cases: [(&[usize], [usize; 4]); 5] = [
            (&[1, 1, 3, 3], [1, 1, 1, 1]),
            (&[1, 3, 4, 5], [2, 1, 3, 0]),
            (&[2, 1, 5, 2], [1, 0, 4, 2]),
            (&[3, 2], [1, 1, 0, 2]),
            (&[1, 1, 2, 7], [6, 3, 1, 1]),
        ];
        for (seed, (dims, [l, r, t, b])) in cases.into_iter().enumerate() {
            let x = uniform(seed as u64, dims, 1.0)?;
            check_gradients(
                |v| weighted_sum(&reflection_pad2d(&v[0], l, r, t, b)?, 5),
                std::slice::from_ref(&x),
                GradCheckOptions::default(),
            )?
            .ensure(1e-6)?;
            check_gradients(
                |v| weighted_sum(&replication_pad2d(&v[0], l, r, t, b)?, 6),
                &[x],
                GradCheckOptions::default(),
            )?
            .ensure(1e-6)?;
        }
        Ok(())
    }
}
