//! The self-contained HTML report: inline SVG charts drawn here (no scripts, no
//! network, no fonts beyond the reader's default), a summary table, the chaos log.

use std::fmt::Write;

use crate::report::Report;

/// One point of the run's timeline, sampled about once a second.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tick {
    /// Seconds since the start.
    pub t: f64,
    /// Readings sent so far.
    pub sent: u64,
    /// Readings committed so far.
    pub stored: u64,
    /// Batches the gateway holds that the cloud has not acked.
    pub backlog: u64,
}

/// A shaded time window (a chaos action).
#[derive(Clone, Debug)]
pub struct Window {
    /// Start, seconds.
    pub from: f64,
    /// End, seconds.
    pub to: f64,
    /// Label.
    pub label: String,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// One line of a chart: name, colour, points.
pub type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// A line chart as inline SVG.
pub fn line_chart(title: &str, y_label: &str, series: &[Series<'_>], windows: &[Window]) -> String {
    let (w, h, l, r, t, b) = (760.0, 260.0, 70.0, 20.0, 30.0, 40.0);
    let pts = series.iter().flat_map(|s| s.2.iter());
    let x_max = pts.clone().map(|p| p.0).fold(1.0_f64, f64::max).max(windows.iter().map(|w| w.to).fold(0.0, f64::max));
    let y_max = pts.map(|p| p.1).fold(1.0_f64, f64::max) * 1.08;
    let sx = |x: f64| l + (x / x_max) * (w - l - r);
    let sy = |y: f64| h - b - (y / y_max) * (h - t - b);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(s, r#"<text x="{l}" y="18" font-size="13" font-weight="bold">{}</text>"#, esc(title));
    for win in windows {
        let (x0, x1) = (sx(win.from), sx(win.to.max(win.from + x_max / 300.0)));
        let _ = write!(
            s,
            r##"<rect x="{x0:.1}" y="{t}" width="{:.1}" height="{:.1}" fill="#f4b942" fill-opacity="0.25"><title>{}</title></rect>"##,
            x1 - x0,
            h - t - b,
            esc(&win.label)
        );
    }
    let _ = write!(s, r##"<line x1="{l}" y1="{0}" x2="{1}" y2="{0}" stroke="#444"/>"##, h - b, w - r);
    let _ = write!(s, r##"<line x1="{l}" y1="{t}" x2="{l}" y2="{}" stroke="#444"/>"##, h - b);
    for i in 0..=5 {
        let (xv, yv) = (x_max * i as f64 / 5.0, y_max * i as f64 / 5.0);
        let _ = write!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.0}s</text>"#, sx(xv), h - b + 15.0, xv);
        let _ = write!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, l - 6.0, sy(yv) + 4.0, short(yv));
        let _ = write!(s, r##"<line x1="{l}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/>"##, sy(yv), w - r);
    }
    let _ = write!(
        s,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {0})" text-anchor="middle">{}</text>"#,
        (h - b + t) / 2.0,
        esc(y_label)
    );
    for (i, (name, color, data)) in series.iter().enumerate() {
        let path: Vec<String> = data.iter().map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y))).collect();
        let _ = write!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{}"/>"#, path.join(" "));
        let lx = w - r - 150.0;
        let ly = t + 14.0 * (i as f64 + 1.0);
        let _ = write!(
            s,
            r#"<rect x="{lx}" y="{:.1}" width="10" height="3" fill="{color}"/><text x="{}" y="{ly:.1}">{}</text>"#,
            ly - 4.0,
            lx + 14.0,
            esc(name)
        );
    }
    s.push_str("</svg>");
    s
}

/// A grouped bar chart (expected against detected per category).
pub fn bar_chart(title: &str, bars: &[(String, u64, Option<u64>)]) -> String {
    let (w, h, l, b, t) = (760.0, 240.0, 50.0, 50.0, 30.0);
    let max = bars.iter().map(|x| x.1.max(x.2.unwrap_or(0))).max().unwrap_or(1).max(1) as f64;
    let slot = (w - l - 20.0) / bars.len().max(1) as f64;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(s, r#"<text x="{l}" y="18" font-size="13" font-weight="bold">{}</text>"#, esc(title));
    let _ = write!(s, r##"<line x1="{l}" y1="{0}" x2="{1}" y2="{0}" stroke="#444"/>"##, h - b, w - 20.0);
    for (i, (name, expected, detected)) in bars.iter().enumerate() {
        let x = l + slot * i as f64 + slot * 0.15;
        let bw = slot * 0.32;
        let bar = |v: f64| (v / max) * (h - b - t);
        let he = bar(*expected as f64);
        let _ = write!(
            s,
            r##"<rect x="{x:.1}" y="{:.1}" width="{bw:.1}" height="{he:.1}" fill="#4a7fd4"><title>expected {expected}</title></rect>"##,
            h - b - he
        );
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{expected}</text>"#,
            x + bw / 2.0,
            h - b - he - 3.0
        );
        match detected {
            Some(d) => {
                let hd = bar(*d as f64);
                let _ = write!(
                    s,
                    r##"<rect x="{:.1}" y="{:.1}" width="{bw:.1}" height="{hd:.1}" fill="#3aa66a"><title>detected {d}</title></rect>"##,
                    x + bw,
                    h - b - hd
                );
            }
            None => {
                let _ = write!(
                    s,
                    r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#999">n/a</text>"##,
                    x + bw * 1.5,
                    h - b - 3.0
                );
            }
        }
        let _ = write!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#, x + bw, h - b + 15.0, esc(name));
    }
    let _ = write!(
        s,
        r##"<rect x="{0}" y="{t}" width="10" height="8" fill="#4a7fd4"/><text x="{1}" y="{2}">injected</text><rect x="{0}" y="{3}" width="10" height="8" fill="#3aa66a"/><text x="{1}" y="{4}">detected</text>"##,
        w - 120.0,
        w - 106.0,
        t + 8.0,
        t + 14.0,
        t + 22.0
    );
    s.push_str("</svg>");
    s
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// The whole page.
pub fn page(report: &Report, ticks: &[Tick], latency: &[(f64, f64, f64)], windows: &[Window]) -> String {
    let rate = |f: fn(&Tick) -> u64| -> Vec<(f64, f64)> {
        ticks
            .windows(2)
            .map(|w| (w[1].t, (f(&w[1]).saturating_sub(f(&w[0]))) as f64 / (w[1].t - w[0].t).max(1e-3)))
            .collect()
    };
    let throughput = line_chart(
        "Throughput",
        "readings / s",
        &[("sent by units", "#4a7fd4", rate(|t| t.sent)), ("committed in the cloud", "#3aa66a", rate(|t| t.stored))],
        windows,
    );
    let lat = line_chart(
        "End-to-end latency (stored_at − reading time), by commit second",
        "ms",
        &[
            ("p50", "#4a7fd4", latency.iter().map(|(t, p50, _)| (*t, *p50)).collect()),
            ("max", "#d44a4a", latency.iter().map(|(t, _, m)| (*t, *m)).collect()),
        ],
        windows,
    );
    let backlog = line_chart(
        "Gateway backlog (batches not yet acked by the cloud)",
        "batches",
        &[("backlog", "#d48a4a", ticks.iter().map(|t| (t.t, t.backlog as f64)).collect())],
        windows,
    );
    let bars: Vec<(String, u64, Option<u64>)> =
        report.events.iter().map(|(k, e)| (k.replace('_', " "), e.expected, e.detected)).collect();
    let events = bar_chart("Incidents: injected (ground truth) and detected", &bars);
    let verdict =
        if report.ok() { ("nothing lost, nothing duplicated", "#3aa66a") } else { ("LOSS OR DUPLICATES", "#d44a4a") };
    let row = |k: &str, v: String| format!("<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&v));
    let mut rows = String::new();
    rows += &row("vehicles", report.vehicles.to_string());
    rows += &row("duration", format!("{:.1} s (time scale {})", report.duration_s, report.time_scale));
    rows += &row("seed", report.seed.to_string());
    rows += &row(
        "samples sent / acked / stored",
        format!("{} / {} / {}", report.samples_sent, report.samples_acked, report.samples_stored),
    );
    rows += &row(
        "samples lost / still queued / duplicated",
        format!("{} / {} / {}", report.samples_lost, report.samples_still_queued, report.samples_duplicated),
    );
    rows += &row("throughput", format!("{:.0} samples/s", report.throughput_samples_per_s));
    let l = report.e2e_latency_ms;
    rows += &row("end-to-end latency", format!("p50 {} ms · p99 {} ms · max {} ms", l.p50, l.p99, l.max));
    let l = report.ingest_latency_ms;
    rows += &row("ingest latency", format!("p50 {} ms · p99 {} ms · max {} ms", l.p50, l.p99, l.max));
    rows += &row("readings", report.readings_parquet_glob.clone());
    let pct = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{:.0} %", v * 100.0));
    for (kind, e) in &report.events {
        rows += &row(
            &format!("events: {}", kind.replace('_', " ")),
            format!(
                "injected {}{} · detected {} · precision {} · recall {}",
                e.expected,
                if e.unmatured > 0 {
                    format!(" (+{} too late in the run to be seen, not scored)", e.unmatured)
                } else {
                    String::new()
                },
                e.detected.map_or("n/a".to_string(), |d| d.to_string()),
                pct(e.precision),
                pct(e.recall)
            ),
        );
    }
    let chaos: String = report.chaos.iter().map(|c| format!("<li>{}</li>", esc(c))).collect();
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>Fleetline demo report</title>
<style>body{{font-family:sans-serif;max-width:800px;margin:2em auto;color:#222}} th{{text-align:left;padding-right:1em;font-weight:normal;color:#555}} td{{font-family:monospace}} .v{{font-size:1.3em;font-weight:bold;color:{color}}}</style>
</head><body><h1>Fleetline demo report</h1><p class="v">{verdict}</p><table>{rows}</table>
<h2>Chaos</h2><ul>{chaos}</ul>{none}
<h2>Charts</h2>{throughput}<br>{lat}<br>{backlog}<br>{events}
</body></html>"#,
        color = verdict.1,
        verdict = verdict.0,
        none = if report.chaos.is_empty() { "<p>none</p>" } else { "" },
    )
}
