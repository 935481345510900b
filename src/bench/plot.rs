//! An SVG chart of a run: stacked panels against concurrency (throughput and p99 latency for
//! request/response models; tokens/s, TTFT and inter-token latency for generation).

use std::path::Path;

use plotters::prelude::*;

use super::error::BenchError;
use super::report::{Report, write_file};

const SIZE: (u32, u32) = (800, 640);
const COLOURS: [RGBColor; 3] = [BLUE, RED, GREEN];

/// The x range on a log scale, padded so that a single point still has room.
fn x_range(points: &[(f64, f64)]) -> (f64, f64) {
    let lo = points.iter().map(|p| p.0.max(1.0)).fold(f64::INFINITY, f64::min);
    let hi = points.iter().map(|p| p.0.max(1.0)).fold(1.0f64, f64::max);
    let lo = if lo.is_finite() { lo } else { 1.0 };
    (lo / 1.5, hi * 1.5)
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    x_desc: &str,
    title: &str,
    y_desc: &str,
    colour: RGBColor,
    pts: &[(f64, f64)],
) -> Result<(), String> {
    let (x_lo, x_hi) = x_range(pts);
    let y_hi = pts.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-3) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), 0.0..y_hi)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| e.to_string())?;
    chart.draw_series(LineSeries::new(pts.to_vec(), colour.stroke_width(2))).map_err(|e| e.to_string())?;
    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, colour.filled()))).map_err(|e| e.to_string())?;
    Ok(())
}

/// One panel of a chart: its title, its y axis and its points (x = concurrency, y).
pub type Panel<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// Renders stacked panels as SVG text.
pub fn render_panels(title: &str, x_desc: &str, panels: &[Panel<'_>]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let height = SIZE.1 / 2 * panels.len().max(1) as u32;
        let root = SVGBackend::with_string(&mut svg, (SIZE.0, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let root = root.titled(title, ("sans-serif", 24)).map_err(|e| e.to_string())?;
        let areas = root.split_evenly((panels.len().max(1), 1));
        for (i, ((name, y_desc, pts), area)) in panels.iter().zip(&areas).enumerate() {
            panel(area, x_desc, name, y_desc, COLOURS[i % COLOURS.len()], pts)?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// Renders the chart of a request/response run (throughput, then p99 latency) as SVG text.
pub fn render_svg(report: &Report) -> Result<String, String> {
    let title = format!("{} (batch {}, {:.0} s per point)", report.model, report.batch_size, report.duration_s);
    let x = |p: &super::report::Point| f64::from(p.concurrency.max(1));
    render_panels(
        &title,
        "concurrency (requests in flight)",
        &[
            ("throughput", "inferences/s", report.points.iter().map(|p| (x(p), p.throughput)).collect()),
            ("p99 latency", "p99 (ms)", report.points.iter().map(|p| (x(p), p.p99_us as f64 / 1000.0)).collect()),
        ],
    )
}

/// Writes the chart to `path`.
pub fn write_svg(path: &Path, report: &Report) -> Result<(), BenchError> {
    let svg = render_svg(report).map_err(|reason| BenchError::Output { path: path.to_path_buf(), reason })?;
    write_file(path, &svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::Point;

    #[test]
    fn renders_an_svg_document() -> Result<(), String> {
        let point = |c: u32, t: f64| Point {
            concurrency: c,
            throughput: t,
            rows_per_s: t,
            p50_us: 10,
            p90_us: 20,
            p99_us: 30,
            max_us: 40,
            errors: Default::default(),
            server_queue_us: None,
            server_compute_us: None,
            avg_batch: None,
        };
        let report = Report {
            points: vec![point(1, 100.0), point(8, 700.0)],
            model: "linear".into(),
            batch_size: 1,
            duration_s: 1.0,
        };
        let svg = render_svg(&report)?;
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.contains("throughput") && svg.contains("p99 latency"));
        Ok(())
    }
}
