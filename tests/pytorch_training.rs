//! Training against PyTorch autograd: every layer's backward, the whole network's parameter
//! gradients (a small AlexNet-shaped network in full, the paper preset by summaries) and two
//! SGD steps under both update rules. The fixture and the script that wrote it:
//! tests/data/pytorch_training.json, tools/pytorch_training_reference.py (float64 autograd on
//! the float32 formula values both sides generate).

mod common;

use alexnet_cuda::config::{AlexNetConfig, InputShape, LrnParams};
use alexnet_cuda::cpu::{
    layer_seed, softmax_cross_entropy, Conv2d, CpuModel, Dropout, InputGradient, Linear, Lrn,
    MaxPool2d,
};
use alexnet_cuda::train::{CpuTrainer, SgdConfig, Trainer, UpdateRule};
use alexnet_cuda::Precision;
use common::{formula_values, json_f64s, rel_max_error};
use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};
use serde_json::Value;

/// Gradients agree to this fraction of the largest (f32 against float64).
const TOLERANCE: f64 = 1e-5;

fn fixture() -> Value {
    let path = common::data_path("pytorch_training.json");
    let text = std::fs::read_to_string(&path).expect("tests/data/pytorch_training.json exists");
    serde_json::from_str(&text).expect("the fixture is valid JSON")
}

fn usizes(v: &Value) -> Vec<usize> {
    json_f64s(v).into_iter().map(|x| x as usize).collect()
}

/// The formula tensor of `case`'s `i`-th stream and scale, shaped `shape`.
fn input(case: &Value, i: usize, shape: &[usize]) -> ArrayD<f32> {
    let stream = case["streams"][i].as_u64().expect("stream");
    let scale = case["scales"][i].as_f64().expect("scale");
    let n = shape.iter().product();
    ArrayD::from_shape_vec(IxDyn(shape), formula_values(stream, n, scale)).expect("shape")
}

fn expect_close(what: &str, got: &[f32], want: &Value) {
    let want = json_f64s(want);
    let err = rel_max_error(got, &want);
    eprintln!("{what}: {err:.2e} of the largest value");
    assert!(err <= TOLERANCE, "{what}: error {err:.3e} > {TOLERANCE:e}");
}

fn four(a: ArrayD<f32>) -> Array4<f32> {
    a.into_dimensionality().expect("4-D")
}

#[test]
fn every_layer_backward_matches_pytorch_autograd() {
    let layers = &fixture()["layers"];
    for (i, case) in layers["conv"]
        .as_array()
        .expect("conv cases")
        .iter()
        .enumerate()
    {
        let shape = usizes(&case["input"]);
        let (o, k) = (
            case["out_channels"].as_u64().unwrap() as usize,
            case["kernel"].as_u64().unwrap() as usize,
        );
        let (s, p) = (
            case["stride"].as_u64().unwrap() as usize,
            case["padding"].as_u64().unwrap() as usize,
        );
        let (oh, ow) = (
            (shape[2] + 2 * p - k) / s + 1,
            (shape[3] + 2 * p - k) / s + 1,
        );
        let x = four(input(case, 0, &shape));
        let w = four(input(case, 1, &[o, shape[1], k, k]));
        let b: Array1<f32> = input(case, 2, &[o]).into_dimensionality().unwrap();
        let g = four(input(case, 3, &[shape[0], o, oh, ow]));
        let conv = Conv2d::new(w.view(), &b, s, p).unwrap();
        let grads = conv
            .backward(x.view(), g.view(), InputGradient::Compute)
            .unwrap();
        let dx = grads.input.expect("asked for");
        expect_close(
            &format!("conv {i} input"),
            dx.as_slice().unwrap(),
            &case["input_grad"],
        );
        expect_close(
            &format!("conv {i} weight"),
            grads.weight.as_slice().unwrap(),
            &case["weight_grad"],
        );
        expect_close(
            &format!("conv {i} bias"),
            grads.bias.as_slice().unwrap(),
            &case["bias_grad"],
        );
    }
    for (i, case) in layers["lrn"]
        .as_array()
        .expect("lrn cases")
        .iter()
        .enumerate()
    {
        let shape = usizes(&case["input"]);
        let lrn = Lrn::new(LrnParams {
            size: case["size"].as_u64().unwrap() as usize,
            k: case["k"].as_f64().unwrap() as f32,
            alpha: case["alpha"].as_f64().unwrap() as f32,
            beta: case["beta"].as_f64().unwrap() as f32,
        })
        .unwrap();
        let x = four(input(case, 0, &shape));
        let g = four(input(case, 1, &shape));
        let dx = lrn.backward(x.view(), g.view()).unwrap();
        expect_close(
            &format!("LRN {i} input"),
            dx.as_slice().unwrap(),
            &case["input_grad"],
        );
    }
    let case = &layers["max_pool"];
    let shape = usizes(&case["input"]);
    let pool = MaxPool2d {
        kernel: case["kernel"].as_u64().unwrap() as usize,
        stride: case["stride"].as_u64().unwrap() as usize,
    };
    let (oh, ow) = pool.output_size(shape[2], shape[3]).unwrap();
    let x = four(input(case, 0, &shape));
    let g = four(input(case, 1, &[shape[0], shape[1], oh, ow]));
    let dx = pool.backward(x.view(), g.view()).unwrap();
    expect_close(
        "max-pool input",
        dx.as_slice().unwrap(),
        &case["input_grad"],
    );

    let case = &layers["linear"];
    let [n, features] = usizes(&case["input"])[..] else {
        panic!("[n, in]")
    };
    let out = case["out_features"].as_u64().unwrap() as usize;
    let two = |a: ArrayD<f32>| -> Array2<f32> { a.into_dimensionality().unwrap() };
    let x = two(input(case, 0, &[n, features]));
    let w = two(input(case, 1, &[out, features]));
    let b: Array1<f32> = input(case, 2, &[out]).into_dimensionality().unwrap();
    let g = two(input(case, 3, &[n, out]));
    let grads = Linear::new(w.view(), &b)
        .unwrap()
        .backward(x.view(), g.view())
        .unwrap();
    expect_close(
        "linear input",
        grads.input.as_slice().unwrap(),
        &case["input_grad"],
    );
    expect_close(
        "linear weight",
        grads.weight.as_slice().unwrap(),
        &case["weight_grad"],
    );
    expect_close(
        "linear bias",
        grads.bias.as_slice().unwrap(),
        &case["bias_grad"],
    );

    let case = &layers["cross_entropy"];
    let [rows, classes] = usizes(&case["logits"])[..] else {
        panic!("[n, classes]")
    };
    let z = Array2::from_shape_vec(
        (rows, classes),
        formula_values(
            case["stream"].as_u64().unwrap(),
            rows * classes,
            case["scale"].as_f64().unwrap(),
        ),
    )
    .unwrap();
    let ce = softmax_cross_entropy(z.view(), &usizes(&case["labels"])).unwrap();
    let want_loss = case["loss"].as_f64().unwrap();
    assert!(
        (ce.loss as f64 - want_loss).abs() <= 1e-6 * want_loss.abs(),
        "loss {} vs {want_loss}",
        ce.loss
    );
    expect_close(
        "cross-entropy logits",
        ce.grad.as_slice().unwrap(),
        &case["logits_grad"],
    );
}

#[test]
fn the_dropout_mask_is_the_one_its_definition_gives() {
    let case = &fixture()["dropout"];
    let n = case["n"].as_u64().unwrap() as usize;
    let seed = layer_seed(
        case["step_seed"].as_u64().unwrap(),
        case["layer"].as_u64().unwrap(),
    );
    let dropout = Dropout::new(case["p"].as_f64().unwrap() as f32, Default::default()).unwrap();
    let kept: Vec<usize> = dropout
        .forward_train(ArrayD::ones(IxDyn(&[n])).view(), seed)
        .iter()
        .enumerate()
        .filter(|(_, &v)| v != 0.0)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(kept, usizes(&case["kept"]));
}

/// The fixture's small network: the AlexNet skeleton with its channels, input side and
/// linear widths (LRN and dropout as in the paper).
fn tiny_config(case: &Value) -> AlexNetConfig {
    let c = usizes(&case["channels"]);
    let lrn = case["lrn"].as_bool().unwrap().then_some(LrnParams::PAPER);
    let mut config = AlexNetConfig::five_conv_three_fc("tiny", [c[0], c[1], c[2], c[3], c[4]], lrn);
    let side = case["side"].as_u64().unwrap() as usize;
    config.input = InputShape {
        channels: 3,
        height: side,
        width: side,
    };
    for (fc, width) in config.fcs.iter_mut().zip(usizes(&case["fcs"])) {
        fc.out_features = width;
        fc.dropout = fc.dropout.map(|_| case["dropout"].as_f64().unwrap() as f32);
    }
    config
}

fn batch(stream: u64, scale: f64, n: usize, config: &AlexNetConfig) -> Array4<f32> {
    let InputShape {
        channels,
        height,
        width,
    } = config.input;
    let shape = (n, channels, height, width);
    Array4::from_shape_vec(
        shape,
        formula_values(stream, n * channels * height * width, scale),
    )
    .unwrap()
}

/// The case's input: one formula batch (`input_stream`) or one image per stream
/// (`image_streams`).
fn case_input(case: &Value, config: &AlexNetConfig, n: usize) -> Array4<f32> {
    let scale = case["input_scale"].as_f64().unwrap();
    match case["image_streams"].as_array() {
        None => batch(case["input_stream"].as_u64().unwrap(), scale, n, config),
        Some(streams) => {
            let images: Vec<Array4<f32>> = streams
                .iter()
                .map(|s| batch(s.as_u64().unwrap(), scale, 1, config))
                .collect();
            let views: Vec<_> = images.iter().map(|a| a.view()).collect();
            ndarray::concatenate(ndarray::Axis(0), &views).unwrap()
        }
    }
}

/// Loss and parameter gradients of one batch through `model` in training mode.
fn gradients_of(
    model: &CpuModel,
    case: &Value,
    config: &AlexNetConfig,
) -> (f32, Vec<Vec<f32>>, Vec<f32>) {
    let labels = usizes(&case["labels"]);
    let x = case_input(case, config, labels.len());
    let tape = model
        .forward_train(x.view(), case["step_seed"].as_u64().unwrap())
        .unwrap();
    let logits = tape.logits().unwrap().to_owned();
    let ce = softmax_cross_entropy(logits.view(), &labels).unwrap();
    let grads = model.backward(&tape, ce.grad.view()).unwrap();
    let values = grads.tensors.into_iter().map(|g| g.values).collect();
    (ce.loss, values, logits.into_raw_vec_and_offset().0)
}

#[test]
fn network_gradients_match_pytorch_autograd() {
    let case = &fixture()["network"];
    let config = tiny_config(case);
    let model = CpuModel::new(&common::formula_weights(&config), Precision::Fp32).unwrap();
    let (loss, grads, logits) = gradients_of(&model, case, &config);
    expect_close("logits (training mode)", &logits, &case["logits"]);
    let want_loss = case["loss"].as_f64().unwrap();
    assert!(
        (loss as f64 - want_loss).abs() <= 1e-6 * want_loss,
        "loss {loss} vs {want_loss}"
    );
    let names = config.parameter_shapes().unwrap();
    let want = case["grads"].as_array().unwrap();
    assert_eq!(grads.len(), want.len());
    for ((got, want), (name, _)) in grads.iter().zip(want).zip(&names) {
        expect_close(name, got, want);
    }
}

#[test]
fn two_sgd_steps_match_pytorch_and_the_papers_rule() {
    let case = &fixture()["network"];
    let sgd = &case["sgd"];
    let config = tiny_config(case);
    let streams = usizes(&sgd["batch_streams"]);
    for (rule, decay_biases, key) in [
        (UpdateRule::PyTorch, true, "pytorch"),
        (UpdateRule::Paper, false, "paper_no_bias_decay"),
    ] {
        let model = CpuModel::new(&common::formula_weights(&config), Precision::Fp32).unwrap();
        let mut trainer = CpuTrainer::new(
            model,
            SgdConfig {
                learning_rate: sgd["learning_rate"].as_f64().unwrap() as f32,
                momentum: sgd["momentum"].as_f64().unwrap() as f32,
                weight_decay: sgd["weight_decay"].as_f64().unwrap() as f32,
                rule,
                decay_biases,
            },
        )
        .unwrap();
        let want = &sgd[key];
        for (step, stream) in streams.iter().enumerate() {
            let labels = usizes(&sgd["labels"][step]);
            let x = batch(*stream as u64, 2.0, labels.len(), &config);
            let seed = sgd["step_seeds"][step].as_u64().unwrap();
            let loss = trainer.step(x.view(), &labels, seed).unwrap();
            let want_loss = want["losses"][step].as_f64().unwrap();
            assert!(
                (loss as f64 - want_loss).abs() <= 1e-6 * want_loss,
                "{key} step {step}: loss {loss} vs {want_loss}"
            );
        }
        for ((got, want), (name, _)) in trainer
            .model
            .parameters()
            .iter()
            .zip(want["weights"].as_array().unwrap())
            .zip(config.parameter_shapes().unwrap())
        {
            expect_close(&format!("{key}: {name} after two steps"), got, want);
        }
    }
}

#[test]
fn paper_preset_gradients_match_pytorch_autograd() {
    let case = &fixture()["paper"];
    let config = AlexNetConfig::paper();
    let model = CpuModel::new(&common::formula_weights(&config), Precision::Fp32).unwrap();
    let (loss, grads, logits) = gradients_of(&model, case, &config);
    expect_close("paper logits (training mode)", &logits, &case["logits"]);
    let want_loss = case["loss"].as_f64().unwrap();
    assert!(
        (loss as f64 - want_loss).abs() <= 1e-5 * want_loss,
        "loss {loss} vs {want_loss}"
    );
    for ((got, want), (name, _)) in grads
        .iter()
        .zip(case["grads"].as_array().unwrap())
        .zip(config.parameter_shapes().unwrap())
    {
        let max_abs = want["max_abs"].as_f64().unwrap();
        let got_max = got.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()));
        let sum: f64 = got.iter().map(|&v| v as f64).sum();
        let abs_sum: f64 = got.iter().map(|&v| (v as f64).abs()).sum();
        let close = |what: &str, got: f64, want: f64, scale: f64| {
            let err = (got - want).abs() / scale;
            eprintln!("paper {name} {what}: {err:.2e}");
            assert!(
                err <= TOLERANCE,
                "paper {name} {what}: {got} vs {want} ({err:.2e} of {scale:.3e})"
            );
        };
        close("largest |gradient|", got_max, max_abs, max_abs);
        // Sums are compared to the sum of magnitudes (a signed sum may cancel to near 0).
        let want_abs_sum = want["abs_sum"].as_f64().unwrap();
        close("sum", sum, want["sum"].as_f64().unwrap(), want_abs_sum);
        close("sum of |gradient|", abs_sum, want_abs_sum, want_abs_sum);
        for (index, value) in usizes(&want["indices"])
            .into_iter()
            .zip(json_f64s(&want["values"]))
        {
            close(&format!("entry {index}"), got[index] as f64, value, max_abs);
        }
    }
}
