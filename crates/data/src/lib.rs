//! # genseg-data: datasets as users already have them
//!
//! Data IO for GenSeg (generative data augmentation for medical image segmentation in
//! ultra-low-data regimes). The principal type is [`Dataset`]: every image/mask pair of a folder,
//! decoded once in parallel, preprocessed and cached in memory, served as candle tensors by
//! [`Dataset::batch`] (images `[B, C, H, W]` f32 in [0, 1], masks `[B, 1, H, W]` f32 in {0, 1}).
//!
//! How the pieces meet:
//! * [`layout`]: the folder layouts ([`Layout`]: `images/` + `masks/`, the GenSeg reference
//!   `Images/` + `Masks/` with mask suffixes, nnU-Net v2 raw), detected or chosen, and pairing.
//! * [`preprocess`]: decoding (PNG, JPEG, GIF, BMP, TIFF), the channel policy, mask binarisation
//!   ([`MaskRule`]), resizing, histogram equalisation + gamma; configured by [`DataConfig`].
//! * [`split`]: seeded splits ([`Split::low_data`], [`Split::k_fold`]) and nnU-Net-compatible split
//!   files.
//! * [`check`]: [`check_dataset`] validates a folder and reports statistics and every problem,
//!   each naming its file.
//! * [`phantom`]: seeded synthetic lungs / skin phantoms (and a shifted domain), so nothing needs
//!   downloaded data.
//! * [`sampler`]: the seeded, resumable order of training batches.
//! * [`intensity`]: per-image z-score normalisation ([`Normalisation`]).
//! * [`transforms`]: nnU-Net's on-the-fly augmentation chain ([`TransformConfig`]), seeded,
//!   parallel over a batch; [`prefetch`] makes batches on a background thread.
//! * [`writer`]: PNG masks, overlays, image grids, masks to and from tensors.
//!
//! Errors are [`DataError`]s whose messages name the file and the problem. Nothing here prints.
//!
//! ```
//! use genseg_data::{DataConfig, Dataset, PhantomConfig, PhantomKind, Split, write_phantoms};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! write_phantoms(dir.path(), &PhantomConfig::new(PhantomKind::Lungs, 32, 0), 12)?;
//! let data = Dataset::load(dir.path(), &DataConfig::default())?;
//! let split = Split::low_data(&data.ids(), 7, 2, 0)?;
//! let train = data.indices_of(&split.train)?;
//! let (images, masks) = data.batch(&train[..2], &candle_core::Device::Cpu)?;
//! assert_eq!(images.dims(), &[2, 1, 32, 32]);
//! assert_eq!(masks.dims(), &[2, 1, 32, 32]);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod check;
pub mod dataset;
pub mod error;
pub mod intensity;
pub mod layout;
pub mod phantom;
pub mod prefetch;
pub mod preprocess;
pub mod sampler;
pub mod split;
pub mod transforms;
pub mod writer;

pub use check::{CheckOptions, CheckReport, check_dataset};
pub use dataset::{DataConfig, Dataset, ImageSize, Sample};
pub use error::{DataError, Result};
pub use intensity::Normalisation;
pub use layout::{Layout, LayoutChoice, SamplePair, detect_layout, discover};
pub use phantom::{PhantomConfig, PhantomKind, phantom_dataset, phantoms, write_phantoms};
pub use preprocess::{ChannelPolicy, ImageFilter, MaskRule};
pub use split::{Split, read_split_file, select_fold, write_split_file};
pub use transforms::TransformConfig;
pub use writer::{OverlayStyle, image_grid, overlay, write_image, write_mask_png};
