//! `backei predict`: the class a trained network gives to images of your own — PNG files, or
//! every image of an IDX file (the MNIST format, `.gz` or not) — and its scores (the output
//! layer's firing rate per class: spike counts / T). The images go through the loader exactly as
//! test images do (the run's encoding), so a prediction equals what `eval` counts.

use crate::data::{Dataset, DatasetKind, Loader, Split};
use crate::engine::Engine;
use crate::error::{BackeiError, Result};
use crate::train::TrainConfig;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One image to classify: where it came from and its pixels (C×H×W, 0..=255).
pub struct Image {
    pub name: String,
    pub pixels: Vec<u8>,
}

/// A prediction: the class, its name (Fashion-MNIST and CIFAR-10 have names), the score of
/// every class.
pub struct Prediction {
    pub name: String,
    pub class: usize,
    pub class_name: Option<&'static str>,
    pub scores: Vec<f32>,
}

const FASHION: [&str; 10] = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];
const CIFAR: [&str; 10] = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// The name of class `c` of a dataset, where its classes have names other than digits.
pub fn class_name(kind: DatasetKind, c: usize) -> Option<&'static str> {
    match kind {
        DatasetKind::FashionMnist => FASHION.get(c).copied(),
        DatasetKind::Cifar10 => CIFAR.get(c).copied(),
        _ => None,
    }
}

fn io(path: &Path, problem: impl Into<String>) -> BackeiError {
    BackeiError::Io { path: path.display().to_string(), problem: problem.into() }
}

/// Reads the images to classify: each path a PNG file, or an IDX file of images (its every
/// image, named `FILE[i]`). `shape` is the network's input (C, H, W); a PNG must have its H×W
/// (colour is turned into grey for one channel, grey repeated for three; alpha is ignored).
pub fn read_images(paths: &[PathBuf], shape: [usize; 3]) -> Result<Vec<Image>> {
    let mut out = Vec::new();
    for path in paths {
        if let Some(what) = crate::data::describe_non_file(path) {
            return Err(io(path, format!("{what}, not an image file")));
        }
        let mut head = [0u8; 8];
        let n = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
            .map_err(|e| io(path, format!("cannot read: {e}")))?;
        if n >= 8 && head == *b"\x89PNG\r\n\x1a\n" {
            out.push(Image { name: path.display().to_string(), pixels: read_png(path, shape)? });
        } else {
            out.extend(read_idx_images(path, shape)?);
        }
    }
    if out.is_empty() {
        return Err(BackeiError::Config { field: "IMAGES".into(), problem: "no image to classify".into() });
    }
    Ok(out)
}

fn read_png(path: &Path, [c, h, w]: [usize; 3]) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| io(path, format!("cannot read: {e}")))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(|e| io(path, format!("not a readable PNG: {e}")))?;
    let (iw, ih) = (reader.info().width as usize, reader.info().height as usize);
    if (ih, iw) != (h, w) {
        return Err(io(
            path,
            format!(
                "the image is {iw}×{ih} pixels; this network takes {w}×{h} (resize it first, e.g. `convert IN -resize {w}x{h}! OUT.png`)"
            ),
        ));
    }
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).map_err(|e| io(path, format!("not a readable PNG: {e}")))?;
    let channels = frame.color_type.samples();
    let px = &buf[..frame.buffer_size()];
    let rgb = |i: usize| -> [u8; 3] {
        let p = &px[i * channels..(i + 1) * channels];
        match channels {
            1 | 2 => [p[0]; 3],
            _ => [p[0], p[1], p[2]],
        }
    };
    let n = h * w;
    let mut out = vec![0u8; c * n];
    for i in 0..n {
        let [r, g, b] = rgb(i);
        if c == 1 {
            // ITU-R BT.601 luma, as PIL's convert("L")
            out[i] = ((299 * r as u32 + 587 * g as u32 + 114 * b as u32 + 500) / 1000) as u8;
        } else {
            for (k, v) in [r, g, b].into_iter().enumerate().take(c) {
                out[k * n + i] = v;
            }
        }
    }
    Ok(out)
}

fn read_idx_images(path: &Path, [c, h, w]: [usize; 3]) -> Result<Vec<Image>> {
    let arr = crate::data::idx::read_idx(path, 3).map_err(|e| {
        io(path, format!("neither a PNG nor an IDX file of images ({e}); predict reads PNG files and IDX image files (.gz or not)"))
    })?;
    if c != 1 || arr.dims[1..] != [h, w] {
        return Err(io(path, format!("the IDX file holds {:?} images; this network takes {c}×{h}×{w}", &arr.dims[1..])));
    }
    Ok(arr
        .data
        .chunks_exact(h * w)
        .enumerate()
        .map(|(i, px)| Image { name: format!("{}[{i}]", path.display()), pixels: px.to_vec() })
        .collect())
}

/// Classifies `images` with `engine` (its parameters loaded), preparing them as the run `cfg`
/// prepares its test images.
pub fn predict(engine: &mut Engine, cfg: &TrainConfig, images: Vec<Image>) -> Result<Vec<Prediction>> {
    let kind = cfg.dataset_kind()?;
    if kind == DatasetKind::Nmnist {
        return Err(BackeiError::Config {
            field: "--checkpoint".into(),
            problem: "an N-MNIST network takes event streams, not images; predict reads PNG and IDX images".into(),
        });
    }
    let shape = cfg.network.input;
    let names: Vec<String> = images.iter().map(|i| i.name.clone()).collect();
    let data: Vec<u8> = images.into_iter().flat_map(|i| i.pixels).collect();
    let labels = vec![0u8; names.len()];
    let set = Arc::new(Dataset::from_raw(kind, Split::Test, shape, 1, data, labels, vec![]));
    let loader = Loader::with_allocator(set, crate::train::run::loader_options(cfg, false)?, engine.buffer_allocator());
    let classes = 10;
    let mut out = Vec::with_capacity(names.len());
    for batch in loader.epoch(0) {
        engine.evaluate(&batch.x, batch.t_in, &batch.labels, cfg.loss)?;
        let scores = engine.last_readout()?;
        let preds = engine.last_predictions()?;
        for (k, (&i, &class)) in batch.indices.iter().zip(&preds).enumerate() {
            out.push(Prediction {
                name: names[i].clone(),
                class,
                class_name: class_name(kind, class),
                scores: scores[k * classes..(k + 1) * classes].to_vec(),
            });
        }
        loader.recycle(batch);
    }
    Ok(out)
}
