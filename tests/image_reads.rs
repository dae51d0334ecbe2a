//! Reading image files is bounded: a non-image is rejected from its first bytes, and no image
//! file is read past the per-image byte cap (regular files by their size, pipes and devices
//! while reading).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use alexnet_cuda::image::{
    decode_image_file, decode_image_file_with, load_batch, ImageLimits, Preprocess,
    DEFAULT_MAX_FILE_BYTES,
};
use alexnet_cuda::Error;
use image::{Rgb, RgbImage};

/// 256 MiB: the documented default cap.
const DEFAULT_CAP: u64 = 256 * 1024 * 1024;
const _: () = assert!(DEFAULT_MAX_FILE_BYTES == DEFAULT_CAP);

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Runs `f` on its own thread and waits at most `secs` for it: a read that does not stop is a
/// test failure, not a hung test run.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what}: still reading after {secs} s"))
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo (coreutils) runs");
    assert!(status.success(), "mkfifo {}", path.display());
}

/// A writer on the FIFO at `path`: writes `head`, then `filler` bytes (zeros) in 64 KiB chunks,
/// then keeps the pipe open until the returned sender is dropped (or the reader closes it).
#[cfg(unix)]
fn fifo_writer(path: PathBuf, head: Vec<u8>, filler: u64) -> mpsc::Sender<()> {
    let (stop, stopped) = mpsc::channel::<()>();
    thread::spawn(move || {
        let Ok(mut pipe) = std::fs::OpenOptions::new().write(true).open(&path) else {
            return;
        };
        if pipe.write_all(&head).is_err() {
            return;
        }
        let chunk = vec![0u8; 64 * 1024];
        let mut left = filler;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if pipe.write_all(&chunk[..n]).is_err() {
                return; // the reader closed its end: it stopped reading
            }
            left -= n as u64;
        }
        // Hold the pipe open: a reader that wants the end of the file waits here.
        let _ = stopped.recv_timeout(Duration::from_secs(60));
    });
    stop
}

/// A non-image in a pipe whose writer never closes: the format is known to be wrong from the
/// first bytes, so decoding returns at once instead of waiting for the end of the stream.
#[cfg(unix)]
#[test]
fn a_non_image_is_rejected_from_its_first_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("holiday.jpg");
    mkfifo(&fifo);
    let text = b"Dear all, the photos from our holiday are attached. ".repeat(100);
    let stop = fifo_writer(fifo.clone(), text, 0);
    let path = fifo.clone();
    let result = within(20, "a non-image in a pipe", move || {
        decode_image_file(&path)
    });
    drop(stop);
    match result {
        Err(Error::ImageDecode { path, message }) => {
            assert_eq!(path, fifo);
            assert!(message.contains("format"), "{message}");
        }
        other => panic!("expected ImageDecode, got {other:?}"),
    }
}

/// A pipe that looks like a PNG and goes on and on (512 MiB, then it stays open): reading stops
/// at the default cap with `ImageTooLarge` naming the file.
#[cfg(unix)]
#[test]
fn an_endless_stream_is_read_up_to_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("stream.png");
    mkfifo(&fifo);
    let stop = fifo_writer(fifo.clone(), PNG_SIGNATURE.to_vec(), 2 * DEFAULT_CAP);
    let path = fifo.clone();
    let result = within(60, "an endless PNG-looking pipe", move || {
        decode_image_file(&path)
    });
    drop(stop);
    match result {
        Err(Error::ImageTooLarge { path, message }) => {
            assert_eq!(path, fifo);
            println!("{message}");
        }
        other => panic!(
            "expected ImageTooLarge, got {:?}",
            other.map(|i| i.dimensions())
        ),
    }
}

/// A regular file over the default cap (a sparse file: nothing is written to disk) is refused
/// from its size, before it is read.
#[test]
fn a_file_over_the_cap_is_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.png");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(PNG_SIGNATURE).unwrap();
    f.set_len(DEFAULT_CAP + 1).unwrap();
    drop(f);
    let p = path.clone();
    match within(20, "a 256 MiB file", move || decode_image_file(&p)) {
        Err(Error::ImageTooLarge { path: p, message }) => {
            assert_eq!(p, path);
            assert!(message.contains("268435457"), "{message}");
        }
        other => panic!(
            "expected ImageTooLarge, got {:?}",
            other.map(|i| i.dimensions())
        ),
    }
}

/// A `w x h` PNG of noise (which does not compress: about `3 * w * h` bytes).
fn noisy_png(w: u32, h: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| {
        let v = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)).rotate_left(7);
        Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// The cap is the caller's: through `decode_image_file_with`, and through `Preprocess::limits`
/// for `Preprocess::load` and `load_batch`.
#[test]
fn the_cap_can_be_lowered_and_raised() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noise.png");
    let png = noisy_png(40, 40);
    std::fs::write(&path, &png).unwrap();
    let len = png.len() as u64;
    assert!(len > 4000, "{len}");

    let exact = ImageLimits {
        max_file_bytes: len,
    };
    let under = ImageLimits {
        max_file_bytes: len - 1,
    };
    assert_eq!(
        decode_image_file_with(&path, &exact).unwrap().dimensions(),
        (40, 40)
    );
    match decode_image_file_with(&path, &under) {
        Err(Error::ImageTooLarge { path: p, message }) => {
            assert_eq!(p, path);
            assert!(message.contains(&format!("{len} bytes")), "{message}");
            assert!(message.contains("max_file_bytes"), "{message}");
        }
        other => panic!(
            "expected ImageTooLarge, got {:?}",
            other.map(|i| i.dimensions())
        ),
    }

    let pre = Preprocess {
        limits: under,
        ..Preprocess::default()
    };
    assert!(matches!(pre.load(&path), Err(Error::ImageTooLarge { .. })));
    let loaded = load_batch(std::slice::from_ref(&path), &pre);
    assert!(loaded.batch.is_empty());
    assert!(matches!(
        loaded.failures[..],
        [(0, Error::ImageTooLarge { .. })]
    ));
    let pre = Preprocess {
        limits: exact,
        ..Preprocess::default()
    };
    assert_eq!(pre.load(&path).unwrap().dimensions(), (224, 224));

    // A cap of zero reads nothing: an invalid limit, named as such.
    let zero = ImageLimits { max_file_bytes: 0 };
    assert!(matches!(
        decode_image_file_with(&path, &zero),
        Err(Error::Invalid { .. })
    ));
}

/// A pipe is read up to the cap it is given, not the default.
#[cfg(unix)]
#[test]
fn a_pipe_is_read_up_to_a_lowered_cap() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("small_cap.png");
    mkfifo(&fifo);
    let stop = fifo_writer(fifo.clone(), PNG_SIGNATURE.to_vec(), 10 * 1024 * 1024);
    let path = fifo.clone();
    let limits = ImageLimits {
        max_file_bytes: 1024 * 1024,
    };
    let result = within(20, "a pipe with a 1 MiB cap", move || {
        decode_image_file_with(&path, &limits)
    });
    drop(stop);
    assert!(
        matches!(&result, Err(Error::ImageTooLarge { path, .. }) if path == &fifo),
        "{:?}",
        result.map(|i| i.dimensions())
    );
}

/// `/dev/zero` is endless: its first bytes are no image format, so it is refused at once.
#[cfg(target_os = "linux")]
#[test]
fn dev_zero_is_not_an_image() {
    let result = within(20, "/dev/zero", || {
        decode_image_file(Path::new("/dev/zero"))
    });
    assert!(
        matches!(&result, Err(Error::ImageDecode { path, .. }) if path == Path::new("/dev/zero")),
        "{:?}",
        result.map(|i| i.dimensions())
    );
}

/// A supported signature alone, or a format the crate does not decode, is named as such.
#[test]
fn first_bytes_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let ico = dir.path().join("favicon.png");
    std::fs::write(&ico, b"\x00\x00\x01\x00\x01\x00\x10\x10 and the rest").unwrap();
    match decode_image_file(&ico) {
        Err(Error::ImageDecode { message, .. }) => {
            assert!(
                message.contains("Ico images are not supported"),
                "{message}"
            )
        }
        other => panic!(
            "expected ImageDecode, got {:?}",
            other.map(|i| i.dimensions())
        ),
    }
    let empty = dir.path().join("empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    match decode_image_file(&empty) {
        Err(Error::ImageDecode { message, .. }) => assert_eq!(message, "file is empty"),
        other => panic!(
            "expected ImageDecode, got {:?}",
            other.map(|i| i.dimensions())
        ),
    }
}
