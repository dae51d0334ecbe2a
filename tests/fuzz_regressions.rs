//! Regression tests for what the fuzz targets in `fuzz/` found, and the generator of their seed
//! corpora (`cargo test --release --test fuzz_regressions -- --ignored write_fuzz_seeds`, which
//! rewrites `fuzz/seeds/`). See `fuzz/README.md`.

use std::path::{Path, PathBuf};

use alexnet_cuda::config::InputShape;
use alexnet_cuda::weights::StorageDtype;
use alexnet_cuda::{AlexNetConfig, Error, Weights};

/// The fuzz targets' tiny network (`fuzz/src/lib.rs` has the same): 3x67x67 input, channels
/// 2-3-4-4-3, fc widths 8-8-5; about 1,400 parameters.
fn tiny_config() -> AlexNetConfig {
    let mut config = AlexNetConfig::five_conv_three_fc("tiny", [2, 3, 4, 4, 3], None);
    config.input = InputShape {
        channels: 3,
        height: 67,
        width: 67,
    };
    for (fc, width) in config.fcs.iter_mut().zip([8, 8, 5]) {
        fc.out_features = width;
    }
    config.layers().expect("tiny config is well formed");
    config
}

/// A safetensors file: header length, the header JSON, `data_len` zero bytes.
fn safetensors_file(header: &str, data_len: usize) -> Vec<u8> {
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.resize(file.len() + data_len, 0);
    file
}

fn origin() -> &'static Path {
    Path::new("fuzz.safetensors")
}

/// Eight 2^61 - 1 byte tensors whose data offsets chain up to 2^64 - 8: safetensors adds the
/// 8-byte length field and the header length to that end offset without checking for overflow,
/// which panics ("attempt to add with overflow") in builds with overflow checks.
fn offsets_summing_past_u64() -> Vec<u8> {
    let span = (1u64 << 61) - 1;
    let entries: Vec<String> = (0..8u64)
        .map(|i| {
            format!(
                "\"t{i}\":{{\"dtype\":\"U8\",\"shape\":[{span}],\"data_offsets\":[{},{}]}}",
                i * span,
                (i + 1) * span
            )
        })
        .collect();
    safetensors_file(&format!("{{{}}}", entries.join(",")), 0)
}

#[test]
fn data_offsets_adding_up_past_u64_max_are_a_format_error() {
    let file = offsets_summing_past_u64();
    for config in [None, Some(&tiny_config())] {
        let err = Weights::from_safetensors_bytes(&file, origin(), config).unwrap_err();
        assert!(matches!(err, Error::WeightsFormat { .. }), "{err}");
        assert!(err.to_string().contains("fuzz.safetensors"), "{err}");
    }
}

/// A corrupt 1,290-byte JPEG found by the `image_decode` target (2026-11-27): zune-jpeg 0.5.15
/// multiplies the DC prediction by the quantisation table without an overflow check
/// (`bitstream.rs:400`, upstream etemesi254/zune-image#382). With overflow checks on (debug builds)
/// that panics inside the decoder, which this crate cannot catch; in release builds it wraps, and
/// the image must then decode to pixels or a named error, and preprocess like any other.
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "zune-jpeg 0.5.15 panics on this input when overflow checks are on (zune-image#382); \
              run with --release"
)]
fn jpeg_with_overflowing_dc_prediction_does_not_panic() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz/zune_jpeg_dc_overflow.jpg");
    let bytes = std::fs::read(&path).unwrap();
    match alexnet_cuda::image::decode_image_bytes(&bytes, &path) {
        Ok(img) => {
            let pre = alexnet_cuda::Preprocess::default();
            let crop = pre.resize_and_crop(&img).unwrap();
            assert_eq!(crop.dimensions(), (224, 224));
        }
        Err(err) => assert!(
            err.to_string().contains("zune_jpeg_dc_overflow.jpg"),
            "{err}"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Seed corpora
// ---------------------------------------------------------------------------------------------

fn seeds_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target)
}

fn write_seed(target: &str, name: &str, bytes: &[u8]) {
    let dir = seeds_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// Writes the seed files of the three fuzz targets under `fuzz/seeds/`.
#[test]
#[ignore = "writes fuzz/seeds/; run by hand when the seeds need regenerating"]
fn write_fuzz_seeds() {
    let config = tiny_config();
    let weights = Weights::paper_init(&config, 1).unwrap();
    let f16 = weights.to_safetensors_bytes(StorageDtype::F16).unwrap();
    let bf16 = weights.to_safetensors_bytes(StorageDtype::BF16).unwrap();
    for (name, bytes) in [
        ("tiny_f16.safetensors", f16.as_slice()),
        ("tiny_bf16.safetensors", bf16.as_slice()),
        ("tiny_f16_truncated.safetensors", &f16[..f16.len() - 100]),
        ("header_only.safetensors", &safetensors_file("{}", 0)),
        (
            "metadata_only.safetensors",
            &safetensors_file("{\"__metadata__\":{\"format\":\"pt\"}}", 0),
        ),
        (
            "torchvision_names.safetensors",
            &safetensors_file(
                "{\"features.0.bias\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\
                 \"classifier.6.bias\":{\"dtype\":\"BF16\",\"shape\":[5],\"data_offsets\":[8,18]}}",
                18,
            ),
        ),
    ] {
        write_seed("weights_bytes", name, bytes);
    }
    // Check the valid seeds load before they are used.
    for bytes in [&f16, &bf16] {
        Weights::from_safetensors_bytes(bytes, origin(), Some(&config)).unwrap();
    }

    // Images: a few hundred bytes each, every format the decoder guesses.
    let rgb = image::RgbImage::from_fn(12, 9, |x, y| image::Rgb([x as u8 * 20, y as u8 * 25, 90]));
    let formats = [
        ("tiny.png", image::ImageFormat::Png),
        ("tiny.jpg", image::ImageFormat::Jpeg),
        ("tiny.gif", image::ImageFormat::Gif),
        ("tiny.bmp", image::ImageFormat::Bmp),
        ("tiny.tiff", image::ImageFormat::Tiff),
        ("tiny.webp", image::ImageFormat::WebP),
    ];
    for (name, format) in formats {
        let mut bytes = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(rgb.clone())
            .write_to(&mut bytes, format)
            .unwrap();
        write_seed("image_decode", name, bytes.get_ref());
    }
    let gray = image::GrayAlphaImage::from_fn(5, 7, |x, y| image::LumaA([(x * y * 7) as u8, 200]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageLumaA8(gray)
        .write_to(&mut bytes, image::ImageFormat::Png)
        .unwrap();
    write_seed("image_decode", "gray_alpha.png", bytes.get_ref());
    let bad = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bad");
    for entry in std::fs::read_dir(bad).unwrap() {
        let path = entry.unwrap().path();
        let name = format!("bad_{}", path.file_name().unwrap().to_string_lossy());
        write_seed("image_decode", &name, &std::fs::read(&path).unwrap());
    }
}
