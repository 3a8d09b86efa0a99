//! The loop every training pipeline shares (`train`, `pretrain-generator` and the end-to-end
//! GenSeg run): progress bar, Ctrl-C, the divergence check, and the cadence of validation,
//! metrics lines, `last/` checkpoints and plots. A pipeline implements [`LoopTask`] and
//! only says what one iteration, one validation and one checkpoint are.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::run_dir::{MetricsLog, Which};

/// How often the loop validates, logs and checkpoints.
#[derive(Debug, Clone, Copy)]
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

/// What [`run_loop`] needs from a pipeline.
pub trait LoopTask {
    /// Iterations completed so far (the loop resumes from here).
    fn iteration(&self) -> u64;
    /// Runs one iteration and advances [`LoopTask::iteration`] by one. Returns the numbers of
    /// the metrics line (keys starting with `loss` must be finite, or the run stops).
    fn step(&mut self) -> Result<serde_json::Map<String, Value>>;
    /// Validates after iteration `it`, adds the scores to `record` (and keeps `best/` when
    /// better); returns the progress bar's message.
    fn validate(&mut self, it: u64, record: &mut Value) -> Result<String>;
    /// Writes the `which` checkpoint of the current state.
    fn checkpoint(&self, which: Which) -> Result<()>;
    /// Redraws the run's plots from metrics.jsonl.
    fn plot(&self) -> Result<()>;
    /// The run's metrics log.
    fn metrics(&mut self) -> &mut MetricsLog;
}

/// How the loop ended.
#[derive(Debug, Clone, Copy)]
pub struct LoopEnd {
    /// `true` when stopped by Ctrl-C before the last iteration.
    pub interrupted: bool,
    /// Wall time of the loop.
    pub seconds: f64,
}

/// Runs `task` up to `cadence.total` iterations. `last/` always holds the final state,
/// also after Ctrl-C (`stop`), so `--resume` continues exactly.
pub fn run_loop(
    task: &mut dyn LoopTask,
    cadence: Cadence,
    stop: &AtomicBool,
    started: Instant,
) -> Result<LoopEnd> {
    let total = cadence.total;
    let bar = ProgressBar::new(total).with_position(task.iteration());
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} it  {per_sec}  ETA {eta}  {msg}")
            .expect("static template"),
    );
    let mut interrupted = false;
    let mut saved_at = None;
    while task.iteration() < total {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let t0 = Instant::now();
        let numbers = task.step()?;
        let it = task.iteration();
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
        record["seconds"] = json!(started.elapsed().as_secs_f64());
        record["step_seconds"] = json!(t0.elapsed().as_secs_f64());
        let validate = it % cadence.val_every == 0 || it == total;
        if validate {
            let message = task.validate(it, &mut record)?;
            bar.set_message(message);
        }
        if validate || it % cadence.log_every == 0 {
            task.metrics().append(&record)?;
        }
        if it % cadence.checkpoint_every == 0 || it == total {
            task.checkpoint(Which::Last)?;
            saved_at = Some(it);
        }
        if validate {
            task.plot()?;
        }
        bar.set_position(it);
    }
    bar.finish_and_clear();
    if saved_at != Some(task.iteration()) {
        task.checkpoint(Which::Last)?;
    }
    Ok(LoopEnd {
        interrupted,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The value of `key` in a checkpoint's `extra`, as f64.
pub fn extra_f64(extra: &Value, key: &str) -> Option<f64> {
    extra.get(key).and_then(Value::as_f64)
}

/// The value of `key` in a checkpoint's `extra`, as u64.
pub fn extra_u64(extra: &Value, key: &str) -> Option<u64> {
    extra.get(key).and_then(Value::as_u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Counter {
        it: u64,
        loss: f64,
        log: MetricsLog,
        events: RefCell<Vec<String>>,
    }

    impl LoopTask for Counter {
        fn iteration(&self) -> u64 {
            self.it
        }
        fn step(&mut self) -> Result<serde_json::Map<String, Value>> {
            self.it += 1;
            let mut m = serde_json::Map::new();
            m.insert(
                "loss".into(),
                json!(if self.it == 4 { self.loss } else { 1.0 }),
            );
            Ok(m)
        }
        fn validate(&mut self, it: u64, record: &mut Value) -> Result<String> {
            record["val"] = json!(it);
            self.events.borrow_mut().push(format!("val{it}"));
            Ok(String::new())
        }
        fn checkpoint(&self, which: Which) -> Result<()> {
            self.events
                .borrow_mut()
                .push(format!("{}{}", which.name(), self.it));
            Ok(())
        }
        fn plot(&self) -> Result<()> {
            Ok(())
        }
        fn metrics(&mut self) -> &mut MetricsLog {
            &mut self.log
        }
    }

    fn counter(dir: &std::path::Path, loss: f64) -> Result<Counter> {
        Ok(Counter {
            it: 0,
            loss,
            log: MetricsLog::open(&dir.join("metrics.jsonl"), None)?,
            events: RefCell::new(Vec::new()),
        })
    }

    #[test]
    fn cadence_is_kept_and_the_last_state_is_saved() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut task = counter(dir.path(), 1.0)?;
        let cadence = Cadence {
            total: 5,
            val_every: 2,
            log_every: 1,
            checkpoint_every: 3,
        };
        let end = run_loop(&mut task, cadence, &AtomicBool::new(false), Instant::now())?;
        assert!(!end.interrupted);
        assert_eq!(task.events.borrow().join(" "), "val2 last3 val4 val5 last5");
        let lines = crate::run_dir::read_lines(&dir.path().join("metrics.jsonl"))?;
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[3]["val"], json!(4));
        Ok(())
    }

    #[test]
    fn divergence_names_the_loss_and_stop_saves_last() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut task = counter(dir.path(), f64::NAN)?;
        let cadence = Cadence {
            total: 9,
            val_every: 100,
            log_every: 100,
            checkpoint_every: 100,
        };
        let err = run_loop(&mut task, cadence, &AtomicBool::new(false), Instant::now())
            .unwrap_err()
            .to_string();
        assert!(err.contains("iteration 4") && err.contains("loss"), "{err}");
        let dir = tempfile::tempdir()?;
        let mut task = counter(dir.path(), 1.0)?;
        let end = run_loop(&mut task, cadence, &AtomicBool::new(true), Instant::now())?;
        assert!(end.interrupted);
        assert_eq!(task.events.borrow().join(" "), "last0");
        Ok(())
    }
}
