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

/// One line of a line plot: its name and points (x, mean, spread) — the spread (standard
/// deviation over seeds) is drawn as a vertical bar when non-zero.
pub type Series = (String, Vec<(f64, f64, f64)>);

const PALETTE: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
    RGBColor(227, 119, 194),
    RGBColor(31, 31, 120),
    RGBColor(255, 187, 120),
];

/// The range a plotted quantity can take, read from its axis label: a percentage ("%") stays
/// within 0..=100, a loss or an error at or above 0.
fn quantity_bounds(y_label: &str) -> (f64, f64) {
    if y_label.starts_with("log") {
        // The logarithm of a loss or a norm: any sign.
        (f64::NEG_INFINITY, f64::INFINITY)
    } else if y_label.contains('%') {
        (0.0, 100.0)
    } else if y_label.contains("loss") || y_label.contains("error") {
        (0.0, f64::INFINITY)
    } else {
        (f64::NEG_INFINITY, f64::INFINITY)
    }
}

/// The first corner of the plot (upper right, upper left, lower right, lower left) whose
/// legend-sized box holds no point or spread bar of the data, so the legend covers none.
/// `x` is mapped as the axis maps it (log2 on a log axis).
fn legend_corner(
    series: &[Series],
    x: fn(f64) -> f64,
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
) -> SeriesLabelPosition {
    let (x0, x1) = (x(x0), x(x1));
    let (w, h) = ((x1 - x0) * 0.4, (y1 - y0) * (0.05 * series.len() as f64 + 0.06));
    let points: Vec<(f64, f64, f64)> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(px, m, s)| (x(px), m, s)))
        .filter(|p| p.1.is_finite())
        .collect();
    let free = |left: bool, top: bool| {
        points.iter().all(|&(x, m, s)| {
            let in_x = if left { x <= x0 + w } else { x >= x1 - w };
            let in_y = if top { m + s >= y1 - h } else { m - s <= y0 + h };
            !(in_x && in_y)
        })
    };
    [
        (false, true, SeriesLabelPosition::UpperRight),
        (true, true, SeriesLabelPosition::UpperLeft),
        (false, false, SeriesLabelPosition::LowerRight),
        (true, false, SeriesLabelPosition::LowerLeft),
    ]
    .into_iter()
    .find(|&(left, top, _)| free(left, top))
    .map_or(SeriesLabelPosition::UpperRight, |(_, _, p)| p)
}

/// A line plot with markers, spread bars and a legend; `log_x` uses a log2 x axis.
pub fn lines_svg(title: &str, x_label: &str, y_label: &str, series: &[Series], log_x: bool) -> Result<String> {
    lines_marked_svg(title, x_label, y_label, series, log_x, &[], "")
}

/// A point to mark on a line plot: the index of its series, x, y (a matched point, a target
/// reached); drawn as a large hollow diamond in the series' colour.
pub type Mark = (usize, f64, f64);

/// `lines_svg` with marked points, named in the legend by `mark_label`.
pub fn lines_marked_svg(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
    marks: &[Mark],
    mark_label: &str,
) -> Result<String> {
    let points = series.iter().flat_map(|(_, p)| p.iter()).filter(|p| p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, m, s) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(m - s);
        y1 = y1.max(m + s);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.08).max(1e-3);
    // Errors and accuracies are never negative: keep the axis at 0 even when a spread bar dips below.
    let all_nonneg = series
        .iter()
        .flat_map(|(_, p)| p.iter())
        .all(|p| !p.1.is_finite() || p.1 >= 0.0);
    // Headroom for the legend in the upper right, so it never covers data points; the axis
    // stays inside what the quantity can be (a percentage never passes 100).
    let legend_room = (y1 - y0).max(1e-3) * 0.08 * series.len() as f64;
    let (lo, hi) = quantity_bounds(y_label);
    let (y0, y1) = (
        if all_nonneg { (y0 - pad).max(0.0) } else { y0 - pad }.max(lo),
        (y1 + pad + legend_room).min(hi),
    );
    let legend = legend_corner(series, if log_x { f64::log2 } else { |x| x }, (x0, x1), (y0, y1));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 440)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let map = |x: f64| if log_x { x.log2() } else { x };
        let integral_x = series
            .iter()
            .flat_map(|(_, p)| p.iter())
            .all(|p| (p.0 - p.0.round()).abs() < 1e-9);
        let (a, b) = (map(x0), map(x1));
        let xpad = ((b - a) * 0.04).max(1e-3);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(65)
            .build_cartesian_2d(a - xpad..b + xpad, y0..y1)
            .map_err(plot_err)?;
        let fmt_x = |v: &f64| {
            if log_x {
                // Whole numbers (batch sizes) as such; fractions (learning rates) to 3 digits.
                // Whole numbers (batch sizes) only at whole ticks: 2.828 is no batch size.
                let x = 2f64.powf(*v);
                if x >= 1.0 && (x - x.round()).abs() < 1e-6 {
                    format!("{}", x.round())
                } else if x >= 1.0 {
                    String::new()
                } else {
                    format!("{x:.3}")
                }
            } else if integral_x {
                // Layers, steps: whole ticks only.
                if (v - v.round()).abs() < 1e-6 {
                    format!("{v:.0}")
                } else {
                    String::new()
                }
            } else if x1.abs() >= 10.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.3}")
            }
        };
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .x_label_formatter(&fmt_x)
            .draw()
            .map_err(plot_err)?;
        let mut seen: Vec<RGBColor> = Vec::new();
        let mut colors = Vec::with_capacity(series.len());
        for (i, (name, pts)) in series.iter().enumerate() {
            // A second line of the same arm ("bn, final" after "bn, init") is a lighter shade.
            let base = arm_color(name, i);
            let repeats = seen.iter().filter(|c| **c == base).count();
            seen.push(base);
            let color = lighter(base, repeats);
            colors.push(color);
            let ok: Vec<(f64, f64, f64)> = pts.iter().copied().filter(|p| p.1.is_finite()).collect();
            chart
                .draw_series(LineSeries::new(
                    ok.iter().map(|&(x, m, _)| (map(x), m)),
                    color.stroke_width(2),
                ))
                .map_err(plot_err)?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
            chart
                .draw_series(ok.iter().map(|&(x, m, _)| Circle::new((map(x), m), 4, color.filled())))
                .map_err(plot_err)?;
            chart
                .draw_series(
                    ok.iter()
                        .filter(|p| p.2 > 0.0)
                        .map(|&(x, m, s)| PathElement::new([(map(x), m - s), (map(x), m + s)], color.stroke_width(1))),
                )
                .map_err(plot_err)?;
        }
        let marked: Vec<(f64, f64, RGBColor)> = marks
            .iter()
            .filter(|m| m.0 < colors.len() && m.1.is_finite() && m.2.is_finite())
            .map(|&(i, x, y)| (map(x), y, colors[i]))
            .collect();
        if !marked.is_empty() {
            // A diamond 9 pixels across each way around the point.
            let diamond = |x: f64, y: f64, c: RGBColor| {
                EmptyElement::at((x, y))
                    + Polygon::new(vec![(0, -9), (9, 0), (0, 9), (-9, 0)], c.mix(0.25).filled())
                    + PathElement::new(vec![(0, -9), (9, 0), (0, 9), (-9, 0), (0, -9)], c.stroke_width(2))
            };
            chart
                .draw_series(marked.iter().map(|&(x, y, c)| diamond(x, y, c)))
                .map_err(plot_err)?
                .label(mark_label)
                .legend(|(x, y)| {
                    PathElement::new(
                        vec![(x + 8, y - 6), (x + 14, y), (x + 8, y + 6), (x + 2, y), (x + 8, y - 6)],
                        BLACK.stroke_width(2),
                    )
                });
        }
        chart
            .configure_series_labels()
            .position(legend)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// A bar chart of labelled values with spread bars (value, spread).
pub fn bars_svg(title: &str, y_label: &str, bars: &[(String, f64, f64)]) -> Result<String> {
    let top = bars.iter().map(|b| b.1 + b.2).fold(0.0f64, f64::max).max(1e-3) * 1.15;
    let lowest = bars.iter().map(|b| b.1 - b.2).fold(0.0f64, f64::min) * 1.15;
    // plotters centres the rotated category labels on the axis: leave room below the lowest bar.
    let bottom = lowest - 0.2 * (top - lowest);
    let n = bars.len().max(1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 460)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(90)
            .y_label_area_size(65)
            .build_cartesian_2d(-0.5f64..n as f64 - 0.5, bottom..top)
            .map_err(plot_err)?;
        let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        let fmt_x = |v: &f64| category_label(&names, *v);
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&fmt_x)
            .x_label_style(("sans-serif", 11).into_font().transform(FontTransform::Rotate270))
            .y_desc(y_label)
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, b)| {
                let c = PALETTE[i % PALETTE.len()];
                Rectangle::new([(i as f64 - 0.35, 0.0), (i as f64 + 0.35, b.1)], c.mix(0.75).filled())
            }))
            .map_err(plot_err)?;
        chart
            .draw_series(
                bars.iter().enumerate().filter(|(_, b)| b.2 > 0.0).map(|(i, b)| {
                    PathElement::new([(i as f64, b.1 - b.2), (i as f64, b.1 + b.2)], BLACK.stroke_width(1))
                }),
            )
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// One point with its spread bar per labelled value, the y axis fitted to the data (so that
/// differences of a point or two stay visible) and both axes titled: the comparison grid.
pub fn points_svg(title: &str, x_label: &str, y_label: &str, points: &[(String, f64, f64)]) -> Result<String> {
    let finite = points.iter().filter(|p| p.1.is_finite());
    let lo = finite.clone().map(|p| p.1 - p.2).fold(f64::MAX, f64::min);
    let hi = finite.map(|p| p.1 + p.2).fold(f64::MIN, f64::max);
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.15).max(0.5);
    let (min, max) = quantity_bounds(y_label);
    let (lo, hi) = ((lo - pad).max(min), (hi + pad).min(max));
    let n = points.len().max(1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 440)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(65)
            .build_cartesian_2d(-0.5f64..n as f64 - 0.5, lo..hi)
            .map_err(plot_err)?;
        let names: Vec<String> = points.iter().map(|p| p.0.clone()).collect();
        let fmt_x = |v: &f64| category_label(&names, *v);
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n.min(40))
            .x_label_formatter(&fmt_x)
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(plot_err)?;
        let color = PALETTE[0];
        chart
            .draw_series(
                points
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.1.is_finite())
                    .map(|(i, p)| Circle::new((i as f64, p.1), 5, color.filled())),
            )
            .map_err(plot_err)?;
        chart
            .draw_series(
                points
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.1.is_finite() && p.2 > 0.0)
                    .map(|(i, p)| {
                        PathElement::new([(i as f64, p.1 - p.2), (i as f64, p.1 + p.2)], color.stroke_width(2))
                    }),
            )
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// `c` blended toward white, more for each `step`.
fn lighter(c: RGBColor, step: usize) -> RGBColor {
    let f = 1.0 - 0.5f64.powi(step as i32);
    let mix = |v: u8| (v as f64 + (255.0 - v as f64) * f * 0.8) as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

/// One colour per arm in every plot of a report: the norm at the start of a series name
/// ("bn", "none: max loss", "gn:8, init x1") picks a fixed colour; other names fall back to
/// their position.
fn arm_color(name: &str, index: usize) -> RGBColor {
    let arm = name.split([':', ',', ' ']).next().unwrap_or("");
    let fixed = [
        "bn",
        "none",
        "gn",
        "ln",
        "layernorm",
        "in",
        "brn",
        "ghost",
        "bn-noisy",
        "bn-l1",
        "bn-linf",
    ];
    match fixed.iter().position(|a| *a == arm) {
        Some(k) => PALETTE[k % PALETTE.len()],
        None => PALETTE[index % PALETTE.len()],
    }
}

/// The name of the category at whole tick `v` of a category axis (empty between categories).
fn category_label(names: &[String], v: f64) -> String {
    let i = v.round();
    if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
        names[i as usize].clone()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_percentage_axis_stays_within_0_to_100_and_a_loss_above_0() {
        assert_eq!(quantity_bounds("test accuracy (%)"), (0.0, 100.0));
        assert_eq!(quantity_bounds("training loss").0, 0.0);
        assert!(quantity_bounds("log10 gradient norm").0.is_infinite());
        // Accuracies near 100 with wide spread bars: the axis still ends at 100.
        let series: Vec<Series> = vec![("bn".into(), vec![(0.01, 97.0, 6.0), (0.1, 98.0, 5.0)])];
        let svg = lines_svg("t", "learning rate", "test accuracy (%)", &series, true).unwrap();
        assert!(
            !svg.contains(">105<") && !svg.contains(">110<") && !svg.contains(">120<"),
            "{svg}"
        );
    }

    #[test]
    fn the_legend_goes_to_a_corner_without_data() {
        // Data high on the right: the upper right is taken, the upper left is free.
        let series: Vec<Series> = vec![("a".into(), vec![(0.0, 10.0, 0.0), (10.0, 99.0, 0.0)])];
        let id = |x| x;
        let corner = legend_corner(&series, id, (0.0, 10.0), (0.0, 100.0));
        assert!(matches!(corner, SeriesLabelPosition::UpperLeft));
        let flat: Vec<Series> = vec![("a".into(), vec![(0.0, 50.0, 1.0), (10.0, 50.0, 1.0)])];
        assert!(matches!(
            legend_corner(&flat, id, (0.0, 10.0), (0.0, 100.0)),
            SeriesLabelPosition::UpperRight
        ));
    }
}
