//! Geometry applied to an image and its mask together: the augmentation baselines of the
//! paper (spec §6) add a loss term on a flipped, rotated or translated copy of each real pair.
//! A [`Geometry`] is drawn per image and warps every `[H, W]` plane of the pair the same way
//! (imageproc, bilinear, zero fill); callers re-binarise the warped mask.

use image::{ImageBuffer, Luma};
use imageproc::geometric_transformations::{Border, Interpolation, Projection, warp};
use rand::Rng;

/// Which transforms a drawn [`Geometry`] combines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PairKinds {
    /// Mirror left-right (always, when set).
    pub flip: bool,
    /// Rotate about the centre by ± the configured angle.
    pub rotate: bool,
    /// Shift by ± the configured fraction of each side.
    pub translate: bool,
}

/// One geometric transform, drawn per image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geometry {
    /// Mirror left-right.
    pub flip: bool,
    /// Rotation about the centre, degrees (counter-clockwise on screen).
    pub degrees: f32,
    /// Shift in pixels (x right, y down).
    pub shift: (f32, f32),
}

impl Geometry {
    /// Draws a transform of `kinds` for an image of `side = (h, w)`: a rotation by
    /// ±`rotate_degrees` and a shift by ±`translate_fraction` of each side, with random
    /// signs so the copy is unbiased (the rotation's sign is drawn first, then x, then y).
    pub fn draw(
        kinds: PairKinds,
        rotate_degrees: f64,
        translate_fraction: f64,
        side: (usize, usize),
        rng: &mut impl Rng,
    ) -> Self {
        let mut sign = || if rng.random::<bool>() { 1.0f32 } else { -1.0 };
        let PairKinds {
            flip,
            rotate,
            translate,
        } = kinds;
        let degrees = if rotate {
            sign() * rotate_degrees as f32
        } else {
            0.0
        };
        let shift = if translate {
            let f = translate_fraction as f32;
            (sign() * f * side.1 as f32, sign() * f * side.0 as f32)
        } else {
            (0.0, 0.0)
        };
        Self {
            flip,
            degrees,
            shift,
        }
    }

    /// The forward map from source to destination pixel coordinates.
    fn projection(&self, h: usize, w: usize) -> Projection {
        let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
        let flip = if self.flip {
            Projection::translate(cx, cy)
                * Projection::scale(-1.0, 1.0)
                * Projection::translate(-cx, -cy)
        } else {
            Projection::scale(1.0, 1.0)
        };
        // Image y points down, so a screen-counter-clockwise turn is -theta here.
        let rotate = Projection::translate(cx, cy)
            * Projection::rotate(-self.degrees.to_radians())
            * Projection::translate(-cx, -cy);
        Projection::translate(self.shift.0, self.shift.1) * rotate * flip
    }

    /// Warps one `[H, W]` plane.
    pub fn apply(&self, plane: &[f32], h: usize, w: usize) -> Vec<f32> {
        let moves = self.degrees != 0.0 || self.shift != (0.0, 0.0);
        if !self.flip && !moves {
            return plane.to_vec();
        }
        if self.flip && !moves {
            // Exact mirror without resampling.
            return plane
                .chunks(w)
                .flat_map(|row| row.iter().rev().copied())
                .collect();
        }
        let img: ImageBuffer<Luma<f32>, Vec<f32>> =
            ImageBuffer::from_raw(w as u32, h as u32, plane.to_vec())
                .expect("plane has h*w values");
        warp(
            &img,
            self.projection(h, w),
            Interpolation::Bilinear,
            Border::Constant(Luma([0.0])),
        )
        .into_raw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_mirrors_exactly_and_twice_is_identity() {
        let plane: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let g = Geometry {
            flip: true,
            degrees: 0.0,
            shift: (0.0, 0.0),
        };
        let once = g.apply(&plane, 3, 4);
        assert_eq!(&once[..4], &[3.0, 2.0, 1.0, 0.0]);
        assert_eq!(g.apply(&once, 3, 4), plane);
    }

    #[test]
    fn translate_moves_content_right_and_down() {
        let mut plane = vec![0.0f32; 64];
        plane[2 * 8 + 2] = 1.0; // (y 2, x 2)
        let g = Geometry {
            flip: false,
            degrees: 0.0,
            shift: (3.0, 1.0),
        };
        let out = g.apply(&plane, 8, 8);
        assert_eq!(out[3 * 8 + 5], 1.0, "{out:?}");
        assert!((out.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rotation_keeps_the_centre_and_turns_counter_clockwise() {
        // A pixel right of the centre of a 9x9 plane moves up under +90 degrees.
        let mut plane = vec![0.0f32; 81];
        plane[4 * 9 + 7] = 1.0;
        plane[4 * 9 + 4] = 1.0;
        let out = Geometry {
            flip: false,
            degrees: 90.0,
            shift: (0.0, 0.0),
        }
        .apply(&plane, 9, 9);
        assert!((out[4 * 9 + 4] - 1.0).abs() < 1e-5);
        assert!((out[9 + 4] - 1.0).abs() < 1e-5, "{out:?}");
    }
}
