//! Writers: PNG masks (0/255), overlays of a mask on its image, and image grids (rows of tiles)
//! for sample grids; plus conversion of batch tensors back to images.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, GrayImage, Luma, Rgb, RgbImage};

use crate::error::{DataError, Result};

/// Creates the parent folder of `path` if needed.
fn create_parent(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
    }
    Ok(())
}

/// Writes any image; the format follows the extension (PNG for `.png`).
///
/// The file appears whole or not at all: the image is encoded in memory, written to a
/// temporary sibling and renamed into place, so a full disk or a crash never leaves a
/// truncated image behind.
pub fn write_image(path: &Path, image: &DynamicImage) -> Result<()> {
    create_parent(path)?;
    let encode = |source| DataError::Encode {
        path: path.to_path_buf(),
        source,
    };
    let format = image::ImageFormat::from_path(path).map_err(encode)?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, format).map_err(encode)?;
    write_file_atomic(path, bytes.get_ref())
}

/// Writes `bytes` to `path` through a temporary sibling and a rename.
fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        DataError::io(path, e)
    })
}

/// Writes a mask as a single-channel PNG with values 0 and 255 (every non-zero input is
/// foreground), the convention of the folder layout.
pub fn write_mask_png(path: &Path, mask: &GrayImage) -> Result<()> {
    let out = GrayImage::from_fn(mask.width(), mask.height(), |x, y| {
        Luma([if mask.get_pixel(x, y).0[0] > 0 {
            255
        } else {
            0
        }])
    });
    write_image(path, &DynamicImage::ImageLuma8(out))
}

/// How a mask is drawn on its image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OverlayStyle {
    /// Blend `color` over foreground pixels with opacity `alpha` in [0, 1].
    Fill {
        /// The fill colour.
        color: [u8; 3],
        /// Opacity of the fill.
        alpha: f32,
    },
    /// Paint the foreground pixels that touch background (4-neighbourhood) or the image border.
    Contour {
        /// The contour colour.
        color: [u8; 3],
    },
}

impl Default for OverlayStyle {
    /// A red fill at 40 % opacity: the lesion stays visible under it.
    fn default() -> Self {
        OverlayStyle::Fill {
            color: [255, 0, 0],
            alpha: 0.4,
        }
    }
}

/// Draws `mask` (non-zero = foreground) on `image`; both must have the same size.
pub fn overlay(image: &RgbImage, mask: &GrayImage, style: OverlayStyle) -> Result<RgbImage> {
    if image.dimensions() != mask.dimensions() {
        return Err(DataError::Config(format!(
            "overlay: mask {}x{} does not match image {}x{}",
            mask.width(),
            mask.height(),
            image.width(),
            image.height()
        )));
    }
    let (w, h) = image.dimensions();
    let fg = |x: i64, y: i64| {
        x >= 0
            && y >= 0
            && x < i64::from(w)
            && y < i64::from(h)
            && mask.get_pixel(x as u32, y as u32).0[0] > 0
    };
    let mut out = image.clone();
    for (x, y, px) in out.enumerate_pixels_mut() {
        let (xi, yi) = (i64::from(x), i64::from(y));
        if !fg(xi, yi) {
            continue;
        }
        match style {
            OverlayStyle::Fill { color, alpha } => {
                let a = alpha.clamp(0.0, 1.0);
                for (c, &target) in px.0.iter_mut().zip(&color) {
                    *c = (f32::from(*c) * (1.0 - a) + f32::from(target) * a).round() as u8;
                }
            }
            OverlayStyle::Contour { color } => {
                let edge = [(1, 0), (-1, 0), (0, 1), (0, -1)]
                    .iter()
                    .any(|(dx, dy)| !fg(xi + dx, yi + dy));
                if edge {
                    *px = Rgb(color);
                }
            }
        }
    }
    Ok(out)
}

/// Lays out rows of equally sized tiles with `padding` white pixels around and between them;
/// rows may hold different numbers of tiles (the grid is as wide as the longest row).
pub fn image_grid(rows: &[Vec<RgbImage>], padding: u32) -> Result<RgbImage> {
    let Some(first) = rows.iter().flatten().next() else {
        return Err(DataError::Config("image grid: no tiles".into()));
    };
    let (tw, th) = first.dimensions();
    if let Some((r, c, t)) = rows
        .iter()
        .enumerate()
        .flat_map(|(r, row)| row.iter().enumerate().map(move |(c, t)| (r, c, t)))
        .find(|(_, _, t)| t.dimensions() != (tw, th))
    {
        return Err(DataError::Config(format!(
            "image grid: tile (row {r}, column {c}) is {}x{}, the first tile is {tw}x{th}",
            t.width(),
            t.height()
        )));
    }
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let n_rows = rows.len() as u32;
    let mut grid = RgbImage::from_pixel(
        cols * tw + (cols + 1) * padding,
        n_rows * th + (n_rows + 1) * padding,
        Rgb([255, 255, 255]),
    );
    for (r, row) in rows.iter().enumerate() {
        for (c, tile) in row.iter().enumerate() {
            let x = padding + c as u32 * (tw + padding);
            let y = padding + r as u32 * (th + padding);
            image::imageops::replace(&mut grid, tile, i64::from(x), i64::from(y));
        }
    }
    Ok(grid)
}

/// Converts images `[B, C, H, W]` (C = 1 or 3, values in [0, 1], clamped) to RGB images.
pub fn images_from_tensor(images: &Tensor) -> candle_core::Result<Vec<RgbImage>> {
    let (b, c, h, w) = images.dims4()?;
    if c != 1 && c != 3 {
        candle_core::bail!(
            "images_from_tensor: expected 1 or 3 channels, got shape {:?}",
            images.dims()
        );
    }
    let data = images
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let plane = h * w;
    let to_u8 = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    Ok((0..b)
        .map(|i| {
            let base = i * c * plane;
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let p = y as usize * w + x as usize;
                let ch = |k: usize| to_u8(data[base + k.min(c - 1) * plane + p]);
                Rgb([ch(0), ch(1), ch(2)])
            })
        })
        .collect())
}

/// Converts masks `[B, 1, H, W]` to {0, 1} gray images, foreground = value > `threshold`
/// (0.5 for probabilities, 0 for logits).
pub fn masks_from_tensor(masks: &Tensor, threshold: f32) -> candle_core::Result<Vec<GrayImage>> {
    let (b, c, h, w) = masks.dims4()?;
    if c != 1 {
        candle_core::bail!(
            "masks_from_tensor: expected one channel, got shape {:?}",
            masks.dims()
        );
    }
    let data = masks
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(data
        .chunks_exact(h * w)
        .take(b)
        .map(|m| {
            GrayImage::from_fn(w as u32, h as u32, |x, y| {
                Luma([u8::from(m[y as usize * w + x as usize] > threshold)])
            })
        })
        .collect())
}

/// Stacks gray masks (non-zero = foreground) into a `[B, 1, H, W]` tensor in `{0, 1}`: the
/// inverse of [`masks_from_tensor`]. Masks of different sizes in one batch are an error.
pub fn masks_to_tensor(masks: &[GrayImage], device: &Device) -> candle_core::Result<Tensor> {
    let Some(first) = masks.first() else {
        candle_core::bail!("masks_to_tensor: no masks to convert");
    };
    let (w, h) = first.dimensions();
    let mut values = Vec::with_capacity(masks.len() * (w * h) as usize);
    for m in masks {
        if m.dimensions() != (w, h) {
            candle_core::bail!(
                "masks of {}x{} and {w}x{h} in one batch",
                m.width(),
                m.height()
            );
        }
        values.extend(m.pixels().map(|p| f32::from(u8::from(p.0[0] > 0))));
    }
    Tensor::from_vec(values, (masks.len(), 1, h as usize, w as usize), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_png_is_zero_or_255_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/m.png");
        let mut m = GrayImage::new(4, 3);
        m.put_pixel(1, 1, Luma([1]));
        write_mask_png(&path, &m).unwrap();
        let back = image::open(&path).unwrap();
        let back = back.as_luma8().expect("single-channel PNG");
        assert_eq!(back.get_pixel(1, 1).0, [255]);
        assert_eq!(back.pixels().filter(|p| p.0[0] == 0).count(), 11);
    }

    #[test]
    fn overlay_fill_and_contour_touch_only_the_mask() {
        let image = RgbImage::from_pixel(5, 5, Rgb([100, 100, 100]));
        let mut mask = GrayImage::new(5, 5);
        for y in 1..4 {
            for x in 1..4 {
                mask.put_pixel(x, y, Luma([1]));
            }
        }
        let filled = overlay(
            &image,
            &mask,
            OverlayStyle::Fill {
                color: [200, 0, 0],
                alpha: 0.5,
            },
        )
        .unwrap();
        assert_eq!(filled.get_pixel(2, 2).0, [150, 50, 50]);
        assert_eq!(filled.get_pixel(0, 0).0, [100, 100, 100]);
        let contour = overlay(&image, &mask, OverlayStyle::Contour { color: [0, 255, 0] }).unwrap();
        assert_eq!(contour.get_pixel(1, 1).0, [0, 255, 0]);
        assert_eq!(contour.get_pixel(2, 2).0, [100, 100, 100]); // interior
        assert_eq!(contour.get_pixel(4, 4).0, [100, 100, 100]); // background
        assert!(
            overlay(
                &image,
                &GrayImage::new(2, 2),
                OverlayStyle::Contour { color: [0, 0, 0] }
            )
            .is_err()
        );
    }

    #[test]
    fn grid_places_tiles_with_padding_and_rejects_mixed_sizes() {
        let a = RgbImage::from_pixel(2, 2, Rgb([1, 2, 3]));
        let b = RgbImage::from_pixel(2, 2, Rgb([9, 9, 9]));
        let grid = image_grid(&[vec![a.clone(), b.clone()], vec![b.clone()]], 1).unwrap();
        assert_eq!(grid.dimensions(), (7, 7));
        assert_eq!(grid.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(grid.get_pixel(1, 1).0, [1, 2, 3]);
        assert_eq!(grid.get_pixel(4, 1).0, [9, 9, 9]);
        assert_eq!(grid.get_pixel(1, 4).0, [9, 9, 9]);
        assert_eq!(grid.get_pixel(4, 4).0, [255, 255, 255]); // missing tile of the short row
        let err = image_grid(&[vec![a, RgbImage::new(3, 2)]], 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("column 1"), "{err}");
        assert!(image_grid(&[], 0).is_err());
    }

    #[test]
    fn tensors_convert_to_images_and_masks() {
        let dev = Device::Cpu;
        let t = Tensor::from_vec(vec![0.0f32, 1.0, 0.5, 2.0], (1, 1, 2, 2), &dev).unwrap();
        let img = &images_from_tensor(&t).unwrap()[0];
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(img.get_pixel(0, 1).0, [128, 128, 128]);
        assert_eq!(img.get_pixel(1, 1).0, [255, 255, 255]);
        let m = &masks_from_tensor(&t, 0.5).unwrap()[0];
        assert_eq!(m.as_raw(), &[0, 1, 0, 1]);
        let rgb = Tensor::zeros((2, 3, 4, 5), DType::F32, &dev).unwrap();
        assert_eq!(images_from_tensor(&rgb).unwrap()[1].dimensions(), (5, 4));
        assert!(masks_from_tensor(&rgb, 0.5).is_err());
    }

    #[test]
    fn masks_round_trip_through_tensors_and_mixed_sizes_fail() -> candle_core::Result<()> {
        let mut a = GrayImage::new(4, 3);
        a.put_pixel(1, 2, image::Luma([255]));
        let t = masks_to_tensor(&[a.clone(), GrayImage::new(4, 3)], &Device::Cpu)?;
        assert_eq!(t.dims(), &[2, 1, 3, 4]);
        assert_eq!(t.sum_all()?.to_scalar::<f32>()?, 1.0);
        assert_eq!(masks_from_tensor(&t, 0.5)?[0].get_pixel(1, 2).0, [1]);
        assert!(masks_to_tensor(&[a, GrayImage::new(3, 3)], &Device::Cpu).is_err());
        assert!(masks_to_tensor(&[], &Device::Cpu).is_err());
        Ok(())
    }

    #[test]
    fn images_are_written_whole_through_a_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/a.png");
        let img = DynamicImage::ImageLuma8(GrayImage::new(3, 2));
        write_image(&path, &img).unwrap();
        write_image(&path, &img).unwrap();
        assert_eq!(image::open(&path).unwrap().width(), 3);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.png"], "no temporary file is left");
        let err = write_image(&dir.path().join("a.unknown"), &img).unwrap_err();
        assert!(err.to_string().contains("a.unknown"), "{err}");
    }
}
