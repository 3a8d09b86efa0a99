//! The terminal side of a run: an indicatif progress bar and the run folder's plots.

use std::path::Path;

use anyhow::Result;
use genseg_pipelines::learner::{Figure, Observer};
use indicatif::{ProgressBar, ProgressStyle};

/// Shows a progress bar per training loop and redraws the run's figures at each validation.
#[derive(Default)]
pub struct Terminal {
    bar: Option<ProgressBar>,
}

impl Observer for Terminal {
    fn started(&mut self, total: u64, position: u64) {
        let bar = ProgressBar::new(total).with_position(position);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} it  {per_sec}  ETA {eta}  {msg}")
                .expect("static template"),
        );
        self.bar = Some(bar);
    }

    fn advanced(&mut self, position: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(position);
        }
    }

    fn validated(&mut self, summary: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(summary.to_string());
        }
    }

    fn figures(&mut self, run: &Path, figures: &[Figure]) -> Result<()> {
        for figure in figures {
            crate::plot::draw_figure(run, figure)?;
        }
        Ok(())
    }

    fn finished(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
