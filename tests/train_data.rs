//! Training data: the image folder's order and errors, the sample order across epochs, the
//! augmentation's draws and the batches it makes, against the eval transform and the image
//! crate's own crop and flip.

use std::path::Path;
use std::sync::Arc;

use alexnet_cuda::image::Preprocess;
use alexnet_cuda::train::{
    Augmentation, BatchBuffer, BatchMaker, ImageFolder, SampleOrder, IMAGENET_PCA_EIGENVALUES,
    IMAGENET_PCA_EIGENVECTORS,
};
use alexnet_cuda::Error;
use image::{imageops, RgbImage};

/// A `w x h` image whose pixels encode their position and `tag`.
fn picture(w: u32, h: u32, tag: u8) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 7 % 256) as u8,
            (y * 5 % 256) as u8,
            tag.wrapping_mul(31),
        ])
    })
}

/// ROOT/<class>/<file>.png for each (class, file, width, height).
fn folder(root: &Path, files: &[(&str, &str, u32, u32)]) {
    for (i, (class, file, w, h)) in files.iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        picture(*w, *h, i as u8).save(dir.join(file)).unwrap();
    }
}

#[test]
fn an_image_folder_lists_classes_and_files_in_sorted_order() {
    let root = tempfile::tempdir().unwrap();
    folder(
        root.path(),
        &[
            ("b_cat", "2.png", 40, 30),
            ("b_cat", "10.png", 40, 30),
            ("a_dog", "z.png", 40, 30),
            ("a_dog", "a.png", 40, 30),
        ],
    );
    std::fs::create_dir(root.path().join(".cache")).unwrap();
    std::fs::write(root.path().join("README"), "not a class").unwrap();
    let data = ImageFolder::open(root.path()).unwrap();
    assert_eq!(data.classes(), ["a_dog", "b_cat"]);
    let listed: Vec<(String, usize)> = data
        .samples()
        .iter()
        .map(|s| {
            let name = s.path.file_name().unwrap().to_string_lossy().into_owned();
            (name, s.label)
        })
        .collect();
    let want = [("a.png", 0), ("z.png", 0), ("10.png", 1), ("2.png", 1)];
    let want: Vec<(String, usize)> = want.iter().map(|(n, l)| (n.to_string(), *l)).collect();
    assert_eq!(listed, want, "(class, file) order, byte-sorted names");
}

#[test]
fn an_image_folder_refuses_empty_classes_and_rootless_paths() {
    let root = tempfile::tempdir().unwrap();
    assert!(
        matches!(ImageFolder::open(root.path()), Err(Error::Invalid { .. })),
        "no class directories"
    );
    folder(root.path(), &[("cat", "1.png", 8, 8)]);
    std::fs::create_dir(root.path().join("dog")).unwrap();
    let err = ImageFolder::open(root.path()).unwrap_err().to_string();
    assert!(err.contains("dog"), "the empty class is named: {err}");
    assert!(matches!(
        ImageFolder::open(root.path().join("missing")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn without_shuffling_batches_run_on_and_wrap_around() {
    let mut order = SampleOrder::new(5, false, 0).unwrap();
    let samples = |o: &mut SampleOrder, step| -> Vec<usize> {
        o.batch(step, 2).into_iter().map(|(_, s)| s).collect()
    };
    assert_eq!(samples(&mut order, 0), [0, 1]);
    assert_eq!(samples(&mut order, 2), [4, 0]);
    assert_eq!(samples(&mut order, 3), [1, 2]);
    assert!(SampleOrder::new(0, true, 0).is_err());
}

#[test]
fn shuffling_draws_one_permutation_per_epoch_from_the_seed() {
    let epoch = |seed, e: u64| -> Vec<usize> {
        let mut order = SampleOrder::new(50, true, seed).unwrap();
        (e * 50..(e + 1) * 50).map(|p| order.at(p)).collect()
    };
    let first = epoch(3, 0);
    let mut sorted = first.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>(), "every sample once");
    assert_ne!(first, (0..50).collect::<Vec<_>>(), "shuffled");
    assert_eq!(first, epoch(3, 0), "reproducible");
    assert_ne!(first, epoch(3, 1), "a new order each epoch");
    assert_ne!(first, epoch(4, 0), "another seed, another order");
}

#[test]
fn the_papers_draws_are_reproducible_and_have_their_distributions() {
    let paper = Augmentation::Paper { lighting_std: 0.1 };
    let draws: Vec<_> = (0..4000)
        .map(|p| paper.draw(9, p, 256, 224).unwrap())
        .collect();
    assert_eq!(draws[17], paper.draw(9, 17, 256, 224).unwrap());
    assert_ne!(draws[17], paper.draw(10, 17, 256, 224).unwrap());
    assert!(draws.iter().all(|d| d.top <= 32 && d.left <= 32));
    assert!(draws.iter().any(|d| d.top == 0) && draws.iter().any(|d| d.left == 32));
    let flips = draws.iter().filter(|d| d.flip).count();
    assert!((1800..2200).contains(&flips), "{flips} flips in 4000");
    // Projected on each principal component, the offset is alpha_k * eigenvalue_k with
    // alpha_k ~ N(0, 0.1): its standard deviation divided by the eigenvalue is 0.1.
    for k in 0..3 {
        let alphas: Vec<f64> = draws
            .iter()
            .map(|d| {
                let projection: f32 = (0..3)
                    .map(|c| IMAGENET_PCA_EIGENVECTORS[c][k] * d.lighting[c])
                    .sum();
                (projection / IMAGENET_PCA_EIGENVALUES[k]) as f64
            })
            .collect();
        let mean = alphas.iter().sum::<f64>() / alphas.len() as f64;
        let std =
            (alphas.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / alphas.len() as f64).sqrt();
        assert!(mean.abs() < 0.01, "component {k}: mean {mean}");
        assert!((0.09..0.11).contains(&std), "component {k}: std {std}");
    }
    let none = Augmentation::None.draw(9, 5, 224, 224).unwrap();
    assert_eq!(
        (none.top, none.left, none.flip, none.lighting),
        (0, 0, false, [0.0; 3])
    );
}

fn small_preprocess() -> Preprocess {
    Preprocess {
        resize_shorter: 40,
        crop: 32,
        ..Preprocess::default()
    }
}

#[test]
fn without_augmentation_a_batch_is_the_eval_transform() {
    let root = tempfile::tempdir().unwrap();
    folder(
        root.path(),
        &[
            ("a", "1.png", 60, 45),
            ("b", "2.png", 45, 70),
            ("c", "3.png", 41, 41),
        ],
    );
    let data = Arc::new(ImageFolder::open(root.path()).unwrap());
    let pre = small_preprocess();
    let is_eval_transform = |images: ndarray::ArrayView4<'_, f32>, samples: [usize; 2]| {
        for (row, sample) in samples.into_iter().enumerate() {
            let crop = pre.load(&data.samples()[sample].path).unwrap();
            let mut want = vec![0.0f32; 3 * 32 * 32];
            pre.normalize_into(&crop, &mut want).unwrap();
            let got = images.index_axis(ndarray::Axis(0), row);
            assert_eq!(got.as_slice().unwrap(), want.as_slice(), "sample {sample}");
        }
    };
    let mut maker = BatchMaker::new(data.clone(), 2, false, Augmentation::None, pre, 0).unwrap();
    let batch = maker.make(1).unwrap(); // positions 2, 3: samples 2 and 0
    assert_eq!(batch.labels, [2, 0]);
    is_eval_transform(batch.images.view(), [2, 0]);

    // The same into a buffer a previous step used: every value must be overwritten.
    assert_eq!(maker.batch_shape(), [2, 3, 32, 32]);
    let mut buffer = BatchBuffer::on_heap([2, 3, 32, 32]).unwrap();
    buffer.images_mut().unwrap().fill(f32::NAN);
    buffer.set_labels(vec![9, 9, 9]);
    maker.fill(2, &mut buffer).unwrap(); // positions 4, 5: samples 1 and 2
    assert_eq!(buffer.labels(), [1, 2]);
    is_eval_transform(buffer.images().unwrap(), [1, 2]);
    for shape in [[3, 3, 32, 32], [2, 3, 32, 31], [2, 1, 32, 32]] {
        let mut wrong = BatchBuffer::on_heap(shape).unwrap();
        let err = maker.fill(0, &mut wrong).unwrap_err().to_string();
        assert!(err.contains("[2, 3, 32, 32]"), "{shape:?}: {err}");
    }
}

#[test]
fn the_papers_augmentation_crops_flips_and_lights_the_central_patch() {
    let root = tempfile::tempdir().unwrap();
    folder(root.path(), &[("a", "1.png", 90, 60)]);
    let data = Arc::new(ImageFolder::open(root.path()).unwrap());
    let pre = small_preprocess();
    let patch = Preprocess { crop: 40, ..pre }
        .load(&data.samples()[0].path)
        .unwrap();
    let seed = 5;
    for lighting_std in [0.0, 0.1] {
        let paper = Augmentation::Paper { lighting_std };
        let mut maker = BatchMaker::new(data.clone(), 1, true, paper, pre, seed).unwrap();
        let mut flips = 0;
        for step in 0..12 {
            let got = maker.make(step).unwrap().images;
            let draw = paper.draw(seed, step, 40, 32).unwrap();
            flips += draw.flip as usize;
            let mut crop = imageops::crop_imm(&patch, draw.left, draw.top, 32, 32).to_image();
            if draw.flip {
                crop = imageops::flip_horizontal(&crop);
            }
            let mut want = vec![0.0f32; 3 * 32 * 32];
            pre.normalize_into(&crop, &mut want).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let c = i / (32 * 32);
                let shift = draw.lighting[c] / pre.std[c];
                assert!(
                    (g - (w + shift)).abs() < 1e-5,
                    "step {step} element {i}: {g} vs {w} + {shift}"
                );
            }
        }
        assert!(flips > 0 && flips < 12, "{flips} flips in 12 steps");
    }
}

#[test]
fn an_unreadable_image_fails_its_batch_with_its_path() {
    let root = tempfile::tempdir().unwrap();
    folder(root.path(), &[("a", "1.png", 50, 50)]);
    std::fs::write(root.path().join("a").join("2.png"), b"not a png").unwrap();
    let data = Arc::new(ImageFolder::open(root.path()).unwrap());
    let mut maker =
        BatchMaker::new(data, 2, false, Augmentation::None, small_preprocess(), 0).unwrap();
    let err = maker.make(0).unwrap_err().to_string();
    assert!(err.contains("2.png"), "{err}");
}
