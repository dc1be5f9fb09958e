//! `backei plot`: test accuracy, and training and test loss, against epoch for one or more runs
//! in one figure, each run named from its config (dataset, back/ei, T) — the paper's ablation at
//! a glance. Without `-o` the figure goes to `plot.png` in the run folder (one run) or in the
//! folder holding the runs (several).
//! Pure-Rust rendering (plotters + an embedded DejaVu font): no system font libraries.

use crate::error::{BackeiError, Result};
use crate::train::metrics::{EpochRow, MetricsWriter};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// One run's curves and legend label.
pub struct RunCurves {
    pub label: String,
    pub rows: Vec<EpochRow>,
}

/// A legend label from a run folder's config.json: dataset, the mechanisms on, T.
pub fn run_label(dir: &Path) -> Result<String> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| BackeiError::Io { path: path.display().to_string(), problem: format!("{e} (is this a run folder?)") })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| BackeiError::Io { path: path.display().to_string(), problem: e.to_string() })?;
    let c = &v["config"];
    let fb = &c["network"]["feedback"];
    let mech = match (fb["back"].as_bool(), fb["ei"].as_bool()) {
        (Some(true), Some(true)) => "back+ei",
        (Some(true), _) => "back",
        (_, Some(true)) => "ei",
        _ => "plain",
    };
    Ok(format!("{} {mech} T={}", c["dataset"].as_str().unwrap_or("?"), c["network"]["steps"]))
}

pub fn load_runs(dirs: &[PathBuf]) -> Result<Vec<RunCurves>> {
    dirs.iter()
        .map(|d| {
            let label = run_label(d)?; // first: a folder without config.json is not a run
            let rows = MetricsWriter::read(d)?;
            if rows.is_empty() {
                return Err(BackeiError::Io {
                    path: d.join("metrics.jsonl").display().to_string(),
                    problem: "no epochs recorded yet".into(),
                });
            }
            Ok(RunCurves { label, rows })
        })
        .collect::<Result<Vec<_>>>()
        .map(|mut runs| {
            // runs that differ only in settings the label leaves out are told apart by folder
            let labels: Vec<String> = runs.iter().map(|r| r.label.clone()).collect();
            for (r, d) in runs.iter_mut().zip(dirs) {
                if labels.iter().filter(|l| **l == r.label).count() > 1 {
                    r.label = format!("{} ({})", r.label, d.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default());
                }
            }
            runs
        })
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, runs: &[RunCurves]) -> std::result::Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let (left, right) = root.split_horizontally(root.dim_in_pixel().0 / 2);
    let max_epoch = runs.iter().flat_map(|r| r.rows.iter().map(|x| x.epoch)).max().unwrap_or(1).max(2);
    let acc = |r: &EpochRow| r.test_accuracy.unwrap_or(0.0) * 100.0;
    let (amin, amax) = runs.iter().flat_map(|r| r.rows.iter().map(acc)).fold((100.0f64, 0.0f64), |(lo, hi), a| (lo.min(a), hi.max(a)));
    let lmax =
        runs.iter().flat_map(|r| r.rows.iter().flat_map(|x| [Some(x.train_loss), x.test_loss]).flatten()).fold(0.0f64, f64::max).max(1e-6);
    let mut ch = ChartBuilder::on(&left)
        .caption("test accuracy (%)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d(1usize..max_epoch, (amin - 1.0).max(0.0)..(amax + 1.0).min(100.0))
        .map_err(e)?;
    ch.configure_mesh().x_desc("epoch").draw().map_err(e)?;
    for (i, r) in runs.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        ch.draw_series(LineSeries::new(r.rows.iter().map(|x| (x.epoch, acc(x))), color.stroke_width(2)))
            .map_err(e)?
            .label(r.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(e)?;
    let mut ch = ChartBuilder::on(&right)
        .caption("loss (solid: training, dashed: test)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(1usize..max_epoch, 0.0..lmax * 1.05)
        .map_err(e)?;
    ch.configure_mesh().x_desc("epoch").draw().map_err(e)?;
    for (i, r) in runs.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        ch.draw_series(LineSeries::new(r.rows.iter().map(|x| (x.epoch, x.train_loss)), color.stroke_width(2))).map_err(e)?;
        let test: Vec<(usize, f64)> = r.rows.iter().filter_map(|x| x.test_loss.map(|l| (x.epoch, l))).collect();
        ch.draw_series(DashedLineSeries::new(test, 8, 5, color.stroke_width(2))).map_err(e)?;
    }
    root.present().map_err(e)
}

/// Where `plot` writes without `-o`: `plot.png` in the run folder of one run; for several, in
/// the folder that holds them all (the current folder if none does).
pub fn default_output(dirs: &[PathBuf]) -> PathBuf {
    match dirs {
        [one] => one.join("plot.png"),
        _ => {
            let parents: Vec<Option<&Path>> = dirs.iter().map(|d| d.parent()).collect();
            match parents.first() {
                Some(Some(p)) if parents.iter().all(|q| q == &Some(*p)) => p.join("plot.png"),
                _ => PathBuf::from("plot.png"),
            }
        }
    }
}

/// Renders the runs' curves to `out` (.png or .svg), written atomically.
pub fn plot_runs(dirs: &[PathBuf], out: &Path) -> Result<()> {
    let runs = load_runs(dirs)?;
    register_font();
    let fail = |problem: String| BackeiError::Io { path: out.display().to_string(), problem };
    let (w, h) = (1200u32, 480u32);
    let bytes = match out.extension().and_then(|e| e.to_str()) {
        Some("png") => {
            let mut rgb = vec![0u8; (w * h * 3) as usize];
            draw(BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area(), &runs).map_err(fail)?;
            let mut png_bytes = Vec::new();
            let mut enc = png::Encoder::new(&mut png_bytes, w, h);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header().map_err(|e| fail(e.to_string()))?;
            writer.write_image_data(&rgb).map_err(|e| fail(e.to_string()))?;
            writer.finish().map_err(|e| fail(e.to_string()))?;
            png_bytes
        }
        Some("svg") => {
            let mut svg = String::new();
            draw(SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area(), &runs).map_err(fail)?;
            svg.into_bytes()
        }
        _ => return Err(fail("the output must end in .png or .svg".into())),
    };
    crate::atomic_file::write(out, &bytes).map_err(|e| fail(format!("cannot write: {e}")))
}
