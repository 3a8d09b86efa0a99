//! `cargo xtask experiment`: the method comparison over seeds (docs/results.md).
//!
//! A method is a `genseg train --method` name, run on the plain recipe, or `strong` /
//! `strong-<method>`: the baseline / that method on `--recipe strong`. Each `--ablate
//! NAME:KEY=VALUE;...` adds, per method, a variant `<method>-<NAME>` with those overrides:
//! one piece of the recipe taken away, trained from the same split and seed. An ablation
//! that sets only keys of the generator's sections (`separate.`, `genseg.`, `generator.`,
//! `discriminator.`, `gan.`) adds no variant to a method without a generator: it would be
//! the method itself, trained again.
//!
//! Runs go seed by seed, each seed's variants in table order; the generator of a seed is
//! pre-trained just before its first variant that uses one. In every override `{seed}`
//! stands for the seed and `{out}` for `--out` (see [`for_seed`]).
//!
//! Layout of `--out`: `pix2pix-s<seed>/` (generator pre-training), `<variant>-s<seed>/`
//! (segmentation runs, with `eval-test/` and `eval-<ood>-all/`), `results.csv` (one line
//! per run) and `results.md` (mean ± std over seeds per variant, and the difference to the
//! first variant, paired by seed).
//!
//! `--strong-set` overrides reach only the strong-recipe variants: how a table measured
//! under an earlier strong recipe pins what has since changed (e.g. nnU-Net's SGD) without
//! touching the plain baseline beside it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::{build_genseg, genseg};

/// What to run.
pub struct Plan {
    pub study: Study,
    pub methods: Vec<String>,
    pub sets: Vec<String>,
    /// `--set` overrides for the strong-recipe variants only (after `sets`).
    pub strong_sets: Vec<String>,
    pub pretrain_sets: Vec<String>,
    /// `NAME:KEY=VALUE;KEY=VALUE`, one per ablated piece.
    pub ablations: Vec<String>,
}

/// One row of the study: a method on a recipe, with its own overrides.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Variant {
    /// The row's name and its run folders' prefix.
    pub name: String,
    /// `genseg train --method`.
    pub method: String,
    /// On `--recipe strong`.
    pub strong: bool,
    /// Its own `--set` overrides (after the plan's).
    pub sets: Vec<String>,
}

impl Variant {
    /// `baseline`, `genseg`, ... (plain recipe), `strong` or `strong-<method>`.
    pub fn parse(spec: &str) -> Self {
        let (strong, method) = match spec.strip_prefix("strong") {
            Some("") => (true, "baseline"),
            Some(rest) if rest.starts_with('-') => (true, &rest[1..]),
            _ => (false, spec),
        };
        Self {
            name: spec.to_string(),
            method: method.to_string(),
            strong,
            sets: Vec::new(),
        }
    }

    /// This variant with the ablation `NAME:KEY=VALUE;KEY=VALUE` applied.
    fn ablated(&self, ablation: &str) -> Result<Self> {
        let Some((name, sets)) = ablation.split_once(':') else {
            bail!("--ablate {ablation:?}: expected NAME:KEY=VALUE[;KEY=VALUE...]");
        };
        let sets: Vec<String> = sets
            .split(';')
            .map(str::trim)
            .filter(|kv| !kv.is_empty())
            .map(String::from)
            .collect();
        if name.is_empty()
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            || sets.is_empty()
            || sets.iter().any(|kv| !kv.contains('='))
        {
            bail!(
                "--ablate {ablation:?}: expected NAME:KEY=VALUE[;KEY=VALUE...], NAME of letters, \
                 digits and '-'"
            );
        }
        let mut variant = self.clone();
        variant.name = format!("{}-{name}", self.name);
        variant.sets.extend(sets);
        Ok(variant)
    }

    /// The arguments of `genseg train` after the data flags (`common`): the method, the
    /// recipe, the generator, the run folder and the `--set` overrides: the plan's `sets`,
    /// then `strong_sets` if this variant is on the strong recipe, then the variant's own.
    pub fn train_args<'a>(
        &self,
        common: &[String],
        generator: Option<&Path>,
        out: &Path,
        sets: impl IntoIterator<Item = &'a String>,
        strong_sets: &'a [String],
    ) -> Vec<String> {
        let mut args = common.to_vec();
        args.extend(["--method".into(), self.method.clone()]);
        if self.strong {
            args.extend(["--recipe".into(), "strong".into()]);
        }
        if let Some(generator) = generator.filter(|_| self.uses_generator()) {
            args.extend(["--generator".into(), s(generator)]);
        }
        args.extend(["--out".into(), s(out)]);
        let strong_sets = strong_sets.iter().filter(|_| self.strong);
        for kv in sets.into_iter().chain(strong_sets) {
            args.extend(["--set".into(), kv.clone()]);
        }
        for kv in &self.sets {
            args.extend(["--set".into(), kv.clone()]);
        }
        args
    }

    pub fn uses_generator(&self) -> bool {
        self.method == "separate" || self.method == "genseg"
    }

    /// Whether this variant reads any of the config keys `sets` (`section.key=value`).
    fn reads_any(&self, sets: &[String]) -> bool {
        const GENERATOR_SECTIONS: &[&str] = &[
            "separate.",
            "genseg.",
            "generator.",
            "discriminator.",
            "gan.",
        ];
        self.uses_generator()
            || sets
                .iter()
                .any(|kv| !GENERATOR_SECTIONS.iter().any(|s| kv.starts_with(s)))
    }
}

/// Every variant of the plan, in table order: each method, then those of its ablations that
/// change what it reads.
fn variants(plan: &Plan) -> Result<Vec<Variant>> {
    let mut all = Vec::new();
    for spec in &plan.methods {
        let variant = Variant::parse(spec);
        let mut ablated = Vec::new();
        for ablation in &plan.ablations {
            let a = variant.ablated(ablation)?;
            if a.reads_any(&a.sets[variant.sets.len()..]) {
                ablated.push(a);
            }
        }
        all.push(variant);
        all.extend(ablated);
    }
    Ok(all)
}

/// The arguments of `genseg pretrain-generator` after the data flags (`common`).
pub(crate) fn pretrain_args(common: &[String], out: &Path, sets: &[String]) -> Vec<String> {
    let mut args = common.to_vec();
    args.extend(["--out".into(), s(out)]);
    for kv in sets {
        args.extend(["--set".into(), kv.clone()]);
    }
    args
}

/// What every multi-seed recipe (`experiment`, `bench-vs-nnunet`) is run on and where it
/// writes.
#[derive(clap::Args, Clone, Debug)]
pub struct Study {
    /// The labelled pool.
    #[arg(long)]
    pub data: PathBuf,
    /// Training pairs per seed.
    #[arg(long)]
    pub n_train: usize,
    /// Validation pairs per seed.
    #[arg(long)]
    pub n_val: usize,
    /// Seeds, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// A dataset to score every run on as well (out of domain), e.g. ../shared/data/ph2.
    #[arg(long)]
    pub ood: Option<PathBuf>,
    /// The study folder (one run folder per method or side, and seed; results.md).
    #[arg(long)]
    pub out: PathBuf,
    /// Use this `genseg` binary instead of building one (e.g. a CUDA build, or a copy
    /// that later builds of the tree do not replace mid-experiment).
    #[arg(long)]
    pub genseg_bin: Option<PathBuf>,
}

impl Study {
    /// The same study with its paths taken relative to `root` (absolute ones stay).
    pub fn under(self, root: &Path) -> Self {
        Self {
            data: root.join(self.data),
            ood: self.ood.map(|o| root.join(o)),
            out: root.join(self.out),
            genseg_bin: self.genseg_bin.map(|b| root.join(b)),
            ..self
        }
    }
}

/// The head of a results table: `| <first> | seeds | test Dice | [out-of-domain Dice |]
/// <last...> |` and its rule.
pub(crate) fn table_head(first: &str, ood: bool, last: &[&str]) -> String {
    let mut columns = vec![first, "seeds", "test Dice"];
    if ood {
        columns.push("out-of-domain Dice");
    }
    columns.extend(last);
    format!(
        "| {} |\n|{}\n",
        columns.join(" | "),
        "---|".repeat(columns.len())
    )
}

/// One finished segmentation run.
struct Row {
    variant: String,
    seed: u64,
    test_dice: f64,
    ood_dice: Option<f64>,
    /// Training loop wall time (without the test evaluation).
    seconds: f64,
}

pub(crate) fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

pub(crate) fn mean_dice(summary: &Path) -> Result<f64> {
    read_json(summary)?["dice"]["mean"]
        .as_f64()
        .with_context(|| format!("{} has no dice.mean", summary.display()))
}

/// The best validation Dice a run reached (`best/state.json`'s `extra.best_val_dice`).
pub(crate) fn best_val_dice(run: &Path) -> Result<f64> {
    let state = run.join("best").join("state.json");
    read_json(&state)?["extra"]["best_val_dice"]
        .as_f64()
        .with_context(|| format!("{} has no extra.best_val_dice", state.display()))
}

/// Seconds of the training loop: the `seconds` of the last metrics line.
pub(crate) fn loop_seconds(run: &Path) -> Result<f64> {
    let path = run.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .with_context(|| format!("{} is empty", path.display()))?;
    serde_json::from_str::<serde_json::Value>(last)?["seconds"]
        .as_f64()
        .with_context(|| format!("no seconds in the last line of {}", path.display()))
}

/// Starts `run` with `args`, or resumes it when it exists and `done` does not (resuming a
/// finished run only rewrites its last/).
pub(crate) fn train_or_resume(
    bin: &Path,
    cmd: &str,
    run: &Path,
    done: Option<&Path>,
    args: &[String],
) -> Result<()> {
    if done.is_some_and(Path::exists) {
        eprintln!("{} finished already, kept", run.display());
        return Ok(());
    }
    if run.join("config.toml").exists() {
        return genseg(bin, &[cmd, "--resume", &s(run)]);
    }
    let mut all: Vec<&str> = vec![cmd];
    all.extend(args.iter().map(String::as_str));
    genseg(bin, &all)
}

pub fn run(root: &Path, plan: &Plan) -> Result<()> {
    let variants = variants(plan)?;
    let bin = match &plan.study.genseg_bin {
        Some(b) => b.clone(),
        None => build_genseg(root)?,
    };
    std::fs::create_dir_all(&plan.study.out)
        .with_context(|| format!("creating {}", plan.study.out.display()))?;
    let common = |seed: u64| -> Vec<String> {
        vec![
            "--data".into(),
            s(&plan.study.data),
            "--n-train".into(),
            plan.study.n_train.to_string(),
            "--n-val".into(),
            plan.study.n_val.to_string(),
            "--seed".into(),
            seed.to_string(),
        ]
    };
    let mut rows = Vec::new();
    for &seed in &plan.study.seeds {
        let pix2pix = plan.study.out.join(format!("pix2pix-s{seed}"));
        let sets = for_seed(&plan.sets, seed, &plan.study.out);
        let strong_sets = for_seed(&plan.strong_sets, seed, &plan.study.out);
        let mut pretrained = false;
        for variant in &variants {
            // The generator is pre-trained just before the first variant that uses it, so
            // its overrides can name a run of the same seed trained before it.
            if variant.uses_generator() && !pretrained {
                let pretrain_sets = for_seed(&plan.pretrain_sets, seed, &plan.study.out);
                let args = pretrain_args(&common(seed), &pix2pix, &pretrain_sets);
                train_or_resume(&bin, "pretrain-generator", &pix2pix, None, &args)?;
                pretrained = true;
            }
            let run = plan.study.out.join(format!("{}-s{seed}", variant.name));
            let variant = Variant {
                sets: for_seed(&variant.sets, seed, &plan.study.out),
                ..variant.clone()
            };
            let args = variant.train_args(&common(seed), Some(&pix2pix), &run, &sets, &strong_sets);
            let test_summary = run.join("eval-test").join("summary.json");
            train_or_resume(&bin, "train", &run, Some(&test_summary), &args)?;
            let ood_dice = match &plan.study.ood {
                Some(ood) => {
                    let name = ood
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "ood".into());
                    let summary = run.join(format!("eval-{name}-all")).join("summary.json");
                    if !summary.exists() {
                        genseg(&bin, &["evaluate", "--run", &s(&run), "--data", &s(ood)])?;
                    }
                    Some(mean_dice(&summary)?)
                }
                None => None,
            };
            rows.push(Row {
                variant: variant.name.clone(),
                seed,
                test_dice: mean_dice(&test_summary)?,
                ood_dice,
                seconds: loop_seconds(&run)?,
            });
            write_results(plan, &variants, &rows)?;
        }
    }
    let table = std::fs::read_to_string(plan.study.out.join("results.md"))?;
    println!("{table}");
    Ok(())
}

/// `sets` with `{seed}` replaced by the seed and `{out}` by the study folder, so that one
/// override can name a file of each seed, e.g. the strong run of the same seed as the
/// segmenter of the generator's consistency term:
/// `--pretrain-set 'consistency.run="{out}/strong-s{seed}"'` with `strong` listed first.
pub(crate) fn for_seed(sets: &[String], seed: u64, out: &Path) -> Vec<String> {
    sets.iter()
        .map(|kv| {
            kv.replace("{seed}", &seed.to_string())
                .replace("{out}", &s(out))
        })
        .collect()
}

/// Mean and sample standard deviation over seeds (n − 1), 0 for a single seed.
pub(crate) use genseg_backbones::report::mean_and_sample_std as mean_std;

/// The variants every row is compared with: the first, then the two that a generated-data
/// method must beat (issue 17) when the study has them: plain augmentation (`combine`) and
/// the strong recipe (`strong`).
fn references(variants: &[Variant]) -> Vec<&str> {
    let mut references = vec![variants[0].name.as_str()];
    for name in ["combine", "strong"] {
        if !references.contains(&name) && variants.iter().any(|v| v.name == name) {
            references.push(name);
        }
    }
    references
}

fn write_results(plan: &Plan, variants: &[Variant], rows: &[Row]) -> Result<()> {
    let mut csv = String::from("variant,seed,test_dice,ood_dice,train_seconds\n");
    for r in rows {
        let ood = r.ood_dice.map(|d| format!("{d:.4}")).unwrap_or_default();
        writeln!(
            csv,
            "{},{},{:.4},{ood},{:.1}",
            r.variant, r.seed, r.test_dice, r.seconds
        )?;
    }
    std::fs::write(plan.study.out.join("results.csv"), csv)?;
    let ood = plan.study.ood.is_some();
    let references = references(variants);
    let mut last = Vec::new();
    for (i, reference) in references.iter().enumerate() {
        let vs = if i == 0 {
            String::new()
        } else {
            format!(" vs {reference}")
        };
        last.push(format!("Δ test{vs}"));
        if ood {
            last.push(format!("Δ out-of-domain{vs}"));
        }
    }
    last.push("train time per run".into());
    let last: Vec<&str> = last.iter().map(String::as_str).collect();
    let mut md = format!(
        "{} ({} train + {} val per seed); Dice is each run's mean over its cases, then mean ± \
         sample std over seeds; Δ is the difference to {} on the same seeds (mean ± std of the \
         per-seed differences), \"Δ … vs X\" the same against X\n\n{}",
        plan.study.data.display(),
        plan.study.n_train,
        plan.study.n_val,
        references[0],
        table_head("variant", ood, &last),
    );
    for variant in variants {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.variant == variant.name).collect();
        if mine.is_empty() {
            continue;
        }
        let (t, ts) = mean_std(&mine.iter().map(|r| r.test_dice).collect::<Vec<_>>());
        let (sec, _) = mean_std(&mine.iter().map(|r| r.seconds).collect::<Vec<_>>());
        let seeds: Vec<String> = mine.iter().map(|r| r.seed.to_string()).collect();
        let paired = |reference: &str, value: fn(&Row) -> Option<f64>| -> String {
            let diffs: Vec<f64> = mine
                .iter()
                .filter_map(|r| {
                    let base = rows
                        .iter()
                        .find(|b| b.variant == reference && b.seed == r.seed)?;
                    Some(value(r)? - value(base)?)
                })
                .collect();
            if diffs.is_empty() || variant.name == reference {
                return "—".into();
            }
            let (d, ds) = mean_std(&diffs);
            format!("{:+.1} ± {:.1} pt", 100.0 * d, 100.0 * ds)
        };
        let ood_cells = if ood {
            let (o, os) = mean_std(&mine.iter().filter_map(|r| r.ood_dice).collect::<Vec<_>>());
            format!("{o:.3} ± {os:.3} | ")
        } else {
            String::new()
        };
        let mut deltas = String::new();
        for reference in &references {
            write!(deltas, "{} | ", paired(reference, |r| Some(r.test_dice)))?;
            if ood {
                write!(deltas, "{} | ", paired(reference, |r| r.ood_dice))?;
            }
        }
        writeln!(
            md,
            "| {} | {} | {t:.3} ± {ts:.3} | {ood_cells}{deltas}{:.0} s |",
            variant.name,
            seeds.join(","),
            sec
        )?;
    }
    std::fs::write(plan.study.out.join("results.md"), md)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(methods: &[&str], ablations: &[&str]) -> Plan {
        Plan {
            study: Study {
                data: "d".into(),
                n_train: 7,
                n_val: 2,
                seeds: vec![0],
                ood: None,
                out: "o".into(),
                genseg_bin: None,
            },
            methods: methods.iter().map(|m| m.to_string()).collect(),
            sets: Vec::new(),
            strong_sets: Vec::new(),
            pretrain_sets: Vec::new(),
            ablations: ablations.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn methods_name_their_recipe_and_ablations_follow_each_method() -> Result<()> {
        let all = variants(&plan(
            &["baseline", "strong", "strong-genseg"],
            &[
                "no-aug:train.transforms=false",
                "sgd:train.optimizer=\"sgd\"; train.lr=0.01",
            ],
        ))?;
        let names: Vec<&str> = all.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "baseline",
                "baseline-no-aug",
                "baseline-sgd",
                "strong",
                "strong-no-aug",
                "strong-sgd",
                "strong-genseg",
                "strong-genseg-no-aug",
                "strong-genseg-sgd"
            ]
        );
        assert_eq!((all[3].method.as_str(), all[3].strong), ("baseline", true));
        assert_eq!((all[6].method.as_str(), all[6].strong), ("genseg", true));
        assert!(all[6].uses_generator() && !all[0].strong);
        assert_eq!(all[5].sets, ["train.optimizer=\"sgd\"", "train.lr=0.01"]);
        Ok(())
    }

    #[test]
    fn an_ablation_of_the_generator_skips_methods_without_one() -> Result<()> {
        let all = variants(&plan(
            &["strong", "strong-separate"],
            &[
                "transformed:separate.transforms=true",
                "mixed:separate.transforms=true;train.lambda=0.5",
            ],
        ))?;
        let names: Vec<&str> = all.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "strong",
                "strong-mixed",
                "strong-separate",
                "strong-separate-transformed",
                "strong-separate-mixed"
            ]
        );
        Ok(())
    }

    #[test]
    fn seed_and_out_placeholders_are_filled_per_seed() {
        let sets = [
            "consistency.run=\"{out}/strong-s{seed}\"".to_string(),
            "train.lr=0.01".to_string(),
        ];
        assert_eq!(
            for_seed(&sets, 2, Path::new("/runs/x")),
            ["consistency.run=\"/runs/x/strong-s2\"", "train.lr=0.01"]
        );
    }

    /// The generator of a seed is pre-trained after the variants before its first user,
    /// with its overrides naming that seed's runs: checked with a stand-in `genseg` that
    /// logs each call and writes what the study reads back.
    #[cfg(unix)]
    #[test]
    fn a_seed_pretrains_its_generator_after_the_runs_it_may_name() -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("calls.log");
        let bin = dir.path().join("genseg");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\necho \"$*\" >> {log}\nwhile [ \"$1\" != --out ]; do shift; done\n\
                 mkdir -p \"$2/eval-test\"\necho '{{\"dice\":{{\"mean\":0.5}}}}' > \
                 \"$2/eval-test/summary.json\"\necho '{{\"seconds\":1}}' > \"$2/metrics.jsonl\"\n",
                log = log.display()
            ),
        )?;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
        let mut plan = plan(&["strong", "strong-separate"], &[]);
        plan.study.out = dir.path().join("study");
        plan.study.seeds = vec![0, 1];
        plan.study.genseg_bin = Some(bin);
        plan.pretrain_sets = vec!["consistency.run=\"{out}/strong-s{seed}\"".into()];
        run(dir.path(), &plan)?;
        let calls: Vec<String> = std::fs::read_to_string(&log)?
            .lines()
            .map(|l| {
                let out = l.split(" --out ").nth(1).unwrap_or_default();
                let run = out.split(' ').next().unwrap_or_default();
                let run = Path::new(run).file_name().unwrap_or_default();
                format!(
                    "{} {}",
                    l.split(' ').next().unwrap_or_default(),
                    s(Path::new(run))
                )
            })
            .collect();
        assert_eq!(
            calls,
            [
                "train strong-s0",
                "pretrain-generator pix2pix-s0",
                "train strong-separate-s0",
                "train strong-s1",
                "pretrain-generator pix2pix-s1",
                "train strong-separate-s1"
            ]
        );
        let text = std::fs::read_to_string(&log)?;
        let study = plan.study.out.display();
        assert!(
            text.contains(&format!("--set consistency.run=\"{study}/strong-s1\"")),
            "{text}"
        );
        Ok(())
    }

    #[test]
    fn a_malformed_ablation_is_refused_with_its_text() {
        for bad in ["no-colon", "bad name:a=1", "x:", "x:novalue"] {
            let err = variants(&plan(&["strong"], &[bad]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn the_table_gives_each_variant_its_paired_difference_to_the_first() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut plan = plan(&["strong"], &["no-aug:train.transforms=false"]);
        plan.study.out = dir.path().to_path_buf();
        let all = variants(&plan)?;
        let row = |variant: &str, seed, test_dice| Row {
            variant: variant.into(),
            seed,
            test_dice,
            ood_dice: None,
            seconds: 100.0,
        };
        let rows = [
            row("strong", 0, 0.94),
            row("strong-no-aug", 0, 0.92),
            row("strong", 1, 0.90),
            row("strong-no-aug", 1, 0.89),
        ];
        write_results(&plan, &all, &rows)?;
        let md = std::fs::read_to_string(dir.path().join("results.md"))?;
        assert!(
            md.contains("| strong | 0,1 | 0.920 ± 0.028 | — | 100 s |"),
            "{md}"
        );
        assert!(
            md.contains("| strong-no-aug | 0,1 | 0.905 ± 0.021 | -1.5 ± 0.7 pt | 100 s |"),
            "{md}"
        );
        assert!(md.contains("|---|---|---|---|---|\n"), "{md}");
        Ok(())
    }

    #[test]
    fn the_table_compares_with_combine_and_strong_when_the_study_has_them() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut plan = plan(&["baseline", "combine", "strong", "strong-genseg"], &[]);
        plan.study.out = dir.path().to_path_buf();
        plan.study.ood = Some("ph2".into());
        let all = variants(&plan)?;
        let row = |variant: &str, seed, test_dice, ood_dice| Row {
            variant: variant.into(),
            seed,
            test_dice,
            ood_dice: Some(ood_dice),
            seconds: 10.0,
        };
        let mut rows = Vec::new();
        for seed in [0, 1] {
            let up = 0.01 * seed as f64;
            rows.push(row("baseline", seed, 0.80 + up, 0.70));
            rows.push(row("combine", seed, 0.85 + up, 0.75));
            rows.push(row("strong", seed, 0.90 + up, 0.80));
            rows.push(row("strong-genseg", seed, 0.91 + up, 0.78 + up));
        }
        write_results(&plan, &all, &rows)?;
        let md = std::fs::read_to_string(dir.path().join("results.md"))?;
        assert!(
            md.contains(
                "| variant | seeds | test Dice | out-of-domain Dice | Δ test | Δ out-of-domain | \
                 Δ test vs combine | Δ out-of-domain vs combine | Δ test vs strong | \
                 Δ out-of-domain vs strong | train time per run |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| strong-genseg | 0,1 | 0.915 ± 0.007 | 0.785 ± 0.007 | +11.0 ± 0.0 pt | \
                 +8.5 ± 0.7 pt | +6.0 ± 0.0 pt | +3.5 ± 0.7 pt | +1.0 ± 0.0 pt | \
                 -1.5 ± 0.7 pt | 10 s |"
            ),
            "{md}"
        );
        assert!(md.contains("| combine | 0,1 | 0.855 ± 0.007 | 0.750 ± 0.000 | +5.0 ± 0.0 pt | +5.0 ± 0.0 pt | — | — | -5.0 ± 0.0 pt | -5.0 ± 0.0 pt | 10 s |"), "{md}");
        Ok(())
    }
}
