//! The slice of a candle CPU storage that a custom op's kernel reads or writes.

use candle_core::{Layout, Result, bail};

/// The elements of a contiguous tensor, or an error naming `op`.
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!(
            "{op}: inputs must be contiguous, got strides {:?}",
            layout.stride()
        ),
    }
}

/// [`contiguous`] for the tensor an in-place op updates.
pub(crate) fn contiguous_mut<'a, T>(
    data: &'a mut [T],
    layout: &Layout,
    op: &str,
) -> Result<&'a mut [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut data[start..end]),
        None => bail!(
            "{op}: the updated tensor must be contiguous, got strides {:?}",
            layout.stride()
        ),
    }
}
