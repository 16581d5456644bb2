//! Training-time augmentation (`--augment crop,flip`): torchvision's RandomCrop(size,
//! padding=4) and RandomHorizontalFlip(0.5) on a normalized batch. Every draw comes from the
//! step's seed and the sample's place in the batch, so a run and its `--resume` see the same
//! images.

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
}

impl FromStr for Augment {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let mut a = Augment::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "crop" => a.crop_padding = 4,
                "flip" => a.flip = true,
                _ => {
                    return Err(Error::invalid(format!(
                        "--augment: unknown '{part}' (known: crop = random crop with 4 pixels of zero padding, flip = horizontal flip)"
                    )))
                }
            }
        }
        Ok(a)
    }
}

impl Augment {
    pub fn is_active(&self) -> bool {
        self.crop_padding > 0 || self.flip
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
    }
}
