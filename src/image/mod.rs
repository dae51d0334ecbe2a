//! Image decoding and torchvision's ImageNet eval preprocessing.
//!
//! The pipeline, per image, is exactly torchvision's
//! `Compose([Resize(256), CenterCrop(224), ToTensor(), Normalize(mean, std)])` applied to a PIL
//! image opened with `Image.open(path).convert("RGB")`:
//!
//! 1. [`decode_image_file`] / [`decode_image_bytes`]: the format is guessed from the content (not
//!    the extension). A file is read only after its first bytes showed a supported format, and
//!    never past [`ImageLimits::max_file_bytes`] ([`DEFAULT_MAX_FILE_BYTES`], 256 MiB; raise it
//!    with [`decode_image_file_with`] or [`Preprocess::limits`]), so a huge non-image, a pipe or
//!    `/dev/zero` costs a few bytes and a bounded read. Grayscale, palette, RGBA, 16-bit, ... all become 8-bit RGB (alpha is dropped,
//!    not blended, like PIL's `convert("RGB")`). EXIF orientation is *not* applied (PIL does not
//!    apply it either). Decoding runs under [`image::Limits`] ([`MAX_IMAGE_DIMENSION`],
//!    [`MAX_DECODE_ALLOC`]) so a file whose header claims a huge size is an
//!    [`Error::ImageTooLarge`], not an abort, and every decode in the process holds its memory
//!    from one [`DECODE_MEMORY_BUDGET`] (2 GiB), whatever the thread count.
//! 2. [`Preprocess::resize_and_crop`]: shorter side to [`Preprocess::resize_shorter`] (the other
//!    side `int(resize_shorter * long / short)`, truncated), bilinear with antialiasing, then the
//!    centre `crop x crop` window. The resampler is a re-implementation of Pillow's
//!    `ImagingResample` (same filter support scaling, same 22-bit fixed-point coefficients, same
//!    horizontal-then-vertical passes with an 8-bit intermediate), so on the same decoded pixels it
//!    reproduces torchvision's crops bit for bit. Only the pixels inside the crop window are
//!    computed. The result is a `crop x crop` 8-bit RGB image.
//! 3. [`Preprocess::normalize_into`] / [`U8Batch::to_nchw_f32`]: CHW `f32`,
//!    `(x as f32 / 255.0 - mean) / std`, computed in `f32` like torchvision.
//!
//! Batches are kept as [`U8Batch`] (N images, HWC `u8`, contiguous): 4x fewer bytes than `f32`,
//! which is what a GPU backend uploads before normalising on the device.

mod batch;
mod budget;
mod decode;
mod gif;
mod preprocess;
mod read;
mod resize;
mod ten_crop;

pub use batch::{
    collect_image_paths, load_batch, load_batch_into, load_ten_crops_into, LoadedBatch, LoadedRows,
    U8Batch,
};
pub use budget::DECODE_MEMORY_BUDGET;
pub use decode::{decode_image_bytes, decode_image_file, decode_image_file_with};
pub use preprocess::Preprocess;
pub use read::{ImageLimits, DEFAULT_MAX_FILE_BYTES};
pub use resize::{center_crop, resize_bilinear};
pub use ten_crop::{ten_crop, TEN};

#[cfg(doc)]
use crate::error::Error;

/// ImageNet per-channel mean (RGB), as used by torchvision's pretrained models.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet per-channel standard deviation (RGB), as used by torchvision's pretrained models.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Largest width and largest height (in pixels) the decoders accept; a file claiming more is an
/// [`Error::ImageTooLarge`].
pub const MAX_IMAGE_DIMENSION: u32 = 16384;
/// Most bytes a decoder may allocate for one image (512 MiB); a file needing more is an
/// [`Error::ImageTooLarge`]. The decoded image itself counts (an 8-bit RGB image of
/// 16384 x 10922 pixels is about the largest that fits). What the whole process holds for
/// decoding, conversions included, is bounded by [`DECODE_MEMORY_BUDGET`].
pub const MAX_DECODE_ALLOC: u64 = 512 * 1024 * 1024;
