//! Image decoding and preprocessing against torchvision/PIL.
//!
//! Expected values come from `tests/data/pytorch_reference.json` and the 224x224 crops in
//! `tests/data/reference/` (both written by `tools/pytorch_reference.py`), or are hand-computed.

use std::path::{Path, PathBuf};

use alexnet_cuda::image::{
    center_crop, collect_image_paths, decode_image_bytes, decode_image_file, load_batch,
    load_batch_into, resize_bilinear, Preprocess, U8Batch, IMAGENET_MEAN, IMAGENET_STD,
    MAX_IMAGE_DIMENSION,
};
use alexnet_cuda::Error;
use image::{GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};

const PHOTOS: [&str; 5] = [
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "camera.png",
    "logo.png",
];

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

/// The resized `[width, height]` of each photo, from the fixture.
fn fixture_resized(photo: &str) -> (u32, u32) {
    let text = std::fs::read_to_string(data("pytorch_reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let r = &v["presets"]["torchvision"]["photos"][photo]["resized"];
    let r = r
        .as_array()
        .unwrap_or_else(|| panic!("no resized size for {photo}"));
    (r[0].as_u64().unwrap() as u32, r[1].as_u64().unwrap() as u32)
}

fn encode_png(img: &image::DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Max and mean absolute difference over all bytes.
fn diff(a: &RgbImage, b: &RgbImage) -> (u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions());
    let mut max = 0u8;
    let mut sum = 0u64;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += d as u64;
    }
    (max, sum as f64 / a.as_raw().len() as f64)
}

// ------------------------------------------------------------------------------------------
// Against torchvision / PIL
// ------------------------------------------------------------------------------------------

#[test]
fn resized_sizes_match_torchvision() {
    let pre = Preprocess::default();
    for photo in PHOTOS {
        let img = decode_image_file(&data(&format!("images/{photo}"))).unwrap();
        let want = fixture_resized(photo);
        assert_eq!(pre.resized_size(img.width(), img.height()), want, "{photo}");
        let full = resize_bilinear(&img, want.0, want.1);
        assert_eq!(full.dimensions(), want, "{photo}");
    }
    // Hand-checked: int(256 * 640 / 427) = int(383.70) = 383; portrait and landscape agree.
    assert_eq!(pre.resized_size(640, 427), (383, 256));
    assert_eq!(pre.resized_size(427, 640), (256, 383));
    assert_eq!(pre.resized_size(300, 500), (256, 426));
    assert_eq!(pre.resized_size(500, 300), (426, 256));
    assert_eq!(pre.resized_size(1000, 1000), (256, 256));
}

/// The PNG photos decode to the same pixels as PIL, and the resampler is Pillow's, so their
/// crops are bit-exact. rocket.jpg differs only by the JPEG decoder's IDCT rounding (zune-jpeg vs
/// libjpeg-turbo), a level or two on a few pixels.
#[test]
fn crops_match_pil_reference() {
    let pre = Preprocess::default();
    // (photo, max abs difference allowed, mean abs difference allowed), in levels of 255.
    let tolerances = [
        ("chelsea.png", 0u8, 0.0f64),
        ("coffee.png", 0, 0.0),
        ("rocket.jpg", 2, 0.02),
        ("camera.png", 0, 0.0),
        ("logo.png", 0, 0.0),
    ];
    for (photo, max_tol, mean_tol) in tolerances {
        let img = decode_image_file(&data(&format!("images/{photo}"))).unwrap();
        let ours = pre.resize_and_crop(&img).unwrap();
        assert_eq!(ours.dimensions(), (224, 224), "{photo}");
        let stem = photo.rsplit_once('.').unwrap().0;
        let reference = decode_image_file(&data(&format!("reference/{stem}_crop224.png"))).unwrap();
        let (max, mean) = diff(&ours, &reference);
        println!("{photo:12} vs PIL crop: max |diff| = {max}, mean |diff| = {mean:.5}");
        assert!(
            max <= max_tol && mean <= mean_tol,
            "{photo}: max {max} (allowed {max_tol}), mean {mean} (allowed {mean_tol})"
        );
    }
}

/// The windowed resize+crop is the same as resizing everything and then cropping.
#[test]
fn windowed_crop_equals_full_resize_then_crop() {
    let pre = Preprocess::default();
    for photo in PHOTOS {
        let img = decode_image_file(&data(&format!("images/{photo}"))).unwrap();
        let (w, h) = pre.resized_size(img.width(), img.height());
        let full = center_crop(&resize_bilinear(&img, w, h), 224);
        assert_eq!(pre.resize_and_crop(&img).unwrap(), full, "{photo}");
    }
    // Synthetic non-square images needing resampling, both orientations, and an upscale.
    for (w, h) in [(300, 500), (500, 300), (97, 61), (1000, 257)] {
        let img = RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x * 7 + y) as u8, (x ^ y) as u8, (x * y / 3) as u8])
        });
        let (rw, rh) = pre.resized_size(w, h);
        let full = center_crop(&resize_bilinear(&img, rw, rh), 224);
        let ours = pre.resize_and_crop(&img).unwrap();
        assert_eq!(ours.dimensions(), (224, 224), "{w}x{h}");
        assert_eq!(ours, full, "{w}x{h}");
    }
}

/// A constant image stays exactly constant through the fixed-point resampler.
#[test]
fn constant_image_stays_constant() {
    let pre = Preprocess::default();
    // Includes extreme aspect ratios: the 3000x1 image resizes to 768000x256, of which only the
    // crop window is computed.
    for (w, h) in [
        (300, 500),
        (500, 300),
        (1000, 999),
        (100, 100),
        (3000, 1),
        (1, 3000),
    ] {
        let img = RgbImage::from_pixel(w, h, Rgb([0, 128, 255]));
        let crop = pre.resize_and_crop(&img).unwrap();
        assert!(crop.pixels().all(|p| *p == Rgb([0, 128, 255])), "{w}x{h}");
    }
}

/// A GIF's first frame is composed onto its logical screen as PIL does (see
/// `tools/gif_reference.py`, which wrote the GIFs and PIL's `convert("RGB")` of each): the
/// uncovered area is palette index 0, or the transparency index when the frame has one; a frame
/// reaching past the screen enlarges the canvas; indices past the palette are black; only the
/// first frame counts. Pixel for pixel, and through the crop too.
#[test]
fn gif_first_frame_is_composed_like_pil() {
    let pre = Preprocess::default();
    for name in [
        "offset",
        "offset_transparent",
        "overflow",
        "local_palette",
        "short_palette",
        "no_palette",
        "interlaced",
    ] {
        let ours = decode_image_file(&data(&format!("gif/{name}.gif"))).unwrap();
        let pil = decode_image_file(&data(&format!("reference/gif_{name}_rgb.png"))).unwrap();
        assert_eq!(ours.dimensions(), pil.dimensions(), "{name}");
        let (max, mean) = diff(&ours, &pil);
        assert!(max == 0, "{name}: max |diff| {max}, mean {mean}");
        let crop = pre.load(&data(&format!("gif/{name}.gif"))).unwrap();
        assert_eq!(crop, pre.resize_and_crop(&pil).unwrap(), "{name}");
    }
}

// ------------------------------------------------------------------------------------------
// Colour conversion
// ------------------------------------------------------------------------------------------

#[test]
fn grayscale_becomes_equal_channels() {
    // The sample photo is 8-bit grayscale.
    let cam = decode_image_file(&data("images/camera.png")).unwrap();
    assert_eq!(cam.dimensions(), (512, 512));
    assert!(cam.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
    assert!(
        cam.pixels().any(|p| p[0] != cam.get_pixel(0, 0)[0]),
        "not a flat image"
    );

    // A synthetic one, values survive unchanged.
    let g = GrayImage::from_fn(5, 3, |x, y| Luma([(x * 40 + y) as u8]));
    let bytes = encode_png(&image::DynamicImage::ImageLuma8(g.clone()));
    let rgb = decode_image_bytes(&bytes, Path::new("gray.png")).unwrap();
    for (x, y, p) in rgb.enumerate_pixels() {
        let v = g.get_pixel(x, y)[0];
        assert_eq!(*p, Rgb([v, v, v]));
    }
}

#[test]
fn rgba_drops_alpha() {
    let logo = decode_image_file(&data("images/logo.png")).unwrap();
    assert_eq!(logo.dimensions(), (500, 500));

    // Alpha is dropped, not blended with any background (PIL's convert("RGB")).
    let a = RgbaImage::from_fn(4, 2, |x, y| {
        Rgba([x as u8 * 60, y as u8 * 100, 7, (x * 80) as u8])
    });
    let bytes = encode_png(&image::DynamicImage::ImageRgba8(a.clone()));
    let rgb = decode_image_bytes(&bytes, Path::new("rgba.png")).unwrap();
    for (x, y, p) in rgb.enumerate_pixels() {
        let q = a.get_pixel(x, y);
        assert_eq!(*p, Rgb([q[0], q[1], q[2]]));
    }
}

#[test]
fn sixteen_bit_becomes_eight_bit() {
    let img = image::ImageBuffer::<Rgb<u16>, Vec<u16>>::from_fn(2, 1, |x, _| {
        if x == 0 {
            Rgb([0, 65535, 257 * 100])
        } else {
            Rgb([257 * 3, 65535, 0])
        }
    });
    let bytes = encode_png(&image::DynamicImage::ImageRgb16(img));
    let rgb = decode_image_bytes(&bytes, Path::new("deep.png")).unwrap();
    assert_eq!(*rgb.get_pixel(0, 0), Rgb([0, 255, 100]));
    assert_eq!(*rgb.get_pixel(1, 0), Rgb([3, 255, 0]));
}

#[test]
fn format_comes_from_content_not_extension() {
    let img = RgbImage::from_pixel(3, 3, Rgb([1, 2, 3]));
    let png = encode_png(&image::DynamicImage::ImageRgb8(img.clone()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("actually_a_png.jpg");
    std::fs::write(&path, &png).unwrap();
    assert_eq!(decode_image_file(&path).unwrap(), img);
}

// ------------------------------------------------------------------------------------------
// Crop geometry (no resampling: short side already 256)
// ------------------------------------------------------------------------------------------

/// Pixel value encodes its coordinate.
fn coord_image(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x % 256) as u8,
            (y % 256) as u8,
            ((x / 256) * 16 + y / 256) as u8,
        ])
    })
}

fn assert_crop_at(crop: &RgbImage, src: &RgbImage, left: u32, top: u32, what: &str) {
    assert_eq!(crop.dimensions(), (224, 224), "{what}");
    for (x, y, p) in crop.enumerate_pixels() {
        assert_eq!(
            p,
            src.get_pixel(left + x, top + y),
            "{what}: crop pixel ({x}, {y}) should be source ({}, {})",
            left + x,
            top + y
        );
    }
}

#[test]
fn identity_256_square_crops_at_16() {
    let pre = Preprocess::default();
    let src = coord_image(256, 256);
    let crop = pre.resize_and_crop(&src).unwrap();
    // round((256 - 224) / 2) = 16 on both axes, pixel-exact.
    assert_eq!(*crop.get_pixel(0, 0), Rgb([16, 16, 0]));
    assert_eq!(*crop.get_pixel(223, 223), Rgb([239, 239, 0]));
    assert_crop_at(&crop, &src, 16, 16, "256x256");
}

#[test]
fn non_square_crop_offsets_portrait_and_landscape() {
    let pre = Preprocess::default();
    // (width, height, left, top), hand-computed with Python's round-half-to-even:
    //   round((400-224)/2) = 88; round(177/2 = 88.5) = 88; round(179/2 = 89.5) = 90;
    //   round((256-224)/2) = 16; round((300-224)/2) = 38.
    let cases = [
        (256, 400, 16, 88),
        (400, 256, 88, 16),
        (256, 401, 16, 88),
        (401, 256, 88, 16),
        (256, 403, 16, 90),
        (403, 256, 90, 16),
        (256, 300, 16, 38),
        (600, 256, 188, 16),
    ];
    for (w, h, left, top) in cases {
        let src = coord_image(w, h);
        assert_eq!(
            pre.resized_size(w, h),
            (w, h),
            "{w}x{h} must not be resampled"
        );
        let crop = pre.resize_and_crop(&src).unwrap();
        assert_crop_at(&crop, &src, left, top, &format!("{w}x{h}"));
        // The first pixel names its source coordinate.
        assert_eq!(*crop.get_pixel(0, 0), *src.get_pixel(left, top));
    }
}

#[test]
fn resampled_non_square_images_give_224() {
    let pre = Preprocess::default();
    for (w, h) in [(300, 500), (500, 300)] {
        let img = coord_image(w, h);
        let crop = pre.resize_and_crop(&img).unwrap();
        assert_eq!(crop.dimensions(), (224, 224), "{w}x{h}");
    }
}

#[test]
fn smaller_than_crop_is_zero_padded_like_torchvision() {
    // resize_shorter < crop: torchvision pads (crop - side) // 2 zeros before, the rest after.
    let pre = Preprocess {
        resize_shorter: 201,
        ..Preprocess::default()
    };
    let src = coord_image(201, 300); // already 201 on the short side: no resampling
    let crop = pre.resize_and_crop(&src).unwrap();
    assert_eq!(crop.dimensions(), (224, 224));
    // Width: 23 columns missing -> 11 zero columns before, 12 after; height: top = 38.
    for (x, y, p) in crop.enumerate_pixels() {
        if !(11..212).contains(&x) {
            assert_eq!(*p, Rgb([0, 0, 0]), "padding at ({x}, {y})");
        } else {
            assert_eq!(p, src.get_pixel(x - 11, y + 38), "({x}, {y})");
        }
    }
    assert_eq!(center_crop(&src, 224), crop);
}

#[test]
fn invalid_parameters_are_errors() {
    let img = coord_image(10, 10);
    for pre in [
        Preprocess {
            crop: 0,
            ..Preprocess::default()
        },
        Preprocess {
            resize_shorter: 0,
            ..Preprocess::default()
        },
        Preprocess {
            std: [1.0, 0.0, 1.0],
            ..Preprocess::default()
        },
    ] {
        assert!(
            matches!(pre.resize_and_crop(&img), Err(Error::Invalid { .. })),
            "{pre:?}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Normalisation
// ------------------------------------------------------------------------------------------

#[test]
fn normalize_hand_computed() {
    let pre = Preprocess::default();
    // Pixel (0, 0) = black, (1, 0) = white, (0, 1) = (255, 0, 128), the rest grey 100.
    let mut img = RgbImage::from_pixel(224, 224, Rgb([100, 100, 100]));
    img.put_pixel(0, 0, Rgb([0, 0, 0]));
    img.put_pixel(1, 0, Rgb([255, 255, 255]));
    img.put_pixel(0, 1, Rgb([255, 0, 128]));
    let mut out = vec![f32::NAN; 3 * 224 * 224];
    pre.normalize_into(&img, &mut out).unwrap();
    let at = |c: usize, y: usize, x: usize| out[c * 224 * 224 + y * 224 + x];

    // (0 - mean) / std and (1 - mean) / std, computed by hand.
    let zero = [-2.117_904, -2.035_714_3, -1.804_444_4];
    let one = [2.248_908_3, 2.428_571_4, 2.64];
    for c in 0..3 {
        assert!(
            (at(c, 0, 0) - zero[c]).abs() < 1e-5,
            "c{c}: {}",
            at(c, 0, 0)
        );
        assert!((at(c, 0, 1) - one[c]).abs() < 1e-5, "c{c}: {}", at(c, 0, 1));
    }
    // CHW layout: pixel (x=0, y=1) has R = 255, G = 0, B = 128.
    assert!((at(0, 1, 0) - one[0]).abs() < 1e-5);
    assert!((at(1, 1, 0) - zero[1]).abs() < 1e-5);
    // (128/255 - 0.406) / 0.225 = 0.426_492_37
    assert!((at(2, 1, 0) - 0.426_492_37).abs() < 1e-5, "{}", at(2, 1, 0));
    // Grey 100: (100/255 - mean) / std.
    let grey = [-0.405_428_55, -0.285_014, -0.061_525_05];
    for (c, g) in grey.iter().enumerate() {
        assert!(
            (at(c, 100, 100) - g).abs() < 1e-5,
            "c{c}: {}",
            at(c, 100, 100)
        );
    }
    // Bit-exact with the documented f32 formula.
    for (c, (m, s)) in IMAGENET_MEAN.iter().zip(IMAGENET_STD).enumerate() {
        let want = (255.0f32 / 255.0 - m) / s;
        assert_eq!(at(c, 0, 1).to_bits(), want.to_bits());
    }
    assert!(out.iter().all(|v| v.is_finite()));
}

#[test]
fn normalize_checks_lengths() {
    let pre = Preprocess::default();
    let img = RgbImage::new(224, 224);
    let mut short = vec![0f32; 3 * 224 * 224 - 1];
    assert!(matches!(
        pre.normalize_into(&img, &mut short),
        Err(Error::Shape { .. })
    ));
    let small = RgbImage::new(223, 224);
    let mut out = vec![0f32; 3 * 224 * 224];
    assert!(matches!(
        pre.normalize_into(&small, &mut out),
        Err(Error::Shape { .. })
    ));
}

// ------------------------------------------------------------------------------------------
// Batches
// ------------------------------------------------------------------------------------------

#[test]
fn u8_batch_layout_and_nchw() {
    let pre = Preprocess::default();
    let mut batch = U8Batch::new(224);
    assert!(batch.is_empty());
    let a = RgbImage::from_fn(224, 224, |x, y| Rgb([x as u8, y as u8, 9]));
    let b = RgbImage::from_pixel(224, 224, Rgb([255, 0, 51]));
    batch.push(&a).unwrap();
    batch.push(&b).unwrap();
    assert!(matches!(
        batch.push(&RgbImage::new(224, 225)),
        Err(Error::Shape { .. })
    ));
    assert_eq!(batch.len(), 2);
    assert_eq!(batch.shape(), [2, 224, 224, 3]);
    assert_eq!(batch.as_slice().len(), 2 * 224 * 224 * 3);
    assert_eq!(&batch.as_slice()[..224 * 224 * 3], a.as_raw().as_slice());
    assert_eq!(batch.image(1).unwrap().as_raw(), &b.as_raw().as_slice());
    assert!(batch.image(2).is_none());
    // HWC: byte (y=3, x=5, c=1) of image 0 is y.
    assert_eq!(batch.as_slice()[(3 * 224 + 5) * 3 + 1], 3);

    let t = batch.to_nchw_f32(&pre);
    assert_eq!(t.shape(), &[2, 3, 224, 224]);
    for (i, img) in [&a, &b].into_iter().enumerate() {
        let mut want = vec![0f32; 3 * 224 * 224];
        pre.normalize_into(img, &mut want).unwrap();
        let got = t.index_axis(ndarray::Axis(0), i);
        assert_eq!(got.as_slice().unwrap(), want.as_slice(), "image {i}");
    }
    // Hand-checked element: image 1, channel 0 is white: (1 - 0.485) / 0.229.
    assert!((t[[1, 0, 7, 7]] - 2.248_908_3).abs() < 1e-5);
    // Image 0, channel 0, (y=3, x=5): R = x = 5.
    let want = (5.0f32 / 255.0 - 0.485) / 0.229;
    assert_eq!(t[[0, 0, 3, 5]], want);

    assert_eq!(
        U8Batch::new(224).to_nchw_f32(&pre).shape(),
        &[0, 3, 224, 224]
    );
}

#[test]
fn load_batch_keeps_order_and_reports_failures() {
    let pre = Preprocess::default();
    let paths = vec![
        data("images/chelsea.png"),
        data("bad/truncated.jpg"),
        data("images/coffee.png"),
        data("bad/does_not_exist.png"),
        data("bad/empty.jpg"),
        data("images/camera.png"),
        data("bad/not_an_image.png"),
    ];
    let loaded = load_batch(&paths, &pre);
    assert_eq!(loaded.sources, vec![0, 2, 5]);
    assert_eq!(loaded.batch.len(), 3);
    let failed: Vec<usize> = loaded.failures.iter().map(|(i, _)| *i).collect();
    assert_eq!(failed, vec![1, 3, 4, 6]);
    for (i, e) in &loaded.failures {
        let ok = match (i, e) {
            (1 | 4 | 6, Error::ImageDecode { path, .. }) => path == &paths[*i],
            (3, Error::Io { path, source }) => {
                path == &paths[3] && source.kind() == std::io::ErrorKind::NotFound
            }
            _ => false,
        };
        assert!(ok, "input {i}: unexpected {e:?}");
        assert!(e.to_string().contains(&*paths[*i].to_string_lossy()), "{e}");
    }
    for (row, &src) in loaded.sources.iter().enumerate() {
        let want = pre
            .resize_and_crop(&decode_image_file(&paths[src]).unwrap())
            .unwrap();
        assert_eq!(
            loaded.batch.image(row).unwrap().as_raw(),
            &want.as_raw().as_slice()
        );
    }
    let empty = load_batch(&[], &pre);
    assert!(empty.batch.is_empty() && empty.sources.is_empty() && empty.failures.is_empty());
}

/// Straight into a caller's buffer: the same rows as `load_batch`, packed from row 0, the
/// bytes past them untouched; a buffer too small is refused before anything is decoded.
#[test]
fn load_batch_into_writes_the_rows_load_batch_makes() {
    let pre = Preprocess::default();
    let paths = vec![
        data("bad/truncated.jpg"),
        data("images/chelsea.png"),
        data("bad/does_not_exist.png"),
        data("images/coffee.png"),
    ];
    let per = 224 * 224 * 3;
    let mut out = vec![0xA5u8; paths.len() * per];
    let rows = load_batch_into(&paths, &pre, &mut out).unwrap();
    let loaded = load_batch(&paths, &pre);
    assert_eq!(rows.sources, loaded.sources);
    assert_eq!(rows.sources, vec![1, 3]);
    let failed: Vec<usize> = rows.failures.iter().map(|(i, _)| *i).collect();
    assert_eq!(failed, vec![0, 2]);
    assert_eq!(&out[..2 * per], loaded.batch.as_slice());
    assert!(out[2 * per..].iter().all(|&b| b == 0xA5));

    let mut small = vec![0u8; paths.len() * per - 1];
    assert!(matches!(
        load_batch_into(&paths, &pre, &mut small),
        Err(Error::Shape { .. })
    ));
}

// ------------------------------------------------------------------------------------------
// Bad files
// ------------------------------------------------------------------------------------------

/// A result, without dumping pixels.
fn describe(r: &Result<RgbImage, Error>) -> String {
    match r {
        Ok(img) => format!("Ok({}x{} image)", img.width(), img.height()),
        Err(e) => format!("Err({e:?})"),
    }
}

fn assert_decode_error(path: &Path) {
    match decode_image_file(path) {
        Err(Error::ImageDecode { path: p, message }) => {
            assert_eq!(p, path);
            println!("{}: {message}", path.display());
        }
        other => panic!(
            "{}: expected ImageDecode, got {}",
            path.display(),
            describe(&other)
        ),
    }
}

#[test]
fn truncated_jpeg_is_decode_error() {
    assert_decode_error(&data("bad/truncated.jpg"));

    // The same photo cut at several points (the JPEG decoder alone would fill the rest with grey).
    let full = std::fs::read(data("images/rocket.jpg")).unwrap();
    let origin = Path::new("cut.jpg");
    for cut in [3, 20, 600, full.len() / 2, full.len() - 2] {
        let r = decode_image_bytes(&full[..cut], origin);
        assert!(
            matches!(&r, Err(Error::ImageDecode { path, .. }) if path == origin),
            "cut at {cut}: {}",
            describe(&r)
        );
    }
    // Bytes after the end-of-image marker are ignored.
    let mut padded = full.clone();
    padded.extend_from_slice(b"trailing garbage \xFF\xD8");
    let a = decode_image_bytes(&padded, origin).unwrap();
    assert_eq!(a, decode_image_bytes(&full, origin).unwrap());
    // A JPEG written by the image crate decodes (baseline, 4:2:0).
    let img = RgbImage::from_fn(33, 17, |x, y| Rgb([(x * 7) as u8, (y * 15) as u8, 90]));
    let mut jpeg = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut jpeg, image::ImageFormat::Jpeg)
        .unwrap();
    let back = decode_image_bytes(jpeg.get_ref(), origin).unwrap();
    assert_eq!(back.dimensions(), (33, 17));
}

#[test]
fn not_an_image_is_decode_error() {
    assert_decode_error(&data("bad/not_an_image.png"));
}

#[test]
fn empty_file_is_decode_error() {
    assert_decode_error(&data("bad/empty.jpg"));
}

#[test]
fn missing_file_is_io_error() {
    let path = data("bad/no_such_file.jpg");
    match decode_image_file(&path) {
        Err(Error::Io { path: p, source }) => {
            assert_eq!(p, path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Io, got {}", describe(&other)),
    }
}

/// CRC-32 (IEEE, reflected, as PNG uses), bit by bit.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG signature and IHDR (8-bit RGB) claiming `width x height`, with a correct CRC, followed
/// by an empty IDAT and IEND.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], body: &[u8]) {
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        let mut crc_input = kind.to_vec();
        crc_input.extend_from_slice(body);
        out.extend_from_slice(&crc_input);
        out.extend_from_slice(&crc32(&crc_input).to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // depth 8, RGB, deflate, filter 0, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &[]);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[test]
fn crc32_check_value() {
    // The standard CRC-32 check value, and PNG's IEND chunk CRC.
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32(b"IEND"), 0xAE42_6082);
}

#[test]
fn huge_png_header_is_too_large_not_an_abort() {
    let bytes = png_header(100_000, 100_000);
    let origin = Path::new("huge.png");
    match decode_image_bytes(&bytes, origin) {
        Err(Error::ImageTooLarge { path, message }) => {
            assert_eq!(path, origin);
            println!("100000x100000: {message}");
        }
        other => panic!("expected ImageTooLarge, got {}", describe(&other)),
    }
    // Through the file API too, naming the file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("huge.png");
    std::fs::write(&file, &bytes).unwrap();
    assert!(
        matches!(decode_image_file(&file), Err(Error::ImageTooLarge { path, .. }) if path == file)
    );

    // Within the per-side limit but over the allocation limit (16000 * 16000 * 3 > 512 MiB).
    let bytes = png_header(16_000, 16_000);
    const { assert!(16_000 <= MAX_IMAGE_DIMENSION) };
    assert!(
        matches!(
            decode_image_bytes(&bytes, origin),
            Err(Error::ImageTooLarge { .. })
        ),
        "16000x16000 should exceed the allocation limit"
    );
    // A small header with no pixel data is a decode error, not a size error (the header is valid).
    assert!(matches!(
        decode_image_bytes(&png_header(4, 4), origin),
        Err(Error::ImageDecode { .. })
    ));
}

// ------------------------------------------------------------------------------------------
// Paths
// ------------------------------------------------------------------------------------------

#[test]
fn collect_image_paths_sorted_skips_hidden_and_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in ["b.png", "a.jpg", ".hidden.png", "C.png", "z.txt"] {
        std::fs::write(d.join(name), b"x").unwrap();
    }
    std::fs::create_dir(d.join("sub")).unwrap();
    std::fs::write(d.join("sub/inner.png"), b"x").unwrap();
    let single = d.join("sub/inner.png");

    let got =
        collect_image_paths(&[single.clone(), d.to_path_buf(), d.join(".hidden.png")]).unwrap();
    let want = vec![
        single,
        d.join("C.png"), // byte order: uppercase before lowercase
        d.join("a.jpg"),
        d.join("b.png"),
        d.join("z.txt"),
        d.join(".hidden.png"), // given explicitly: kept
    ];
    assert_eq!(got, want);
}

#[test]
fn collect_image_paths_keeps_missing_files_for_per_image_reporting() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.jpg");
    // A missing file is kept in place so that decoding reports it and the others still run.
    assert_eq!(
        collect_image_paths(std::slice::from_ref(&missing)).unwrap(),
        vec![missing.clone()]
    );
    let loaded = load_batch(std::slice::from_ref(&missing), &Preprocess::default());
    match &loaded.failures[..] {
        [(0, Error::Io { path, source })] => {
            assert_eq!(path, &missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected one Io failure, got {other:?}"),
    }
    assert_eq!(
        collect_image_paths(&[dir.path().to_path_buf()]).unwrap(),
        Vec::<PathBuf>::new()
    );
}

// ------------------------------------------------------------------------------------------
// Grey images are resampled as one channel
// ------------------------------------------------------------------------------------------

/// `Preprocess::load` resamples grey images (8-bit, with alpha, 16-bit) before widening them to
/// RGB; the crop must be byte for byte the crop of the widened image, which is what
/// `decode_image_file` returns and what PIL's `convert("RGB")` hands torchvision.
#[test]
fn grey_images_resampled_narrow_match_the_widened_image() {
    use image::{DynamicImage, ImageBuffer, Luma, LumaA};
    let dir = tempfile::tempdir().unwrap();
    let pre = Preprocess::default();
    let pattern = |x: u32, y: u32| ((x * 7 + y * 13 + (x * y) % 31) % 256) as u8;
    for (w, h) in [(640u32, 427u32), (300, 1000), (257, 256), (100, 60)] {
        let grey = ImageBuffer::from_fn(w, h, |x, y| Luma([pattern(x, y)]));
        let grey_alpha = ImageBuffer::from_fn(w, h, |x, y| LumaA([pattern(x, y), (x % 256) as u8]));
        let grey16 = ImageBuffer::from_fn(w, h, |x, y| Luma([u16::from(pattern(x, y)) * 251 + 3]));
        let cases = [
            ("l8", DynamicImage::ImageLuma8(grey)),
            ("la8", DynamicImage::ImageLumaA8(grey_alpha)),
            ("l16", DynamicImage::ImageLuma16(grey16)),
        ];
        for (name, img) in cases {
            let path = dir.path().join(format!("{name}_{w}x{h}.png"));
            img.save(&path).unwrap();
            let widened = decode_image_file(&path).unwrap();
            assert_eq!(widened, img.to_rgb8(), "{name} {w}x{h}: decode");
            let want = pre.resize_and_crop(&widened).unwrap();
            let got = pre.load(&path).unwrap();
            assert_eq!(got, want, "{name} {w}x{h}: crop");
        }
    }
}
