//! `--plot FILE.svg`: throughput against batch size, one panel per mode, one line per
//! layout. The SVG is written by hand: axes, ticks, grid, labels and a legend, nothing
//! that needs fonts or scripts beyond what any SVG viewer has.

use std::fmt::Write as _;

use crate::bench::Mode;
use crate::report::Report;
use virtq::LayoutKind;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 460.0;
/// Plot-area margins inside each panel's slot.
const LEFT: f64 = 72.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 104.0;
const BOTTOM: f64 = 64.0;

/// Colour-blind-safe colours (Okabe and Ito), one per layout.
const COLOURS: [&str; 4] = ["#0072B2", "#D55E00", "#009E73", "#CC79A7"];

/// One line: `(x, y)` points, drawn in colour and marker `style`.
#[derive(Clone, Debug)]
pub struct Series {
    pub style: usize,
    pub points: Vec<(f64, f64)>,
}

/// One chart: a title and its lines, on a log2 x axis and a linear y axis from 0.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

/// What the figure says around its panels.
#[derive(Clone, Debug)]
pub struct Labels {
    pub title: String,
    pub subtitle: String,
    pub x: String,
    pub y: String,
    /// Legend entries: text and the style of its line.
    pub legend: Vec<(String, usize)>,
}

/// The matrix's throughput figure: a panel per mode, a line per layout.
pub fn throughput_svg(report: &Report) -> String {
    let mut modes = Vec::new();
    for t in &report.throughput {
        if !modes.contains(&t.mode) {
            modes.push(t.mode);
        }
    }
    let style = |l: LayoutKind| LayoutKind::ALL.iter().position(|&x| x == l).unwrap_or(0);
    let panels = modes
        .iter()
        .map(|&mode| Panel {
            title: match mode {
                Mode::Poll => "poll: both sides busy-poll".to_string(),
                Mode::Sleep => "sleep: woken by notifications (event idx)".to_string(),
            },
            series: report
                .layouts
                .iter()
                .map(|info| Series {
                    style: style(info.layout),
                    points: report
                        .throughput
                        .iter()
                        .filter(|t| t.mode == mode && t.layout == info.layout)
                        .map(|t| (f64::from(t.batch), t.mbufs_per_sec))
                        .collect(),
                })
                .collect(),
        })
        .collect::<Vec<_>>();
    let placement = match report.cpus {
        Some(c) if report.pinned => format!("driver on CPU {}, device on CPU {}", c.driver, c.device),
        _ => "unpinned".to_string(),
    };
    let labels = Labels {
        title: "virtq bench: streaming throughput".to_string(),
        subtitle: format!(
            "ring of {} entries, ring kept full, one kick per batch; {} ms per point; {placement}",
            report.ring_size, report.duration_ms
        ),
        x: "buffers per kick (log scale)".to_string(),
        y: "million buffers per second".to_string(),
        legend: report.layouts.iter().map(|info| (info.layout.to_string(), style(info.layout))).collect(),
    };
    render(&labels, &panels)
}

/// Draws `panels` side by side with one legend, sharing nothing but the x ticks' values.
pub fn render(labels: &Labels, panels: &[Panel]) -> String {
    let mut svg = String::new();
    let w = |svg: &mut String, s: std::fmt::Arguments<'_>| {
        svg.write_fmt(s).expect("writing to a String cannot fail");
        svg.push('\n');
    };
    w(
        &mut svg,
        format_args!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
        ),
    );
    w(&mut svg, format_args!(r#"<rect width="100%" height="100%" fill="white"/>"#));
    w(
        &mut svg,
        format_args!(
            r#"<text x="{}" y="26" text-anchor="middle" font-size="17" font-weight="bold">{}</text>"#,
            WIDTH / 2.0,
            escape(&labels.title)
        ),
    );
    w(
        &mut svg,
        format_args!(
            r##"<text x="{}" y="46" text-anchor="middle" fill="#444">{}</text>"##,
            WIDTH / 2.0,
            escape(&labels.subtitle)
        ),
    );
    legend(&mut svg, &labels.legend);

    // The x ticks are every x value that occurs (the batch sizes).
    let mut xs: Vec<f64> =
        panels.iter().flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().map(|&(x, _)| x))).collect();
    xs.retain(|x| x.is_finite() && *x > 0.0);
    xs.sort_by(f64::total_cmp);
    xs.dedup();

    let slot = WIDTH / panels.len().max(1) as f64;
    for (i, panel) in panels.iter().enumerate() {
        let (x0, x1) = (i as f64 * slot + LEFT, (i + 1) as f64 * slot - RIGHT);
        let (y0, y1) = (HEIGHT - BOTTOM, TOP);
        let ymax = panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|&(_, y)| y))
            .filter(|y| y.is_finite())
            .fold(0.0, f64::max);
        let (step, top) = nice_axis(ymax, 6);
        let px = |x: f64| x_position(x, &xs, x0, x1);
        let py = |y: f64| y0 - (y / top) * (y0 - y1);

        w(
            &mut svg,
            format_args!(
                r#"<text x="{}" y="{}" text-anchor="middle" font-size="13" font-weight="bold">{}</text>"#,
                (x0 + x1) / 2.0,
                y1 - 10.0,
                escape(&panel.title)
            ),
        );
        // Horizontal grid and y ticks.
        let ticks = (top / step).round() as usize;
        for k in 0..=ticks {
            let v = step * k as f64;
            let y = py(v);
            let colour = if k == 0 { "#000" } else { "#ddd" };
            w(
                &mut svg,
                format_args!(
                    r#"<line x1="{x0:.1}" y1="{y:.1}" x2="{x1:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="1"/>"#
                ),
            );
            w(
                &mut svg,
                format_args!(
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                    x0 - 6.0,
                    y + 4.0,
                    format_tick(v, step)
                ),
            );
        }
        // Vertical axis and x ticks.
        w(
            &mut svg,
            format_args!(
                r##"<line x1="{x0:.1}" y1="{y0:.1}" x2="{x0:.1}" y2="{y1:.1}" stroke="#000" stroke-width="1"/>"##
            ),
        );
        for &x in &xs {
            let x = px(x);
            w(
                &mut svg,
                format_args!(
                    r##"<line x1="{x:.1}" y1="{y0:.1}" x2="{x:.1}" y2="{:.1}" stroke="#000" stroke-width="1"/>"##,
                    y0 + 5.0
                ),
            );
        }
        for &x in &xs {
            w(
                &mut svg,
                format_args!(
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                    px(x),
                    y0 + 19.0,
                    format_tick(x, 1.0)
                ),
            );
        }
        // Axis titles.
        w(
            &mut svg,
            format_args!(
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                (x0 + x1) / 2.0,
                y0 + 42.0,
                escape(&labels.x)
            ),
        );
        let (tx, ty) = (x0 - 52.0, (y0 + y1) / 2.0);
        w(
            &mut svg,
            format_args!(
                r#"<text x="{tx:.1}" y="{ty:.1}" text-anchor="middle" transform="rotate(-90 {tx:.1} {ty:.1})">{}</text>"#,
                escape(&labels.y)
            ),
        );
        // The lines, then their markers on top.
        for s in &panel.series {
            let points: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && *x > 0.0 && y.is_finite())
                .map(|&(x, y)| (px(x), py(y)))
                .collect();
            if points.is_empty() {
                continue;
            }
            let list: Vec<String> = points.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            w(
                &mut svg,
                format_args!(
                    r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2.2" stroke-linejoin="round"/>"#,
                    list.join(" "),
                    COLOURS[s.style % COLOURS.len()]
                ),
            );
            for &(x, y) in &points {
                marker(&mut svg, s.style, x, y);
            }
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// The legend, centred in one row under the subtitle.
fn legend(svg: &mut String, entries: &[(String, usize)]) {
    const ENTRY: f64 = 150.0;
    let start = WIDTH / 2.0 - ENTRY * entries.len() as f64 / 2.0;
    for (i, (text, style)) in entries.iter().enumerate() {
        let x = start + i as f64 * ENTRY;
        let y = 70.0;
        let colour = COLOURS[style % COLOURS.len()];
        let _ = writeln!(
            svg,
            r#"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="2.2"/>"#,
            x + 28.0
        );
        marker(svg, *style, x + 14.0, y);
        let _ = writeln!(svg, r#"<text x="{:.1}" y="{:.1}">{}</text>"#, x + 34.0, y + 4.0, escape(text));
    }
}

/// A point marker: circle, square, diamond or triangle, by style.
fn marker(svg: &mut String, style: usize, x: f64, y: f64) {
    let colour = COLOURS[style % COLOURS.len()];
    let _ = match style % 4 {
        0 => writeln!(svg, r#"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="{colour}"/>"#),
        1 => {
            writeln!(svg, r#"<rect x="{:.1}" y="{:.1}" width="7.5" height="7.5" fill="{colour}"/>"#, x - 3.75, y - 3.75)
        }
        2 => writeln!(
            svg,
            r#"<polygon points="{:.1},{y:.1} {x:.1},{:.1} {:.1},{y:.1} {x:.1},{:.1}" fill="{colour}"/>"#,
            x - 5.0,
            y - 5.0,
            x + 5.0,
            y + 5.0
        ),
        _ => writeln!(
            svg,
            r#"<polygon points="{x:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" fill="{colour}"/>"#,
            y - 5.0,
            x + 4.8,
            y + 4.0,
            x - 4.8,
            y + 4.0
        ),
    };
}

/// Where `x` goes between `x0` and `x1` on a log2 axis spanning `xs` (sorted), with a
/// little room at both ends; a single value sits in the middle.
fn x_position(x: f64, xs: &[f64], x0: f64, x1: f64) -> f64 {
    let (Some(&lo), Some(&hi)) = (xs.first(), xs.last()) else { return (x0 + x1) / 2.0 };
    if hi <= lo {
        return (x0 + x1) / 2.0;
    }
    let pad = (x1 - x0) * 0.05;
    let t = (x.log2() - lo.log2()) / (hi.log2() - lo.log2());
    x0 + pad + t * (x1 - x0 - 2.0 * pad)
}

/// A tick step of 1, 2, 2.5 or 5 times a power of ten giving at most `max_ticks`
/// intervals up to `max`, and the axis top (a multiple of the step at or above `max`).
pub fn nice_axis(max: f64, max_ticks: usize) -> (f64, f64) {
    if !(max.is_finite() && max > 0.0) {
        return (0.2, 1.0);
    }
    let raw = max / max_ticks.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * magnitude).find(|&s| s >= raw).unwrap_or(10.0 * magnitude);
    let top = (max / step).ceil() * step;
    // A point right at the top would touch the frame: keep a little headroom.
    let top = if top - max < 0.03 * top { top + step } else { top };
    (step, top)
}

/// A tick label: as many decimals as the step needs.
fn format_tick(v: f64, step: f64) -> String {
    let decimals = if !(step.is_finite() && step > 0.0) {
        0
    } else {
        let mut d = 0;
        while d < 6 && ((step * 10f64.powi(d)).round() - step * 10f64.powi(d)).abs() > 1e-9 {
            d += 1;
        }
        d as usize
    };
    format!("{v:.decimals$}")
}

/// Escapes text for SVG character data and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_axis_steps_and_tops() {
        assert_eq!(nice_axis(10.0, 5), (2.0, 12.0));
        assert_eq!(nice_axis(9.3, 5), (2.0, 10.0));
        assert_eq!(nice_axis(23.0, 5), (5.0, 25.0));
        assert_eq!(nice_axis(0.9, 5), (0.2, 1.0));
        assert_eq!(nice_axis(11.0, 5), (2.5, 12.5));
        assert_eq!(nice_axis(0.0, 5), (0.2, 1.0));
        assert_eq!(nice_axis(f64::NAN, 5), (0.2, 1.0));
        for max in [0.013, 0.7, 3.3, 42.0, 999.0, 12345.0] {
            let (step, top) = nice_axis(max, 5);
            assert!(top > max && top / step <= 6.0 + 1e-9, "{max}: step {step} top {top}");
        }
    }

    #[test]
    fn tick_labels_show_the_decimals_the_step_needs() {
        assert_eq!(format_tick(2.0, 2.0), "2");
        assert_eq!(format_tick(0.4, 0.2), "0.4");
        assert_eq!(format_tick(7.5, 2.5), "7.5");
        assert_eq!(format_tick(0.05, 0.025), "0.050");
        assert_eq!(format_tick(128.0, 1.0), "128");
    }

    #[test]
    fn log2_x_positions() {
        let xs = [1.0, 8.0, 32.0, 128.0];
        let (x0, x1) = (100.0, 800.0);
        let pad = 35.0;
        assert!((x_position(1.0, &xs, x0, x1) - (x0 + pad)).abs() < 1e-9);
        assert!((x_position(128.0, &xs, x0, x1) - (x1 - pad)).abs() < 1e-9);
        // 8 is 3/7 of the way along log2(1)..log2(128).
        assert!((x_position(8.0, &xs, x0, x1) - (x0 + pad + 3.0 / 7.0 * 630.0)).abs() < 1e-9);
        assert_eq!(x_position(5.0, &[5.0], x0, x1), 450.0);
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape(r#"a<b & "c">'"#), "a&lt;b &amp; &quot;c&quot;&gt;&apos;");
    }

    fn figure() -> String {
        let series = |style, k: f64| Series {
            style,
            points: vec![(1.0, 1.0 * k), (8.0, 4.0 * k), (32.0, 6.0 * k), (128.0, 5.5 * k)],
        };
        let panels = vec![
            Panel {
                title: "poll".into(),
                series: vec![series(0, 1.0), series(1, 2.0), series(2, 3.0), series(3, 4.0)],
            },
            Panel { title: "sleep <&>".into(), series: vec![series(0, 0.5), series(1, 0.25)] },
        ];
        let labels = Labels {
            title: "T".into(),
            subtitle: "S".into(),
            x: "X".into(),
            y: "Y".into(),
            legend: (0..4).map(|i| (format!("layout {i}"), i)).collect(),
        };
        render(&labels, &panels)
    }

    #[test]
    fn svg_has_one_polyline_per_series_and_is_well_formed() {
        let svg = figure();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 6);
        assert!(svg.contains("sleep &lt;&amp;&gt;"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // Every element is self-closed or closed, in order.
        let mut open = Vec::new();
        let mut rest = svg.as_str();
        while let Some(i) = rest.find('<') {
            let end = rest[i..].find('>').expect("tag closes") + i;
            let tag = &rest[i + 1..end];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(open.pop(), Some(name.to_string()));
            } else if !tag.ends_with('/') {
                open.push(tag.split_whitespace().next().unwrap().to_string());
            }
            rest = &rest[end + 1..];
        }
        assert!(open.is_empty(), "unclosed: {open:?}");
    }

    #[test]
    fn all_points_lie_inside_the_figure() {
        let svg = figure();
        for chunk in svg.split("points=\"").skip(1) {
            for pair in chunk[..chunk.find('"').unwrap()].split_whitespace() {
                let (x, y) = pair.split_once(',').unwrap();
                let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
                assert!((0.0..=WIDTH).contains(&x) && (0.0..=HEIGHT).contains(&y), "{pair}");
            }
        }
    }

    #[test]
    fn empty_figure_still_renders() {
        let labels =
            Labels { title: "t".into(), subtitle: String::new(), x: String::new(), y: String::new(), legend: vec![] };
        let svg = render(&labels, &[Panel { title: "p".into(), series: vec![] }]);
        assert!(svg.contains("</svg>") && !svg.contains("NaN"));
    }
}
