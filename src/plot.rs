//! `backei plot`: test accuracy and training loss against epoch for several runs in one figure,
//! each run named from its config (dataset, back/ei, T) — the paper's ablation at a glance.
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
    let lmax = runs.iter().flat_map(|r| r.rows.iter().map(|x| x.train_loss)).fold(0.0f64, f64::max).max(1e-6);
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
        .caption("training loss", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(1usize..max_epoch, 0.0..lmax * 1.05)
        .map_err(e)?;
    ch.configure_mesh().x_desc("epoch").draw().map_err(e)?;
    for (i, r) in runs.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        ch.draw_series(LineSeries::new(r.rows.iter().map(|x| (x.epoch, x.train_loss)), color.stroke_width(2))).map_err(e)?;
    }
    root.present().map_err(e)
}

/// Renders the runs' curves to `out` (.png or .svg).
pub fn plot_runs(dirs: &[PathBuf], out: &Path) -> Result<()> {
    let runs = load_runs(dirs)?;
    register_font();
    let fail = |problem: String| BackeiError::Io { path: out.display().to_string(), problem };
    let size = (1200, 480);
    match out.extension().and_then(|e| e.to_str()) {
        Some("png") => draw(BitMapBackend::new(out, size).into_drawing_area(), &runs).map_err(fail),
        Some("svg") => draw(SVGBackend::new(out, size).into_drawing_area(), &runs).map_err(fail),
        _ => Err(fail("the output must end in .png or .svg".into())),
    }
}
