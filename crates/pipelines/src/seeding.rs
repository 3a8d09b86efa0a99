//! Stateless, labelled random streams: the generator for "the batch order of
//! epoch e" or "the augmentation of iteration t" is a pure function of the
//! run's seed, so a resumed run draws exactly what an uninterrupted one would,
//! with nothing to checkpoint.

use genseg_nn::rng::SeededRng;

/// What a stream is for (its ChaCha stream id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Purpose {
    /// Model weight initialisation.
    Weights = 1,
    /// The order of training images, one stream per epoch.
    BatchOrder = 2,
    /// Augmentation draws, one stream per iteration.
    Augment = 3,
    /// Generator weight initialisation (pix2pix pre-training).
    GeneratorWeights = 4,
    /// Discriminator weight initialisation (pix2pix pre-training).
    DiscriminatorWeights = 5,
    /// The generator's dropout masks, one stream per iteration (or per generated batch).
    GeneratorDropout = 6,
    /// The generator's dropout masks during validation, one stream per validation.
    ValidationDropout = 7,
    /// The geometric augmentation of masks before synthesis, one stream per iteration
    /// (or per generated sample).
    MaskAugment = 8,
    /// Random post-processing decisions of synthetic images, one stream per iteration.
    PostProcess = 9,
    /// The generator's dropout masks when it paints the segmenter's synthetic batch
    /// (end-to-end GenSeg), one stream per iteration.
    SynthesisDropout = 10,
    /// The order of validation images in the architecture level's batches, per epoch.
    ValidationBatchOrder = 11,
    /// The on-the-fly transforms of the real training pairs (`train.transforms`), one
    /// stream per image of each iteration.
    Transforms = 12,
    /// The on-the-fly transforms of Separate's synthetic pairs (`separate.transforms`), one
    /// stream per image of each iteration.
    SyntheticTransforms = 13,
    /// The spatial transforms of the generator's pre-training pairs (`train.transforms` in
    /// a pix2pix run), one stream per pair of each iteration.
    PairTransforms = 14,
}

/// SplitMix64's finaliser: a bijective mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator for `(seed, purpose, index)`.
pub fn rng_for(seed: u64, purpose: Purpose, index: u64) -> SeededRng {
    SeededRng::new(mix(seed ^ mix(index))).with_stream(purpose as u64)
}

/// A seed for a sub-component (e.g. a ParamStore) derived from the run seed.
pub fn seed_for(seed: u64, purpose: Purpose) -> u64 {
    mix(seed ^ mix(purpose as u64).rotate_left(17))
}

/// The batch of iteration `t` of a run with seed `seed` (see [`genseg_data::sampler`]).
pub fn batch_indices(seed: u64, n: usize, batch: usize, t: u64) -> Vec<usize> {
    genseg_data::sampler::batch_indices(n, batch, t, |epoch| {
        rng_for(seed, Purpose::BatchOrder, epoch)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a = rng_for(0, Purpose::Augment, 5).next_u64();
        assert_eq!(a, rng_for(0, Purpose::Augment, 5).next_u64());
        assert_ne!(a, rng_for(0, Purpose::Augment, 6).next_u64());
        assert_ne!(a, rng_for(1, Purpose::Augment, 5).next_u64());
        assert_ne!(a, rng_for(0, Purpose::BatchOrder, 5).next_u64());
        assert_ne!(seed_for(0, Purpose::Weights), seed_for(0, Purpose::Augment));
    }
}
