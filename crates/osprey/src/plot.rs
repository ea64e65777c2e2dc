//! Plots and the HTML report of a benchmark run, drawn with `plotters`: every chart is
//! written as SVG (for the report and diffs) and PNG (for anything that shows pictures).
//! Text in PNGs uses DejaVu Sans, embedded in the binary (`assets/DejaVuSans.ttf`, its licence
//! beside it): this machine has no fontconfig, and a binary should not depend on one.

use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const SIZE: (u32, u32) = (820, 400);

const COLORS: [RGBColor; 11] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0, 0, 0),
];

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The embedded file is a valid TrueType font; a failure would leave PNG text out, not
        // the plot (plotters reports it when drawing text).
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn err(e: impl std::fmt::Display) -> String {
    format!("plot: {e}")
}

/// Writes `stem.svg` and `stem.png`, drawn by `draw` on each backend.
fn both(
    stem: &Path,
    draw: impl Fn(&DrawingArea<SVGBackend, Shift>) -> Result<(), String>,
    draw_png: impl Fn(&DrawingArea<BitMapBackend, Shift>) -> Result<(), String>,
) -> Result<(), String> {
    register_font();
    let svg = stem.with_extension("svg");
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        draw(&root)?;
        root.present().map_err(err)?;
    }
    let png = stem.with_extension("png");
    let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
    draw_png(&root)?;
    root.present().map_err(err)?;
    Ok(())
}

fn draw_lines<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    lines: &[(String, Vec<(f64, f64)>)],
) -> Result<(), String> {
    root.fill(&WHITE).map_err(err)?;
    let xs = lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)).filter(|x| x.is_finite());
    let ys = lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)).filter(|y| y.is_finite());
    let xmax = xs.fold(1e-9, f64::max);
    // An all-zero series (no late answer at all) still gets a readable 0..1 axis.
    let ymax = match ys.fold(0.0, f64::max) {
        m if m > 1e-9 => m * 1.08,
        _ => 1.0,
    };
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(38)
        .y_label_area_size(58)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 12))
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .draw()
        .map_err(err)?;
    for (k, (name, pts)) in lines.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        let pts: Vec<(f64, f64)> =
            pts.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3)));
    }
    if !lines.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(0xbb, 0xbb, 0xbb))
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

fn draw_bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    bars: &[(String, f64)],
) -> Result<(), String> {
    root.fill(&WHITE).map_err(err)?;
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let hi = bars.iter().map(|b| finite(b.1)).fold(0.0, f64::max);
    let lo = bars.iter().map(|b| finite(b.1)).fold(0.0, f64::min);
    let pad = (hi - lo).max(1e-9) * 0.12;
    // The names go in a legend below the chart, three to a row, each by its bar's colour.
    let columns = 3;
    let legend_rows = bars.len().div_ceil(columns).max(1) as u32;
    let (top, bottom) = root.split_vertically(SIZE.1 - 10 - 18 * legend_rows);
    let n = bars.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(6)
        .y_label_area_size(58)
        .build_cartesian_2d(0f64..n, (lo - if lo < 0.0 { pad } else { 0.0 })..(hi + pad))
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .label_style(("sans-serif", 12))
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(k, (_, v))| {
            let c = COLORS[k % COLORS.len()];
            Rectangle::new([(k as f64 + 0.12, 0.0), (k as f64 + 0.88, finite(*v))], c.filled())
        }))
        .map_err(err)?;
    let font = ("sans-serif", 12).into_font();
    chart
        .draw_series(bars.iter().enumerate().map(|(k, (_, v))| {
            let v = finite(*v);
            let y = if v >= 0.0 { v + pad * 0.6 } else { v - pad * 0.2 };
            Text::new(format!("{v:.3}"), (k as f64 + 0.3, y), font.clone())
        }))
        .map_err(err)?;
    let width = (SIZE.0 as i32 - 80) / columns as i32;
    for (k, (name, _)) in bars.iter().enumerate() {
        let x = 70 + (k % columns) as i32 * width;
        let y = 2 + (k / columns) as i32 * 18;
        let c = COLORS[k % COLORS.len()];
        bottom.draw(&Rectangle::new([(x, y + 2), (x + 12, y + 14)], c.filled())).map_err(err)?;
        bottom.draw(&Text::new(format!("{}. {name}", k + 1), (x + 18, y + 2), font.clone())).map_err(err)?;
    }
    Ok(())
}

fn draw_grouped_bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
) -> Result<(), String> {
    root.fill(&WHITE).map_err(err)?;
    let finite = |v: f64| if v.is_finite() { v.max(0.0) } else { 0.0 };
    let hi = series.iter().flat_map(|(_, v)| v.iter().map(|&x| finite(x))).fold(0.0, f64::max);
    // Headroom above the tallest bar for the legend.
    let top_y = if hi > 1e-9 { hi * 1.35 } else { 1.0 };
    let n = groups.len().max(1) as f64;
    let k = series.len().max(1) as f64;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(58)
        .build_cartesian_2d(0f64..n, 0f64..top_y)
        .map_err(err)?;
    let names: Vec<String> = groups.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| {
            // Each group's name under its middle.
            let g = x.floor();
            if (x - g - 0.5).abs() < 1e-6 {
                names.get(g as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .label_style(("sans-serif", 12))
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .draw()
        .map_err(err)?;
    let width = 0.8 / k;
    for (j, (name, values)) in series.iter().enumerate() {
        let c = COLORS[j % COLORS.len()];
        chart
            .draw_series(values.iter().enumerate().map(|(g, &v)| {
                let x0 = g as f64 + 0.1 + j as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.92, finite(v))], c.filled())
            }))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(0xbb, 0xbb, 0xbb))
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// A line chart over time, one line per series: `stem.svg` and `stem.png`.
pub fn lines(
    stem: &Path,
    title: &str,
    y_label: &str,
    lines: &[(String, Vec<(f64, f64)>)],
) -> Result<(), String> {
    lines_with_x(stem, title, "time (s)", y_label, lines)
}

/// [`lines`] with another x axis.
pub fn lines_with_x(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<(), String> {
    both(
        stem,
        |r| draw_lines(r, title, x_label, y_label, series),
        |r| draw_lines(r, title, x_label, y_label, series),
    )
}

/// A bar chart of one value per policy (negative values below the axis).
pub fn bars(stem: &Path, title: &str, bars: &[(String, f64)]) -> Result<(), String> {
    both(stem, |r| draw_bars(r, title, bars), |r| draw_bars(r, title, bars))
}

/// Bars side by side per group (x axis: `groups`, e.g. policies), one colour per series
/// (e.g. tenants), each series holding one value per group: `stem.svg` and `stem.png`.
pub fn grouped_bars(
    stem: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
) -> Result<(), String> {
    both(
        stem,
        |r| draw_grouped_bars(r, title, y_label, groups, series),
        |r| draw_grouped_bars(r, title, y_label, groups, series),
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// `report.html`: the title, notes, a table from CSV text (first line the header) and the
/// named plots (`stem` → `stem.svg` beside the report).
pub fn report(dir: &Path, title: &str, notes: &[String], csv: &str, plots: &[&str]) -> Result<(), String> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let mut html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>\
         body{{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d232a}}\
         table{{border-collapse:collapse;margin:12px 0 24px}}th,td{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right;font-variant-numeric:tabular-nums}}\
         th:first-child,td:first-child{{text-align:left}}th{{color:#555}}img{{max-width:100%;border:1px solid #eee;margin:6px 0}}\
         .notes{{color:#555}}</style></head><body>\n<h1>{t}</h1>\n",
        t = escape(title)
    );
    for n in notes {
        html.push_str(&format!("<p class=\"notes\">{}</p>\n", escape(n)));
    }
    html.push_str("<table>\n<tr>");
    for h in &header {
        html.push_str(&format!("<th>{}</th>", escape(h)));
    }
    html.push_str("</tr>\n");
    for l in lines.filter(|l| !l.trim().is_empty()) {
        html.push_str("<tr>");
        for c in l.split(',') {
            html.push_str(&format!("<td>{}</td>", escape(c)));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
    for p in plots {
        html.push_str(&format!(
            "<figure><img src=\"{p}.svg\" alt=\"{p}\"><figcaption><a href=\"{p}.png\">{p}.png</a></figcaption></figure>\n",
            p = escape(p)
        ));
    }
    html.push_str("</body></html>\n");
    let path = dir.join("report.html");
    std::fs::write(&path, html).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_written_as_svg_and_png_with_text() {
        let dir = std::env::temp_dir().join(format!("osprey-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let l =
            vec![("a".to_string(), vec![(0.0, 1.0), (1.0, 2.0)]), ("b".into(), vec![(0.0, 0.5), (1.0, 0.2)])];
        lines(&dir.join("l"), "late %", "late", &l).unwrap();
        bars(&dir.join("b"), "utility", &[("x".into(), 0.4), ("y".into(), -0.2)]).unwrap();
        let groups = ["p".to_string(), "q".to_string()];
        grouped_bars(&dir.join("g"), "accuracy", "acc", &groups, &[("t".into(), vec![0.9, 0.8])]).unwrap();
        for stem in ["l", "b", "g"] {
            let svg = std::fs::read_to_string(dir.join(format!("{stem}.svg"))).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("<text"), "{svg}");
            let png = std::fs::read(dir.join(format!("{stem}.png"))).unwrap();
            assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 2000);
        }
        assert!(std::fs::read_to_string(dir.join("l.svg")).unwrap().contains("late %"));
        report(&dir, "t <x>", &["n".into()], "policy,v\na,1\n", &["l", "b"]).unwrap();
        let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
        assert!(
            html.contains("<td>a</td><td>1</td>") && html.contains("l.svg") && html.contains("t &lt;x&gt;")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
