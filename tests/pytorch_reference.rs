//! The CPU model against PyTorch float64 (tests/data/pytorch_reference.json, written by
//! tools/pytorch_reference.py): same formula weights, same inputs.

mod common;

use alexnet_cuda::cpu::{Bf16Kernels, CpuModel};
use alexnet_cuda::image::{decode_image_file, Preprocess, U8Batch};
use alexnet_cuda::{AlexNetConfig, Precision};
use common::*;
use ndarray::Array4;

fn synthetic_input() -> Array4<f32> {
    let n = 2 * 3 * 224 * 224;
    Array4::from_shape_vec((2, 3, 224, 224), formula_values(1000, n, 2.0)).unwrap()
}

fn preset(name: &str) -> AlexNetConfig {
    AlexNetConfig::preset(name).unwrap()
}

fn check_logits(name: &str) {
    let reference = pytorch_reference();
    let expected = &reference["presets"][name]["logits"];
    let model = CpuModel::new(&formula_weights(&preset(name)), Precision::Fp32).unwrap();
    let logits = model.forward(synthetic_input().view()).unwrap();
    for image in 0..2 {
        let want = json_f64s(&expected[image]);
        let got = logits.row(image).to_vec();
        let err = rel_max_error(&got, &want);
        println!("{name} image {image}: max error / max |logit| = {err:.3e}");
        assert!(
            err <= 1e-5,
            "{name} image {image}: relative error {err:.3e}"
        );
    }
}

#[test]
fn paper_logits_match_pytorch_float64() {
    check_logits("paper");
}

#[test]
fn torchvision_logits_match_pytorch_float64() {
    check_logits("torchvision");
}

/// fp16 mode (f16 storage, f32 accumulation) stays within the fp16 tolerance of PyTorch float64
/// and keeps the top-1 class.
#[test]
fn fp16_logits_within_fp16_tolerance() {
    let reference = pytorch_reference();
    for name in ["paper", "torchvision"] {
        let model = CpuModel::new(&formula_weights(&preset(name)), Precision::Fp16).unwrap();
        let logits = model.forward(synthetic_input().view()).unwrap();
        for image in 0..2 {
            let want = json_f64s(&reference["presets"][name]["logits"][image]);
            let got = logits.row(image).to_vec();
            let err = rel_max_error(&got, &want);
            println!("{name} fp16 image {image}: relative error {err:.3e}");
            assert!(err <= 1e-2, "{name} fp16 image {image}: {err:.3e}");
            assert!(err > 0.0, "fp16 mode must actually round");
            let argmax = |v: &[f64]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
            let got64: Vec<f64> = got.iter().map(|&v| v as f64).collect();
            assert_eq!(
                argmax(&got64),
                argmax(&want),
                "{name} fp16 image {image}: top-1"
            );
        }
    }
}

/// The bf16 model on `kernels`, or `None` (said on stdout) where numkong's kernels cannot run
/// on this machine (AMX present but refused by the kernel).
fn bf16_model(weights: &alexnet_cuda::Weights, kernels: Bf16Kernels) -> Option<CpuModel> {
    match CpuModel::bf16(weights, kernels) {
        Ok(model) => Some(model),
        Err(e) if kernels == Bf16Kernels::Native => {
            println!("SKIPPED bf16 on native kernels: {e}");
            None
        }
        Err(e) => panic!("bf16 model on {kernels:?}: {e}"),
    }
}

/// bf16 mode (bf16 storage, f32 accumulation) within 2e-2 of the largest logit of PyTorch
/// float64, with the reference's top-1 wherever its top two are further apart than that: on
/// numkong's kernels (the bf16 hardware's where the CPU has it, portable ones elsewhere), on
/// the emulated twin, and on what `CpuModel::new` picks.
#[test]
fn bf16_logits_within_bf16_tolerance() {
    let reference = pytorch_reference();
    let mut checked_top1 = 0;
    for name in ["paper", "torchvision"] {
        let weights = formula_weights(&preset(name));
        let models = [Bf16Kernels::Native, Bf16Kernels::Emulated]
            .into_iter()
            .filter_map(|kernels| bf16_model(&weights, kernels))
            .chain([CpuModel::new(&weights, Precision::Bf16).unwrap()]);
        for model in models {
            let kernels = model.bf16_kernels().unwrap_or("emulated");
            check_bf16_logits(&model, &reference, name, kernels, &mut checked_top1);
        }
    }
    println!("top-1 checked on {checked_top1} of 12 image runs");
}

fn check_bf16_logits(
    model: &CpuModel,
    reference: &serde_json::Value,
    name: &str,
    kernels: &str,
    checked_top1: &mut usize,
) {
    const TOLERANCE: f64 = 2e-2;
    assert_eq!(model.precision(), Precision::Bf16);
    let logits = model.forward(synthetic_input().view()).unwrap();
    for image in 0..2 {
        let want = json_f64s(&reference["presets"][name]["logits"][image]);
        let got = logits.row(image).to_vec();
        let err = rel_max_error(&got, &want);
        println!("{name} bf16 ({kernels}) image {image}: relative error {err:.3e}");
        assert!(
            err <= TOLERANCE,
            "{name} bf16 ({kernels}) image {image}: {err:.3e}"
        );
        // bf16 keeps 8 significant bits where f16 keeps 11: its error is the larger.
        assert!(err > 1e-4, "bf16 mode must actually round ({err:.3e})");
        let mut order: Vec<usize> = (0..want.len()).collect();
        order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
        let largest = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        if want[order[0]] - want[order[1]] > TOLERANCE * largest {
            let top = (0..got.len())
                .max_by(|&a, &b| got[a].total_cmp(&got[b]))
                .unwrap();
            assert_eq!(
                top, order[0],
                "{name} bf16 ({kernels}) image {image}: top-1"
            );
            *checked_top1 += 1;
        }
    }
}

/// bf16 mode stores every stage's output in bf16 (an f32 whose low 16 bits are zero), as bf16
/// hardware would hand it to the next layer; fp32 mode does not (so the check can fail).
#[test]
fn bf16_stores_every_stage_in_bf16() {
    let weights = formula_weights(&preset("paper"));
    let input = synthetic_input();
    let input = input.slice(ndarray::s![..1, .., .., ..]);
    let models = [
        (bf16_model(&weights, Bf16Kernels::Native), true),
        (bf16_model(&weights, Bf16Kernels::Emulated), true),
        (CpuModel::new(&weights, Precision::Fp32).ok(), false),
    ];
    for (model, want_bf16) in models {
        let Some(model) = model else { continue };
        let precision = format!("{} {:?}", model.precision(), model.bf16_kernels());
        let mut stages = 0;
        let mut all_bf16 = true;
        model
            .forward_observed(input, |stage, values| {
                stages += 1;
                let wide = values.iter().filter(|v| v.to_bits() & 0xFFFF != 0).count();
                if want_bf16 {
                    assert_eq!(wide, 0, "{stage}: {wide} values are not bf16");
                }
                all_bf16 &= wide == 0;
            })
            .unwrap();
        assert_eq!(stages, 13, "{precision}");
        assert_eq!(all_bf16, want_bf16, "{precision}");
    }
}

/// Native bf16 mode keeps its activations in its own layout (HWC bf16) between layers; what it
/// hands an observer at every stage is the emulated twin's, up to the order of the f32
/// additions (a bf16 step here and there, carried forward), and observing changes nothing.
#[test]
fn native_bf16_stages_match_the_emulated_twin() {
    let input = synthetic_input();
    for name in ["paper", "torchvision"] {
        let weights = formula_weights(&preset(name));
        let Some(native) = bf16_model(&weights, Bf16Kernels::Native) else {
            return;
        };
        let emulated = bf16_model(&weights, Bf16Kernels::Emulated).unwrap();
        let mut want = Vec::new();
        emulated
            .forward_observed(input.view(), |stage, x| {
                want.push((stage.to_string(), x.to_owned()))
            })
            .unwrap();
        let mut seen = 0;
        let observed = native
            .forward_observed(input.view(), |stage, x| {
                let (want_stage, want) = &want[seen];
                assert_eq!(stage, want_stage, "{name}: stage order");
                assert_eq!(x.shape(), want.shape(), "{name} {stage}: shape");
                let largest = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let worst = x
                    .iter()
                    .zip(want.iter())
                    .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
                println!(
                    "{name} {stage}: largest difference {:.2e} of the largest value",
                    worst / largest
                );
                assert!(
                    worst <= 2e-2 * largest,
                    "{name} {stage}: {worst} of {largest}"
                );
                seen += 1;
            })
            .unwrap();
        assert_eq!(seen, want.len(), "{name}: stages observed");
        let unobserved = native.forward(input.view()).unwrap();
        assert_eq!(observed, unobserved, "{name}: observing changed the logits");
    }
}

/// Every stage's max |x| and sum for image 0 against PyTorch, so a failure names the layer.
#[test]
fn paper_stages_match_pytorch_float64() {
    let reference = pytorch_reference();
    let stages = &reference["presets"]["paper"]["stages"];
    let model = CpuModel::new(&formula_weights(&AlexNetConfig::paper()), Precision::Fp32).unwrap();
    let input = synthetic_input();
    let mut seen = Vec::new();
    model
        .forward_observed(input.slice(ndarray::s![0..1, .., .., ..]), |stage, x| {
            let want = &stages[stage];
            assert!(want.is_object(), "stage {stage} missing from the fixture");
            let max_abs = x.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
            let sum: f64 = x.iter().map(|&v| v as f64).sum();
            let want_max = want["max_abs"].as_f64().unwrap();
            let want_sum = want["sum"].as_f64().unwrap();
            assert!(
                (max_abs - want_max).abs() <= 1e-5 * want_max,
                "{stage}: max |x| {max_abs} vs {want_max}"
            );
            // The sum of ~10^5 terms: allow for f32 rounding across all of them.
            let sum_scale: f64 = x.iter().map(|&v| v.abs() as f64).sum();
            assert!(
                (sum - want_sum).abs() <= 1e-5 * sum_scale,
                "{stage}: sum {sum} vs {want_sum}"
            );
            seen.push(stage.to_string());
        })
        .unwrap();
    let expected: Vec<&String> = stages.as_object().unwrap().keys().collect();
    assert_eq!(seen.len(), expected.len(), "stages seen: {seen:?}");
}

/// Photos through our decoder, resize and crop, then the model: top-1 as PyTorch's, and logits
/// close (the resize is a re-implementation of Pillow's, so not bit-exact).
#[test]
fn photos_top1_match_pytorch() {
    let reference = pytorch_reference();
    let pre = Preprocess::default();
    for name in ["paper", "torchvision"] {
        let model = CpuModel::new(&formula_weights(&preset(name)), Precision::Fp32).unwrap();
        let photos = reference["presets"][name]["photos"].as_object().unwrap();
        let mut batch = U8Batch::new(pre.crop);
        let mut wanted = Vec::new();
        for (photo, expected) in photos {
            let image = decode_image_file(&data_path(&format!("images/{photo}"))).unwrap();
            batch.push(&pre.resize_and_crop(&image).unwrap()).unwrap();
            wanted.push((photo.clone(), expected.clone()));
        }
        let logits = model.forward(batch.to_nchw_f32(&pre).view()).unwrap();
        for (row, (photo, expected)) in wanted.iter().enumerate() {
            let want = json_f64s(&expected["logits"]);
            let got = logits.row(row).to_vec();
            let top1 = got
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .unwrap();
            let want_top1 = expected["top5"][0].as_u64().unwrap() as usize;
            let err = rel_max_error(&got, &want);
            println!("{name} {photo}: top-1 {top1} (PyTorch {want_top1}), logit error {err:.2e}");
            assert_eq!(top1, want_top1, "{name} {photo}");
            assert!(err < 2e-2, "{name} {photo}: logits differ by {err:.2e}");
        }
    }
}
