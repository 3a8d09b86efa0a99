//! Deterministic train / validation / test splits and split files.
//!
//! Every split starts from the ids sorted, then shuffled by a [`ChaCha8Rng`] seeded with the
//! user's seed, so a split depends only on the set of ids and the seed (not on directory order).
//! [`Split::low_data`] draws the ultra-low-data regime (`n_train` + `n_val` labelled cases, the
//! rest is test), [`Split::low_data_fold`] the other validation folds of the same labelled
//! pool (same test cases); [`Split::k_fold`] builds k folds of a whole dataset. Split files are JSON lists of
//! `{"train": [..], "val": [..], "test": [..]}`, i.e. nnU-Net's `splits_final.json` plus an
//! optional `"test"` list, so nnU-Net files can be read and ours read by nnU-Net.

use std::collections::BTreeSet;
use std::path::Path;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::error::{DataError, Result};

/// One split of a dataset's ids (each list sorted).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Split {
    /// Ids to train on.
    pub train: Vec<String>,
    /// Ids for validation (model selection).
    pub val: Vec<String>,
    /// Held-out ids; absent in nnU-Net files, hence empty by default.
    #[serde(default)]
    pub test: Vec<String>,
}

/// Sorts the ids, refuses duplicates, and shuffles them with the seeded RNG.
fn shuffled(ids: &[String], seed: u64) -> Result<Vec<String>> {
    let mut sorted = ids.to_vec();
    sorted.sort();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(DataError::Split(format!("id {:?} appears twice", w[0])));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    sorted.shuffle(&mut rng);
    Ok(sorted)
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

impl Split {
    /// The ultra-low-data regime: `n_train` and `n_val` ids drawn from the labelled pool `ids`,
    /// every other id is test (the paper's "9 examples" = 7 train + 2 val).
    pub fn low_data(ids: &[String], n_train: usize, n_val: usize, seed: u64) -> Result<Split> {
        Self::low_data_fold(ids, n_train, n_val, 0, seed)
    }

    /// Fold `fold` of the seed's labelled pool: the same `n_train + n_val` labelled cases and
    /// the same test cases as [`Split::low_data`] (which is fold 0), validated on another
    /// `n_val` of them. Fold `i` validates on the `i`-th block of `n_val` counted back from
    /// the end of the pool, so the first `(n_train + n_val) / n_val` folds have disjoint
    /// validation sets: cross-validating a choice over them scores it on `k * n_val`
    /// labelled images without touching the test cases (40 instead of 8 on ISIC 32 + 8).
    pub fn low_data_fold(
        ids: &[String],
        n_train: usize,
        n_val: usize,
        fold: usize,
        seed: u64,
    ) -> Result<Split> {
        if n_train == 0 {
            return Err(DataError::Split("n_train must be at least 1".into()));
        }
        if n_train + n_val > ids.len() {
            return Err(DataError::Split(format!(
                "n_train {n_train} + n_val {n_val} = {} exceeds the {} labelled cases",
                n_train + n_val,
                ids.len()
            )));
        }
        let pool = n_train + n_val;
        let folds = Self::low_data_fold_count(n_train, n_val);
        if fold >= folds {
            return Err(DataError::Split(format!(
                "fold {fold} of {n_train} + {n_val} labelled cases: the pool has {folds} \
                 disjoint validation fold(s) (0 to {})",
                folds - 1
            )));
        }
        let mut order = shuffled(ids, seed)?;
        let test = order.split_off(pool);
        let (lo, hi) = (pool - (fold + 1) * n_val, pool - fold * n_val);
        let val = order.drain(lo..hi).collect();
        Ok(Split {
            train: sorted(order),
            val: sorted(val),
            test: sorted(test),
        })
    }

    /// How many disjoint validation folds [`Split::low_data_fold`] offers for `n_train +
    /// n_val` labelled cases (1 without validation cases).
    pub fn low_data_fold_count(n_train: usize, n_val: usize) -> usize {
        (n_train + n_val).checked_div(n_val).unwrap_or(1)
    }

    /// `k` folds: the shuffled ids are cut into `k` near-equal parts (the first `N mod k` one
    /// larger); fold `i` validates on part `i` and trains on the others; no test ids.
    pub fn k_fold(ids: &[String], k: usize, seed: u64) -> Result<Vec<Split>> {
        if k < 2 {
            return Err(DataError::Split(format!("k-fold needs k >= 2, got {k}")));
        }
        if ids.len() < k {
            return Err(DataError::Split(format!(
                "{k}-fold cross-validation needs at least {k} cases, the dataset has {}",
                ids.len()
            )));
        }
        let order = shuffled(ids, seed)?;
        let (base, extra) = (order.len() / k, order.len() % k);
        let mut bounds = Vec::with_capacity(k + 1);
        bounds.push(0);
        for i in 0..k {
            bounds.push(bounds[i] + base + usize::from(i < extra));
        }
        Ok((0..k)
            .map(|i| {
                let (lo, hi) = (bounds[i], bounds[i + 1]);
                Split {
                    train: sorted([&order[..lo], &order[hi..]].concat()),
                    val: sorted(order[lo..hi].to_vec()),
                    test: Vec::new(),
                }
            })
            .collect())
    }

    /// Checks that the lists are disjoint, that train is not empty and that every id is one of
    /// `ids` (the dataset's); errors name the offending id.
    pub fn validate(&self, ids: &[String]) -> Result<()> {
        if self.train.is_empty() {
            return Err(DataError::Split("the train list is empty".into()));
        }
        let known: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
        let mut seen = BTreeSet::new();
        for (list, members) in [
            ("train", &self.train),
            ("val", &self.val),
            ("test", &self.test),
        ] {
            for id in members {
                if !known.contains(id.as_str()) {
                    return Err(DataError::Split(format!(
                        "{list} id {id:?} is not in the dataset"
                    )));
                }
                if !seen.insert(id.as_str()) {
                    return Err(DataError::Split(format!(
                        "id {id:?} appears twice (second time in {list})"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The JSON forms accepted when reading: a list of splits (nnU-Net) or a single split.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum SplitFileJson {
    Many(Vec<Split>),
    One(Split),
}

/// Reads a split file (a list of splits as nnU-Net writes it, or one split object).
pub fn read_split_file(path: &Path) -> Result<Vec<Split>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let parsed: SplitFileJson = serde_json::from_str(&text).map_err(|source| DataError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let splits = match parsed {
        SplitFileJson::Many(v) => v,
        SplitFileJson::One(s) => vec![s],
    };
    if splits.is_empty() {
        return Err(DataError::InvalidLayout {
            path: path.to_path_buf(),
            message: "split file holds no split".into(),
        });
    }
    Ok(splits)
}

/// Writes splits as a JSON list (pretty-printed), creating parent folders.
pub fn write_split_file(path: &Path, splits: &[Split]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
    }
    let json = serde_json::to_string_pretty(splits).map_err(|source| DataError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, json + "\n").map_err(|e| DataError::io(path, e))
}

/// Picks fold `fold` of a split file's splits, with an error naming the number of folds.
pub fn select_fold(splits: &[Split], fold: usize) -> Result<&Split> {
    splits.get(fold).ok_or_else(|| {
        DataError::Split(format!(
            "fold {fold} requested but the split file has {} fold(s)",
            splits.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("case_{i:03}")).collect()
    }

    #[test]
    fn low_data_split_has_requested_sizes_and_is_deterministic() {
        let pool = ids(20);
        let a = Split::low_data(&pool, 7, 2, 0).unwrap();
        assert_eq!((a.train.len(), a.val.len(), a.test.len()), (7, 2, 11));
        a.validate(&pool).unwrap();
        // Directory order must not matter: the same ids reversed give the same split.
        let mut reversed = pool.clone();
        reversed.reverse();
        assert_eq!(Split::low_data(&reversed, 7, 2, 0).unwrap(), a);
        assert_ne!(Split::low_data(&pool, 7, 2, 1).unwrap(), a);
    }

    #[test]
    fn low_data_split_refuses_too_small_pools() {
        let err = Split::low_data(&ids(5), 7, 2, 0).unwrap_err().to_string();
        assert!(err.contains("exceeds the 5 labelled cases"), "{err}");
        assert!(Split::low_data(&ids(5), 0, 2, 0).is_err());
        let dup = vec!["a".to_string(), "a".to_string()];
        assert!(
            Split::low_data(&dup, 1, 0, 0)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
    }

    #[test]
    fn low_data_folds_share_the_pool_and_the_test_cases() {
        let pool = ids(50);
        let fold0 = Split::low_data(&pool, 32, 8, 4).unwrap();
        assert_eq!(Split::low_data_fold(&pool, 32, 8, 0, 4).unwrap(), fold0);
        assert_eq!(Split::low_data_fold_count(32, 8), 5);
        let labelled: BTreeSet<String> = fold0.train.iter().chain(&fold0.val).cloned().collect();
        let mut seen_val = BTreeSet::new();
        for fold in 0..5 {
            let s = Split::low_data_fold(&pool, 32, 8, fold, 4).unwrap();
            s.validate(&pool).unwrap();
            assert_eq!(s.test, fold0.test);
            assert_eq!((s.train.len(), s.val.len()), (32, 8));
            let here: BTreeSet<String> = s.train.iter().chain(&s.val).cloned().collect();
            assert_eq!(here, labelled);
            for id in &s.val {
                assert!(seen_val.insert(id.clone()), "{id} validates twice");
            }
        }
        assert_eq!(seen_val, labelled);
        let err = Split::low_data_fold(&pool, 32, 8, 5, 4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("5 disjoint validation fold(s) (0 to 4)"),
            "{err}"
        );
        // Montgomery 7 + 2: four disjoint folds, one labelled image never validates.
        assert_eq!(Split::low_data_fold_count(7, 2), 4);
        assert_eq!(Split::low_data_fold_count(7, 0), 1);
    }

    #[test]
    fn k_fold_refuses_fewer_cases_than_folds() {
        let err = Split::k_fold(&ids(3), 5, 0).unwrap_err().to_string();
        assert!(
            err.contains("at least 5 cases") && err.contains("has 3"),
            "{err}"
        );
        assert!(Split::k_fold(&ids(3), 1, 0).is_err());
    }

    #[test]
    fn split_files_round_trip_and_read_nnunet_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/split.json");
        let splits = Split::k_fold(&ids(10), 5, 3).unwrap();
        write_split_file(&path, &splits).unwrap();
        assert_eq!(read_split_file(&path).unwrap(), splits);
        let nnunet = dir.path().join("splits_final.json");
        std::fs::write(&nnunet, r#"[{"train": ["a", "b"], "val": ["c"]}]"#).unwrap();
        let read = read_split_file(&nnunet).unwrap();
        assert_eq!(read[0].val, ["c"]);
        assert!(read[0].test.is_empty());
        assert!(
            select_fold(&read, 1)
                .unwrap_err()
                .to_string()
                .contains("1 fold(s)")
        );
        std::fs::write(&nnunet, "[").unwrap();
        let err = read_split_file(&nnunet).unwrap_err().to_string();
        assert!(err.contains("splits_final.json"), "{err}");
    }

    #[test]
    fn validate_names_unknown_and_repeated_ids() {
        let pool = ids(4);
        let mut s = Split::low_data(&pool, 2, 1, 0).unwrap();
        s.test.push(s.train[0].clone());
        assert!(s.validate(&pool).unwrap_err().to_string().contains("twice"));
        s.test = vec!["ghost".into()];
        assert!(s.validate(&pool).unwrap_err().to_string().contains("ghost"));
    }

    proptest! {
        #[test]
        fn low_data_splits_partition_the_pool(n in 1usize..60, t in 1usize..30, v in 0usize..30, seed in any::<u64>()) {
            prop_assume!(t + v <= n);
            let pool = ids(n);
            let s = Split::low_data(&pool, t, v, seed).unwrap();
            s.validate(&pool).unwrap();
            prop_assert_eq!((s.train.len(), s.val.len(), s.test.len()), (t, v, n - t - v));
        }

        #[test]
        fn k_folds_validate_on_each_id_exactly_once(n in 2usize..50, k in 2usize..10, seed in any::<u64>()) {
            prop_assume!(k <= n);
            let pool = ids(n);
            let folds = Split::k_fold(&pool, k, seed).unwrap();
            prop_assert_eq!(folds.len(), k);
            let mut all_val: Vec<String> = folds.iter().flat_map(|f| f.val.clone()).collect();
            all_val.sort();
            prop_assert_eq!(all_val, pool.clone());
            for f in &folds {
                f.validate(&pool).unwrap();
                prop_assert_eq!(f.train.len() + f.val.len(), n);
                prop_assert!(f.val.len() == n / k || f.val.len() == n / k + 1);
            }
        }
    }
}
