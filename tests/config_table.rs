//! The seed's table, reproduced exactly from the layer specs (shapes, per-layer counts, total).

use alexnet_cuda::config::{LayerKind, LrnParams, PoolSpec};
use alexnet_cuda::AlexNetConfig;

/// (layer, activation shape, filter side, weights, biases, parameters).
type SeedRow = (
    &'static str,
    &'static [usize],
    Option<usize>,
    usize,
    usize,
    usize,
);

/// The seed's table for the paper's network, typed in from the paper (not from this crate):
/// (layer, activation shape, filter side, weights, biases, parameters).
const SEED_TABLE: [SeedRow; 11] = [
    ("Conv1", &[96, 55, 55], Some(11), 34_848, 96, 34_944),
    ("Pool1", &[96, 27, 27], None, 0, 0, 0),
    ("Conv2", &[256, 27, 27], Some(5), 614_400, 256, 614_656),
    ("Pool2", &[256, 13, 13], None, 0, 0, 0),
    ("Conv3", &[384, 13, 13], Some(3), 884_736, 384, 885_120),
    ("Conv4", &[384, 13, 13], Some(3), 1_327_104, 384, 1_327_488),
    ("Conv5", &[256, 13, 13], Some(3), 884_736, 256, 884_992),
    ("Pool3", &[256, 6, 6], None, 0, 0, 0),
    ("FC1", &[4096], None, 37_748_736, 4096, 37_752_832),
    ("FC2", &[4096], None, 16_777_216, 4096, 16_781_312),
    ("FC3", &[1000], None, 4_096_000, 1000, 4_097_000),
];

#[test]
fn paper_reproduces_the_seed_table() {
    let rows = AlexNetConfig::paper().layers().unwrap();
    assert_eq!(rows.len(), SEED_TABLE.len());
    for (row, &(name, shape, filter, weights, biases, params)) in rows.iter().zip(&SEED_TABLE) {
        assert_eq!(row.name, name);
        assert_eq!(row.output, shape, "{name} activation");
        assert_eq!(row.filter, filter, "{name} filter");
        assert_eq!(row.weights, weights, "{name} weights");
        assert_eq!(row.biases, biases, "{name} biases");
        assert_eq!(row.params(), params, "{name} parameters");
    }
    assert_eq!(AlexNetConfig::paper().param_count().unwrap(), 62_378_344);
}

#[test]
fn paper_architecture_details() {
    let c = AlexNetConfig::paper();
    assert_eq!(AlexNetConfig::default(), c);
    let lrn: Vec<bool> = c
        .convs
        .iter()
        .map(|s| s.lrn == Some(LrnParams::PAPER))
        .collect();
    assert_eq!(lrn, [true, true, false, false, false]);
    let pool: Vec<bool> = c
        .convs
        .iter()
        .map(|s| {
            s.pool
                == Some(PoolSpec {
                    kernel: 3,
                    stride: 2,
                })
        })
        .collect();
    assert_eq!(pool, [true, true, false, false, true]);
    let geometry: Vec<(usize, usize, usize)> = c
        .convs
        .iter()
        .map(|s| (s.kernel, s.stride, s.padding))
        .collect();
    assert_eq!(
        geometry,
        [(11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1)]
    );
    let relu: Vec<bool> = c.fcs.iter().map(|f| f.relu).collect();
    assert_eq!(relu, [true, true, false]);
    let dropout: Vec<Option<f32>> = c.fcs.iter().map(|f| f.dropout).collect();
    assert_eq!(dropout, [Some(0.5), Some(0.5), None]);
    assert_eq!(c.flattened_features().unwrap(), 9216);
    // 2 x multiply-adds, as torch_anchor.py counts them: 2.271 GFLOP per image.
    let gflop = c.flops_per_image().unwrap() as f64 / 1e9;
    assert!((gflop - 2.271).abs() < 0.0005, "{gflop}");
}

#[test]
fn torchvision_variant() {
    let c = AlexNetConfig::torchvision();
    assert_eq!(c.param_count().unwrap(), 61_100_840);
    assert!(c.convs.iter().all(|s| s.lrn.is_none()));
    let channels: Vec<usize> = c.convs.iter().map(|s| s.out_channels).collect();
    assert_eq!(channels, [64, 192, 384, 256, 256]);
    let rows = c.layers().unwrap();
    let pool3 = rows.iter().rfind(|r| r.kind == LayerKind::Pool).unwrap();
    assert_eq!(pool3.output, [256, 6, 6]);
}

#[test]
fn parameter_shapes_follow_pytorch_layout() {
    let shapes = AlexNetConfig::paper().parameter_shapes().unwrap();
    assert_eq!(shapes.len(), 16);
    assert_eq!(shapes[0], ("conv1.weight".to_string(), vec![96, 3, 11, 11]));
    assert_eq!(shapes[1], ("conv1.bias".to_string(), vec![96]));
    assert_eq!(shapes[10], ("fc1.weight".to_string(), vec![4096, 9216]));
    assert_eq!(shapes[15], ("fc3.bias".to_string(), vec![1000]));
}

#[test]
fn summary_prints_the_table() {
    let text = AlexNetConfig::paper().summary().unwrap();
    for needle in [
        "Conv1",
        "96x55x55",
        "11x11",
        "34,848",
        "Pool3",
        "256x6x6",
        "37,752,832",
        "62,378,344",
    ] {
        assert!(text.contains(needle), "summary lacks {needle}:\n{text}");
    }
}

#[test]
fn bad_configs_are_errors_not_panics() {
    let mut c = AlexNetConfig::paper();
    c.input.height = 8; // conv1's 11x11 window does not fit
    assert!(c.layers().is_err());
    let mut c = AlexNetConfig::paper();
    c.convs[2].stride = 0;
    assert!(c.param_count().is_err());
    let mut c = AlexNetConfig::paper();
    c.fcs[0].dropout = Some(1.0);
    assert!(c.layers().is_err());
    assert!(AlexNetConfig::preset("vgg").is_err());
}
