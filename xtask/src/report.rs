//! The figures and the one-page report of an experiment (`cargo xtask aggregate`).
//!
//! `plots/` gets, per dataset and test set, a bar chart of Dice (mean ± std over seeds, one
//! bar per method in each regime x backbone group) and, when the experiment has several
//! labelled-set sizes, the data-efficiency curve (Dice against labelled images).
//! `results.html` is one static file with everything inlined (no server, no network): the
//! tables, those plots, each method's test cases as image | truth | prediction (the
//! `cases.png` every evaluation writes) and the pairs each generator made (its last
//! `samples/` grid: mask | real image | generated image, on validation masks). A small
//! script reports any figure that fails to load on the browser console.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine as _;
use genseg::plot::{ErrorSeries, bar_chart, log_x_curves};
use genseg_pipelines::manifest::RunSpec;

use crate::aggregate::{Section, Tables, columns};

/// The plots of each section of [`Tables`]: `(description, path relative to the
/// experiment folder)`.
pub(crate) struct Plots {
    per_section: Vec<Vec<(String, String)>>,
}

impl Plots {
    /// The plots of section `k`.
    pub(crate) fn of(&self, k: usize) -> impl Iterator<Item = (&str, &str)> {
        self.per_section
            .get(k)
            .into_iter()
            .flatten()
            .map(|(alt, file)| (alt.as_str(), file.as_str()))
    }
}

/// A file-name-safe version of `name`.
fn slug(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Distinct values in first-seen order.
fn distinct<T: PartialEq + Clone>(values: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    for v in values {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

/// Draws the plots of every section into `exp/plots/`.
pub(crate) fn plots(exp: &Path, tables: &Tables) -> Result<Plots> {
    let dir = exp.join("plots");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut per_section = Vec::new();
    for section in &tables.sections {
        let stem = format!("{}-{}", slug(&section.dataset), slug(&section.test_set));
        let title = format!("{}, test set {}", section.dataset, section.test_set);
        let methods: Vec<&String> = tables
            .methods
            .iter()
            .filter(|m| section.rows.iter().any(|r| &r.method == *m))
            .collect();
        let backbones = distinct(section.rows.iter().map(|r| r.backbone.as_str()));
        let mut mine = Vec::new();

        let groups = distinct(
            section
                .rows
                .iter()
                .map(|r| (r.regime.as_str(), r.backbone.as_str())),
        );
        let labels: Vec<String> = groups
            .iter()
            .map(|(regime, backbone)| {
                if backbones.len() > 1 {
                    format!("{regime} {backbone}")
                } else {
                    regime.to_string()
                }
            })
            .collect();
        let series: Vec<ErrorSeries> = methods
            .iter()
            .map(|m| ErrorSeries {
                label: m,
                values: groups
                    .iter()
                    .map(|&(regime, backbone)| find(section, regime, backbone, m).map(|r| r.dice))
                    .collect(),
            })
            .collect();
        let file = format!("plots/{stem}-dice.png");
        bar_chart(&exp.join(&file), &title, "Dice", &labels, &series)?;
        mine.push((format!("Dice per method, {title}"), file));

        let sizes = {
            let mut n = distinct(section.rows.iter().map(|r| r.n_train));
            n.sort_unstable();
            n
        };
        if sizes.len() > 1 {
            let xs: Vec<f64> = sizes.iter().map(|&n| n as f64).collect();
            let mut names = Vec::new();
            let mut values = Vec::new();
            for backbone in &backbones {
                for m in &methods {
                    names.push(if backbones.len() > 1 {
                        format!("{m} ({backbone})")
                    } else {
                        m.to_string()
                    });
                    values.push(
                        sizes
                            .iter()
                            .map(|&n| {
                                section
                                    .rows
                                    .iter()
                                    .find(|r| {
                                        r.n_train == n && r.backbone == *backbone && r.method == **m
                                    })
                                    .map(|r| r.dice)
                            })
                            .collect::<Vec<_>>(),
                    );
                }
            }
            let series: Vec<ErrorSeries> = names
                .iter()
                .zip(values)
                .map(|(label, values)| ErrorSeries { label, values })
                .collect();
            let file = format!("plots/{stem}-efficiency.png");
            log_x_curves(
                &exp.join(&file),
                &format!("data efficiency, {title}"),
                "labelled training images",
                "Dice",
                &xs,
                &series,
            )?;
            mine.push((format!("Dice against labelled images, {title}"), file));
        }
        per_section.push(mine);
    }
    Ok(Plots { per_section })
}

fn find<'a>(
    section: &'a Section,
    regime: &str,
    backbone: &str,
    method: &str,
) -> Option<&'a crate::aggregate::Row> {
    section
        .rows
        .iter()
        .find(|r| r.regime == regime && r.backbone == backbone && r.method == method)
}

/// `text` with the HTML special characters escaped.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An `<img>` with `path`'s PNG inlined, or a note saying which file is missing.
fn figure(path: &Path, caption: &str) -> Result<String> {
    if !path.is_file() {
        return Ok(format!(
            "<p class=\"missing\">{}: {} is not there (run unfinished?)</p>\n",
            escape(caption),
            escape(&path.display().to_string())
        ));
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!(
        "<figure><img src=\"data:image/png;base64,{}\" alt=\"{}\"><figcaption>{}</figcaption></figure>\n",
        base64::engine::general_purpose::STANDARD.encode(bytes),
        escape(caption),
        escape(caption)
    ))
}

/// The newest `samples/iter_*.png` of a run folder.
fn last_sample_grid(dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir.join("samples")).ok()?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .max()
}

/// The folder of the generator a run pre-trains, if it has one.
pub(crate) fn generator_dir(run: &RunSpec) -> Option<&Path> {
    run.steps
        .iter()
        .find(|s| s.args.first().is_some_and(|a| a == "pretrain-generator"))
        .and_then(|s| s.resume.as_deref())
}

const STYLE: &str = "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}\
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:4px 8px;text-align:left}\
th{background:#eee}td.num{text-align:right;font-variant-numeric:tabular-nums}\
.figures{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}\
figure img{image-rendering:pixelated;max-width:100%}figcaption{font-size:0.85em;color:#555}\
img.small{width:260px}.missing{color:#a00}";

/// Reports each figure that did not load on the console and counts them on `<body>`
/// (`data-figures`, `data-broken-figures`), for people and for the headless check.
const CHECK: &str = "window.addEventListener('load',()=>{const all=[...document.images];\
const broken=all.filter(i=>!(i.complete&&i.naturalWidth>0));\
broken.forEach(i=>console.error('figure failed to load: '+i.alt));\
document.body.dataset.figures=all.length;document.body.dataset.brokenFigures=broken.length;});";

/// Writes `exp/results.html`.
pub(crate) fn html(exp: &Path, runs: &[RunSpec], tables: &Tables, plots: &Plots) -> Result<()> {
    let name = exp
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "experiment".into());
    let mut page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>GenSeg experiment {0}</title><style>{STYLE}</style></head><body>\n\
         <h1>GenSeg experiment {0}</h1>\n<p>{1}</p>\n",
        escape(&name),
        escape(&tables.legend())
    );
    for (k, section) in tables.sections.iter().enumerate() {
        write!(
            page,
            "<h2>{}, test set <code>{}</code></h2>\n<table><tr>",
            escape(&section.dataset),
            escape(&section.test_set),
        )?;
        for column in columns(&tables.reference) {
            write!(page, "<th>{}</th>", escape(&column))?;
        }
        page += "</tr>\n";
        for row in &section.rows {
            page += "<tr>";
            // Text columns left, numbers right.
            for (i, cell) in row.cells().iter().enumerate() {
                let class = if i >= 4 { " class=\"num\"" } else { "" };
                write!(page, "<td{class}>{}</td>", escape(cell))?;
            }
            page += "</tr>\n";
        }
        page += "</table>\n<div class=\"figures\">\n";
        for (alt, file) in plots.of(k) {
            page += &figure(&exp.join(file), alt)?;
        }
        page += "</div>\n";

        // Test cases of the first seed's runs: the same cases for every method.
        let mine: Vec<&RunSpec> = runs
            .iter()
            .filter(|r| r.dataset == section.dataset && r.scores.contains_key(&section.test_set))
            .collect();
        if let Some(seed) = mine.iter().map(|r| r.seed).min() {
            write!(
                page,
                "<h3>Test cases, seed {seed}: image | truth (green) | prediction (red)</h3>\n\
                 <div class=\"figures\">\n"
            )?;
            for run in mine.iter().filter(|r| r.seed == seed) {
                let cases = run.scores[&section.test_set].with_file_name("cases.png");
                page += &figure(&cases, &run.id)?.replace("<img ", "<img class=\"small\" ");
            }
            page += "</div>\n";
        }
    }

    let with_generator: Vec<(&RunSpec, &Path)> = runs
        .iter()
        .filter_map(|r| generator_dir(r).map(|g| (r, g)))
        .collect();
    if let Some(seed) = with_generator.iter().map(|(r, _)| r.seed).min() {
        write!(
            page,
            "<h2>Generated pairs, seed {seed}</h2>\n<p>Each generator's last validation grid: \
             mask | real image | generated image. GenSeg runs show their own generator \
             (trained end to end), the others the pre-trained one they used.</p>\n\
             <div class=\"figures\">\n"
        )?;
        for (run, generator) in with_generator.iter().filter(|(r, _)| r.seed == seed) {
            let grid = last_sample_grid(&run.dir).or_else(|| last_sample_grid(generator));
            page += &match grid {
                Some(path) => figure(&path, &run.id)?,
                None => format!(
                    "<p class=\"missing\">{}: no samples/ grid in {} or {}</p>\n",
                    escape(&run.id),
                    escape(&run.dir.display().to_string()),
                    escape(&generator.display().to_string())
                ),
            };
        }
        page += "</div>\n";
    }
    write!(page, "<script>{CHECK}</script>\n</body></html>\n")?;
    let path = exp.join("results.html");
    let tmp = exp.join("results.html.tmp");
    std::fs::write(&tmp, page).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}
