//! The paper's ten-crop test: the crops are torchvision's TenCrop, and the averaged
//! probabilities through the CPU model are PyTorch's float64 ones on three photos (fixture:
//! tests/data/ten_crop_reference.json from tools/ten_crop_reference.py).

mod common;

use std::path::PathBuf;

use alexnet_cuda::classify::{classify_files_with, ClassifyEvent, Crops};
use alexnet_cuda::cpu::CpuModel;
use alexnet_cuda::image::{load_ten_crops_into, ten_crop, Preprocess};
use alexnet_cuda::{AlexNetConfig, Error, Precision};
use image::RgbImage;

#[test]
fn ten_crop_cuts_the_corners_the_centre_and_their_mirrors() {
    // Each pixel says where it is: (x, y, 0).
    let (w, h) = (7u32, 6u32);
    let image = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 0]));
    let crops = ten_crop(&image, 3).unwrap();
    assert_eq!(crops.len(), 10);
    let origin = |i: usize| {
        let p = crops[i].get_pixel(0, 0).0;
        (p[0] as u32, p[1] as u32)
    };
    // Top-left, top-right, bottom-left, bottom-right, centre (round((7-3)/2) = 2,
    // round((6-3)/2) = round(1.5) = 2, half to even).
    assert_eq!(
        [0, 1, 2, 3, 4].map(origin),
        [(0, 0), (4, 0), (0, 3), (4, 3), (2, 2)]
    );
    // The mirrored image's five, at the same places in the mirror: pixel (x, y) of a crop at
    // (left, top) there is the original's (w - 1 - (left + x), top + y).
    let places = [(0, 0), (4, 0), (0, 3), (4, 3), (2, 2)];
    for (i, (left, top)) in (5..10).zip(places) {
        for (x, y, p) in crops[i].enumerate_pixels() {
            let want = [(w - 1 - (left + x)) as u8, (top + y) as u8, 0];
            assert_eq!(p.0, want, "crop {i} at ({x}, {y})");
        }
    }
    assert!(matches!(ten_crop(&image, 7), Err(Error::Invalid { .. })));
}

#[test]
fn loading_ten_crops_needs_room_for_ten_rows_per_image() {
    let paths = vec![common::data_path("images/chelsea.png")];
    let pre = Preprocess::default();
    let mut small = vec![0u8; 9 * 224 * 224 * 3];
    assert!(matches!(
        load_ten_crops_into(&paths, &pre, &mut small),
        Err(Error::Shape { .. })
    ));
    let mut room = vec![0u8; 10 * 224 * 224 * 3];
    let rows = load_ten_crops_into(&paths, &pre, &mut room).unwrap();
    assert_eq!(rows.sources, [0]);
    // The fifth row is the centre crop: the eval transform's own crop of the image.
    let centre = pre.load(&paths[0]).unwrap();
    let per = 224 * 224 * 3;
    assert_eq!(&room[4 * per..5 * per], centre.as_raw().as_slice());
}

#[test]
fn ten_crop_probabilities_match_torchvision_and_pytorch() {
    let text = std::fs::read_to_string(common::data_path("ten_crop_reference.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let photos = fixture["photos"].as_object().unwrap();
    let names: Vec<&String> = photos.keys().collect();
    let paths: Vec<PathBuf> = names
        .iter()
        .map(|n| common::data_path(&format!("images/{n}")))
        .collect();
    let config = AlexNetConfig::paper();
    let mut model = CpuModel::new(&common::formula_weights(&config), Precision::Fp32).unwrap();
    let mut seen = 0;
    // Batches of two images: twenty rows, and a last batch with one image.
    classify_files_with(
        &mut model,
        &paths,
        2,
        &Preprocess::default(),
        5,
        Crops::Ten,
        |event| match event {
            ClassifyEvent::Classified(c) => {
                let want = &photos[names[c.index].as_str()];
                let probabilities: Vec<f32> = c.logits.iter().map(|l| l.exp()).collect();
                let reference = common::json_f64s(&want["probabilities"]);
                let err = common::rel_max_error(&probabilities, &reference);
                eprintln!("{}: {err:.2e} of the largest probability", names[c.index]);
                assert!(err < 1e-5, "{}: {err:.3e}", names[c.index]);
                let top: Vec<usize> = c.top.iter().map(|&(class, _)| class).collect();
                let want_top: Vec<usize> = common::json_f64s(&want["top5"])
                    .into_iter()
                    .map(|v| v as usize)
                    .collect();
                assert_eq!(top[0], want_top[0], "{}", names[c.index]);
                seen += 1;
            }
            ClassifyEvent::Failed { error, .. } => panic!("{error}"),
        },
    )
    .unwrap();
    assert_eq!(seen, paths.len());
}
