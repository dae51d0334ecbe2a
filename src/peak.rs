//! What a card can do at most: NVIDIA's datasheet figures for the dense (not 2:4 sparse)
//! arithmetic peak of common data-centre GPUs, so a report can set its achieved TFLOP/s beside
//! them (`infer` does). A card not in the table has no peak: nothing is estimated.
//!
//! The figures are the datasheets' at their boost clock: fp32 on the CUDA cores, TF32 and fp16
//! (with f32 accumulation) on the tensor cores, the sparse figures halved. An fp32 run whose
//! convolutions use FFT or Winograd (allowed in fp32 unless `--fp32-gemm-only`) does fewer
//! operations than the direct convolution the achieved figure counts, so it can show more than
//! 100% of the fp32 peak.

use crate::Precision;

/// A card's dense peak in one precision.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DensePeak {
    /// The card as the datasheet names it, e.g. `H200 SXM`.
    pub card: &'static str,
    /// TFLOP/s.
    pub tflops: f64,
}

/// One datasheet row: the name pattern, the card, and fp32 / TF32 / fp16 dense TFLOP/s.
struct Card {
    /// Every one of these must occur in the device name (case-insensitive), ...
    all: &'static [&'static str],
    /// ... and none of these.
    none: &'static [&'static str],
    card: &'static str,
    fp32: f64,
    tf32: f64,
    fp16: f64,
}

/// More specific rows first: "H100 NVL" before "H100".
const CARDS: &[Card] = &[
    Card {
        all: &["h200", "nvl"],
        none: &[],
        card: "H200 NVL",
        fp32: 60.0,
        tf32: 417.5,
        fp16: 835.5,
    },
    Card {
        all: &["h200"],
        none: &["nvl"],
        card: "H200 SXM",
        fp32: 67.0,
        tf32: 494.5,
        fp16: 989.5,
    },
    Card {
        all: &["h100", "nvl"],
        none: &[],
        card: "H100 NVL",
        fp32: 60.0,
        tf32: 417.5,
        fp16: 835.5,
    },
    Card {
        all: &["h100", "pcie"],
        none: &[],
        card: "H100 PCIe",
        fp32: 51.0,
        tf32: 378.0,
        fp16: 756.5,
    },
    Card {
        all: &["h100"],
        none: &["nvl", "pcie"],
        card: "H100 SXM",
        fp32: 67.0,
        tf32: 494.5,
        fp16: 989.5,
    },
    Card {
        all: &["a100"],
        none: &[],
        card: "A100",
        fp32: 19.5,
        tf32: 156.0,
        fp16: 312.0,
    },
    Card {
        all: &["l40s"],
        none: &[],
        card: "L40S",
        fp32: 91.6,
        tf32: 183.0,
        fp16: 362.0,
    },
    Card {
        all: &["l4"],
        none: &[],
        card: "L4",
        fp32: 30.3,
        tf32: 60.0,
        fp16: 121.0,
    },
];

/// The dense peak of the card named `device` (as the driver names it, e.g. `NVIDIA H200`) in
/// `precision`, if the card is in the table.
pub fn dense_peak(device: &str, precision: Precision) -> Option<DensePeak> {
    let name = device.to_lowercase();
    // Whole words only: "L4" must not match "L40S", nor "A100" a longer model number.
    let words: Vec<&str> = name
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let has = |word: &&str| words.contains(word);
    let card = CARDS
        .iter()
        .find(|c| c.all.iter().all(has) && !c.none.iter().any(has))?;
    let tflops = match precision {
        Precision::Fp32 => card.fp32,
        Precision::Tf32 => card.tf32,
        // Every card here (Ampere and newer) has bf16 tensor cores at fp16's dense rate, as
        // their datasheets give it.
        Precision::Fp16 | Precision::Bf16 => card.fp16,
    };
    Some(DensePeak {
        card: card.card,
        tflops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The driver's names of the cards pick their own datasheet rows, in every precision; a
    /// name that only contains another card's (L40S and L4) does not.
    #[test]
    fn driver_names_find_their_datasheet_rows() {
        let peak = |device, precision| dense_peak(device, precision).map(|p| (p.card, p.tflops));
        assert_eq!(
            peak("NVIDIA H200", Precision::Fp16),
            Some(("H200 SXM", 989.5))
        );
        assert_eq!(
            peak("NVIDIA H200", Precision::Fp32),
            Some(("H200 SXM", 67.0))
        );
        assert_eq!(
            peak("NVIDIA H200 NVL", Precision::Tf32),
            Some(("H200 NVL", 417.5))
        );
        assert_eq!(
            peak("NVIDIA H100 80GB HBM3", Precision::Tf32),
            Some(("H100 SXM", 494.5))
        );
        assert_eq!(
            peak("NVIDIA H100 PCIe", Precision::Fp16),
            Some(("H100 PCIe", 756.5))
        );
        assert_eq!(
            peak("NVIDIA A100-SXM4-80GB", Precision::Fp16),
            Some(("A100", 312.0))
        );
        assert_eq!(peak("NVIDIA L40S", Precision::Fp16), Some(("L40S", 362.0)));
        assert_eq!(peak("NVIDIA L4", Precision::Fp16), Some(("L4", 121.0)));
        assert_eq!(
            peak("NVIDIA H200", Precision::Bf16),
            Some(("H200 SXM", 989.5))
        );
    }

    /// No estimate for what the table does not hold: other cards, the CPU.
    #[test]
    fn an_unknown_card_or_the_cpu_has_no_peak() {
        for device in [
            "NVIDIA GeForce RTX 4090",
            "Tesla T4",
            "CPU (2 threads, AVX-512 kernels)",
            "",
        ] {
            assert_eq!(dense_peak(device, Precision::Fp16), None, "{device}");
        }
        assert_eq!(dense_peak("Tesla T4", Precision::Bf16), None);
    }
}
