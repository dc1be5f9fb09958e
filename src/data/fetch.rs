//! `backei data fetch`: downloads the standard files from their usual public locations
//! (trying them in order) with a progress bar; verifies each against the checksum in the code;
//! resumes a partial download (`<name>.part`, HTTP `Range`); never leaves a half file under the
//! final name (the `.part` file is renamed only after verification). A mirror (`--mirror URL`,
//! `$BACKEI_MIRROR`) replaces the usual locations of every file by `<URL>/<file name>`, checked
//! against the same checksums: for institutions with their own copy, and for the tests, which
//! never reach outside hosts.
//!
//! A checksum is a SHA-256 or, where the publisher gives nothing else, an MD5; the SHA-256 of
//! every file is computed and printed whichever algorithm verified it. Files already in the
//! folder (a previous fetch, or downloaded by hand) are verified the same way and not fetched
//! again; a copy that does not verify is downloaded anew and replaced only once the new one
//! verifies.
//!
//! Checksums in the code:
//! * MNIST: the published SHA-256 of each `.gz` file (the values torchvision uses).
//! * Fashion-MNIST: the SHA-256 of the *decompressed* IDX content, computed from the Debian
//!   package `dataset-fashion-mnist` (its `.gz` files are recompressed, so the compressed bytes
//!   differ from upstream while the content is the same).
//! * CIFAR-10: the SHA-256 of `cifar-10-binary.tar.gz`, recorded next to the publisher's MD5.
//! * N-MNIST: its publisher distributes `Train.zip` and `Test.zip` through Mendeley Data
//!   (dataset 468j46mzdv) with MD5 checksums only; the code has those MD5s.

use super::{DataError, DatasetKind};
use md5::Md5;
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a checksum is computed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChecksumOf {
    /// The downloaded bytes.
    File,
    /// The content of a gzip file after decompression.
    Gunzipped,
}

/// A checksum's hash function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Sha256,
    /// Only where the publisher gives nothing stronger (N-MNIST).
    Md5,
}

impl Algorithm {
    /// "SHA-256" or "MD5", as messages print it.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "SHA-256",
            Algorithm::Md5 => "MD5",
        }
    }

    /// Hex digits of a digest.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Md5 => 32,
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The checksum a file must have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checksum {
    pub of: ChecksumOf,
    pub algorithm: Algorithm,
    /// Hex digest (compared case-insensitively).
    pub hex: String,
}

impl Checksum {
    pub fn sha256(of: ChecksumOf, hex: impl Into<String>) -> Checksum {
        Checksum { of, algorithm: Algorithm::Sha256, hex: hex.into().to_ascii_lowercase() }
    }

    pub fn md5(of: ChecksumOf, hex: impl Into<String>) -> Checksum {
        Checksum { of, algorithm: Algorithm::Md5, hex: hex.into().to_ascii_lowercase() }
    }

    /// The digest of this checksum's algorithm among `d`.
    fn found(&self, d: &Digests) -> String {
        match self.algorithm {
            Algorithm::Sha256 => d.sha256.clone(),
            Algorithm::Md5 => d.md5.clone().unwrap_or_default(),
        }
    }

    fn matches(&self, d: &Digests) -> bool {
        self.found(d).eq_ignore_ascii_case(&self.hex)
    }
}

/// What to do with a file after download.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unpack {
    None,
    /// A `.tar.gz` whose regular files are extracted into the folder.
    TarGz,
    /// A `.zip` extracted into the folder.
    Zip,
}

/// One file to download.
#[derive(Clone, Debug)]
pub struct RemoteFile {
    pub name: String,
    /// Tried in order.
    pub urls: Vec<String>,
    pub checksum: Option<Checksum>,
    pub unpack: Unpack,
}

const MNIST_URLS: [&str; 2] = [
    "https://yann.lecun.com/exdb/mnist/",
    // Mirror (the one torchvision uses); the usual location is often unavailable.
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
];
const FASHION_URL: &str = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/";
const CIFAR_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// Where N-MNIST is described and linked from: the manual route (put `Train.zip` and `Test.zip`
/// from there into the folder; `fetch` verifies and unpacks them without downloading).
pub const NMNIST_PAGE: &str = "https://www.garrickorchard.com/datasets/n-mnist";
/// Where N-MNIST's files are distributed (Mendeley Data, dataset 468j46mzdv).
const NMNIST_URL: &str = "https://data.mendeley.com/public-files/datasets/468j46mzdv/files/";
/// (file name, file id on Mendeley Data, MD5) of N-MNIST's two archives. The publisher gives
/// MD5s only; these URLs and MD5s are the values the `tonic` library uses for N-MNIST. Each zip
/// holds one top-level folder (`Train/`, `Test/`) of `<digit>/*.bin`, the layout
/// `nmnist::load_dir` reads once it is unpacked into the dataset folder.
const NMNIST_MD5: [(&str, &str, &str); 2] = [
    ("Train.zip", "39c25547-014b-4137-a934-9d29fa53c7a0", "20959b8e626244a1b502305a9e6e2031"),
    ("Test.zip", "05a4d654-7e03-4c15-bdfa-9bb2bcbea494", "69ca8762b2fe404d9b9bad1103e97832"),
];

/// SHA-256 of the decompressed Fashion-MNIST files (from Debian's `dataset-fashion-mnist`).
const FASHION_SHA256: [(&str, &str); 4] = [
    ("train-images-idx3-ubyte.gz", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    ("train-labels-idx1-ubyte.gz", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    ("t10k-images-idx3-ubyte.gz", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    ("t10k-labels-idx1-ubyte.gz", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
];

/// SHA-256 of `cifar-10-binary.tar.gz` (170,052,171 bytes). Its publisher lists only the MD5
/// c32a1d4ab5d03f1284b67883e8d87530; this SHA-256 is the one recorded, next to that MD5, by
/// independent verifications of the same archive.
const CIFAR_SHA256: &str = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd";

/// SHA-256 of the standard MNIST .gz files as published (the same four values appear in
/// torchvision's dataset definitions and many independent download scripts).
const MNIST_SHA256: [(&str, &str); 4] = [
    ("train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    ("train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    ("t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    ("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
];

/// The files `fetch` downloads for a dataset (none for the embedded sample).
pub fn remote_files(kind: DatasetKind) -> Vec<RemoteFile> {
    match kind {
        DatasetKind::MnistSample => vec![],
        DatasetKind::Mnist => MNIST_SHA256
            .iter()
            .map(|(n, h)| RemoteFile {
                name: n.to_string(),
                urls: MNIST_URLS.iter().map(|u| format!("{u}{n}")).collect(),
                checksum: Some(Checksum::sha256(ChecksumOf::File, *h)),
                unpack: Unpack::None,
            })
            .collect(),
        DatasetKind::FashionMnist => FASHION_SHA256
            .iter()
            .map(|(n, h)| RemoteFile {
                name: n.to_string(),
                urls: vec![format!("{FASHION_URL}{n}")],
                checksum: Some(Checksum::sha256(ChecksumOf::Gunzipped, *h)),
                unpack: Unpack::None,
            })
            .collect(),
        DatasetKind::Cifar10 => {
            vec![RemoteFile {
                name: "cifar-10-binary.tar.gz".into(),
                urls: vec![CIFAR_URL.into()],
                checksum: Some(Checksum::sha256(ChecksumOf::File, CIFAR_SHA256)),
                unpack: Unpack::TarGz,
            }]
        }
        DatasetKind::Nmnist => NMNIST_MD5
            .iter()
            .map(|(n, id, h)| RemoteFile {
                name: n.to_string(),
                urls: vec![format!("{NMNIST_URL}{id}/file_downloaded")],
                checksum: Some(Checksum::md5(ChecksumOf::File, *h)),
                unpack: Unpack::Zip,
            })
            .collect(),
    }
}

/// `file` fetched from `mirror` instead of its usual locations: `<mirror>/<file name>`, with
/// the same checksum.
pub fn mirrored(file: &RemoteFile, mirror: &str) -> RemoteFile {
    RemoteFile { urls: vec![format!("{}/{}", mirror.trim_end_matches('/'), file.name)], ..file.clone() }
}

/// Result of fetching one file.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub path: PathBuf,
    /// SHA-256 of what was checked (see [`ChecksumOf`]), whichever algorithm verified it.
    pub sha256: String,
    /// True if it matched a checksum in the code; false if there was none to check.
    pub verified: bool,
    /// The algorithm that verified it (None when not verified).
    pub algorithm: Option<Algorithm>,
    /// True if the file was already there (and verified, when possible).
    pub already_present: bool,
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The digests of one pass over some bytes: SHA-256 always, MD5 when asked for.
struct Digests {
    sha256: String,
    md5: Option<String>,
}

fn digest_reader(r: &mut dyn Read, md5: bool, err: &dyn Fn(std::io::Error) -> DataError) -> Result<Digests, DataError> {
    let mut sha = Sha256::new();
    let mut m = md5.then(Md5::new);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        if let Some(m) = m.as_mut() {
            m.update(&buf[..n]);
        }
    }
    Ok(Digests { sha256: hex(&sha.finalize()), md5: m.map(|m| hex(&m.finalize())) })
}

/// SHA-256 of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String, DataError> {
    digests_of(path, ChecksumOf::File, false).map(|d| d.sha256)
}

/// MD5 of a file's bytes.
pub fn md5_file(path: &Path) -> Result<String, DataError> {
    digests_of(path, ChecksumOf::File, true).map(|d| d.md5.unwrap_or_default())
}

/// SHA-256 of bytes.
pub fn sha256_bytes(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

/// MD5 of bytes.
pub fn md5_bytes(b: &[u8]) -> String {
    hex(&Md5::digest(b))
}

fn digests_of(path: &Path, of: ChecksumOf, md5: bool) -> Result<Digests, DataError> {
    match of {
        ChecksumOf::File => {
            let mut f = File::open(path).map_err(|e| DataError::io(path, "a readable file", e))?;
            digest_reader(&mut f, md5, &|e| DataError::io(path, "a readable file", e))
        }
        ChecksumOf::Gunzipped => {
            let f = File::open(path).map_err(|e| DataError::io(path, "a gzip file", e))?;
            let mut d = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(f));
            digest_reader(&mut d, md5, &|e| DataError::Gzip { path: path.to_path_buf(), detail: e.to_string() })
        }
    }
}

fn part_path(final_path: &Path) -> PathBuf {
    let mut s = final_path.as_os_str().to_owned();
    s.push(".part");
    PathBuf::from(s)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_recv_body(None)
        .build()
        .into()
}

/// Downloads `url` into `part`, resuming from its current length. Ok(()) when the server
/// says the whole body has been received.
fn download(url: &str, part: &Path, progress: bool) -> Result<(), DataError> {
    let derr = |detail: String| DataError::Download { url: url.to_string(), path: part.to_path_buf(), detail };
    let offset = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut req = agent().get(url);
    if offset > 0 {
        req = req.header("Range", format!("bytes={offset}-"));
    }
    let resp = req.call().map_err(|e| derr(format!("request failed: {e}")))?;
    let status = resp.status().as_u16();
    let header = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let len = header("content-length").and_then(|v| v.parse::<u64>().ok());
    let (append, start, total) = match status {
        200 => (false, 0, len),
        206 => {
            // Content-Range: bytes START-END/TOTAL
            let cr = header("content-range").unwrap_or_default();
            let start = cr.strip_prefix("bytes ").and_then(|r| r.split('-').next()).and_then(|s| s.trim().parse::<u64>().ok());
            if start != Some(offset) {
                return Err(derr(format!("server answered range `{cr}`, expected one starting at byte {offset}")));
            }
            let total = cr.rsplit('/').next().and_then(|t| t.parse::<u64>().ok());
            (true, offset, total)
        }
        416 if offset > 0 => return Ok(()), // nothing left to fetch; verification decides
        _ => return Err(derr(format!("HTTP status {status}, expected 200 (or 206 when resuming)"))),
    };
    let mut file = if append { OpenOptions::new().append(true).open(part) } else { File::create(part) }
        .map_err(|e| DataError::io(part, "a writable file", e))?;
    let pb = if progress {
        let pb = indicatif::ProgressBar::new(total.unwrap_or(0));
        pb.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.set_message(part.file_name().map(|n| n.to_string_lossy().trim_end_matches(".part").to_string()).unwrap_or_default());
        pb.set_position(start);
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut reader = resp.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = start;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                pb.abandon();
                let _ = file.flush();
                return Err(derr(format!(
                    "connection lost after {got} of {} bytes ({e}); the partial file is kept, run the fetch again to resume",
                    total.map(|t| t.to_string()).unwrap_or_else(|| "?".into())
                )));
            }
        };
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).map_err(|e| DataError::io(part, "a writable file", e))?;
        got += n as u64;
        pb.set_position(got);
    }
    file.flush().map_err(|e| DataError::io(part, "a writable file", e))?;
    pb.finish();
    if let Some(t) = total {
        if got < t {
            return Err(derr(format!(
                "connection closed after {got} of {t} bytes; the partial file is kept, run the fetch again to resume"
            )));
        }
    }
    Ok(())
}

/// Fetches one file into `dir` (see the module docs).
pub fn fetch_file(file: &RemoteFile, dir: &Path, progress: bool) -> Result<Fetched, DataError> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, "a folder we can create", e))?;
    let final_path = dir.join(&file.name);
    let of = file.checksum.as_ref().map(|c| c.of).unwrap_or(ChecksumOf::File);
    let want_md5 = file.checksum.as_ref().is_some_and(|c| c.algorithm == Algorithm::Md5);
    let algorithm = file.checksum.as_ref().map(|c| c.algorithm);
    // Why a copy already there is not used, for the error if the download fails too.
    let mut present_problem = None;
    if final_path.is_file() {
        match (&file.checksum, digests_of(&final_path, of, want_md5)) {
            (Some(c), Ok(d)) if c.matches(&d) => {
                return Ok(Fetched { path: final_path, sha256: d.sha256, verified: true, algorithm, already_present: true })
            }
            (None, Ok(d)) => {
                return Ok(Fetched { path: final_path, sha256: d.sha256, verified: false, algorithm: None, already_present: true })
            }
            // A bad copy: download again; it is replaced only once the new one verifies.
            (Some(c), Ok(d)) => {
                present_problem = Some(format!("the {} already there has {} {}, expected {}", file.name, c.algorithm, c.found(&d), c.hex))
            }
            (_, Err(e)) => present_problem = Some(format!("the {} already there is unreadable ({e})", file.name)),
        }
    }
    let with_present = |e: DataError| match (e, &present_problem) {
        (DataError::Download { url, path, detail }, Some(p)) => DataError::Download { url, path, detail: format!("{detail}; {p}") },
        (e, _) => e,
    };
    let part = part_path(&final_path);
    let mut last_err = None;
    let mut ok = false;
    for url in &file.urls {
        match download(url, &part, progress) {
            Ok(()) => {
                ok = true;
                break;
            }
            Err(e) => {
                // A transfer that started and broke is resumable: stop here so the next run
                // resumes from the same mirror. Errors before any byte: try the next mirror.
                let resumable = matches!(&e, DataError::Download { detail, .. } if detail.contains("resume"));
                last_err = Some(e);
                if resumable {
                    break;
                }
            }
        }
    }
    if !ok {
        return Err(with_present(last_err.unwrap_or_else(|| DataError::Download {
            url: String::new(),
            path: final_path.clone(),
            detail: "no download location known".into(),
        })));
    }
    let d = match digests_of(&part, of, want_md5) {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    let verified = match &file.checksum {
        Some(c) if !c.matches(&d) => {
            let _ = std::fs::remove_file(&part);
            return Err(DataError::Checksum {
                path: final_path,
                algorithm: c.algorithm.name().into(),
                expected: c.hex.clone(),
                found: c.found(&d),
            });
        }
        Some(_) => true,
        None => false,
    };
    std::fs::rename(&part, &final_path).map_err(|e| DataError::io(&final_path, "a writable destination", e))?;
    Ok(Fetched { path: final_path, sha256: d.sha256, verified, algorithm: algorithm.filter(|_| verified), already_present: false })
}

/// Extracts the regular files of a `.tar.gz` into `dir` (relative paths only; each file is
/// written to a temporary name and renamed). Returns the extracted paths.
pub fn extract_tar_gz(archive: &Path, dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let f = File::open(archive).map_err(|e| DataError::io(archive, "a .tar.gz archive", e))?;
    let mut r = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(f));
    let mut out = Vec::new();
    let mut offset: u64 = 0;
    let bad = |offset: u64, what: String| DataError::format(archive, offset, "tar header", "a ustar archive", what);
    loop {
        let mut hdr = [0u8; 512];
        if let Err(e) = r.read_exact(&mut hdr) {
            return Err(DataError::Gzip { path: archive.to_path_buf(), detail: format!("{e} at tar offset {offset}") });
        }
        if hdr.iter().all(|&b| b == 0) {
            break;
        }
        let field = |a: usize, b: usize| {
            let s = &hdr[a..b];
            let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).trim().to_string()
        };
        let name = {
            let prefix = field(345, 500);
            let n = field(0, 100);
            if prefix.is_empty() {
                n
            } else {
                format!("{prefix}/{n}")
            }
        };
        let size = u64::from_str_radix(&field(124, 136), 8).map_err(|_| bad(offset + 124, "a bad size field".into()))?;
        let typ = hdr[156];
        offset += 512;
        let padded = size.div_ceil(512) * 512;
        let rel = Path::new(&name);
        let safe = rel.components().all(|c| matches!(c, std::path::Component::Normal(_)));
        if (typ == b'0' || typ == 0) && safe {
            let dest = dir.join(rel);
            if let Some(p) = dest.parent() {
                std::fs::create_dir_all(p).map_err(|e| DataError::io(p, "a folder we can create", e))?;
            }
            let tmp = part_path(&dest);
            let mut w = File::create(&tmp).map_err(|e| DataError::io(&tmp, "a writable file", e))?;
            let n = std::io::copy(&mut (&mut r).take(size), &mut w)
                .map_err(|e| DataError::Gzip { path: archive.to_path_buf(), detail: format!("{e} inside member {name}") })?;
            if n != size {
                return Err(bad(offset, format!("member {name} truncated ({n} of {size} bytes)")));
            }
            std::fs::rename(&tmp, &dest).map_err(|e| DataError::io(&dest, "a writable destination", e))?;
            out.push(dest);
            std::io::copy(&mut (&mut r).take(padded - size), &mut std::io::sink()).ok();
        } else {
            std::io::copy(&mut (&mut r).take(padded), &mut std::io::sink()).ok();
        }
        offset += padded;
    }
    Ok(out)
}

/// Extracts a `.zip` into `dir` (paths outside `dir` are refused by the `zip` crate). Returns
/// the number of entries (files and folders).
pub fn extract_zip(archive: &Path, dir: &Path) -> Result<usize, DataError> {
    let f = File::open(archive).map_err(|e| DataError::io(archive, "a .zip archive", e))?;
    let mut z = zip::ZipArchive::new(std::io::BufReader::new(f))
        .map_err(|e| DataError::format(archive, 0, "zip directory", "a valid .zip archive", e.to_string()))?;
    let n = z.len();
    z.extract(dir).map_err(|e| DataError::format(archive, 0, "zip member", "a valid .zip archive", e.to_string()))?;
    Ok(n)
}

/// Options of [`fetch`] and [`fetch_files`].
#[derive(Clone, Debug, Default)]
pub struct FetchOptions {
    /// Draw progress bars.
    pub progress: bool,
    /// Download `<mirror>/<file name>` instead of the usual locations (same checksums).
    pub mirror: Option<String>,
}

/// Fetches a dataset into `dir`: downloads (or finds already there), verifies, unpacks.
/// `log` receives one line per file and per unpacked archive.
pub fn fetch(kind: DatasetKind, dir: &Path, opts: &FetchOptions, log: &mut dyn FnMut(String)) -> Result<Vec<Fetched>, DataError> {
    if kind == DatasetKind::MnistSample {
        log("mnist-sample is embedded in the binary; nothing to fetch".into());
        return Ok(vec![]);
    }
    let r = fetch_files(&remote_files(kind), dir, opts, log);
    if kind != DatasetKind::Nmnist {
        return r;
    }
    // N-MNIST's host may refuse automated downloads: say how to get it by hand.
    r.map_err(|e| match e {
        DataError::Download { url, path, detail } => DataError::Download {
            url,
            path,
            detail: format!(
                "{detail}. To fetch N-MNIST by hand: download Train.zip and Test.zip (linked from {NMNIST_PAGE}) into {} and run this command again; it verifies and unpacks them",
                dir.display()
            ),
        },
        e => e,
    })
}

/// Fetches `files` into `dir` (from `opts.mirror` when set), verifies each and unpacks the
/// archives. `log` receives one line per file and per unpacked archive.
pub fn fetch_files(files: &[RemoteFile], dir: &Path, opts: &FetchOptions, log: &mut dyn FnMut(String)) -> Result<Vec<Fetched>, DataError> {
    let mut done = Vec::new();
    for f in files {
        let f = match &opts.mirror {
            Some(m) => mirrored(f, m),
            None => f.clone(),
        };
        let r = fetch_file(&f, dir, opts.progress)?;
        let state = if r.already_present { "already present" } else { "downloaded" };
        match (&f.checksum, r.algorithm) {
            (Some(c), Some(alg)) => {
                let what = if c.of == ChecksumOf::Gunzipped { " (of the decompressed content)" } else { "" };
                let sha = if alg == Algorithm::Sha256 { String::new() } else { format!("; SHA-256{what} {}", r.sha256) };
                log(format!("{}: {state}, {alg}{what} verified {}{sha}", r.path.display(), c.hex));
            }
            _ => log(format!("{}: {state}, SHA-256 {} (NOT verified: no checksum in the code)", r.path.display(), r.sha256)),
        }
        match f.unpack {
            Unpack::None => {}
            Unpack::TarGz => {
                let files = extract_tar_gz(&r.path, dir)?;
                log(format!("{}: unpacked {} files into {}", r.path.display(), files.len(), dir.display()));
            }
            Unpack::Zip => {
                let n = extract_zip(&r.path, dir)?;
                log(format!("{}: unpacked {n} entries into {}", r.path.display(), dir.display()));
            }
        }
        done.push(r);
    }
    Ok(done)
}
