//! `kvxfer bench --sweep`: one measurement per request size and backend,
//! written as a table, as JSON and as an SVG chart (bandwidth and median
//! latency against request size, one line per backend).
//!
//! Each point is a [`run_bench`](crate::bench::run_bench) of one block of
//! that size per request, against a target spawned for it.

use crate::bench::{format_size, BenchOptions, BenchReport};

/// One measured point of a sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepPoint {
    /// The line it belongs to: the backend, with its provider if one was
    /// given (`LIBFABRIC shm`).
    pub label: String,
    /// The run's report; its `block_size` is the request size.
    pub report: BenchReport,
}

/// One line of a sweep: a backend and, for libfabric, a provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SweepBackend {
    /// Backend name (`UCX`, `LIBFABRIC`).
    pub backend: String,
    /// libfabric provider, if one was given.
    pub provider: Option<String>,
}

impl SweepBackend {
    /// How the line is named in the table and the legend.
    pub fn label(&self) -> String {
        match &self.provider {
            Some(p) => format!("{} {p}", self.backend),
            None => self.backend.clone(),
        }
    }
}

/// Parses a backend list: `UCX,LIBFABRIC`, a provider after a colon
/// (`LIBFABRIC:shm,LIBFABRIC:tcp;ofi_rxm`).
pub fn parse_backends(s: &str) -> Result<Vec<SweepBackend>, String> {
    let list: Vec<SweepBackend> = s
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .map(|b| match b.split_once(':') {
            Some((name, p)) => SweepBackend {
                backend: name.trim().to_string(),
                provider: Some(p.trim().to_string()),
            },
            None => SweepBackend {
                backend: b.to_string(),
                provider: None,
            },
        })
        .collect();
    if list.is_empty() {
        return Err("names no backend".to_string());
    }
    Ok(list)
}

/// Parses a size range `LOW..HIGH` (units as in
/// [`parse_size`](crate::bench::parse_size)) into the sizes measured:
/// `LOW`, then doubling while at most `HIGH`.
pub fn parse_range(s: &str) -> Result<Vec<u64>, String> {
    let (lo, hi) = s
        .split_once("..")
        .ok_or_else(|| "expected LOW..HIGH, e.g. 4KiB..64MiB".to_string())?;
    let lo = crate::bench::parse_size(lo)?;
    let hi = crate::bench::parse_size(hi)?;
    if lo == 0 || hi < lo {
        return Err("LOW must be positive and at most HIGH".to_string());
    }
    let mut sizes = vec![lo];
    while let Some(&last) = sizes.last() {
        match last.checked_mul(2) {
            Some(n) if n <= hi => sizes.push(n),
            _ => break,
        }
    }
    Ok(sizes)
}

/// The options of one point: `base` with one block of `size` bytes per
/// request over `backend`.
pub fn point_options(base: &BenchOptions, backend: &SweepBackend, size: u64) -> BenchOptions {
    BenchOptions {
        backend: Some(backend.backend.clone()),
        provider: backend.provider.clone().or_else(|| base.provider.clone()),
        block_size: size,
        blocks: 1,
        stride: None,
        strided: false,
        tcp_baseline: false,
        ..base.clone()
    }
}

/// The sweep as a table: one row per point.
pub fn table(points: &[SweepPoint]) -> String {
    let mut out = format!(
        "{:<22} {:<5} {:>9} {:>9} {:>10} {:>9} {:>9}\n",
        "backend", "op", "size", "GB/s", "req/s", "p50 us", "p99 us"
    );
    for p in points {
        let r = &p.report;
        out += &format!(
            "{:<22} {:<5} {:>9} {:>9.3} {:>10.0} {:>9.1} {:>9.1}\n",
            p.label,
            r.op,
            format_size(r.block_size),
            r.gb_per_s,
            r.requests_per_s,
            r.p50_us,
            r.p99_us
        );
    }
    out.pop();
    out
}

/// The sweep as one JSON object: `{"points": [{"label": …, "report": …}]}`
/// with each report as [`BenchReport::json`] writes it.
pub fn json(points: &[SweepPoint]) -> String {
    let items: Vec<String> = points
        .iter()
        .map(|p| {
            format!(
                "{{\"label\":\"{}\",\"size\":{},\"report\":{}}}",
                p.label.replace('\\', "\\\\").replace('"', "\\\""),
                p.report.block_size,
                p.report.json()
            )
        })
        .collect();
    format!("{{\"points\":[{}]}}", items.join(","))
}

/// Draws the sweep as an SVG chart at `path`: bandwidth (GB/s) on the
/// left, median latency (µs, log scale) on the right, request size on a
/// log scale, one line per label. Text is written as SVG `<text>`, so no
/// font is needed.
#[cfg(feature = "cli")]
pub fn svg(points: &[SweepPoint], path: &std::path::Path) -> Result<(), String> {
    use plotters::prelude::*;

    let mut labels: Vec<&str> = Vec::new();
    for p in points {
        if !labels.contains(&p.label.as_str()) {
            labels.push(&p.label);
        }
    }
    let sizes = points.iter().map(|p| p.report.block_size as f64);
    let x_lo = sizes.clone().fold(f64::MAX, f64::min).max(1.0);
    let x_hi = sizes.fold(0.0, f64::max).max(x_lo * 2.0);
    let op = points.first().map_or("", |p| p.report.op);
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());

    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(
            &format!("kvxfer bench --sweep: {op}, one block per request"),
            ("sans-serif", 22),
        )
        .map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(600);

    let x_desc = "request size (bytes, log scale)";
    let x_fmt = |v: &f64| format_size(v.round() as u64).replace(' ', "");
    let y_fmt = |v: &f64| match *v {
        v if v >= 10.0 => format!("{v:.0}"),
        v if v >= 1.0 => format!("{v:.1}"),
        v => format!("{v:.2}"),
    };
    // Palette99 without its yellow (index 2), which is faint on white.
    let style = |j: usize| Palette99::pick(if j < 2 { j } else { j + 1 }).stroke_width(2);
    let bandwidth = |r: &BenchReport| r.gb_per_s;
    let latency = |r: &BenchReport| r.p50_us;
    let (b_hi, l_lo, l_hi) = points
        .iter()
        .fold((1e-3, f64::MAX, 1e-3), |(b, lo, hi), p| {
            let (bw, l) = (bandwidth(&p.report), latency(&p.report));
            (f64::max(b, bw), f64::min(lo, l), f64::max(hi, l))
        });
    // The two panels differ in their y axis (linear, log), hence in type.
    macro_rules! panel {
        ($area:expr, $y_range:expr, $y_desc:expr, $value:expr) => {{
            let mut c = ChartBuilder::on($area)
                .margin(16)
                .x_label_area_size(48)
                .y_label_area_size(64)
                .build_cartesian_2d((x_lo * 0.8..x_hi * 1.25).log_scale().base(2.0), $y_range)
                .map_err(|e| err(&e))?;
            c.configure_mesh()
                .x_desc(x_desc)
                .y_desc($y_desc)
                .x_label_formatter(&x_fmt)
                .y_label_formatter(&y_fmt)
                .x_labels(8)
                .axis_desc_style(("sans-serif", 16))
                .draw()
                .map_err(|e| err(&e))?;
            for (j, l) in labels.iter().enumerate() {
                let line = points
                    .iter()
                    .filter(|p| p.label == *l)
                    .map(|p| (p.report.block_size as f64, $value(&p.report)));
                c.draw_series(LineSeries::new(line.clone(), style(j)))
                    .map_err(|e| err(&e))?
                    .label(*l)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style(j)));
                c.draw_series(line.map(|xy| Circle::new(xy, 3, style(j).filled())))
                    .map_err(|e| err(&e))?;
            }
            c.configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .label_font(("sans-serif", 15))
                .draw()
                .map_err(|e| err(&e))?;
        }};
    }
    panel!(&left, 0.0..b_hi * 1.1, "bandwidth (GB/s)", bandwidth);
    panel!(
        &right,
        (l_lo.max(1e-3) * 0.8..l_hi * 1.25).log_scale().base(2.0),
        "p50 latency (µs, log scale)",
        latency
    );
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_lists() {
        assert_eq!(
            parse_range("4KiB..64KiB"),
            Ok(vec![4096, 8192, 16384, 32768, 65536])
        );
        assert_eq!(parse_range("1MiB..1MiB"), Ok(vec![1 << 20]));
        assert_eq!(parse_range("4KiB..5KiB"), Ok(vec![4096]));
        assert!(parse_range("64MiB..4KiB").is_err());
        assert!(parse_range("4KiB").is_err());
        assert_eq!(
            parse_backends("UCX, LIBFABRIC:shm")
                .map(|l| l.iter().map(SweepBackend::label).collect::<Vec<_>>()),
            Ok(vec!["UCX".to_string(), "LIBFABRIC shm".to_string()])
        );
        assert!(parse_backends(" , ").is_err());
    }
}
