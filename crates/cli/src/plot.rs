//! The figures of a run folder (`progress.png`, `alpha.png`), drawn from the
//! [`Figure`]s the pipelines describe, with an embedded font (DejaVu Sans) so no system
//! fonts are needed.

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
    register_embedded_font()?;
    let (width, height) = (900u32, 320 * panels.len().max(1) as u32);
    let mut pixels = vec![0u8; width as usize * height as usize * 3];
    let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
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
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("drawing {}", path.display()))?;
    drop(root);
    let image = image::RgbImage::from_raw(width, height, pixels)
        .context("the plot buffer has the figure's size")?;
    genseg_data::writer::write_image(path, &image::DynamicImage::ImageRgb8(image))?;
    Ok(())
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
}
