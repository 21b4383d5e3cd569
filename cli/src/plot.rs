//! `bench --plot FILE.svg|FILE.png`: a latency-by-percentile chart of one run, drawn with
//! `plotters` (its text in DejaVu Sans, embedded: no system font needed).
//!
//! The x axis is the percentile on the usual "nines" scale (`-log10(1 - q)`: 0 is the
//! minimum, 1 is p90, 2 p99, 3 p99.9), so the tail gets as much room as the median; the y axis
//! is the latency on a log scale.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Once;

use hdrhistogram::Histogram;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::Failure;

/// The chart's file formats, chosen by the file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Svg,
    Png,
}

/// The pixel size of the chart.
const SIZE: (u32, u32) = (960, 540);

/// Reads `--plot`'s value: a path ending in `.svg` or `.png`.
pub(crate) fn parse_path(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    format_of(&path).map(|_| path)
}

fn format_of(path: &Path) -> Result<Format, String> {
    match path
        .extension()
        .and_then(OsStr::to_str)
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("svg") => Ok(Format::Svg),
        Some("png") => Ok(Format::Png),
        _ => Err(format!(
            "{} must end in .svg or .png (the chart's format)",
            path.display()
        )),
    }
}

/// What the chart shows.
pub(crate) struct Chart<'a> {
    /// The first line of the title (`bench produce`).
    pub(crate) title: String,
    /// What the latency is of, for the x axis.
    pub(crate) latency_of: &'a str,
    /// Latencies in nanoseconds.
    pub(crate) latency: &'a Histogram<u64>,
}

/// Writes the chart to `path` (its extension picks the format).
pub(crate) fn write(path: &Path, chart: &Chart<'_>) -> Result<(), Failure> {
    let failed = |e: String| Failure::runtime(format!("--plot {}: {e}", path.display()));
    let format = format_of(path).map_err(failed)?;
    if chart.latency.is_empty() {
        return Err(failed("no latency samples to plot".into()));
    }
    // Both formats lay their text out with the font's metrics.
    register_font().map_err(failed)?;
    match format {
        Format::Svg => draw(SVGBackend::new(path, SIZE).into_drawing_area(), chart),
        Format::Png => draw(BitMapBackend::new(path, SIZE).into_drawing_area(), chart),
    }
    .map_err(failed)
}

/// Text needs a font: DejaVu Sans, embedded in the binary, registered once.
fn register_font() -> Result<(), String> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        )
        .map_err(|_| "the embedded DejaVu Sans font did not load".to_string());
    });
    result
}

/// The percentile at `nines` x, as a label: `0%`, `90%`, `99%`, `99.9%`.
fn label(x: f64) -> String {
    let pct = 100.0 * (1.0 - 10f64.powf(-x));
    let digits = x.ceil().max(0.0) as usize;
    let s = format!("{pct:.digits$}", digits = digits.saturating_sub(2));
    format!("{s}%")
}

/// The points of the curve: (nines, latency in µs), from the minimum to the percentile the
/// sample count still resolves, then the maximum.
fn points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    #[allow(clippy::cast_precision_loss)]
    let last = (h.len() as f64).log10().clamp(1.0, 6.0);
    let steps = (last * 50.0) as u32;
    let mut pts: Vec<(f64, f64)> = (0..=steps)
        .map(|i| {
            let x = last * f64::from(i) / f64::from(steps);
            let q = 1.0 - 10f64.powf(-x);
            (x, micros(h.value_at_quantile(q)))
        })
        .collect();
    pts.push((last, micros(h.max())));
    pts
}

#[allow(clippy::cast_precision_loss)]
fn micros(ns: u64) -> f64 {
    ns as f64 / 1e3
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart<'_>) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let pts = points(chart.latency);
    let x_max = pts.last().map_or(1.0, |p| p.0);
    // A log scale: the median and the tail both readable.
    let y_max = pts.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.2;
    let y_min = pts
        .iter()
        .map(|p| p.1)
        .fold(f64::INFINITY, f64::min)
        .max(1e-3)
        / 1.2;
    let h = chart.latency;
    let caption = format!(
        "{}: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs ({} samples)",
        chart.title,
        micros(h.value_at_quantile(0.5)),
        micros(h.value_at_quantile(0.99)),
        micros(h.max()),
        h.len()
    );
    let mut ctx = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale())
        .map_err(err)?;
    ctx.configure_mesh()
        .x_desc(format!("percentile of {}", chart.latency_of))
        .y_desc("latency, µs (log scale)")
        .x_labels(x_max.ceil() as usize + 1)
        .x_label_formatter(&|x| label(*x))
        .draw()
        .map_err(err)?;
    ctx.draw_series(LineSeries::new(pts, BLUE.stroke_width(2)))
        .map_err(err)?;
    root.present().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_the_nines() {
        assert_eq!(label(0.0), "0%");
        assert_eq!(label(1.0), "90%");
        assert_eq!(label(2.0), "99%");
        assert_eq!(label(3.0), "99.9%");
        assert_eq!(label(4.0), "99.99%");
    }

    #[test]
    fn only_svg_and_png_are_accepted() {
        assert!(parse_path("a.svg").is_ok());
        assert!(parse_path("A.PNG").is_ok());
        assert_eq!(
            parse_path("chart.jpg").unwrap_err(),
            "chart.jpg must end in .svg or .png (the chart's format)"
        );
        assert!(parse_path("chart").is_err());
    }

    #[test]
    fn svg_and_png_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Histogram::new_with_bounds(1, 3_600_000_000_000, 3).unwrap();
        for i in 1..=10_000u64 {
            h.record(50_000 + i * 7).unwrap();
        }
        for name in ["c.svg", "c.png"] {
            let path = dir.path().join(name);
            let chart = Chart {
                title: "bench produce".into(),
                latency_of: "enqueue to acknowledgement",
                latency: &h,
            };
            write(&path, &chart).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            if name.ends_with("svg") {
                let text = String::from_utf8(bytes).unwrap();
                assert!(text.starts_with("<svg"), "{}", &text[..40]);
                assert!(text.contains("99.9%"));
                assert!(text.contains("<polyline"));
            } else {
                assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
            }
        }
        let empty = Histogram::<u64>::new(3).unwrap();
        let chart = Chart {
            title: "t".into(),
            latency_of: "x",
            latency: &empty,
        };
        let e = write(&dir.path().join("e.svg"), &chart).unwrap_err();
        assert!(
            e.message.ends_with("no latency samples to plot"),
            "{}",
            e.message
        );
    }
}
