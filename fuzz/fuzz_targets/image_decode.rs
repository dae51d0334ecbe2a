//! Arbitrary bytes into the image decoder (format guessed from the content: PNG, JPEG, BMP, GIF,
//! WebP, TIFF), then, for what decodes, torchvision's resize + centre crop and the normalisation.
//! Must never panic, abort or hang; memory stays bounded by the decoder limits in src/image/mod.rs
//! (run with `-rss_limit_mb=2048`).
#![no_main]

use std::path::Path;

use alexnet_cuda::image::decode_image_bytes;
use alexnet_cuda::Preprocess;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let img = match decode_image_bytes(data, Path::new("fuzz.img")) {
        Ok(img) => img,
        Err(e) => return drop(e.to_string()),
    };
    assert!(
        img.width() > 0 && img.height() > 0,
        "decoded an empty image"
    );
    let pre = Preprocess::default();
    let crop = pre
        .resize_and_crop(&img)
        .expect("a decoded image always crops");
    assert_eq!(crop.dimensions(), (pre.crop, pre.crop));
    let c = pre.crop as usize;
    let mut out = vec![0f32; 3 * c * c];
    pre.normalize_into(&crop, &mut out)
        .expect("a crop always normalises");
    assert!(out.iter().all(|v| v.is_finite()));
});
