//! The figures of a run folder (`progress.png`, `alpha.png`, drawn from the [`Figure`]s
//! the pipelines describe) and of an experiment report (bar charts with error bars, curves
//! over a logarithmic axis), with an embedded font (DejaVu Sans) so no system fonts are
//! needed.

use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result};
use genseg_pipelines::learner::{Color as CurveColor, Figure};
use plotters::prelude::*;
use plotters::style::FontStyle;

const FONT: &str = "sans-serif";

fn register_embedded_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| anyhow::anyhow!("the embedded DejaVu font could not be parsed"));
    });
    result
}

/// One curve: `(iteration, value)` points.
pub struct Series<'a> {
    /// Legend label.
    pub label: &'a str,
    /// Points in iteration order.
    pub points: &'a [(f64, f64)],
    /// Line colour.
    pub color: RGBColor,
}

/// Draws stacked panels, one per `(title, y label, curves)`, into a PNG. The figure is
/// drawn in memory and written through a temporary file and a rename, so a crash while
/// drawing never leaves a damaged plot.
pub fn plot_panels(path: &Path, panels: &[(&str, &str, Vec<Series>)]) -> Result<()> {
    let size = (900u32, 320 * panels.len().max(1) as u32);
    render(path, size, |root| {
        let areas = root.split_evenly((panels.len().max(1), 1));
        for ((title, y_label, curves), area) in panels.iter().zip(areas.iter()) {
            let all: Vec<(f64, f64)> = curves
                .iter()
                .flat_map(|c| c.points.iter().copied())
                .filter(|p| p.1.is_finite())
                .collect();
            let (x_max, y_min, y_max) = all.iter().fold(
                (1.0f64, f64::INFINITY, f64::NEG_INFINITY),
                |(x, lo, hi), &(px, py)| (x.max(px), lo.min(py), hi.max(py)),
            );
            let (y_min, y_max) = if all.is_empty() {
                (0.0, 1.0)
            } else if y_max - y_min < 1e-9 {
                (y_min - 0.5, y_max + 0.5)
            } else {
                (y_min, y_max)
            };
            let pad = 0.05 * (y_max - y_min);
            let mut chart = ChartBuilder::on(area)
                .caption(*title, (FONT, 20))
                .margin(10)
                .margin_right(30)
                .x_label_area_size(35)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..x_max, (y_min - pad)..(y_max + pad))?;
            chart
                .configure_mesh()
                .x_desc("iteration")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_desc(*y_label)
                .label_style((FONT, 14))
                .axis_desc_style((FONT, 15))
                .draw()?;
            for curve in curves {
                let color = curve.color;
                let points = curve.points.iter().copied().filter(|p| p.1.is_finite());
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                    .label(curve.label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .label_font((FONT, 14))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        Ok(())
    })
}

/// One method's bars (or curve points) with error bars: `None` where it has no value.
pub struct ErrorSeries<'a> {
    /// Legend label.
    pub label: &'a str,
    /// `(mean, std)` per group (bars) or per x (curves).
    pub values: Vec<Option<(f64, f64)>>,
}

/// The colour of series `i`: the same method gets the same colour in every figure of a
/// report.
fn series_color(i: usize) -> RGBColor {
    const COLORS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    COLORS[i % COLORS.len()]
}

/// The y range that shows every `mean ± std` with a margin, clamped to [0, 1] (Dice).
fn unit_y_range(series: &[ErrorSeries]) -> (f64, f64) {
    let (lo, hi) = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(m, sd)| {
            (lo.min(m - sd), hi.max(m + sd))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = (0.1 * (hi - lo)).max(0.01);
    ((lo - pad).max(0.0), (hi + pad).min(1.0))
}

/// Width of the legend strip right of a report chart.
const LEGEND_WIDTH: u32 = 170;

/// A legend in its own strip (`area`), so that it never hides a bar or a point: one
/// colour swatch and label per series.
fn draw_legend(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    labels: &[&str],
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    for (i, label) in labels.iter().enumerate() {
        let y = 50 + 24 * i as i32;
        area.draw(&Rectangle::new(
            [(4, y - 7), (20, y + 7)],
            series_color(i).filled(),
        ))?;
        area.draw(&Text::new(
            label.to_string(),
            (26, y - 8),
            (FONT, 14).into_font().color(&BLACK),
        ))?;
    }
    Ok(())
}

/// Renders `draw` on a `width` x `height` canvas and writes it to `path` as PNG (through
/// a temporary file and a rename, like [`plot_panels`]).
fn render(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(
        &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    ) -> std::result::Result<(), Box<dyn std::error::Error>>,
) -> Result<()> {
    register_embedded_font()?;
    let mut pixels = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .and_then(|()| draw(&root).map_err(|e| anyhow::anyhow!("{e}")))
            .and_then(|()| root.present().map_err(|e| anyhow::anyhow!("{e}")))
            .with_context(|| format!("drawing {}", path.display()))?;
    }
    let image = image::RgbImage::from_raw(width, height, pixels)
        .context("the plot buffer has the figure's size")?;
    genseg_data::writer::write_image(path, &image::DynamicImage::ImageRgb8(image))?;
    Ok(())
}

/// A grouped bar chart with error bars: one group per `groups` entry (e.g. regime and
/// backbone), one bar per series (method) in each, bar height the mean, whisker ± std.
pub fn bar_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[ErrorSeries],
) -> Result<()> {
    let n_groups = groups.len().max(1);
    let width = (160 + n_groups * (40 + 34 * series.len().max(1))).clamp(560, 1800) as u32;
    let (y_min, y_max) = unit_y_range(series);
    render(path, (width + LEGEND_WIDTH, 420), |root| {
        let (root, legend) = root.split_horizontally(width);
        let root = &root;
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 20))
            .margin(10)
            .margin_right(20)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..n_groups as f64, y_min..y_max)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(y_label)
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .draw()?;
        // Bars fill 80 % of a group's unit width.
        let bar = 0.8 / series.len().max(1) as f64;
        for (k, s) in series.iter().enumerate() {
            let color = series_color(k);
            let bars: Vec<(f64, f64, f64)> = s
                .values
                .iter()
                .enumerate()
                .filter_map(|(g, v)| v.map(|(m, sd)| (g as f64 + 0.1 + bar * k as f64, m, sd)))
                .collect();
            chart.draw_series(bars.iter().map(|&(x, m, _)| {
                Rectangle::new([(x, y_min), (x + bar * 0.9, m)], color.filled())
            }))?;
            chart.draw_series(bars.iter().map(|&(x, m, sd)| {
                ErrorBar::new_vertical(
                    x + bar * 0.45,
                    (m - sd).max(y_min),
                    m,
                    m + sd,
                    BLACK.stroke_width(1),
                    6,
                )
            }))?;
        }
        let labels: Vec<&str> = series.iter().map(|s| s.label).collect();
        draw_legend(&legend, &labels)?;
        // Group names under the axis, centred on their group.
        for (g, name) in groups.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(g as f64 + 0.5, y_min));
            root.draw(&Text::new(
                name.clone(),
                (x, y + 8),
                (FONT, 14)
                    .into_font()
                    .color(&BLACK)
                    .pos(plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Top,
                    )),
            ))?;
        }
        Ok(())
    })
}

/// Curves with error bars over a logarithmic x axis (e.g. Dice against the number of
/// labelled images): one per series, `values[i]` at `xs[i]`.
pub fn log_x_curves(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    xs: &[f64],
    series: &[ErrorSeries],
) -> Result<()> {
    anyhow::ensure!(
        xs.iter().all(|&x| x > 0.0),
        "{title}: a logarithmic x axis needs positive values, got {xs:?}"
    );
    let (x_lo, x_hi) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    let (x_lo, x_hi) = if x_lo.is_finite() {
        (x_lo / 1.3, x_hi * 1.3)
    } else {
        (1.0, 10.0)
    };
    let (y_min, y_max) = unit_y_range(series);
    render(path, (760 + LEGEND_WIDTH, 440), |root| {
        let (root, legend) = root.split_horizontally(760);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 20))
            .margin(10)
            .margin_right(20)
            .x_label_area_size(40)
            .y_label_area_size(60)
            // Ticks at the measured sizes (4, 8, 16, ...), not at powers of ten.
            .build_cartesian_2d(
                (x_lo..x_hi).log_scale().with_key_points(xs.to_vec()),
                y_min..y_max,
            )?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .draw()?;
        for (k, s) in series.iter().enumerate() {
            let color = series_color(k);
            let points: Vec<(f64, f64, f64)> = xs
                .iter()
                .zip(&s.values)
                .filter_map(|(&x, v)| v.map(|(m, sd)| (x, m, sd)))
                .collect();
            chart.draw_series(LineSeries::new(
                points.iter().map(|&(x, m, _)| (x, m)),
                color.stroke_width(2),
            ))?;
            chart.draw_series(points.iter().map(|&(x, m, sd)| {
                ErrorBar::new_vertical(
                    x,
                    (m - sd).max(y_min),
                    m,
                    (m + sd).min(y_max),
                    color.stroke_width(1),
                    8,
                )
            }))?;
            chart.draw_series(
                points
                    .iter()
                    .map(|&(x, m, _)| Circle::new((x, m), 3, color.filled())),
            )?;
        }
        let labels: Vec<&str> = series.iter().map(|s| s.label).collect();
        draw_legend(&legend, &labels)?;
        Ok(())
    })
}

/// Draws `figure` into `dir/<figure.file>`.
pub fn draw_figure(dir: &Path, figure: &Figure) -> Result<()> {
    let rgb = |c: CurveColor| match c {
        CurveColor::Blue => BLUE,
        CurveColor::Green => GREEN,
        CurveColor::Red => RED,
    };
    let panels: Vec<(&str, &str, Vec<Series>)> = figure
        .panels
        .iter()
        .map(|p| {
            let curves = p
                .curves
                .iter()
                .map(|c| Series {
                    label: &c.label,
                    points: &c.points,
                    color: rgb(c.color),
                })
                .collect();
            (p.title.as_str(), p.y_label.as_str(), curves)
        })
        .collect();
    plot_panels(&dir.join(&figure.file), &panels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_with_text() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("progress.png");
        let loss: Vec<(f64, f64)> = (0..50)
            .map(|i| (i as f64, 1.0 / (1.0 + i as f64)))
            .collect();
        let dice = vec![(10.0, 0.3), (20.0, 0.6), (30.0, f64::NAN), (40.0, 0.8)];
        plot_panels(
            &path,
            &[
                (
                    "training loss",
                    "loss",
                    vec![Series {
                        label: "train",
                        points: &loss,
                        color: BLUE,
                    }],
                ),
                (
                    "validation",
                    "Dice",
                    vec![Series {
                        label: "val Dice",
                        points: &dice,
                        color: RED,
                    }],
                ),
            ],
        )?;
        let img = image::open(&path)?.to_rgb8();
        assert_eq!(img.dimensions(), (900, 640));
        // Curves and text put non-white pixels on the canvas.
        let inked = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        assert!(inked > 5_000, "only {inked} inked pixels");
        // Empty panels are fine too.
        plot_panels(&path, &[("empty", "y", vec![])])?;
        Ok(())
    }

    /// Pixels of `color` with x in `columns`.
    fn count_color(path: &Path, color: RGBColor, columns: std::ops::Range<u32>) -> usize {
        let img = image::open(path).unwrap().to_rgb8();
        img.enumerate_pixels()
            .filter(|(x, _, p)| columns.contains(x) && p.0 == [color.0, color.1, color.2])
            .count()
    }

    #[test]
    fn bars_and_curves_have_one_colour_per_method_and_skip_missing_values() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let bars = dir.path().join("bars.png");
        let groups = vec!["7+2 unet".to_string(), "32+8 unet".to_string()];
        let series = [
            ErrorSeries {
                label: "baseline",
                values: vec![Some((0.90, 0.02)), Some((0.70, 0.05))],
            },
            ErrorSeries {
                label: "genseg",
                values: vec![Some((0.93, 0.01)), None],
            },
        ];
        bar_chart(&bars, "Dice", "Dice", &groups, &series)?;
        // 560 px of chart (the plot area from ~70 px), then the legend strip. The first
        // group (left half) has both bars, the second only the first series': a missing
        // value draws nothing.
        let img = image::open(&bars)?;
        assert_eq!(img.width(), 560 + LEGEND_WIDTH);
        let (left, right) = (0..300, 320..560);
        for (k, in_right) in [(0, true), (1, false)] {
            let color = series_color(k);
            assert!(count_color(&bars, color, left.clone()) > 1000, "series {k}");
            let n = count_color(&bars, color, right.clone());
            assert_eq!(
                n > 1000,
                in_right,
                "series {k}: {n} pixels in the second group"
            );
            // Each series has its legend swatch.
            assert!(count_color(&bars, color, 560..560 + LEGEND_WIDTH) > 100);
        }

        let curve = dir.path().join("curve.png");
        log_x_curves(&curve, "ladder", "labelled", "Dice", &[4.0, 16.0], &series)?;
        assert!(count_color(&curve, series_color(0), 0..760) > 100);
        let err = log_x_curves(&curve, "ladder", "n", "Dice", &[0.0, 4.0], &series)
            .unwrap_err()
            .to_string();
        assert!(err.contains("positive"), "{err}");
        Ok(())
    }
}
