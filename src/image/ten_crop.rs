//! The paper's test-time augmentation: ten `crop x crop` patches of one image — its four
//! corners and centre, then the same five of its horizontal mirror — in the order of
//! torchvision's `TenCrop`.

use image::{imageops, RgbImage};

use super::resize::center_crop;
use crate::error::{Error, Result};

/// Patches per image.
pub const TEN: usize = 10;

/// torchvision's `TenCrop(crop)` of `image` (at least `crop` on both sides): top-left,
/// top-right, bottom-left, bottom-right, centre (rounded as `CenterCrop`), then those five of
/// the horizontally flipped image (whose top-left is the mirror of the original's top-right).
pub fn ten_crop(image: &RgbImage, crop: u32) -> Result<Vec<RgbImage>> {
    let (w, h) = image.dimensions();
    if crop == 0 || w < crop || h < crop {
        return Err(Error::invalid(
            "ten_crop",
            format!("a {w}x{h} image has no {crop}x{crop} corners"),
        ));
    }
    let mirrored = imageops::flip_horizontal(image);
    let mut crops = Vec::with_capacity(TEN);
    for source in [image, &mirrored] {
        for (left, top) in [(0, 0), (w - crop, 0), (0, h - crop), (w - crop, h - crop)] {
            crops.push(imageops::crop_imm(source, left, top, crop, crop).to_image());
        }
        crops.push(center_crop(source, crop));
    }
    Ok(crops)
}
