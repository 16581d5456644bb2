//! Training-time augmentation (`--augment crop,flip` or `random-resized-crop,flip`):
//! torchvision's RandomCrop(size, padding=4), RandomResizedCrop(size, scale=(0.08, 1),
//! ratio=(3/4, 4/3), bilinear) and RandomHorizontalFlip(0.5) on a normalized batch. Every draw
//! comes from the step's seed and the sample's place in the batch, so a run and its `--resume`
//! see the same images.

use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::InputNorm;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Augment {
    /// Zero padding of the random crop in pixels (0: no crop).
    pub crop_padding: usize,
    pub flip: bool,
    /// RandomResizedCrop to the image's own size.
    #[serde(default)]
    pub resized_crop: bool,
}

/// RandomResizedCrop's defaults.
const RRC_SCALE: (f64, f64) = (0.08, 1.0);
const RRC_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// torchvision's `RandomResizedCrop.get_params`: (top, left, height, width) of the crop of an
/// h x w image; ten tries at a random area and aspect ratio, then the centre crop clamped to
/// the ratio range. Python's round (ties to even) as torchvision's.
fn resized_crop_box(h: usize, w: usize, rng: &mut ChaCha8Rng) -> (usize, usize, usize, usize) {
    let area = (h * w) as f64;
    let (lo, hi) = (RRC_RATIO.0.ln(), RRC_RATIO.1.ln());
    for _ in 0..10 {
        let target = area * rng.gen_range(RRC_SCALE.0..RRC_SCALE.1);
        let aspect = rng.gen_range(lo..hi).exp();
        let cw = (target * aspect).sqrt().round_ties_even() as usize;
        let ch = (target / aspect).sqrt().round_ties_even() as usize;
        if 0 < cw && cw <= w && 0 < ch && ch <= h {
            let top = rng.gen_range(0..=h - ch);
            let left = rng.gen_range(0..=w - cw);
            return (top, left, ch, cw);
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (ch, cw) = if in_ratio < RRC_RATIO.0 {
        ((w as f64 / RRC_RATIO.0).round_ties_even() as usize, w)
    } else if in_ratio > RRC_RATIO.1 {
        (h, (h as f64 * RRC_RATIO.1).round_ties_even() as usize)
    } else {
        (h, w)
    };
    ((h - ch) / 2, (w - cw) / 2, ch, cw)
}

/// Bilinear resize of the ch x cw window at (top, left) of `src` (h x w, row-major) to h x w,
/// align_corners=False: output pixel y samples src row (y + ½)·ch/h − ½, clamped at 0, between
/// its two neighbours (the window only grows, so no antialiasing applies).
fn resize_window(src: &[f32], w: usize, (top, left, ch, cw): (usize, usize, usize, usize), h: usize, dst: &mut [f32]) {
    let axis = |o: usize, n_in: usize, n_out: usize| {
        let s = ((o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        (i0, i1, (s - i0 as f64) as f32)
    };
    for y in 0..h {
        let (y0, y1, ly) = axis(y, ch, h);
        let (r0, r1) = (&src[(top + y0) * w + left..], &src[(top + y1) * w + left..]);
        for x in 0..w {
            let (x0, x1, lx) = axis(x, cw, w);
            let a = r0[x0] * (1.0 - lx) + r0[x1] * lx;
            let b = r1[x0] * (1.0 - lx) + r1[x1] * lx;
            dst[y * w + x] = a * (1.0 - ly) + b * ly;
        }
    }
}

impl FromStr for Augment {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let mut a = Augment::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "crop" => a.crop_padding = 4,
                "flip" => a.flip = true,
                "random-resized-crop" => a.resized_crop = true,
                _ => {
                    return Err(Error::invalid(format!(
                        "--augment: unknown '{part}' (known: crop = random crop with 4 pixels of zero padding, \
                         random-resized-crop = torchvision's RandomResizedCrop to the image's size, flip = horizontal flip)"
                    )))
                }
            }
        }
        if a.resized_crop && a.crop_padding > 0 {
            return Err(Error::invalid(
                "--augment: crop and random-resized-crop both crop; choose one",
            ));
        }
        Ok(a)
    }
}

impl Augment {
    pub fn is_active(&self) -> bool {
        self.crop_padding > 0 || self.flip || self.resized_crop
    }

    /// Crops and flips each sample of the normalized batch `x` [N, C, H, W] in place. The
    /// padding is black in raw pixels, so it takes each channel's normalized value of 0.
    pub fn apply(&self, x: &mut Tensor, norm: &InputNorm, step_seed: u64, scratch: &mut Vec<f32>) {
        if !self.is_active() || x.shape.len() != 4 {
            return;
        }
        let [_, c, h, w] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
        let p = self.crop_padding as isize;
        for (i, sample) in x.data.chunks_mut(c * h * w).enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(step_seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            // The crop's offset into the padded image, as RandomCrop draws it (top, then left).
            let (dy, dx) = if p > 0 {
                (rng.gen_range(0..=2 * p) - p, rng.gen_range(0..=2 * p) - p)
            } else {
                (0, 0)
            };
            if self.resized_crop {
                let window = resized_crop_box(h, w, &mut rng);
                scratch.clear();
                scratch.extend_from_slice(sample);
                for (plane, src) in sample.chunks_mut(h * w).zip(scratch.chunks(h * w)) {
                    resize_window(src, w, window, h, plane);
                }
            }
            let flip = self.flip && rng.gen_bool(0.5);
            if (dy, dx) == (0, 0) && !flip {
                continue;
            }
            scratch.clear();
            scratch.extend_from_slice(sample);
            for (ch, plane) in sample.chunks_mut(h * w).enumerate() {
                let k = ch.min(norm.channels - 1);
                let pad = -norm.mean[k] / norm.std[k];
                let src = &scratch[ch * h * w..(ch + 1) * h * w];
                for y in 0..h {
                    let sy = y as isize + dy;
                    for xo in 0..w {
                        // The flip mirrors the cropped image.
                        let xc = if flip { w - 1 - xo } else { xo };
                        let sx = xc as isize + dx;
                        plane[y * w + xo] = if sy >= 0 && sy < h as isize && sx >= 0 && sx < w as isize {
                            src[sy as usize * w + sx as usize]
                        } else {
                            pad
                        };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize, c: usize, h: usize, w: usize) -> Tensor {
        Tensor {
            shape: vec![n, c, h, w],
            data: (0..n * c * h * w).map(|v| v as f32).collect(),
        }
    }

    #[test]
    fn same_seed_same_images_and_the_pixels_are_moved_not_changed() {
        let norm = InputNorm::uniform(3, 0.5, 0.25);
        let aug: Augment = "crop,flip".parse().unwrap();
        let (mut a, mut b, mut s) = (ramp(8, 3, 6, 5), ramp(8, 3, 6, 5), Vec::new());
        aug.apply(&mut a, &norm, 42, &mut s);
        aug.apply(&mut b, &norm, 42, &mut s);
        assert_eq!(a.data, b.data);
        let mut other = ramp(8, 3, 6, 5);
        aug.apply(&mut other, &norm, 43, &mut s);
        assert_ne!(a.data, other.data);
        // Every output value is a pixel of the same sample and channel, or the padding (-2).
        let orig = ramp(8, 3, 6, 5);
        for (k, (out, src)) in a.data.chunks(30).zip(orig.data.chunks(30)).enumerate() {
            for &v in out {
                assert!(
                    v == -2.0 || src.contains(&v),
                    "plane {k}: {v} is neither a pixel nor the padding"
                );
            }
        }
    }

    #[test]
    fn flip_alone_mirrors_rows() {
        let norm = InputNorm::uniform(1, 0.0, 1.0);
        let aug: Augment = "flip".parse().unwrap();
        let mut s = Vec::new();
        let mut flipped = 0;
        for seed in 0..20 {
            let mut x = ramp(1, 1, 2, 3);
            aug.apply(&mut x, &norm, seed, &mut s);
            if x.data != ramp(1, 1, 2, 3).data {
                assert_eq!(x.data, vec![2.0, 1.0, 0.0, 5.0, 4.0, 3.0]);
                flipped += 1;
            }
        }
        assert!((3..=17).contains(&flipped), "{flipped} of 20 flipped");
        assert!("rotate".parse::<Augment>().is_err());
        assert!("crop,random-resized-crop".parse::<Augment>().is_err());
    }

    #[test]
    fn resized_crop_boxes_keep_the_area_and_ratio_ranges() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..2000 {
            let (top, left, ch, cw) = resized_crop_box(64, 48, &mut rng);
            assert!(top + ch <= 64 && left + cw <= 48 && ch > 0 && cw > 0);
            let share = (ch * cw) as f64 / (64.0 * 48.0);
            assert!(share <= 1.0 && share > 0.06, "{share}");
        }
        // A 1x100 strip is out of the ratio range every time: the centre crop, clamped.
        assert_eq!(resized_crop_box(1, 100, &mut rng), (0, 49, 1, 1));
    }

    #[test]
    fn the_whole_window_is_the_identity_and_doubling_interpolates_at_half_pixels() {
        let src: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let mut dst = vec![0.0; 12];
        resize_window(&src, 4, (0, 0, 3, 4), 3, &mut dst);
        assert_eq!(dst, src);
        // The 2x2 window [[0, 1], [4, 5]] at (0, 0) to 3x4: these rows are what
        // torch.nn.functional.interpolate(x, size=(3, 4), mode="bilinear", align_corners=False)
        // gives for it (checked with torch 2.15).
        let mut out = vec![0.0; 12];
        resize_window(&src, 4, (0, 0, 2, 2), 3, &mut out);
        let want = [
            0.0, 0.25, 0.75, 1.0, //
            2.0, 2.25, 2.75, 3.0, //
            4.0, 4.25, 4.75, 5.0,
        ];
        for (g, w) in out.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{out:?}");
        }
    }
}
