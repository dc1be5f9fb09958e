//! `data` subcommands called through `data::cli`.

use backei::data::cli::{run, DataCommand};
use backei::data::DatasetKind;
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: DataCommand,
}

#[test]
fn inspect_embedded_sample_writes_grid_png() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("grid.png");
    run(DataCommand::Inspect {
        dataset: DatasetKind::MnistSample,
        data_dir: None,
        grid: Some(out.clone()),
        steps: 8,
        cache_dir: None,
        binning: Default::default(),
    })
    .unwrap();
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap()));
    let r = dec.read_info().unwrap();
    let info = r.info();
    // 8×8 cells of 28 px with 1 px gaps.
    assert_eq!((info.width, info.height), (8 * 29 + 1, 8 * 29 + 1));
}

#[test]
fn inspect_missing_dataset_fails_with_hint() {
    let d = tempfile::tempdir().unwrap();
    let e = run(DataCommand::Inspect {
        dataset: DatasetKind::Cifar10,
        data_dir: Some(d.path().into()),
        grid: None,
        steps: 8,
        cache_dir: None,
        binning: Default::default(),
    })
    .unwrap_err();
    assert!(format!("{e}").contains("backei data fetch cifar10 --dir DIR"), "{e}");
}

#[test]
fn parses_fetch_and_inspect() {
    let c = Cli::try_parse_from(["x", "fetch", "fashion-mnist", "--dir", "/tmp/f", "--no-progress"]).unwrap();
    assert!(matches!(c.cmd, DataCommand::Fetch { dataset: DatasetKind::FashionMnist, no_progress: true, mirror: None, .. }));
    let c = Cli::try_parse_from(["x", "fetch", "nmnist", "--mirror", "http://127.0.0.1:1/copy"]).unwrap();
    assert!(
        matches!(c.cmd, DataCommand::Fetch { dataset: DatasetKind::Nmnist, mirror: Some(ref m), .. } if m == "http://127.0.0.1:1/copy")
    );
    let c = Cli::try_parse_from(["x", "inspect", "nmnist", "--steps", "10", "--grid", "g.png"]).unwrap();
    assert!(matches!(c.cmd, DataCommand::Inspect { dataset: DatasetKind::Nmnist, steps: 10, .. }));
    assert!(Cli::try_parse_from(["x", "inspect", "imagenet"]).is_err());
}

/// A URL on 127.0.0.1 where nothing listens: a download from it fails at once.
fn dead_mirror() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}/nmnist")
}

#[test]
fn nmnist_fetch_that_cannot_download_explains_manual_download() {
    let d = tempfile::tempdir().unwrap();
    let e = run(DataCommand::Fetch {
        dataset: DatasetKind::Nmnist,
        dir: Some(d.path().into()),
        mirror: Some(dead_mirror()),
        no_progress: true,
    })
    .unwrap_err();
    let m = format!("{e}");
    assert!(m.contains("Train.zip") && m.contains("by hand") && m.contains(backei::data::fetch::NMNIST_PAGE), "{m}");
    assert!(!d.path().join("Train.zip").exists());
}

/// The manual route: Train.zip and Test.zip put into the folder by hand are verified (here
/// against checksums of the fixtures) and unpacked without any download; inspect then reads them.
#[test]
fn nmnist_zips_put_by_hand_are_verified_unpacked_and_read() {
    use backei::data::fetch::{self, Checksum, ChecksumOf, FetchOptions};
    use std::io::Write;
    let d = tempfile::tempdir().unwrap();
    for (zipname, top) in [("Train.zip", "Train"), ("Test.zip", "Test")] {
        let f = std::fs::File::create(d.path().join(zipname)).unwrap();
        let mut z = zip::ZipWriter::new(f);
        let o = zip::write::SimpleFileOptions::default();
        for digit in 0..2 {
            z.start_file(format!("{top}/{digit}/00001.bin"), o).unwrap();
            z.write_all(&[3, 4, 0x80, 0, 10, 5, 6, 0, 0, 20]).unwrap();
        }
        z.finish().unwrap();
    }
    // N-MNIST's own file list, with the fixtures' MD5s and no download location at all.
    let files: Vec<_> = fetch::remote_files(DatasetKind::Nmnist)
        .into_iter()
        .map(|mut f| {
            f.checksum = Some(Checksum::md5(ChecksumOf::File, fetch::md5_file(&d.path().join(&f.name)).unwrap()));
            f.urls.clear();
            f
        })
        .collect();
    let mut log = Vec::new();
    let r = fetch::fetch_files(&files, d.path(), &FetchOptions::default(), &mut |l| log.push(l)).unwrap();
    assert!(r.iter().all(|f| f.already_present && f.verified), "{log:?}");
    assert!(log[0].contains("already present, MD5 verified"), "{log:?}");
    assert!(d.path().join("Train/1/00001.bin").is_file());
    let out = d.path().join("g.png");
    run(DataCommand::Inspect {
        dataset: DatasetKind::Nmnist,
        data_dir: Some(d.path().into()),
        grid: Some(out.clone()),
        steps: 4,
        cache_dir: None,
        binning: Default::default(),
    })
    .unwrap();
    assert!(out.is_file());
}
