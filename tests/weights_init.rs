//! The paper's initialisation: N(0, 0.01^2) weights, the paper's bias rule, reproducible seeds.

use alexnet_cuda::{AlexNetConfig, Weights};

#[test]
fn same_seed_same_weights_other_seed_other_weights() {
    let config = AlexNetConfig::torchvision();
    let a = Weights::paper_init(&config, 11).unwrap();
    let b = Weights::paper_init(&config, 11).unwrap();
    let c = Weights::paper_init(&config, 12).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.convs()[0].weight, c.convs()[0].weight);
    assert_ne!(a.fcs()[2].weight, c.fcs()[2].weight);
    // Tensors are independent streams: two tensors of one model are not copies of each other.
    let w3 = a.convs()[2].weight.as_slice().unwrap();
    let w4 = a.convs()[3].weight.as_slice().unwrap();
    assert_ne!(&w3[..100], &w4[..100]);
}

#[test]
fn weights_are_normal_with_std_0_01_and_biases_follow_the_paper() {
    let config = AlexNetConfig::paper();
    let w = Weights::paper_init(&config, 3).unwrap();
    assert_eq!(w.param_count(), 62_378_344);
    let mut all_weights = Vec::new();
    for c in w.convs() {
        all_weights.extend(c.weight.iter().map(|&v| v as f64));
    }
    for l in w.fcs() {
        all_weights.extend(l.weight.iter().map(|&v| v as f64));
    }
    let n = all_weights.len() as f64;
    let mean = all_weights.iter().sum::<f64>() / n;
    let std = (all_weights.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    // ~62M samples: the mean's standard error is 1.3e-6, the std's about 1e-6.
    assert!(mean.abs() < 1e-5, "mean {mean}");
    assert!((std - 0.01).abs() < 1e-4, "std {std}");
    // Normal, not uniform: about 68.3% within one standard deviation (uniform would give 57.7%).
    let within = all_weights.iter().filter(|v| v.abs() < 0.01).count() as f64 / n;
    assert!(
        (within - 0.6827).abs() < 0.002,
        "fraction within 1 std: {within}"
    );

    // Biases: 1 in conv2, conv4, conv5, fc1, fc2; 0 in conv1, conv3, fc3.
    let conv_bias: Vec<f32> = w.convs().iter().map(|c| c.bias[0]).collect();
    assert_eq!(conv_bias, [0.0, 1.0, 0.0, 1.0, 1.0]);
    let fc_bias: Vec<f32> = w.fcs().iter().map(|l| l.bias[0]).collect();
    assert_eq!(fc_bias, [1.0, 1.0, 0.0]);
    for c in w.convs() {
        assert!(c.bias.iter().all(|&b| b == c.bias[0]));
    }
    for l in w.fcs() {
        assert!(l.bias.iter().all(|&b| b == l.bias[0]));
    }
}
