//! An SVG chart of a run: throughput and p99 latency against concurrency, one panel each.

use std::path::Path;

use plotters::prelude::*;

use super::error::BenchError;
use super::report::{Report, write_file};

const SIZE: (u32, u32) = (800, 640);

/// The x range on a log scale, padded so that a single point still has room.
fn x_range(report: &Report) -> (f64, f64) {
    let xs = report.points.iter().map(|p| f64::from(p.concurrency.max(1)));
    let lo = xs.clone().fold(f64::INFINITY, f64::min);
    let hi = xs.fold(1.0f64, f64::max);
    let lo = if lo.is_finite() { lo } else { 1.0 };
    (lo / 1.5, hi * 1.5)
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    report: &Report,
    title: &str,
    y_desc: &str,
    colour: RGBColor,
    y: impl Fn(&super::report::Point) -> f64,
) -> Result<(), String> {
    let (x_lo, x_hi) = x_range(report);
    let y_hi = report.points.iter().map(&y).fold(0.0f64, f64::max).max(1e-3) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), 0.0..y_hi)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("concurrency (requests in flight)")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| e.to_string())?;
    let pts: Vec<(f64, f64)> = report.points.iter().map(|p| (f64::from(p.concurrency.max(1)), y(p))).collect();
    chart.draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2))).map_err(|e| e.to_string())?;
    chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, colour.filled()))).map_err(|e| e.to_string())?;
    Ok(())
}

/// Renders the chart as SVG text.
pub fn render_svg(report: &Report) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let title = format!("{} (batch {}, {:.0} s per point)", report.model, report.batch_size, report.duration_s);
        let root = root.titled(&title, ("sans-serif", 24)).map_err(|e| e.to_string())?;
        let (top, bottom) = root.split_vertically(SIZE.1 / 2 - 20);
        panel(&top, report, "throughput", "inferences/s", BLUE, |p| p.throughput)?;
        panel(&bottom, report, "p99 latency", "p99 (ms)", RED, |p| p.p99_us as f64 / 1000.0)?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
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
