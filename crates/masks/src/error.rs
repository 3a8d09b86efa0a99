//! The error type of the crate. Messages name the configuration field (or the mask) and the
//! numbers involved, so that the message alone tells the user what to fix.

/// Everything that can go wrong when building a [`crate::MaskAugmenter`] or applying it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MaskError {
    /// A field of [`crate::MaskAugmentConfig`] (or of [`crate::AugmentParams`]) is out of range.
    #[error("mask augmentation: `{field}` {problem}")]
    InvalidConfig {
        /// The field's name as written in the configuration file.
        field: String,
        /// What is wrong, with the offending numbers.
        problem: String,
    },
    /// Parameters drawn for one mask size were applied to a mask of another size.
    #[error(
        "mask augmentation: parameters were drawn for a {expected_width}x{expected_height} mask \
         but the mask is {width}x{height}"
    )]
    SizeMismatch {
        /// Width the parameters were drawn for.
        expected_width: u32,
        /// Height the parameters were drawn for.
        expected_height: u32,
        /// Width of the mask given.
        width: u32,
        /// Height of the mask given.
        height: u32,
    },
    /// A raw mask buffer does not hold `width * height` values.
    #[error("mask augmentation: a {width}x{height} mask needs {expected} values, got {len}")]
    BufferLength {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// `width * height`.
        expected: usize,
        /// Length of the buffer given.
        len: usize,
    },
}

impl MaskError {
    pub(crate) fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::InvalidConfig {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Result alias of the crate.
pub type Result<T, E = MaskError> = std::result::Result<T, E>;
