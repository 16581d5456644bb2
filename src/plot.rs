//! SVG plots (plotters' SVG backend: self-contained text, no fonts or files needed).

use plotters::prelude::*;

use crate::error::{Error, Result};

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("plot: {e}"))
}

/// A histogram of |γ| over all BN channels with the pruning threshold marked.
pub fn gamma_histogram_svg(gammas: &[f32], threshold: f32, percent: f64) -> Result<String> {
    let max = gammas.iter().fold(0.0f32, |m, &g| m.max(g)).max(1e-6);
    let bins = 50;
    let width = max / bins as f32;
    let mut counts = vec![0usize; bins];
    for &g in gammas {
        counts[((g / width) as usize).min(bins - 1)] += 1;
    }
    let top = *counts.iter().max().unwrap_or(&1) as f32 * 1.1;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let title = format!(
            "BN scale factors |γ| of {} channels; threshold at {:.0}% = {:.4}",
            gammas.len(),
            100.0 * percent,
            threshold.max(0.0)
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(0f32..max * 1.02, 0f32..top)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("|γ| (BN scale factor, absolute value)")
            .y_desc("number of channels")
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(counts.iter().enumerate().map(|(i, &c)| {
                let x0 = i as f32 * width;
                let color = if x0 + width <= threshold {
                    RED.mix(0.6)
                } else {
                    BLUE.mix(0.6)
                };
                Rectangle::new([(x0, 0.0), (x0 + width, c as f32)], color.filled())
            }))
            .map_err(plot_err)?
            .label("kept channels (blue), pruned (red)")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], BLUE.mix(0.6).filled()));
        if threshold.is_finite() && threshold > 0.0 {
            chart
                .draw_series(LineSeries::new(
                    [(threshold, 0.0), (threshold, top)],
                    BLACK.stroke_width(2),
                ))
                .map_err(plot_err)?
                .label("threshold")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], BLACK.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}
