//! The error type of the crate: every variant names the file (or folder) and the problem, so that a
//! message alone tells the user what to fix. [`DataError`] doubles as the list of problems in a
//! [`crate::check::CheckReport`].

use std::path::{Path, PathBuf};

/// Everything that can go wrong while discovering, decoding, splitting or writing a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be read, listed or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The operating-system error.
        source: std::io::Error,
    },
    /// An image or mask could not be decoded (unreadable, truncated or not an image).
    #[error("{path}: cannot decode image (unreadable or truncated file): {source}")]
    Decode {
        /// The file that failed to decode.
        path: PathBuf,
        /// The decoder's error.
        source: image::ImageError,
    },
    /// An image could not be encoded or written.
    #[error("{path}: cannot write image: {source}")]
    Encode {
        /// The destination file.
        path: PathBuf,
        /// The encoder's error.
        source: image::ImageError,
    },
    /// A JSON file (nnU-Net `dataset.json`, split file) could not be parsed or written.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// No known layout was found in a folder.
    #[error(
        "{dir}: no dataset layout found (expected images/ + masks/, Images/ + Masks/, or nnU-Net dataset.json + imagesTr/ + labelsTr/)"
    )]
    NoLayout {
        /// The dataset folder.
        dir: PathBuf,
    },
    /// More than one layout matches a folder; the user must choose one.
    #[error("{dir}: ambiguous dataset layout, {candidates} all match; choose one with --layout")]
    AmbiguousLayout {
        /// The dataset folder.
        dir: PathBuf,
        /// The matching layouts, comma separated.
        candidates: String,
    },
    /// A layout-specific file is malformed or describes an unsupported dataset.
    #[error("{path}: {message}")]
    InvalidLayout {
        /// The offending file or folder.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The dataset folder holds no image/mask pair.
    #[error("{dir}: empty dataset (no image/mask pairs found)")]
    EmptyDataset {
        /// The dataset folder.
        dir: PathBuf,
    },
    /// An image has no mask.
    #[error("{image}: missing mask (looked for {expected})")]
    MissingMask {
        /// The image without mask.
        image: PathBuf,
        /// Where the mask was expected, for the message.
        expected: String,
    },
    /// A mask has no image.
    #[error("{mask}: unmatched mask (no image with this id)")]
    UnmatchedMask {
        /// The mask without image.
        mask: PathBuf,
    },
    /// Two files in the same folder share an id, so pairs would be ambiguous.
    #[error("{path}: id {id:?} is also used by {other}")]
    DuplicateId {
        /// The second file seen with this id.
        path: PathBuf,
        /// The first file seen with this id.
        other: PathBuf,
        /// The shared id.
        id: String,
    },
    /// Mask and image of one pair differ in size.
    #[error(
        "{mask}: mask size {mask_w}x{mask_h} differs from image size {image_w}x{image_h} ({image})"
    )]
    MaskSizeMismatch {
        /// The mask.
        mask: PathBuf,
        /// The image it belongs to.
        image: PathBuf,
        /// Mask width in pixels.
        mask_w: u32,
        /// Mask height in pixels.
        mask_h: u32,
        /// Image width in pixels.
        image_w: u32,
        /// Image height in pixels.
        image_h: u32,
    },
    /// A mask has more than two distinct values and no threshold was given.
    #[error(
        "{path}: non-binary mask ({distinct} distinct values, e.g. {examples}); give a threshold to binarise it"
    )]
    NonBinaryMask {
        /// The mask.
        path: PathBuf,
        /// How many distinct values it holds.
        distinct: usize,
        /// A few of them, for the message.
        examples: String,
    },
    /// An nnU-Net label map holds a value that `dataset.json` does not declare.
    #[error("{path}: label value {value} is not declared in dataset.json (declared: {declared})")]
    UndeclaredLabel {
        /// The label map.
        path: PathBuf,
        /// The undeclared value.
        value: u16,
        /// The declared values, for the message.
        declared: String,
    },
    /// Images with different channel counts under [`crate::ChannelPolicy::Strict`].
    #[error(
        "{path}: {channels} channel(s) but {first} has {expected}; the dataset mixes channel counts (convert with the gray or rgb channel policy)"
    )]
    MixedChannels {
        /// The image that differs.
        path: PathBuf,
        /// Its channel count.
        channels: usize,
        /// The first image of the dataset.
        first: PathBuf,
        /// The first image's channel count.
        expected: usize,
    },
    /// Images of different sizes and no target size to resize them to.
    #[error(
        "{path}: size {width}x{height} differs from {first} ({expected_w}x{expected_h}); set a target size to resize"
    )]
    MixedSizes {
        /// The image that differs.
        path: PathBuf,
        /// Its width.
        width: u32,
        /// Its height.
        height: u32,
        /// The first image of the dataset.
        first: PathBuf,
        /// The first image's width.
        expected_w: u32,
        /// The first image's height.
        expected_h: u32,
    },
    /// A split cannot be built or does not fit the dataset.
    #[error("invalid split: {0}")]
    Split(String),
    /// A configuration value is out of range.
    #[error("invalid data configuration: {0}")]
    Config(String),
    /// The background batch preparation failed or was used out of order.
    #[error("{0}")]
    Prefetch(String),
}

/// Result alias of the crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

impl DataError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// The file or folder this error is about, when it has one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            DataError::Io { path, .. }
            | DataError::Decode { path, .. }
            | DataError::Encode { path, .. }
            | DataError::Json { path, .. }
            | DataError::InvalidLayout { path, .. }
            | DataError::DuplicateId { path, .. }
            | DataError::NonBinaryMask { path, .. }
            | DataError::UndeclaredLabel { path, .. }
            | DataError::MixedChannels { path, .. }
            | DataError::MixedSizes { path, .. } => Some(path),
            DataError::NoLayout { dir }
            | DataError::AmbiguousLayout { dir, .. }
            | DataError::EmptyDataset { dir } => Some(dir),
            DataError::MissingMask { image, .. } => Some(image),
            DataError::UnmatchedMask { mask } | DataError::MaskSizeMismatch { mask, .. } => {
                Some(mask)
            }
            DataError::Split(_) | DataError::Config(_) | DataError::Prefetch(_) => None,
        }
    }
}
