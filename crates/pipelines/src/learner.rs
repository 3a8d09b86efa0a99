//! The one training loop every method shares, in the manner of Burn's learner: a method
//! implements [`Pipeline`] (one iteration, one validation, its state) and the [`Learner`]
//! does the rest — resuming from `last/`, the cadence of validation, metrics lines and
//! checkpoints, keeping `best/`, the divergence check, Ctrl-C, and telling an [`Observer`]
//! (the binary's progress bar and plots) what happened.
//!
//! Checkpoints carry a typed [`CheckpointMeta`] (method, best score and its iteration, and
//! what a method adds), so no method assembles a checkpoint or parses its JSON by hand.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;
use genseg_nn::checkpoint::Checkpoint;
use genseg_nn::optim::OptimizerState;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::run_dir::{MetricsLog, RunDir, Which, read_lines};

/// How often the learner validates, logs and checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    /// Iterations of the whole run.
    pub total: u64,
    /// Validate every this many iterations (and at the last).
    pub val_every: u64,
    /// Write a metrics line every this many iterations (and whenever validating).
    pub log_every: u64,
    /// Refresh `last/` every this many iterations (and at the last).
    pub checkpoint_every: u64,
}

/// Whether a higher or a lower validation score is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// Higher is better (Dice). A NaN first score (no foreground anywhere) still counts, so
    /// a run always has a `best/`.
    Maximise,
    /// Lower is better (a generator's L1).
    Minimise,
}

/// The best validation score so far and the iteration of `best/`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Best {
    /// The score (`-inf` / `+inf` before the first validation).
    pub score: f64,
    /// Its iteration.
    pub iteration: u64,
    /// Which way is better.
    pub goal: Goal,
}

impl Best {
    /// No validation yet.
    pub fn none(goal: Goal) -> Self {
        let score = match goal {
            Goal::Maximise => f64::NEG_INFINITY,
            Goal::Minimise => f64::INFINITY,
        };
        Self {
            score,
            iteration: 0,
            goal,
        }
    }

    /// Keeps `(score, iteration)` when strictly better, like the reference (ties keep the
    /// earlier model); returns whether it was kept.
    pub fn offer(&mut self, score: f64, iteration: u64) -> bool {
        let better = match self.goal {
            // After a NaN best (no foreground anywhere yet) any real score is better.
            Goal::Maximise => {
                score > self.score
                    || (self.score == f64::NEG_INFINITY && score.is_nan())
                    || (self.score.is_nan() && !score.is_nan())
            }
            Goal::Minimise => score < self.score,
        };
        if better {
            self.score = score;
            self.iteration = iteration;
        }
        better
    }
}

/// What a checkpoint's `state.json` says besides the step (its `extra` field).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// The method that wrote it (`baseline`, `separate`, `genseg`, `pix2pix`, ...).
    pub method: String,
    /// The iteration of `best/`.
    #[serde(default)]
    pub best_iteration: u64,
    /// Best validation Dice (segmentation methods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_val_dice: Option<f64>,
    /// Lowest validation L1 (generator pre-training).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_val_l1: Option<f64>,
    /// Validation L1 of the untrained generator (generator pre-training).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_val_l1: Option<f64>,
    /// `softmax(α)` per searchable cell at the checkpoint (GenSeg).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha_softmax: Option<Vec<Vec<f64>>>,
}

impl CheckpointMeta {
    /// Reads the meta of `ckpt` (a checkpoint of any earlier version: missing fields are
    /// absent, non-finite scores were written as null).
    pub fn of(ckpt: &Checkpoint) -> Result<Self> {
        serde_json::from_value(ckpt.extra.clone()).context("reading the checkpoint's state.json")
    }

    /// The best score recorded for `goal`'s kind of score.
    fn best(&self, goal: Goal) -> Best {
        let mut best = Best::none(goal);
        let score = match goal {
            Goal::Maximise => self.best_val_dice,
            Goal::Minimise => self.best_val_l1,
        };
        if let Some(score) = score {
            best.score = score;
        }
        best.iteration = self.best_iteration;
        best
    }
}

/// A method's trainable state at a checkpoint.
pub struct State {
    /// Every network's tensors (weights and buffers), under their prefixes.
    pub weights: BTreeMap<String, Tensor>,
    /// Every optimizer's state by name.
    pub optimizers: BTreeMap<String, OptimizerState>,
}

/// One validation's outcome.
pub struct Validation {
    /// The score that chooses `best/` (see [`Pipeline::goal`]).
    pub score: f64,
    /// A short line for the progress display, e.g. `val Dice 0.9120`.
    pub summary: String,
}

/// Curve colours of a [`Figure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Color {
    /// Blue.
    Blue,
    /// Green.
    Green,
    /// Red.
    Red,
}

/// One curve: `(iteration, value)` points.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// Legend label.
    pub label: String,
    /// Points in iteration order.
    pub points: Vec<(f64, f64)>,
    /// Line colour.
    pub color: Color,
}

/// One panel of stacked curves.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Title.
    pub title: String,
    /// Label of the y axis.
    pub y_label: String,
    /// The curves.
    pub curves: Vec<Curve>,
}

/// A figure of a run folder (`progress.png`, `alpha.png`): what to draw, not how.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// File name inside the run folder.
    pub file: String,
    /// Panels, top to bottom.
    pub panels: Vec<Panel>,
}

/// `(iteration, value)` of every record of `lines` that has a number under `key`.
pub fn series(lines: &[Value], key: &str) -> Vec<(f64, f64)> {
    lines
        .iter()
        .filter_map(|v| Some((v.get("iteration")?.as_f64()?, v.get(key)?.as_f64()?)))
        .collect()
}

/// A curve of metrics key `key`.
pub fn curve(lines: &[Value], key: &str, label: &str, color: Color) -> Curve {
    Curve {
        label: label.to_string(),
        points: series(lines, key),
        color,
    }
}

/// A panel.
pub fn panel(title: &str, y_label: &str, curves: Vec<Curve>) -> Panel {
    Panel {
        title: title.to_string(),
        y_label: y_label.to_string(),
        curves,
    }
}

/// What the learner reports while it runs. Libraries do not print or draw: the binary
/// implements this with a progress bar and PNG plots; [`Silent`] ignores everything.
pub trait Observer {
    /// A loop of `total` steps starts (or resumes) at `position`.
    fn started(&mut self, _total: u64, _position: u64) {}
    /// `position` steps are done.
    fn advanced(&mut self, _position: u64) {}
    /// A validation ended; `summary` includes the best so far.
    fn validated(&mut self, _summary: &str) {}
    /// The run's figures, to draw into `run`.
    fn figures(&mut self, _run: &Path, _figures: &[Figure]) -> Result<()> {
        Ok(())
    }
    /// The loop ended.
    fn finished(&mut self) {}
}

/// An [`Observer`] that shows nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Observer for Silent {}

/// A training method, run by a [`Learner`].
pub trait Pipeline {
    /// The method's name (recorded in checkpoints).
    fn method(&self) -> &'static str;
    /// Iterations completed so far (the learner resumes from here).
    fn iteration(&self) -> u64;
    /// Runs one iteration and advances [`Pipeline::iteration`] by one. Returns the numbers of
    /// the metrics line (keys starting with `loss` must be finite, or the run stops).
    fn step(&mut self) -> Result<Map<String, Value>>;
    /// Validates after iteration `it`, adding its scores to `record`.
    fn validate(&mut self, it: u64, record: &mut Value) -> Result<Validation>;
    /// Weights and optimizer states to checkpoint.
    fn state(&self) -> Result<State>;
    /// What the method adds to a checkpoint's meta.
    fn annotate(&self, _meta: &mut CheckpointMeta) -> Result<()> {
        Ok(())
    }
    /// The run's figures from its metrics lines.
    fn figures(&self, _lines: &[Value]) -> Vec<Figure> {
        Vec::new()
    }
}

/// How the loop ended.
#[derive(Debug, Clone, Copy)]
pub struct LoopEnd {
    /// `true` when stopped by Ctrl-C before the last iteration.
    pub interrupted: bool,
    /// Wall time of this invocation.
    pub seconds: f64,
    /// The best validation score and its iteration.
    pub best: Best,
}

/// Runs a [`Pipeline`] in a run folder.
pub struct Learner<'a> {
    run: RunDir,
    cadence: Cadence,
    config_toml: String,
    best: Best,
    metrics: MetricsLog,
    observer: &'a mut dyn Observer,
    stop: &'a AtomicBool,
    started: Instant,
}

impl<'a> Learner<'a> {
    /// A learner for `run`, continuing from `ckpt` (the pipeline was built from it) or from
    /// the start. `config_toml` is written into every checkpoint.
    pub fn new(
        run: RunDir,
        cadence: Cadence,
        config_toml: String,
        goal: Goal,
        ckpt: Option<&Checkpoint>,
        observer: &'a mut dyn Observer,
        stop: &'a AtomicBool,
    ) -> Result<Self> {
        let (iteration, best) = match ckpt {
            Some(c) => (c.step, CheckpointMeta::of(c)?.best(goal)),
            None => (0, Best::none(goal)),
        };
        if ckpt.is_none() && run.metrics_path().exists() {
            // Restarting from iteration 0: every old line is redone.
            std::fs::remove_file(run.metrics_path())
                .with_context(|| format!("removing {}", run.metrics_path().display()))?;
        }
        let metrics = MetricsLog::open(&run.metrics_path(), Some(iteration))?;
        Ok(Self {
            run,
            cadence,
            config_toml,
            best,
            metrics,
            observer,
            stop,
            started: Instant::now(),
        })
    }

    /// The best validation so far.
    pub fn best(&self) -> Best {
        self.best
    }

    /// Appends a record to metrics.jsonl outside the loop (e.g. the state at iteration 0).
    pub fn log(&mut self, record: &Value) -> Result<()> {
        self.metrics.append(record)
    }

    /// Validates outside the loop (e.g. the untrained model at iteration 0), keeping `best/`.
    pub fn validate(
        &mut self,
        pipeline: &mut dyn Pipeline,
        it: u64,
        record: &mut Value,
    ) -> Result<Validation> {
        let v = pipeline.validate(it, record)?;
        if self.best.offer(v.score, it) {
            self.checkpoint(pipeline, Which::Best)?;
        }
        Ok(v)
    }

    /// Writes the `which` checkpoint of `pipeline`'s current state.
    pub fn checkpoint(&self, pipeline: &dyn Pipeline, which: Which) -> Result<()> {
        let State {
            weights,
            optimizers,
        } = pipeline.state()?;
        let mut meta = CheckpointMeta {
            method: pipeline.method().to_string(),
            best_iteration: self.best.iteration,
            ..CheckpointMeta::default()
        };
        match self.best.goal {
            Goal::Maximise => meta.best_val_dice = Some(self.best.score),
            Goal::Minimise => meta.best_val_l1 = Some(self.best.score),
        }
        pipeline.annotate(&mut meta)?;
        let ckpt = Checkpoint {
            step: pipeline.iteration(),
            weights,
            optimizers,
            rng: BTreeMap::new(),
            config_toml: self.config_toml.clone(),
            extra: serde_json::to_value(&meta)?,
        };
        self.run.save_checkpoint(which, &ckpt)
    }

    fn draw(&mut self, pipeline: &dyn Pipeline) -> Result<()> {
        let lines = read_lines(&self.run.metrics_path())?;
        let figures = pipeline.figures(&lines);
        self.observer.figures(self.run.root(), &figures)
    }

    /// Runs `pipeline` up to `cadence.total` iterations. `last/` always holds the final
    /// state, also after Ctrl-C, so a resume continues exactly.
    pub fn fit(&mut self, pipeline: &mut dyn Pipeline) -> Result<LoopEnd> {
        let total = self.cadence.total;
        self.observer.started(total, pipeline.iteration());
        let mut interrupted = false;
        let mut saved_at = None;
        while pipeline.iteration() < total {
            if self.stop.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
            let t0 = Instant::now();
            let numbers = pipeline.step()?;
            let it = pipeline.iteration();
            if let Some((key, value)) = numbers
                .iter()
                .find(|(k, v)| k.starts_with("loss") && !v.as_f64().is_some_and(f64::is_finite))
            {
                anyhow::bail!("training diverged at iteration {it}: {key} is {value}");
            }
            let mut record = json!({ "iteration": it });
            record
                .as_object_mut()
                .expect("a json object")
                .extend(numbers);
            record["seconds"] = json!(self.started.elapsed().as_secs_f64());
            record["step_seconds"] = json!(t0.elapsed().as_secs_f64());
            let validate = it % self.cadence.val_every == 0 || it == total;
            if validate {
                let v = self.validate(pipeline, it, &mut record)?;
                tracing::debug!(iteration = it, score = v.score, "validated");
                self.observer.validated(&format!(
                    "{}  best {:.4} @{}",
                    v.summary, self.best.score, self.best.iteration
                ));
            }
            if validate || it % self.cadence.log_every == 0 {
                self.metrics.append(&record)?;
            }
            if it % self.cadence.checkpoint_every == 0 || it == total {
                self.checkpoint(pipeline, Which::Last)?;
                saved_at = Some(it);
            }
            if validate {
                self.draw(pipeline)?;
            }
            self.observer.advanced(it);
        }
        self.observer.finished();
        if saved_at != Some(pipeline.iteration()) {
            self.checkpoint(pipeline, Which::Last)?;
        }
        Ok(LoopEnd {
            interrupted,
            seconds: self.started.elapsed().as_secs_f64(),
            best: self.best,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    struct Counter {
        it: u64,
        loss: f64,
        scores: Vec<f64>,
        events: Rc<RefCell<Vec<String>>>,
    }

    impl Pipeline for Counter {
        fn method(&self) -> &'static str {
            "counter"
        }
        fn iteration(&self) -> u64 {
            self.it
        }
        fn step(&mut self) -> Result<Map<String, Value>> {
            self.it += 1;
            let mut m = Map::new();
            m.insert(
                "loss".into(),
                json!(if self.it == 4 { self.loss } else { 1.0 }),
            );
            Ok(m)
        }
        fn validate(&mut self, it: u64, record: &mut Value) -> Result<Validation> {
            record["val"] = json!(it);
            self.events.borrow_mut().push(format!("val{it}"));
            Ok(Validation {
                score: self.scores[(it as usize / 2) % self.scores.len()],
                summary: String::new(),
            })
        }
        fn state(&self) -> Result<State> {
            self.events.borrow_mut().push(format!("state{}", self.it));
            Ok(State {
                weights: BTreeMap::new(),
                optimizers: BTreeMap::new(),
            })
        }
    }

    fn counter(loss: f64, events: &Rc<RefCell<Vec<String>>>) -> Counter {
        Counter {
            it: 0,
            loss,
            scores: vec![0.5, 0.7, 0.6],
            events: events.clone(),
        }
    }

    /// A learner over `run` that maximises, writing empty configs.
    fn maximiser<'a>(
        run: RunDir,
        cadence: Cadence,
        ckpt: Option<&Checkpoint>,
        observer: &'a mut Silent,
        stop: &'a AtomicBool,
    ) -> Result<Learner<'a>> {
        Learner::new(
            run,
            cadence,
            String::new(),
            Goal::Maximise,
            ckpt,
            observer,
            stop,
        )
    }

    #[test]
    fn cadence_best_and_the_last_state_are_kept() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let events = Rc::new(RefCell::new(Vec::new()));
        let mut task = counter(1.0, &events);
        let cadence = Cadence {
            total: 5,
            val_every: 2,
            log_every: 1,
            checkpoint_every: 3,
        };
        let run = RunDir::create(dir.path())?;
        let stop = AtomicBool::new(false);
        let mut observer = Silent;
        let mut learner = maximiser(run.clone(), cadence, None, &mut observer, &stop)?;
        let end = learner.fit(&mut task)?;
        assert!(!end.interrupted);
        // Scores 0.7 @2, 0.6 @4, 0.7 @5 (no tie wins): best/ written once, at 2.
        assert_eq!(
            events.borrow().join(" "),
            "val2 state2 state3 val4 val5 state5"
        );
        assert_eq!((end.best.score, end.best.iteration), (0.7, 2));
        let lines = read_lines(&run.metrics_path())?;
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[3]["val"], json!(4));
        let last = Checkpoint::load(&run.checkpoint(Which::Last))?;
        let meta = CheckpointMeta::of(&last)?;
        assert_eq!(
            (
                meta.method.as_str(),
                meta.best_val_dice,
                meta.best_iteration
            ),
            ("counter", Some(0.7), 2)
        );
        // A learner resumed from last/ knows the best so far.
        let resumed = maximiser(run, cadence, Some(&last), &mut observer, &stop)?;
        assert_eq!(resumed.best().iteration, 2);
        Ok(())
    }

    #[test]
    fn divergence_names_the_loss_and_stop_saves_last() -> Result<()> {
        let cadence = Cadence {
            total: 9,
            val_every: 100,
            log_every: 100,
            checkpoint_every: 100,
        };
        let events = Rc::new(RefCell::new(Vec::new()));
        let dir = tempfile::tempdir()?;
        let stop = AtomicBool::new(false);
        let mut observer = Silent;
        let err = maximiser(
            RunDir::create(dir.path())?,
            cadence,
            None,
            &mut observer,
            &stop,
        )?
        .fit(&mut counter(f64::NAN, &events))
        .unwrap_err()
        .to_string();
        assert!(err.contains("iteration 4") && err.contains("loss"), "{err}");
        let dir = tempfile::tempdir()?;
        let stop = AtomicBool::new(true);
        events.borrow_mut().clear();
        let end = maximiser(
            RunDir::create(dir.path())?,
            cadence,
            None,
            &mut observer,
            &stop,
        )?
        .fit(&mut counter(1.0, &events))?;
        assert!(end.interrupted);
        assert_eq!(events.borrow().join(" "), "state0");
        Ok(())
    }

    #[test]
    fn lower_is_better_for_minimised_scores_and_nan_gives_a_first_best() {
        let mut best = Best::none(Goal::Minimise);
        assert!(best.offer(0.3, 1) && !best.offer(0.3, 2) && best.offer(0.2, 3));
        assert_eq!(best.iteration, 3);
        let mut best = Best::none(Goal::Maximise);
        assert!(best.offer(f64::NAN, 1) && !best.offer(f64::NAN, 2));
        assert!(best.offer(0.1, 3) && !best.offer(0.1, 4));
    }
}
