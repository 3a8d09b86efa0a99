//! The `genseg` command line's own pieces: a progress bar and the run folders' plots, shown
//! through the pipelines' [`Observer`](genseg_pipelines::learner::Observer), and the
//! parser of config enum names. Everything the commands run lives in
//! [`genseg_pipelines`] and the library crates below it.

pub mod plot;
pub mod progress;

/// The names each enum flag accepts: its config-file spelling.
pub mod names {
    /// `--method` ([`genseg_pipelines::config::Method`]).
    pub const METHOD: &[&str] = &[
        "baseline",
        "flip",
        "rotate",
        "translate",
        "combine",
        "separate",
        "genseg",
    ];
    /// `--profile` ([`genseg_pipelines::config::Profile`]).
    pub const PROFILE: &[&str] = &["paper", "cpu", "study"];
    /// `--recipe` ([`genseg_pipelines::config::Recipe`]).
    pub const RECIPE: &[&str] = &["plain", "strong"];
    /// `--checkpoint` ([`genseg_pipelines::run_dir::Which`]).
    pub const CHECKPOINT: &[&str] = &["best", "last"];
    /// `--split` of evaluate ([`genseg_pipelines::evaluate::SplitChoice`]).
    pub const SPLIT: &[&str] = &["test", "val", "all"];
    /// `--layout` of generate ([`genseg_pipelines::generate::OutputLayout`]).
    pub const LAYOUT: &[&str] = &["folder", "nnunet"];
    /// `--postprocess` ([`genseg_pipelines::config::PostChoice`]).
    pub const POSTPROCESS: &[&str] = &["auto", "min_max", "xray", "rgb"];
    /// `--generator-norm` ([`genseg_pipelines::config::NormStatistics`]).
    pub const GENERATOR_NORM: &[&str] = &["batch", "running"];
    /// `--model` of bench-step ([`genseg_pipelines::bench_step::BenchModel`]).
    pub const BENCH_MODEL: &[&str] = &["unet", "pix2pix", "deeplabv3_r50", "swin_unet"];
}

/// A clap value parser for a config enum: accepts exactly `names` (shown in `--help`) and
/// converts them by their config-file spelling.
pub fn choice<T>(names: &'static [&'static str]) -> impl clap::builder::TypedValueParser<Value = T>
where
    T: serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(names).map(|s: String| {
        genseg_pipelines::config::parse_name::<T>(&s, "value")
            .expect("every listed name is a variant (tested)")
    })
}

/// An error and its causes on one line, "what failed: why", each cause once: many errors
/// already end with their cause's text (`"x.png: cannot decode image: Invalid PNG
/// signature."` over the decoder's own error), and printing the chain again would repeat it.
pub fn error_message(err: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if message.is_empty() {
            message = text;
        } else if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::names;

    #[test]
    fn error_messages_name_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = anyhow::Error::new(genseg_data::DataError::io("data/x.png", io))
            .context("loading the dataset");
        assert_eq!(
            super::error_message(&err),
            "loading the dataset: data/x.png: no such file"
        );
        let err = anyhow::anyhow!("dataset folder not found").context("dataset folder not found");
        assert_eq!(super::error_message(&err), "dataset folder not found");
        let err = anyhow::anyhow!("disk full").context("writing last/");
        assert_eq!(super::error_message(&err), "writing last/: disk full");
    }
    use genseg_pipelines::config::parse_name;

    fn all<T: serde::de::DeserializeOwned>(list: &[&str]) {
        for name in list {
            assert!(parse_name::<T>(name, "flag").is_ok(), "{name}");
        }
        assert!(parse_name::<T>("no-such-name", "flag").is_err());
    }

    /// Every name a flag lists converts to its config enum, so the lists and the config
    /// spelling cannot drift apart.
    #[test]
    fn every_listed_name_parses() {
        use genseg_pipelines::{bench_step, config, evaluate, generate, run_dir};
        all::<config::Method>(names::METHOD);
        assert_eq!(
            names::METHOD.len() + 1,
            config::Method::ALL.len(),
            "all but pix2pix"
        );
        all::<config::Profile>(names::PROFILE);
        all::<config::Recipe>(names::RECIPE);
        all::<run_dir::Which>(names::CHECKPOINT);
        all::<evaluate::SplitChoice>(names::SPLIT);
        all::<generate::OutputLayout>(names::LAYOUT);
        all::<config::PostChoice>(names::POSTPROCESS);
        all::<config::NormStatistics>(names::GENERATOR_NORM);
        all::<bench_step::BenchModel>(names::BENCH_MODEL);
    }
}
