//! `backei data inspect`: counts per split and class, pixel mean and std, file checksums,
//! and an image grid of the first 64 samples.

use super::fetch::{sha256_bytes, sha256_file};
use super::{embedded, DataError, Dataset, DatasetKind, LoadOptions, Split};
use std::fmt;
use std::path::Path;

/// Statistics of one split.
#[derive(Clone, Debug)]
pub struct SplitStats {
    pub split: Split,
    pub count: usize,
    pub per_class: [usize; 10],
    /// Per channel: mean and std of intensities scaled to [0, 1] (event counts for N-MNIST,
    /// per frame).
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// A file and its SHA-256.
#[derive(Clone, Debug)]
pub struct FileSum {
    pub name: String,
    pub sha256: String,
}

/// What `inspect` reports.
#[derive(Clone, Debug)]
pub struct Report {
    pub kind: DatasetKind,
    pub shape: [usize; 3],
    pub frames: usize,
    pub splits: Vec<SplitStats>,
    pub files: Vec<FileSum>,
}

/// Counts and per-channel pixel statistics of a dataset.
pub fn stats(ds: &Dataset) -> SplitStats {
    let mut per_class = [0usize; 10];
    for &l in ds.labels() {
        per_class[l as usize] += 1;
    }
    let [c, h, w] = ds.shape();
    let plane = h * w;
    let scale = if ds.is_event_counts() { 1.0 } else { 1.0 / 255.0 };
    // Histogram per channel: exact and fast.
    let mut hist = vec![[0u64; 256]; c];
    for s in ds.raw().chunks_exact(c * plane) {
        for (ch, p) in s.chunks_exact(plane).enumerate() {
            let hh = &mut hist[ch];
            for &b in p {
                hh[b as usize] += 1;
            }
        }
    }
    let mut mean = Vec::with_capacity(c);
    let mut std = Vec::with_capacity(c);
    for hh in &hist {
        let n: u64 = hh.iter().sum();
        let n = n.max(1) as f64;
        let m: f64 = hh.iter().enumerate().map(|(b, &k)| b as f64 * scale * k as f64).sum::<f64>() / n;
        let v: f64 = hh.iter().enumerate().map(|(b, &k)| (b as f64 * scale - m).powi(2) * k as f64).sum::<f64>() / n;
        mean.push(m);
        std.push(v.sqrt());
    }
    SplitStats { split: ds.split(), count: ds.len(), per_class, mean, std }
}

/// Loads both splits, computes statistics and checksums. Returns the report and the train
/// split (for [`render_grid`]).
pub fn inspect(kind: DatasetKind, opts: &LoadOptions) -> Result<(Report, Dataset), DataError> {
    let train = Dataset::load(kind, Split::Train, opts)?;
    let test = Dataset::load(kind, Split::Test, opts)?;
    let mut files = Vec::new();
    if kind == DatasetKind::MnistSample {
        for s in [Split::Train, Split::Test] {
            for (name, bytes) in embedded::files(s) {
                files.push(FileSum { name: name.into(), sha256: sha256_bytes(bytes) });
            }
        }
    } else {
        for p in train.sources().iter().chain(test.sources()) {
            if p.is_file() {
                files.push(FileSum { name: p.display().to_string(), sha256: sha256_file(p)? });
            }
        }
    }
    let report = Report { kind, shape: train.shape(), frames: train.frames(), splits: vec![stats(&train), stats(&test)], files };
    Ok((report, train))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [c, h, w] = self.shape;
        writeln!(f, "dataset {}: samples of {c}×{h}×{w}, {} frame(s)", self.kind, self.frames)?;
        let unit = if self.kind == DatasetKind::Nmnist { "event counts per pixel per frame" } else { "pixels scaled to [0,1]" };
        for s in &self.splits {
            writeln!(f, "{}: {} samples", s.split, s.count)?;
            let pc: Vec<String> = s.per_class.iter().enumerate().map(|(k, n)| format!("{k}:{n}")).collect();
            writeln!(f, "  per class: {}", pc.join(" "))?;
            let ms: Vec<String> = s.mean.iter().zip(&s.std).map(|(m, d)| format!("{m:.4}±{d:.4}")).collect();
            writeln!(f, "  mean±std ({unit}, per channel): {}", ms.join(", "))?;
        }
        if !self.files.is_empty() {
            writeln!(f, "files (SHA-256):")?;
            for x in &self.files {
                writeln!(f, "  {}  {}", x.sha256, x.name)?;
            }
        }
        Ok(())
    }
}

/// Renders the first `n` (≤ 64) samples as an 8-column PNG grid (N-MNIST: frames summed,
/// OFF events red, ON events green).
pub fn render_grid(ds: &Dataset, n: usize, out: &Path) -> Result<(), DataError> {
    let n = n.min(ds.len()).min(64);
    let [c, h, w] = ds.shape();
    let cols = 8usize;
    let rows = n.div_ceil(cols).max(1);
    let (gw, gh) = (cols * (w + 1) + 1, rows * (h + 1) + 1);
    let mut img = vec![64u8; gw * gh * 3];
    let plane = h * w;
    for i in 0..n {
        let (gx, gy) = ((i % cols) * (w + 1) + 1, (i / cols) * (h + 1) + 1);
        let s = ds.sample(i);
        let mut rgb = vec![[0u8; 3]; plane];
        if ds.is_event_counts() {
            let mut sum = vec![[0u32; 2]; plane];
            for fr in s.chunks_exact(c * plane) {
                for (p, ch) in fr.chunks_exact(plane).enumerate().take(2) {
                    for (k, &v) in ch.iter().enumerate() {
                        sum[k][p] += v as u32;
                    }
                }
            }
            let max = sum.iter().flat_map(|v| v.iter()).copied().max().unwrap_or(0).max(1);
            for (o, v) in rgb.iter_mut().zip(&sum) {
                *o = [(v[0] * 255 / max) as u8, (v[1] * 255 / max) as u8, 0];
            }
        } else {
            for (k, o) in rgb.iter_mut().enumerate() {
                *o = if c == 3 { [s[k], s[plane + k], s[2 * plane + k]] } else { [s[k]; 3] };
            }
        }
        for y in 0..h {
            for x in 0..w {
                let o = ((gy + y) * gw + gx + x) * 3;
                img[o..o + 3].copy_from_slice(&rgb[y * w + x]);
            }
        }
    }
    let fail = |cause: String| DataError::Write { path: out.to_path_buf(), what: "the PNG grid".into(), cause };
    let mut png_bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png_bytes, gw as u32, gh as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(|e| fail(e.to_string()))?;
        wr.write_image_data(&img).map_err(|e| fail(e.to_string()))?;
        wr.finish().map_err(|e| fail(e.to_string()))?;
    }
    crate::atomic_file::write(out, &png_bytes).map_err(|e| fail(e.to_string()))
}
