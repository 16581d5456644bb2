//! Softmax cross-entropy over logits [N, K] with integer labels.

/// loss = mean_n( logsumexp(z_n) - z_n[label_n] ); dz = (softmax(z) - onehot(label)) / N.
/// Returns the loss and the number of rows whose argmax equals the label.
pub fn softmax_cross_entropy(logits: &[f32], labels: &[u8], k: usize, dlogits: &mut [f32]) -> (f64, usize) {
    let n = labels.len();
    let mut total = 0.0f64;
    let mut correct = 0;
    for (row, (z, &label)) in logits.chunks(k).zip(labels).enumerate() {
        let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let sum_exp: f64 = z.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let log_z = max as f64 + sum_exp.ln();
        total += log_z - z[label as usize] as f64;
        if argmax(z) == label as usize {
            correct += 1;
        }
        let d = &mut dlogits[row * k..(row + 1) * k];
        for (j, (o, &v)) in d.iter_mut().zip(z).enumerate() {
            let p = ((v as f64 - log_z).exp()) as f32;
            *o = (p - if j == label as usize { 1.0 } else { 0.0 }) / n as f32;
        }
    }
    (total / n as f64, correct)
}

/// Index of the largest value (the first on ties); NaN counts as largest, as in PyTorch.
pub fn argmax(z: &[f32]) -> usize {
    let mut best = 0;
    for (j, &v) in z.iter().enumerate() {
        if v.is_nan() {
            return j;
        }
        if v > z[best] {
            best = j;
        }
    }
    best
}
