//! A GIF's first frame as PIL's `Image.open(gif).convert("RGB")` sees it.
//!
//! The `image` crate composes a first frame that does not cover the logical screen onto
//! transparent black, which `into_rgb8` turns into black; PIL (and so every torchvision
//! pipeline) fills the uncovered area with palette index 0, or with the frame's transparency
//! index when it has one. The rules, checked against Pillow by `tools/gif_reference.py`:
//!
//! * the canvas is the logical screen, enlarged to hold the frame if it reaches past the screen;
//! * uncovered pixels are index 0, or the transparency index (the screen's background index is
//!   ignored);
//! * the frame's palette (local, else global) maps an index to RGB; a transparent index keeps
//!   its palette colour; an index past the end of the palette is black; without any palette an
//!   index is a grey level (PIL's mode `L`; the gif crate refuses such a file, so it is given a
//!   grey global table first);
//! * only the first frame counts.

use std::borrow::Cow;
use std::io::Cursor;
use std::num::NonZeroU64;

use gif::{ColorOutput, DecodeOptions, Decoder, DecodingError, Frame, MemoryLimit};
use image::RgbImage;

use super::{MAX_DECODE_ALLOC, MAX_IMAGE_DIMENSION};

/// Why a GIF could not be decoded: the caller turns these into the crate's typed errors.
#[derive(Debug)]
pub(super) enum GifFailure {
    /// Not a valid GIF, truncated, or without any frame.
    Corrupt(String),
    /// Larger than [`MAX_IMAGE_DIMENSION`] or [`MAX_DECODE_ALLOC`].
    TooLarge(String),
}

fn failure(err: DecodingError) -> GifFailure {
    match err {
        DecodingError::MemoryLimit | DecodingError::OutOfMemory => GifFailure::TooLarge(format!(
            "GIF frame needs more than {MAX_DECODE_ALLOC} bytes"
        )),
        other => GifFailure::Corrupt(other.to_string()),
    }
}

/// Opens a GIF decoder on `bytes` (with a grey table added if it has none).
fn open(bytes: &[u8]) -> Result<Decoder<Cursor<&[u8]>>, GifFailure> {
    let mut options = DecodeOptions::new();
    options.set_color_output(ColorOutput::Indexed);
    if let Some(limit) = NonZeroU64::new(MAX_DECODE_ALLOC) {
        options.set_memory_limit(MemoryLimit::Bytes(limit));
    }
    options.read_info(Cursor::new(bytes)).map_err(failure)
}

/// The canvas a first frame at `left, top` of `frame_w x frame_h` makes on a `screen`, checked
/// against the limits.
fn canvas_size(screen: (u16, u16), frame: &Frame<'_>) -> Result<(u32, u32), GifFailure> {
    let width = u32::from(screen.0).max(u32::from(frame.left) + u32::from(frame.width));
    let height = u32::from(screen.1).max(u32::from(frame.top) + u32::from(frame.height));
    if width > MAX_IMAGE_DIMENSION || height > MAX_IMAGE_DIMENSION {
        return Err(GifFailure::TooLarge(format!(
            "GIF canvas of {width}x{height} pixels is over {MAX_IMAGE_DIMENSION} per side"
        )));
    }
    if u64::from(width) * u64::from(height) * 3 > MAX_DECODE_ALLOC {
        return Err(GifFailure::TooLarge(format!(
            "GIF canvas of {width}x{height} pixels needs more than {MAX_DECODE_ALLOC} bytes"
        )));
    }
    if width == 0 || height == 0 {
        return Err(GifFailure::Corrupt(format!(
            "image has no pixels ({width}x{height})"
        )));
    }
    Ok((width, height))
}

/// The canvas size of the first frame and the bytes its indices take, from the headers only.
pub(super) fn first_frame_size(bytes: &[u8]) -> Result<(u32, u32, u64), GifFailure> {
    let bytes = with_grey_global_table(bytes);
    let mut decoder = open(&bytes)?;
    let screen = (decoder.width(), decoder.height());
    let Some(frame) = decoder.next_frame_info().map_err(failure)? else {
        return Err(GifFailure::Corrupt("GIF has no image in it".into()));
    };
    let (width, height) = canvas_size(screen, frame)?;
    let indices = u64::from(frame.width) * u64::from(frame.height);
    Ok((width, height, indices))
}

/// Decodes the first frame of the GIF in `bytes` onto its canvas, as RGB.
pub(super) fn decode_first_frame(bytes: &[u8]) -> Result<RgbImage, GifFailure> {
    let bytes = with_grey_global_table(bytes);
    let mut decoder = open(&bytes)?;
    let screen = (decoder.width(), decoder.height());
    let global_palette = decoder.global_palette().map(<[u8]>::to_vec);
    let Some(frame) = decoder.read_next_frame().map_err(failure)? else {
        return Err(GifFailure::Corrupt("GIF has no image in it".into()));
    };
    let (width, height) = canvas_size(screen, frame)?;
    let (left, top) = (u32::from(frame.left), u32::from(frame.top));
    let (frame_w, frame_h) = (u32::from(frame.width), u32::from(frame.height));
    let palette = frame.palette.as_deref().or(global_palette.as_deref());
    let colour = |index: u8| -> [u8; 3] {
        let at = 3 * usize::from(index);
        palette
            .and_then(|p| p.get(at..at + 3))
            .map_or([0; 3], |c| [c[0], c[1], c[2]])
    };
    let background = colour(frame.transparent.unwrap_or(0));
    let mut canvas = RgbImage::from_pixel(width, height, image::Rgb(background));
    // `buffer` holds frame_w * frame_h indices, row by row, already de-interlaced.
    for (y, row) in frame
        .buffer
        .chunks_exact(frame_w.max(1) as usize)
        .take(frame_h as usize)
        .enumerate()
    {
        for (x, &index) in row.iter().enumerate() {
            canvas.put_pixel(left + x as u32, top + y as u32, image::Rgb(colour(index)));
        }
    }
    Ok(canvas)
}

/// Where the logical screen descriptor's flags are, and where a global colour table starts.
const SCREEN_FLAGS_AT: usize = 10;
const GLOBAL_TABLE_AT: usize = 13;

/// `bytes` with a 256-entry grey global colour table when it has none, so that a frame without
/// a local table decodes to grey levels as in PIL (a frame's local table still wins).
fn with_grey_global_table(bytes: &[u8]) -> Cow<'_, [u8]> {
    let has_global_table = bytes.get(SCREEN_FLAGS_AT).is_none_or(|f| f & 0x80 != 0);
    if has_global_table || bytes.len() < GLOBAL_TABLE_AT {
        return Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len() + 768);
    out.extend_from_slice(&bytes[..GLOBAL_TABLE_AT]);
    // Table present (0x80), 2^(7 + 1) = 256 entries (0x07).
    out[SCREEN_FLAGS_AT] |= 0x87;
    out.extend((0..=255u8).flat_map(|v| [v, v, v]));
    out.extend_from_slice(&bytes[GLOBAL_TABLE_AT..]);
    Cow::Owned(out)
}
