//! Turning a decoded image upright as its EXIF orientation says.

use image::{metadata::Orientation, DynamicImage};

use crate::RgbImage;

/// `img` turned upright as its EXIF orientation says.
pub(crate) fn orient(img: RgbImage, orientation: Orientation) -> RgbImage {
    if orientation == Orientation::NoTransforms {
        return img;
    }
    let Some(buffer) = image::RgbImage::from_raw(img.width, img.height, img.pixels) else {
        unreachable!("an RgbImage holds width * height * 3 bytes")
    };
    let mut dynamic = DynamicImage::ImageRgb8(buffer);
    dynamic.apply_orientation(orientation);
    let rgb = dynamic.into_rgb8();
    RgbImage { width: rgb.width(), height: rgb.height(), pixels: rgb.into_raw() }
}
