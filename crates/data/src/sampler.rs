//! The order in which training pairs are served: a continuous stream over per-epoch
//! shuffles, so every batch is full (an epoch's tail continues into the next epoch's
//! permutation) and batch `t` is a pure function of `t` and the per-epoch random streams.
//! A resumed run therefore draws exactly the batches an uninterrupted one would, with no
//! sampler state to checkpoint.

use rand::Rng;
use rand::seq::SliceRandom;

/// The pool indices of batch `t` (batches of `batch` out of `n` pairs). Epoch `e` is a
/// shuffle of `0..n` drawn from `epoch_rng(e)`, which must return the same stream for the
/// same epoch every time it is called.
///
/// ```
/// use genseg_data::sampler::batch_indices;
/// use rand::SeedableRng;
/// use rand_chacha::ChaCha8Rng;
///
/// let rng = |epoch: u64| ChaCha8Rng::seed_from_u64(epoch);
/// // 7 pairs, batch 2: batch 3 takes the last pair of epoch 0 and the first of epoch 1.
/// let b = batch_indices(7, 2, 3, rng);
/// assert_eq!(b.len(), 2);
/// assert_eq!(b, batch_indices(7, 2, 3, rng));
/// ```
pub fn batch_indices<R: Rng>(
    n: usize,
    batch: usize,
    t: u64,
    mut epoch_rng: impl FnMut(u64) -> R,
) -> Vec<usize> {
    let start = t as usize * batch;
    let mut cached: Option<(usize, Vec<usize>)> = None;
    (start..start + batch)
        .map(|k| {
            let epoch = k / n;
            if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
                let mut perm: Vec<usize> = (0..n).collect();
                perm.shuffle(&mut epoch_rng(epoch as u64));
                cached = Some((epoch, perm));
            }
            cached.as_ref().expect("just set").1[k % n]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn stream(seed: u64) -> impl Fn(u64) -> ChaCha8Rng {
        move |epoch| ChaCha8Rng::seed_from_u64(seed * 1000 + epoch)
    }

    #[test]
    fn batches_are_full_cover_each_epoch_and_are_reproducible() {
        let n = 7;
        let mut seen = vec![0usize; n];
        // 7 iterations of batch 2 = exactly 2 epochs.
        for t in 0..7 {
            let b = batch_indices(n, 2, t, stream(3));
            assert_eq!(b.len(), 2);
            assert_eq!(b, batch_indices(n, 2, t, stream(3)));
            for i in b {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 2), "{seen:?}");
        let all = |seed| {
            (0..7)
                .flat_map(|t| batch_indices(n, 2, t, stream(seed)))
                .collect::<Vec<_>>()
        };
        assert_ne!(all(3), all(4));
    }
}
