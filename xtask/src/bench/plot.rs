//! PNG plots of the results (plotters, text in DejaVu Sans from Debian's
//! fonts-dejavu-core, which `cargo xtask setup` installs).
use std::{path::Path, sync::OnceLock};

use anyhow::{Context as _, anyhow};
use plotters::{coord::Shift, prelude::*};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// One line: (x, median, min, max) per point.
pub struct Series {
    pub name: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64, f64, f64)>,
}

/// A figure of `rows` × `cols` panels, drawn by `draw` in reading order.
pub fn figure(
    path: &Path,
    (rows, cols): (usize, usize),
    mut draw: impl FnMut(usize, &Area) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    register_font()?;
    let size = (620 * cols as u32, 440 * rows as u32);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    for (i, panel) in root.split_evenly((rows, cols)).iter().enumerate() {
        draw(i, panel)?;
    }
    root.present().map_err(|e| anyhow!("{}: {e}", path.display()))
}

fn register_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e}"))?;
            // Registered fonts live as long as the program.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{FONT}: not a font"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
        .context("plot font (cargo xtask setup installs fonts-dejavu-core)")
}

/// A tick label without float noise: 0.3, 10, 25000.
fn tick(v: &f64) -> String {
    let digits = if v.abs() >= 100.0 { 0 } else { 2 };
    let rounded = format!("{v:.digits$}");
    let trimmed = if rounded.contains('.') {
        rounded.trim_end_matches('0').trim_end_matches('.')
    } else {
        &rounded
    };
    trimmed.to_owned()
}

/// Lines over the number of Services (log scale), with min–max bars; the
/// series are nudged apart sideways so their bars do not hide each other.
pub fn lines(area: &Area, title: &str, y_desc: &str, series: &[Series]) -> anyhow::Result<()> {
    let top = series.iter().flat_map(|s| s.points.iter().map(|p| p.3)).fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(38)
        .y_label_area_size(64)
        .build_cartesian_2d((5f64..20_000f64).log_scale(), 0f64..(top * 1.12).max(1.0))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("Services")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&tick)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, s) in series.iter().enumerate() {
        let color = s.color;
        let nudge = 1.0 + 0.05 * (i as f64 - (series.len() as f64 - 1.0) / 2.0);
        let points: Vec<_> =
            s.points.iter().map(|&(x, m, lo, hi)| (x * nudge, m, lo, hi)).collect();
        chart
            .draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.1)), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| ErrorBar::new_vertical(p.0, p.2, p.1, p.3, color.filled(), 8)),
            )
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))
}

/// Bars per label, one per group side by side, on a log scale.
pub fn bars(
    area: &Area,
    title: &str,
    y_desc: &str,
    labels: &[&str],
    groups: &[(&str, RGBColor, Vec<f64>)],
) -> anyhow::Result<()> {
    let values = || groups.iter().flat_map(|g| g.2.iter().copied()).filter(|v| *v > 0.0);
    let (low, high) = (values().fold(f64::MAX, f64::min), values().fold(0.0, f64::max));
    let (low, high) = if high > 0.0 { (low / 3.0, high * 3.0) } else { (0.1, 1.0) };
    // One slot per group and one gap per label.
    let slots = groups.len() + 1;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(38)
        .y_label_area_size(64)
        .build_cartesian_2d((0..labels.len() * slots).into_segmented(), (low..high).log_scale())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(labels.len() * slots)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) if i % slots == groups.len() / 2 => {
                labels.get(i / slots).copied().unwrap_or_default().to_owned()
            }
            _ => String::new(),
        })
        .y_desc(y_desc)
        .y_label_formatter(&tick)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (g, (name, color, values)) in groups.iter().enumerate() {
        let color = *color;
        chart
            .draw_series(values.iter().enumerate().filter(|(_, v)| **v > 0.0).map(|(i, v)| {
                let slot = i * slots + g;
                Rectangle::new(
                    [(SegmentValue::Exact(slot), low), (SegmentValue::Exact(slot + 1), *v)],
                    color.filled(),
                )
            }))
            .map_err(|e| anyhow!("{e}"))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ticks_have_no_float_noise() {
        let ticks: Vec<String> = [0.30000000000000004, 0.25, 10.0, 99.5, 1000.0, 25_000.0]
            .iter()
            .map(super::tick)
            .collect();
        assert_eq!(ticks, ["0.3", "0.25", "10", "99.5", "1000", "25000"]);
    }
}
