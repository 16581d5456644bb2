//! The input normalization of a large split from a sample: per-channel histograms of the byte
//! values of an evenly spaced sample of images, read from memory or decoded, so a cached and a
//! streamed copy of one split give the same mean and std bit for bit (integer counts do not
//! depend on the order they are taken in).

use rayon::prelude::*;

use crate::data::{Dataset, InputNorm};
use crate::error::Result;

/// At most this many images of an image folder or shards set the input normalization.
pub const STATS_IMAGES: usize = 10_000;

/// Per-channel mean and std (of values scaled to [0, 1]) of the images `i·N/k`, k = min(N,
/// STATS_IMAGES); an image that fails to decode stops it with the file's name.
pub fn sampled_pixel_stats(set: &Dataset) -> Result<InputNorm> {
    let n = set.len();
    let k = n.min(STATS_IMAGES);
    let [c, h, w] = set.shape;
    let plane = h * w;
    let picks: Vec<usize> = (0..k).map(|j| j * n / k).collect();
    let hist = picks
        .par_chunks(64)
        .map(|chunk| -> Result<Vec<[u64; 256]>> {
            let mut hist = vec![[0u64; 256]; c];
            let mut buf = vec![0u8; c * plane];
            for &i in chunk {
                set.read_sample(i, &mut buf)?;
                for (ch, p) in buf.chunks(plane).enumerate() {
                    for &b in p {
                        hist[ch][b as usize] += 1;
                    }
                }
            }
            Ok(hist)
        })
        .try_reduce(
            || vec![[0u64; 256]; c],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    for (u, v) in x.iter_mut().zip(y) {
                        *u += v;
                    }
                }
                Ok(a)
            },
        )?;
    Ok(stats_from_histograms(&hist))
}

/// mean = Σ h[v]·v/255 / n, var = Σ h[v]·(v/255 − mean)² / n per channel (at most 3 kept).
pub fn stats_from_histograms(hist: &[[u64; 256]]) -> InputNorm {
    let mut norm = InputNorm::uniform(hist.len(), 0.0, 1.0);
    for (ch, h) in hist.iter().take(3).enumerate() {
        let n = h.iter().sum::<u64>().max(1) as f64;
        let mean = h
            .iter()
            .enumerate()
            .map(|(v, &c)| c as f64 * (v as f64 / 255.0))
            .sum::<f64>()
            / n;
        let var = h
            .iter()
            .enumerate()
            .map(|(v, &c)| c as f64 * (v as f64 / 255.0 - mean).powi(2))
            .sum::<f64>()
            / n;
        norm.mean[ch] = mean as f32;
        norm.std[ch] = var.sqrt().max(1e-6) as f32;
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_stats_match_the_direct_formula() {
        let values: Vec<u8> = (0..1000u32).map(|v| (v * 37 % 256) as u8).collect();
        let mut h = [0u64; 256];
        values.iter().for_each(|&v| h[v as usize] += 1);
        let norm = stats_from_histograms(&[h]);
        let xs: Vec<f64> = values.iter().map(|&v| v as f64 / 255.0).collect();
        let mean = xs.iter().sum::<f64>() / 1000.0;
        let std = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 1000.0).sqrt();
        assert!((norm.mean[0] as f64 - mean).abs() < 1e-7);
        assert!((norm.std[0] as f64 - std).abs() < 1e-7);
    }
}
