//! The training kernels on a GPU against their CPU twins, at AlexNet's shapes: the backward of
//! max-pooling, LRN and ReLU, softmax cross-entropy and the fused SGD step, and the layers'
//! backward through cuDNN and cuBLAS with the bias-gradient kernel (fp32 within 1e-5 of the
//! largest gradient, 1e-2 where cuDNN may take FFT and Winograd, fp16 within 1e-2). The same
//! kernels
//! run as host C++ on every CI run (tests/host_kernels.rs, bit for bit); what only a GPU shows
//! is the device compiler's code and the device's math library, so the tolerances here allow
//! the last bits: max |gpu - cpu| / max |cpu| <= 1e-6, except SGD, whose __fmul_rn/__fadd_rn
//! arithmetic must match exactly.
//!
//! They need an NVIDIA GPU and its driver, so they are ignored by default: `cargo test
//! --release --test gpu_training_kernels -- --include-ignored` on a GPU machine (without one
//! they FAIL with the "device unavailable" message; they never pass without running).

#![cfg(feature = "cuda")]

mod common;

use alexnet_cuda::config::{LrnParams, PoolSpec};
use alexnet_cuda::cpu::{
    relu_backward, softmax_cross_entropy, Conv2d, InputGradient, Linear, Lrn, MaxPool2d,
};
use alexnet_cuda::cuda::library_calls::unpack_conv_weights;
use alexnet_cuda::cuda::{
    relu_backward as relu_backward_gpu, sgd_step, softmax_cross_entropy as xent_gpu, Conv2dGpu,
    ConvOptions, Gpu, GpuFloat, GpuTensor, Layout, LinearGpu, LrnGpu, MaxPoolGpu, SgdBuffers,
    SgdSegment, StepSettings,
};
use alexnet_cuda::train::{Sgd, SgdConfig, UpdateRule};
use common::{check, formula_values};
use half::{bf16, f16};
use ndarray::{s, Array, Array2, Array4, ArrayD, IxDyn, ShapeBuilder};

fn gpu() -> Gpu {
    Gpu::new(0).unwrap_or_else(|e| panic!("{e}"))
}

fn random<Sh: ShapeBuilder>(shape: Sh, stream: u64, scale: f64) -> Array<f32, Sh::Dim> {
    let zeros = Array::<f32, _>::zeros(shape);
    Array::from_shape_vec(zeros.raw_dim(), formula_values(stream, zeros.len(), scale)).unwrap()
}

fn upload(gpu: &Gpu, a: &ArrayD<f32>, layout: Layout) -> GpuTensor<f32> {
    GpuTensor::from_host(gpu, a.view(), layout).unwrap()
}

fn poisoned(gpu: &Gpu, shape: &[usize], layout: Layout) -> GpuTensor<f32> {
    let mut t = GpuTensor::zeros(gpu, shape, layout).unwrap();
    t.poison(gpu).unwrap();
    t
}

/// The LRN's, max-pool's and ReLU's backward in `T` at conv1's and conv2's output shapes against
/// the CPU layers on the values rounded to `T`: exact for pooling and ReLU (which only route
/// gradients; f16 pooling sums in f32 and rounds once), within `lrn_tol` of the largest
/// gradient for the LRN (1e-6 in f32; f16 rounds each result once: one f16 step, 1e-3).
fn pool_lrn_relu_backward_case<T: GpuFloat>(gpu: &Gpu, layout: Layout, seed: u64, lrn_tol: f64) {
    let to_t = |a: ArrayD<f32>| a.mapv(|v| T::from_f32(v).to_f32());
    let on_gpu = |a: &ArrayD<f32>| GpuTensor::<T>::from_host(gpu, a.view(), layout).unwrap();
    let poisoned_t = |shape: &[usize]| {
        let mut t = GpuTensor::<T>::zeros(gpu, shape, layout).unwrap();
        t.poison(gpu).unwrap();
        t
    };
    let dtype = T::DTYPE;
    // conv1's and conv2's outputs at batch 4: ReLU, then LRN, then the overlapping pool.
    for (i, dims) in [[4, 96, 55, 55], [4, 256, 27, 27]].into_iter().enumerate() {
        let s = seed + 10 * i as u64;
        let x = to_t(random(dims, s, 3.0).mapv(|v| v.max(0.0)).into_dyn());
        let dy = to_t(random(dims, s + 1, 1.0).into_dyn());

        let lrn = Lrn::new(LrnParams::PAPER).unwrap();
        let want = lrn
            .backward(
                x.view().into_dimensionality().unwrap(),
                dy.view().into_dimensionality().unwrap(),
            )
            .unwrap()
            .into_dyn();
        let mut dx = poisoned_t(&dims);
        LrnGpu::new(LrnParams::PAPER)
            .unwrap()
            .backward(gpu, &on_gpu(&x), &on_gpu(&dy), &mut dx, false)
            .unwrap();
        check(
            &format!("lrn backward {dtype:?} {dims:?} {layout:?}"),
            &dx.to_host(gpu).unwrap(),
            &want,
            lrn_tol,
        );

        // With the ReLU before it fused in: from the ReLU's input (negative values too), as
        // the CPU's ReLU backward after its LRN backward.
        let before_relu = to_t(random(dims, s + 3, 3.0).into_dyn());
        let relu = before_relu.mapv(|v| v.max(0.0));
        let lrn_grad = lrn
            .backward(
                relu.view().into_dimensionality().unwrap(),
                dy.view().into_dimensionality().unwrap(),
            )
            .unwrap();
        let want = relu_backward(relu.view(), lrn_grad.view().into_dyn()).unwrap();
        let mut dx = poisoned_t(&dims);
        LrnGpu::new(LrnParams::PAPER)
            .unwrap()
            .backward(gpu, &on_gpu(&before_relu), &on_gpu(&dy), &mut dx, true)
            .unwrap();
        check(
            &format!("lrn backward with the ReLU {dtype:?} {dims:?} {layout:?}"),
            &dx.to_host(gpu).unwrap(),
            &want,
            lrn_tol,
        );

        let pool = MaxPool2d::from(PoolSpec::OVERLAPPING);
        let (oh, ow) = pool.output_size(dims[2], dims[3]).unwrap();
        let pool_dy = to_t(random((dims[0], dims[1], oh, ow), s + 2, 1.0).into_dyn());
        let want = pool
            .backward(
                x.view().into_dimensionality().unwrap(),
                pool_dy.view().into_dimensionality().unwrap(),
            )
            .unwrap()
            .into_dyn();
        let mut dx = poisoned_t(&dims);
        // The backward reads each window's maximum from the forward's output, as in training.
        let layer = MaxPoolGpu::new(3, 2).unwrap();
        let x_gpu = on_gpu(&x);
        let mut y = poisoned_t(&[dims[0], dims[1], oh, ow]);
        layer.forward(gpu, &x_gpu, &mut y).unwrap();
        layer
            .backward(gpu, &x_gpu, &y, &on_gpu(&pool_dy), &mut dx, false)
            .unwrap();
        check(
            &format!("maxpool backward {dtype:?} {dims:?} {layout:?}"),
            &dx.to_host(gpu).unwrap(),
            &to_t(want),
            0.0,
        );

        // With the ReLU before it fused in: from the ReLU's input, the window maxima pooled
        // from its output, as the CPU's ReLU backward after its max-pool backward.
        let pooled = pool
            .backward(
                relu.view().into_dimensionality().unwrap(),
                pool_dy.view().into_dimensionality().unwrap(),
            )
            .unwrap();
        let want = relu_backward(relu.view(), pooled.view().into_dyn()).unwrap();
        let mut y = poisoned_t(&[dims[0], dims[1], oh, ow]);
        layer.forward(gpu, &on_gpu(&relu), &mut y).unwrap();
        let mut dx = poisoned_t(&dims);
        layer
            .backward(
                gpu,
                &on_gpu(&before_relu),
                &y,
                &on_gpu(&pool_dy),
                &mut dx,
                true,
            )
            .unwrap();
        check(
            &format!("maxpool backward with the ReLU {dtype:?} {dims:?} {layout:?}"),
            &dx.to_host(gpu).unwrap(),
            &to_t(want),
            0.0,
        );

        let want = relu_backward(x.view(), dy.view()).unwrap();
        let mut grad = on_gpu(&dy);
        relu_backward_gpu(gpu, &on_gpu(&x), &mut grad).unwrap();
        check(
            &format!("relu backward {dtype:?} {dims:?} {layout:?}"),
            &grad.to_host(gpu).unwrap(),
            &want,
            0.0,
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --release -- --include-ignored on a GPU machine"]
fn pool_lrn_and_relu_backward_match_the_cpu_at_alexnet_shapes() {
    let _gpu = common::exclusive_gpu();
    let gpu = gpu();
    let seed = common::test_seed("pool_lrn_and_relu_backward_match_the_cpu_at_alexnet_shapes");
    let bf16 = common::gpu_runs_bf16("pool_lrn_and_relu_backward_match_the_cpu_at_alexnet_shapes");
    for layout in [Layout::Nchw, Layout::Nhwc] {
        pool_lrn_relu_backward_case::<f32>(&gpu, layout, seed, 1e-6);
        pool_lrn_relu_backward_case::<f16>(&gpu, layout, seed, 1e-3);
        // One bf16 rounding: 2^-8 relative, twice for the margin (not yet run on a GPU).
        if bf16 {
            pool_lrn_relu_backward_case::<bf16>(&gpu, layout, seed, 8e-3);
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --release -- --include-ignored on a GPU machine"]
fn softmax_cross_entropy_matches_the_cpu_at_batch_128() {
    let _gpu = common::exclusive_gpu();
    let gpu = gpu();
    let seed = common::test_seed("softmax_cross_entropy_matches_the_cpu_at_batch_128");
    let logits: Array2<f32> = random((128, 1000), seed, 8.0);
    let labels: Vec<usize> = (0..128).map(|i| (i * 7919) % 1000).collect();
    let want = softmax_cross_entropy(logits.view(), &labels).unwrap();
    let stream = gpu.stream();
    let labels_dev = stream
        .clone_htod(&labels.iter().map(|&l| l as u32).collect::<Vec<u32>>())
        .unwrap();
    let mut row_loss = stream.alloc_zeros::<f64>(128).unwrap();
    let mut grad = poisoned(&gpu, &[128, 1000], Layout::Nchw);
    xent_gpu(
        &gpu,
        &upload(&gpu, &logits.clone().into_dyn(), Layout::Nchw),
        &labels_dev,
        &mut grad,
        &mut row_loss,
    )
    .unwrap();
    check(
        "softmax cross-entropy gradient",
        &grad.to_host(&gpu).unwrap(),
        &want.grad.into_dyn(),
        1e-6,
    );
    let rows = stream.clone_dtoh(&row_loss).unwrap();
    let loss = (rows.iter().sum::<f64>() / 128.0) as f32;
    assert!(
        ((loss - want.loss) / want.loss).abs() <= 1e-6,
        "loss {loss} against {}",
        want.loss
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --release -- --include-ignored on a GPU machine"]
fn sgd_step_matches_the_cpu_optimiser_exactly() {
    let _gpu = common::exclusive_gpu();
    let gpu = gpu();
    let seed = common::test_seed("sgd_step_matches_the_cpu_optimiser_exactly");
    let tensors = [
        ("conv1.weight", 34_848),
        ("conv1.bias", 96),
        ("fc1.weight", 1 << 20),
        ("fc1.bias", 4096),
    ];
    for rule in [UpdateRule::PyTorch, UpdateRule::Paper] {
        let config = SgdConfig {
            rule,
            decay_biases: false,
            ..SgdConfig::default()
        };
        let lens: Vec<usize> = tensors.iter().map(|t| t.1).collect();
        let total: usize = lens.iter().sum();
        let mut segments: Vec<SgdSegment> = tensors
            .iter()
            .map(|&(n, len)| SgdSegment::named(n, len, &config))
            .collect();
        // A gap between conv1 and fc1, as the trainer leaves before an unaligned weight (here
        // one it would not need): never read (its gradients are not the CPU's) nor written
        // (its velocity stays NaN), and no tensor or copy of its own.
        const GAP: usize = 48;
        let gap_at = lens[0] + lens[1];
        segments.insert(2, SgdSegment::padding(GAP));
        let start = formula_values(seed, total, 0.1);
        let mut cpu = common::split_flat(&start, &lens);
        let mut sgd = Sgd::new(config).unwrap();
        let stream = gpu.stream();
        let mut weights: Vec<_> = common::split_flat(&start, &lens)
            .iter()
            .map(|w| stream.clone_htod(w).unwrap())
            .collect();
        // NaN until the first step writes it: that step must not read it.
        let mut velocity = stream.clone_htod(&vec![f32::NAN; total + GAP]).unwrap();
        // f16 copies, as mixed precision rewrites them: each must land on its own tensor.
        let mut copies: Vec<_> = lens
            .iter()
            .map(|&len| stream.alloc_zeros::<f16>(len).unwrap())
            .collect();
        for step in 0..3u64 {
            // The first and third steps as a captured training step launches them: the
            // first-step flag and (third step) a tenth of the learning rate read from the
            // device, the arguments left as they were (no first step, the config's rate).
            if step == 2 {
                sgd.set_learning_rate(config.learning_rate / 10.0).unwrap();
            }
            let settings = (step != 1).then(|| {
                StepSettings::new(&gpu, sgd.config().learning_rate, 1.0, step == 0).unwrap()
            });
            let flat = formula_values(seed + 1 + step, total + GAP, 1.0);
            let without_gap = [&flat[..gap_at], &flat[gap_at + GAP..]].concat();
            let grads = common::flat_gradients(&tensors, &without_gap);
            sgd.step(cpu.iter_mut().map(|w| &mut w[..]).collect(), &grads)
                .unwrap();
            let g = stream.clone_htod(&flat).unwrap();
            sgd_step::<f16>(
                &gpu,
                &config,
                &segments,
                false,
                SgdBuffers {
                    weights: &mut weights.iter_mut().collect::<Vec<_>>(),
                    copies: &mut copies.iter_mut().collect::<Vec<_>>(),
                    grads: &g,
                    velocity: &mut velocity,
                    skip: None,
                    settings: settings.as_ref(),
                },
            )
            .unwrap();
            let got: Vec<f32> = weights
                .iter()
                .flat_map(|w| stream.clone_dtoh(w).unwrap())
                .collect();
            let got = ArrayD::from_shape_vec(IxDyn(&[total]), got).unwrap();
            let want = ArrayD::from_shape_vec(IxDyn(&[total]), cpu.concat()).unwrap();
            check(&format!("sgd {rule:?} step {step}"), &got, &want, 0.0);
            let got_copies: Vec<f32> = copies
                .iter()
                .flat_map(|c| stream.clone_dtoh(c).unwrap())
                .map(f16::to_f32)
                .collect();
            let got_copies = ArrayD::from_shape_vec(IxDyn(&[total]), got_copies).unwrap();
            let want_copies = want.mapv(|w| f16::from_f32(w).to_f32());
            check(
                &format!("sgd {rule:?} step {step} f16 copies"),
                &got_copies,
                &want_copies,
                0.0,
            );
        }
        let velocity = stream.clone_dtoh(&velocity).unwrap();
        assert!(
            velocity[gap_at..gap_at + GAP].iter().all(|v| v.is_nan()),
            "sgd {rule:?}: velocities written in the padding"
        );
    }
}

/// One convolution's backward on the GPU against `Conv2d::backward`: input, filter and bias
/// gradients within `tol` of each one's largest value.
#[allow(clippy::too_many_arguments)]
fn conv_backward_case<T: GpuFloat>(
    gpu: &Gpu,
    name: &str,
    input: [usize; 4],
    out: usize,
    [kernel, stride, padding]: [usize; 3],
    options: ConvOptions,
    input_gradient: InputGradient,
    tol: f64,
    seed: u64,
) {
    let [n, c, h, w] = input;
    let x = random((n, c, h, w), seed, 1.0);
    let weight = random((out, c, kernel, kernel), seed + 1, 0.05);
    let bias = random(out, seed + 2, 0.1);
    let cpu = Conv2d::new(weight.view(), &bias, stride, padding).unwrap();
    let dy = random(cpu.forward(x.view()).unwrap().raw_dim(), seed + 3, 1.0);
    let want = cpu.backward(x.view(), dy.view(), input_gradient).unwrap();

    let layout = options.layout;
    let mut layer = Conv2dGpu::<T>::new(gpu, weight.view(), bias.view(), options).unwrap();
    let in_channels = layer.in_channels();
    let mut padded = Array4::<f32>::zeros((n, in_channels, h, w));
    padded.slice_mut(s![.., ..c, .., ..]).assign(&x);
    let x_gpu = GpuTensor::<T>::from_host(gpu, padded.view().into_dyn(), layout).unwrap();
    let dy_gpu = GpuTensor::<T>::from_host(gpu, dy.view().into_dyn(), layout).unwrap();
    let stream = gpu.stream();
    let mut dw = stream
        .alloc_zeros::<T>(out * in_channels * kernel * kernel)
        .unwrap();
    let mut db = stream.alloc_zeros::<f32>(out).unwrap();
    let mut dx = match input_gradient {
        InputGradient::Compute => {
            let mut t = GpuTensor::<T>::zeros(gpu, &[n, in_channels, h, w], layout).unwrap();
            t.poison(gpu).unwrap();
            Some(t)
        }
        InputGradient::Skip => None,
    };
    // Twice: the first call chooses the algorithms, the second runs the chosen ones.
    for round in 0..2 {
        layer
            .backward(
                gpu,
                &x_gpu,
                &dy_gpu,
                dx.as_mut(),
                &mut dw.slice_mut(..),
                &mut db.slice_mut(..),
            )
            .unwrap();
        let what = format!(
            "{name} {layout:?} gemm_only={} round {round}",
            options.fp32_gemm_only
        );
        if round == 0 {
            // The algorithms chosen, printed before any check can fail.
            eprintln!("{what}: {:?}", layer.plans());
        }
        let packed: Vec<f32> = stream
            .clone_dtoh(&dw)
            .unwrap()
            .into_iter()
            .map(|v: T| v.to_f32())
            .collect();
        let got_dw = unpack_conv_weights(&packed, [out, c, kernel], in_channels, layout).unwrap();
        check(
            &format!("{what}: filter gradient"),
            &got_dw.into_dyn(),
            &want.weight.clone().into_dyn(),
            tol,
        );
        let got_db = ArrayD::from_shape_vec(IxDyn(&[out]), stream.clone_dtoh(&db).unwrap());
        check(
            &format!("{what}: bias gradient"),
            &got_db.unwrap(),
            &want.bias.clone().into_dyn(),
            tol,
        );
        if let (Some(dx), Some(want_dx)) = (&dx, &want.input) {
            let got = dx.to_host(gpu).unwrap();
            let got = got.slice(s![.., ..c, .., ..]).to_owned().into_dyn();
            check(
                &format!("{what}: input gradient"),
                &got,
                &want_dx.clone().into_dyn(),
                tol,
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test --release -- --include-ignored on a GPU machine"]
fn conv_and_linear_backward_match_the_cpu_at_alexnet_shapes() {
    let _gpu = common::exclusive_gpu();
    let gpu = gpu();
    let seed = common::test_seed("conv_and_linear_backward_match_the_cpu_at_alexnet_shapes");
    let bf16 = common::gpu_runs_bf16("conv_and_linear_backward_match_the_cpu_at_alexnet_shapes");
    // conv1 (no input gradient: its input is the data) and a conv2-like layer, batch 2, true
    // fp32 NCHW kept to the GEMM family (the 1e-5 of the largest gradient), true fp32
    // free to take FFT and Winograd (the default: 1e-2, their transforms round more), then
    // fp16 NHWC with conv1's input padded to 8 channels (mixed precision's 1e-2), then true
    // fp32 NHWC kept to the GEMM family (1e-5).
    let conv1 = ([2, 3, 227, 227], 96, [11, 4, 0], InputGradient::Skip);
    let conv2 = ([2, 96, 27, 27], 64, [5, 1, 2], InputGradient::Compute);
    for (i, (name, (input, out, geometry, grad))) in
        [("conv1", conv1), ("conv2", conv2)].into_iter().enumerate()
    {
        let [_, stride, padding] = geometry;
        let s = seed + 10 * i as u64;
        let fp32 = ConvOptions::new(stride, padding, Layout::Nchw);
        let gemm_only = ConvOptions {
            fp32_gemm_only: true,
            ..fp32
        };
        conv_backward_case::<f32>(&gpu, name, input, out, geometry, gemm_only, grad, 1e-5, s);
        conv_backward_case::<f32>(&gpu, name, input, out, geometry, fp32, grad, 1e-2, s);
        let fp16 = ConvOptions {
            in_channels: (input[1] < 8).then_some(8),
            ..ConvOptions::new(stride, padding, Layout::Nhwc)
        };
        conv_backward_case::<f16>(&gpu, name, input, out, geometry, fp16, grad, 1e-2, s);
        // bf16 as fp16, three significant bits fewer: 8e-2, an estimate no GPU has measured.
        if bf16 {
            conv_backward_case::<bf16>(&gpu, name, input, out, geometry, fp16, grad, 8e-2, s);
        }
        // True fp32 in NHWC (channels-last training), GEMM family only: the trainer's first
        // fp32 NHWC convolutions, here where a failure names the op.
        let fp32_nhwc = ConvOptions {
            fp32_gemm_only: true,
            ..fp16
        };
        conv_backward_case::<f32>(&gpu, name, input, out, geometry, fp32_nhwc, grad, 1e-5, s);
    }

    // fc1-like and fc3 at batch 128: weight, bias and input gradients.
    for (i, (inputs, outputs)) in [(9216, 512), (4096, 1000)].into_iter().enumerate() {
        let s = seed + 100 + 10 * i as u64;
        let rows = 128;
        let x = random((rows, inputs), s, 1.0);
        let weight = random((outputs, inputs), s + 1, 0.01);
        let bias = random(outputs, s + 2, 0.1);
        let dy = random((rows, outputs), s + 3, 1.0);
        let want = Linear::new(weight.view(), &bias)
            .unwrap()
            .backward(x.view(), dy.view())
            .unwrap();
        let layer = LinearGpu::<f32>::new(&gpu, weight.view(), bias.view(), false).unwrap();
        let stream = gpu.stream();
        let mut dw = stream.alloc_zeros::<f32>(outputs * inputs).unwrap();
        let mut db = stream.alloc_zeros::<f32>(outputs).unwrap();
        let mut dx = poisoned(&gpu, &[rows, inputs], Layout::Nchw);
        layer
            .backward(
                &gpu,
                &upload(&gpu, &x.clone().into_dyn(), Layout::Nchw),
                &upload(&gpu, &dy.clone().into_dyn(), Layout::Nchw),
                Some(&mut dx),
                &mut dw.slice_mut(..),
                &mut db.slice_mut(..),
            )
            .unwrap();
        let what = format!("linear {inputs}->{outputs}");
        let host = |v: Vec<f32>, shape: &[usize]| ArrayD::from_shape_vec(IxDyn(shape), v).unwrap();
        check(
            &format!("{what}: weight gradient"),
            &host(stream.clone_dtoh(&dw).unwrap(), &[outputs, inputs]),
            &want.weight.into_dyn(),
            1e-5,
        );
        check(
            &format!("{what}: bias gradient"),
            &host(stream.clone_dtoh(&db).unwrap(), &[outputs]),
            &want.bias.into_dyn(),
            1e-5,
        );
        check(
            &format!("{what}: input gradient"),
            &dx.to_host(&gpu).unwrap(),
            &want.input.into_dyn(),
            1e-5,
        );
    }
}
