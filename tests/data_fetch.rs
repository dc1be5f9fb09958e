//! `data fetch` against a local HTTP server on 127.0.0.1 serving fixture files: a good file,
//! a wrong checksum, a connection cut mid-file (then resumed), a 404, mirror fallback, and
//! the checksum of gzip content; plus tar.gz unpacking. N-MNIST through a mirror (`--mirror`,
//! `$BACKEI_MIRROR`, the library's `FetchOptions::mirror`): tiny fixture zips fail the real MD5s
//! with a checksum error, and verify, unpack and load with MD5s of their own; the binary's
//! `data fetch --mirror` fetches Fashion-MNIST from the Debian files served locally.

mod data_fixtures;
use backei::data::fetch::{self, Algorithm, Checksum, ChecksumOf, FetchOptions, RemoteFile, Unpack};
use backei::data::{DataError, Dataset, DatasetKind, LoadOptions, Split};
use data_fixtures::{events, gz};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

fn body() -> Vec<u8> {
    (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

/// Paths served with fixed contents (all other paths: `body()`, see `handle`).
type Files = Arc<Mutex<HashMap<String, Vec<u8>>>>;

struct Server {
    base: String,
    log: Arc<Mutex<Vec<String>>>,
    files: Files,
}

impl Server {
    /// Serves `bytes` at `path` (e.g. "/mirror/Train.zip").
    fn serve(&self, path: &str, bytes: Vec<u8>) {
        self.files.lock().unwrap().insert(path.into(), bytes);
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

fn respond(mut s: TcpStream, status: &str, headers: &[String], body: &[u8]) {
    let mut h = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for x in headers {
        h.push_str(x);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    let _ = s.write_all(h.as_bytes());
    let _ = s.write_all(body);
    let _ = s.flush();
}

fn handle(s: TcpStream, log: &Mutex<Vec<String>>, files: &Files) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range: Option<usize> = None;
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
            break;
        }
        let low = l.to_ascii_lowercase();
        if let Some(v) = low.strip_prefix("range: bytes=") {
            range = v.trim().trim_end_matches('-').parse().ok();
        }
    }
    log.lock().unwrap().push(format!("{path} range={range:?}"));
    let fixed = files.lock().unwrap().get(&path).cloned();
    let data = match fixed {
        Some(d) => d,
        None if path.starts_with("/only/") => return respond(s, "404 Not Found", &["Content-Length: 9".into()], b"not found"),
        None if path.ends_with(".gz") => gz(&body()),
        None => body(),
    };
    let n = data.len();
    if path.starts_with("/missing/") {
        return respond(s, "404 Not Found", &["Content-Length: 9".into()], b"not found");
    }
    if let Some(start) = range {
        let rest = &data[start..];
        return respond(
            s,
            "206 Partial Content",
            &[format!("Content-Length: {}", rest.len()), format!("Content-Range: bytes {start}-{}/{n}", n - 1)],
            rest,
        );
    }
    if path.starts_with("/cut/") {
        // Announce the whole file, send 40 %, then cut the connection.
        let mut s2 = s;
        let h = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n");
        let _ = s2.write_all(h.as_bytes());
        let _ = s2.write_all(&data[..n * 2 / 5]);
        let _ = s2.flush();
        let _ = s2.shutdown(std::net::Shutdown::Both);
        return;
    }
    respond(s, "200 OK", &[format!("Content-Length: {n}")], &data);
}

fn server() -> Server {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let files: Files = Arc::default();
    let (lg, fs) = (log.clone(), files.clone());
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (lg, fs) = (lg.clone(), fs.clone());
            std::thread::spawn(move || handle(s, &lg, &fs));
        }
    });
    Server { base, log, files }
}

fn file(name: &str, urls: Vec<String>, sha: Option<String>) -> RemoteFile {
    RemoteFile { name: name.into(), urls, checksum: sha.map(|h| Checksum::sha256(ChecksumOf::File, h)), unpack: Unpack::None }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn good_file_verified() {
    let s = server();
    let d = tempfile::tempdir().unwrap();
    let sha = fetch::sha256_bytes(&body());
    let f = file("good.bin", vec![format!("{}/ok/good.bin", s.base)], Some(sha.clone()));
    let r = fetch::fetch_file(&f, d.path(), false).unwrap();
    assert!(r.verified && !r.already_present);
    assert_eq!(r.sha256, sha);
    assert_eq!(std::fs::read(d.path().join("good.bin")).unwrap(), body());
    assert_eq!(names(d.path()), vec!["good.bin"]);
    // Second run: already there, verified, no request.
    let before = s.log.lock().unwrap().len();
    let r = fetch::fetch_file(&f, d.path(), false).unwrap();
    assert!(r.already_present && r.verified);
    assert_eq!(s.log.lock().unwrap().len(), before);
}

#[test]
fn no_checksum_reports_computed_sha_unverified() {
    let s = server();
    let d = tempfile::tempdir().unwrap();
    let f = file("x.bin", vec![format!("{}/ok/x.bin", s.base)], None);
    let r = fetch::fetch_file(&f, d.path(), false).unwrap();
    assert!(!r.verified);
    assert_eq!(r.sha256, fetch::sha256_bytes(&body()));
}

#[test]
fn wrong_checksum_leaves_nothing() {
    let s = server();
    let d = tempfile::tempdir().unwrap();
    let bad = "00".repeat(32);
    let f = file("good.bin", vec![format!("{}/ok/good.bin", s.base)], Some(bad.clone()));
    let e = fetch::fetch_file(&f, d.path(), false).unwrap_err();
    assert!(matches!(e, DataError::Checksum { .. }), "{e}");
    let m = e.to_string();
    assert!(m.contains("good.bin") && m.contains(&bad) && m.contains(&fetch::sha256_bytes(&body())), "{m}");
    assert!(names(d.path()).is_empty(), "{:?}", names(d.path()));
}

#[test]
fn cut_connection_keeps_part_and_resumes() {
    let s = server();
    let d = tempfile::tempdir().unwrap();
    let sha = fetch::sha256_bytes(&body());
    let f = file("big.bin", vec![format!("{}/cut/big.bin", s.base)], Some(sha.clone()));
    let e = fetch::fetch_file(&f, d.path(), false).unwrap_err();
    let m = e.to_string();
    assert!(m.contains("resume"), "{m}");
    // No file under the final name; the partial file holds what arrived.
    assert!(!d.path().join("big.bin").exists());
    let part = std::fs::read(d.path().join("big.bin.part")).unwrap();
    assert_eq!(part.len(), 40_000);
    assert_eq!(&part[..], &body()[..40_000]);
    // Rerun: resumes with a Range request and verifies.
    let r = fetch::fetch_file(&f, d.path(), false).unwrap();
    assert!(r.verified);
    assert_eq!(std::fs::read(d.path().join("big.bin")).unwrap(), body());
    assert_eq!(names(d.path()), vec!["big.bin"]);
    let log = s.log.lock().unwrap();
    assert_eq!(log.last().unwrap(), "/cut/big.bin range=Some(40000)");
}

#[test]
fn not_found_404() {
    let s = server();
    let d = tempfile::tempdir().unwrap();
    let f = file("gone.bin", vec![format!("{}/missing/gone.bin", s.base)], None);
    let m = fetch::fetch_file(&f, d.path(), false).unwrap_err().to_string();
    assert!(m.contains("404") && m.contains("/missing/gone.bin"), "{m}");
    assert!(names(d.path()).is_empty());
}

#[test]
fn mirror_fallback_after_404() {
    let s = server();
    let d = tempfile::tempdir().unwrap();
    let f = file("m.bin", vec![format!("{}/missing/m.bin", s.base), format!("{}/ok/m.bin", s.base)], Some(fetch::sha256_bytes(&body())));
    assert!(fetch::fetch_file(&f, d.path(), false).unwrap().verified);
}

#[test]
fn checksum_of_gzip_content() {
    let s = server();
    let d = tempfile::tempdir().unwrap();
    let f = RemoteFile {
        name: "a.gz".into(),
        urls: vec![format!("{}/ok/a.gz", s.base)],
        checksum: Some(Checksum::sha256(ChecksumOf::Gunzipped, fetch::sha256_bytes(&body()))),
        unpack: Unpack::None,
    };
    assert!(fetch::fetch_file(&f, d.path(), false).unwrap().verified);
}

fn is_sha256(f: &RemoteFile) -> bool {
    f.checksum.as_ref().is_some_and(|c| c.algorithm == Algorithm::Sha256 && c.hex.len() == 64)
}

#[test]
fn remote_file_table() {
    let f = fetch::remote_files(DatasetKind::FashionMnist);
    assert_eq!(f.len(), 4);
    assert!(f.iter().all(is_sha256));
    let m = fetch::remote_files(DatasetKind::Mnist);
    assert!(m.iter().all(|x| x.urls.len() >= 2 && is_sha256(x)));
    assert!(is_sha256(&fetch::remote_files(DatasetKind::Cifar10)[0]));
    assert_eq!(fetch::remote_files(DatasetKind::Cifar10)[0].unpack, Unpack::TarGz);
    // N-MNIST: two zips from Mendeley Data, MD5 only (the publisher gives nothing else).
    let n = fetch::remote_files(DatasetKind::Nmnist);
    assert_eq!(n.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(), ["Train.zip", "Test.zip"]);
    for x in &n {
        let c = x.checksum.as_ref().unwrap();
        assert_eq!((c.algorithm, c.of, c.hex.len(), x.unpack), (Algorithm::Md5, ChecksumOf::File, 32, Unpack::Zip));
        assert!(x.urls.len() == 1 && x.urls[0].contains("/datasets/468j46mzdv/files/"), "{:?}", x.urls);
    }
    assert!(fetch::remote_files(DatasetKind::MnistSample).is_empty());
    // A mirror replaces every location of every dataset by <mirror>/<name>, checksums unchanged.
    for kind in [DatasetKind::Mnist, DatasetKind::FashionMnist, DatasetKind::Cifar10, DatasetKind::Nmnist] {
        for f in fetch::remote_files(kind) {
            let m = fetch::mirrored(&f, "http://127.0.0.1:8/copy/");
            assert_eq!(m.urls, vec![format!("http://127.0.0.1:8/copy/{}", f.name)]);
            assert_eq!((m.checksum, m.unpack, m.name), (f.checksum, f.unpack, f.name));
        }
    }
}

#[test]
fn md5_checksums_verify_and_mismatch_names_md5() {
    let s = server();
    let d = tempfile::tempdir().unwrap();
    let md5 = fetch::md5_bytes(&body());
    assert_eq!(md5.len(), 32);
    assert_eq!(fetch::md5_bytes(b""), "d41d8cd98f00b204e9800998ecf8427e");
    let mut f = file("m.bin", vec![format!("{}/ok/m.bin", s.base)], None);
    f.checksum = Some(Checksum::md5(ChecksumOf::File, md5.to_uppercase()));
    let r = fetch::fetch_file(&f, d.path(), false).unwrap();
    assert!(r.verified && r.algorithm == Some(Algorithm::Md5));
    // The SHA-256 is computed whatever verified the file.
    assert_eq!(r.sha256, fetch::sha256_bytes(&body()));
    let bad = "0".repeat(32);
    f.name = "n.bin".into();
    f.checksum = Some(Checksum::md5(ChecksumOf::File, bad.clone()));
    let e = fetch::fetch_file(&f, d.path(), false).unwrap_err();
    let m = e.to_string();
    assert!(matches!(&e, DataError::Checksum { algorithm, .. } if algorithm == "MD5"), "{m}");
    assert!(m.contains("n.bin") && m.contains("MD5 mismatch") && m.contains(&bad) && m.contains(&md5), "{m}");
    assert_eq!(names(d.path()), vec!["m.bin"]);
}

/// A zip of valid N-MNIST event files: `<top>/<digit>/<k>.bin` for each (digit, count).
fn nmnist_zip(top: &str, digits: &[(u8, usize)]) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let o = zip::write::SimpleFileOptions::default();
    for &(digit, count) in digits {
        for k in 0..count {
            z.start_file(format!("{top}/{digit}/{k:05}.bin"), o).unwrap();
            let ev: Vec<(u8, u8, u8, u32)> =
                (0..12u32).map(|j| ((j * 3 % 34) as u8, (digit as u32 * 3 + j % 5) as u8, (j % 2) as u8, j * 2500)).collect();
            z.write_all(&events(&ev)).unwrap();
        }
    }
    z.finish().unwrap().into_inner()
}

/// A server with N-MNIST fixture zips under /mirror/ (and nothing else there: /only/ paths 404).
fn nmnist_mirror() -> (Server, Vec<u8>, Vec<u8>) {
    let s = server();
    let train = nmnist_zip("Train", &[(0, 2), (3, 1)]);
    let test = nmnist_zip("Test", &[(1, 2)]);
    s.serve("/only/mirror/Train.zip", train.clone());
    s.serve("/only/mirror/Test.zip", test.clone());
    (s, train, test)
}

#[test]
fn nmnist_through_a_mirror_fails_the_real_md5_and_leaves_nothing() {
    let (s, train, _) = nmnist_mirror();
    let d = tempfile::tempdir().unwrap();
    let opts = FetchOptions { progress: false, mirror: Some(format!("{}/only/mirror/", s.base)) };
    let e = fetch::fetch(DatasetKind::Nmnist, d.path(), &opts, &mut |_| {}).unwrap_err();
    let m = e.to_string();
    assert!(matches!(e, DataError::Checksum { .. }), "{m}");
    let real = fetch::remote_files(DatasetKind::Nmnist)[0].checksum.clone().unwrap().hex;
    assert!(m.contains("Train.zip") && m.contains("MD5") && m.contains(&real) && m.contains(&fetch::md5_bytes(&train)), "{m}");
    // Nothing under the final name, no partial file, nothing unpacked.
    assert!(names(d.path()).is_empty(), "{:?}", names(d.path()));
    // Only the mirror was asked (never an outside host).
    assert_eq!(s.requests(), vec!["/only/mirror/Train.zip range=None"]);
}

/// N-MNIST's file list with the fixtures' MD5s: what the real files would do, end to end.
fn nmnist_files_for(train: &[u8], test: &[u8]) -> Vec<RemoteFile> {
    fetch::remote_files(DatasetKind::Nmnist)
        .into_iter()
        .map(|mut f| {
            let bytes = if f.name == "Train.zip" { train } else { test };
            f.checksum = Some(Checksum::md5(ChecksumOf::File, fetch::md5_bytes(bytes)));
            f
        })
        .collect()
}

#[test]
fn nmnist_md5_verified_download_unpacks_and_loads() {
    let (s, train, test) = nmnist_mirror();
    let d = tempfile::tempdir().unwrap();
    let files = nmnist_files_for(&train, &test);
    let opts = FetchOptions { progress: false, mirror: Some(format!("{}/only/mirror", s.base)) };
    let mut log = Vec::new();
    let r = fetch::fetch_files(&files, d.path(), &opts, &mut |l| log.push(l)).unwrap();
    assert_eq!(r.len(), 2);
    for (f, bytes) in r.iter().zip([&train, &test]) {
        assert!(f.verified && !f.already_present && f.algorithm == Some(Algorithm::Md5));
        assert_eq!(f.sha256, fetch::sha256_bytes(bytes));
    }
    let text = log.join("\n");
    assert!(
        text.contains(&format!(
            "Train.zip: downloaded, MD5 verified {}; SHA-256 {}",
            fetch::md5_bytes(&train),
            fetch::sha256_bytes(&train)
        )),
        "{text}"
    );
    assert!(text.contains("Test.zip: unpacked"), "{text}");
    assert!(d.path().join("Train/3/00000.bin").is_file() && d.path().join("Test/1/00001.bin").is_file());
    // The N-MNIST reader loads what was unpacked.
    let lo = LoadOptions { data_dir: Some(d.path().into()), steps: 4, cache_dir: Some(d.path().join("cache")), ..Default::default() };
    let tr = Dataset::load(DatasetKind::Nmnist, Split::Train, &lo).unwrap();
    let mut labels = tr.labels().to_vec();
    labels.sort();
    assert_eq!(labels, vec![0, 0, 3]);
    assert!(tr.sample(0).iter().any(|&v| v > 0), "events binned into frames");
    let te = Dataset::load(DatasetKind::Nmnist, Split::Test, &lo).unwrap();
    assert_eq!(te.labels(), &[1, 1]);
    // Again: both already present and verified, no request; unpacked again all the same.
    let before = s.requests().len();
    std::fs::remove_dir_all(d.path().join("Test")).unwrap();
    let mut log = Vec::new();
    let r = fetch::fetch_files(&files, d.path(), &opts, &mut |l| log.push(l)).unwrap();
    assert!(r.iter().all(|f| f.already_present && f.verified), "{log:?}");
    assert_eq!(s.requests().len(), before);
    assert!(d.path().join("Test/1/00001.bin").is_file());
}

#[test]
fn a_bad_copy_already_there_is_downloaded_again() {
    let (s, train, test) = nmnist_mirror();
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("Train.zip"), b"not the archive").unwrap();
    let files = nmnist_files_for(&train, &test);
    let opts = FetchOptions { progress: false, mirror: Some(format!("{}/only/mirror", s.base)) };
    let r = fetch::fetch_files(&files[..1], d.path(), &opts, &mut |_| {}).unwrap();
    assert!(r[0].verified && !r[0].already_present);
    assert_eq!(std::fs::read(d.path().join("Train.zip")).unwrap(), train);
    // When the new download fails too, the error says why the copy there was not used.
    std::fs::write(d.path().join("Test.zip"), b"not the archive").unwrap();
    let gone = FetchOptions { progress: false, mirror: Some(format!("{}/only/elsewhere", s.base)) };
    let m = fetch::fetch_files(&files[1..], d.path(), &gone, &mut |_| {}).unwrap_err().to_string();
    assert!(m.contains("404") && m.contains("the Test.zip already there has MD5"), "{m}");
}

fn backei() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backei"));
    c.env_remove("BACKEI_MIRROR").env_remove("BACKEI_DATA");
    c
}

#[test]
fn binary_fetch_mirror_flag_and_env_reach_the_mirror_only() {
    let (s, _, _) = nmnist_mirror();
    let d = tempfile::tempdir().unwrap();
    let mirror = format!("{}/only/mirror", s.base);
    let o = backei().args(["data", "fetch", "nmnist", "--no-progress", "--mirror", &mirror, "--dir"]).arg(d.path()).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("Train.zip: MD5 mismatch"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("fetching from the mirror {mirror}")));
    // $BACKEI_MIRROR is the flag's default.
    let o =
        backei().env("BACKEI_MIRROR", &mirror).args(["data", "fetch", "nmnist", "--no-progress", "--dir"]).arg(d.path()).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("Train.zip: MD5 mismatch"), "{err}");
    assert_eq!(s.requests(), vec!["/only/mirror/Train.zip range=None"; 2]);
    assert!(names(d.path()).is_empty(), "{:?}", names(d.path()));
}

/// The binary fetches Fashion-MNIST from a mirror (the Debian package's files, served on
/// 127.0.0.1), verifies the SHA-256 of each and says so.
#[test]
fn binary_fetch_fashion_mnist_from_a_mirror() {
    let src = Path::new("/usr/share/datasets/fashion-mnist");
    assert!(src.is_dir(), "apt-get install dataset-fashion-mnist");
    let s = server();
    let files = fetch::remote_files(DatasetKind::FashionMnist);
    for f in &files {
        s.serve(&format!("/only/fm/{}", f.name), std::fs::read(src.join(&f.name)).unwrap());
    }
    let d = tempfile::tempdir().unwrap();
    let o = backei()
        .args(["data", "fetch", "fashion-mnist", "--no-progress", "--mirror", &format!("{}/only/fm", s.base), "--dir"])
        .arg(d.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    for f in &files {
        assert!(out.contains(&format!("{}: downloaded, SHA-256 (of the decompressed content) verified", f.name)), "{out}");
        assert!(d.path().join(&f.name).is_file());
    }
    assert_eq!(s.requests().len(), 4);
    assert!(out.contains("found by `--data-dir"), "{out}");
}

/// The Fashion-MNIST checksums in the code match the installed Debian files' content.
#[test]
fn fashion_checksums_match_debian_files() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    assert!(dir.is_dir(), "apt-get install dataset-fashion-mnist");
    for f in fetch::remote_files(backei::data::DatasetKind::FashionMnist) {
        let d = tempfile::tempdir().unwrap();
        std::fs::copy(dir.join(&f.name), d.path().join(&f.name)).unwrap();
        // Present and matching: no download attempted (the URLs are unreachable here).
        let r = fetch::fetch_file(&f, d.path(), false).unwrap();
        assert!(r.already_present && r.verified, "{}", f.name);
    }
}

fn tar_entry(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
    h[156] = b'0';
    h[257..262].copy_from_slice(b"ustar");
    let mut v = h.to_vec();
    v.extend_from_slice(data);
    v.resize(v.len().div_ceil(512) * 512, 0);
    v
}

#[test]
fn tar_gz_unpacking() {
    let d = tempfile::tempdir().unwrap();
    let mut t = tar_entry("cifar-10-batches-bin/test_batch.bin", &[1, 2, 3]);
    t.extend(tar_entry("../evil.bin", &[9]));
    t.extend(tar_entry("cifar-10-batches-bin/readme.html", b"hi"));
    t.extend([0u8; 1024]);
    let a = d.path().join("c.tar.gz");
    std::fs::write(&a, gz(&t)).unwrap();
    let out = d.path().join("out");
    let files = fetch::extract_tar_gz(&a, &out).unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(std::fs::read(out.join("cifar-10-batches-bin/test_batch.bin")).unwrap(), vec![1, 2, 3]);
    assert!(!d.path().join("evil.bin").exists());
}
