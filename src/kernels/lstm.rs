//! LSTM kernels on slices: the gate nonlinearities and cell update of one time step, their
//! backward, and the two normalizations the recurrent norms need on an [rows, cols] matrix —
//! along a row (LayerNorm: one sample's features) and down a column (BatchNorm: one feature
//! over the batch). Gates are laid out as PyTorch's nn.LSTM lays them: i, f, g, o blocks of H.

use rayon::prelude::*;

use crate::kernels::simd::multiversion;
use crate::kernels::special::exp as exp_fast;

/// Rows (samples) per parallel task of the elementwise kernels.
const ROWS_PER_TASK: usize = 16;

#[inline(always)]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + exp_fast(-v))
}

// tanh x = 2σ(2x) − 1
#[inline(always)]
fn tanh(v: f32) -> f32 {
    2.0 / (1.0 + exp_fast(-2.0 * v)) - 1.0
}

// i = σ(a_i), f = σ(a_f), g = tanh(a_g), o = σ(a_o);  c = f·c_prev + i·g   (a becomes the gates)
pub fn lstm_cell_forward(a: &mut [f32], c_prev: &[f32], c: &mut [f32], h: usize) {
    a.par_chunks_mut(4 * h * ROWS_PER_TASK)
        .zip(c_prev.par_chunks(h * ROWS_PER_TASK))
        .zip(c.par_chunks_mut(h * ROWS_PER_TASK))
        .for_each(|((a, c_prev), c)| cell_rows(a, c_prev, c, h));
}

multiversion! {
    fn cell_rows(a: &mut [f32], c_prev: &[f32], c: &mut [f32], h: usize) {
        for ((gates, cp), cn) in a.chunks_mut(4 * h).zip(c_prev.chunks(h)).zip(c.chunks_mut(h)) {
            let (ifg, o) = gates.split_at_mut(3 * h);
            let (i, fg) = ifg.split_at_mut(h);
            let (f, g) = fg.split_at_mut(h);
            // Zipped iterators, no indexing: the loop has no bounds checks and vectorizes.
            for (((((i, f), g), o), &cp), cn) in
                i.iter_mut().zip(f.iter_mut()).zip(g.iter_mut()).zip(o.iter_mut()).zip(cp).zip(cn.iter_mut())
            {
                *i = sigmoid(*i);
                *f = sigmoid(*f);
                *g = tanh(*g);
                *o = sigmoid(*o);
                *cn = *f * cp + *i * *g;
            }
        }
    }
}

// h = o · tanh(cn)   (cn: the cell state, normalized for LN/BN-LSTM); keeps tanh(cn)
pub fn lstm_hidden_forward(gates: &[f32], cn: &[f32], tc: &mut [f32], hid: &mut [f32], h: usize) {
    gates
        .par_chunks(4 * h * ROWS_PER_TASK)
        .zip(cn.par_chunks(h * ROWS_PER_TASK))
        .zip(tc.par_chunks_mut(h * ROWS_PER_TASK))
        .zip(hid.par_chunks_mut(h * ROWS_PER_TASK))
        .for_each(|(((gates, cn), tc), hid)| hidden_rows(gates, cn, tc, hid, h));
}

multiversion! {
    fn hidden_rows(gates: &[f32], cn: &[f32], tc: &mut [f32], hid: &mut [f32], h: usize) {
        for (((g, c), t), y) in gates.chunks(4 * h).zip(cn.chunks(h)).zip(tc.chunks_mut(h)).zip(hid.chunks_mut(h)) {
            for (((t, y), &c), &o) in t.iter_mut().zip(y.iter_mut()).zip(c).zip(&g[3 * h..4 * h]) {
                *t = tanh(c);
                *y = o * *t;
            }
        }
    }
}

// do = dh·tanh(cn);  dcn = dh·o·(1 − tanh²(cn))   (dcn is written; do goes into da's o block)
pub fn lstm_hidden_backward(gates: &[f32], tc: &[f32], dh: &[f32], dcn: &mut [f32], da: &mut [f32], h: usize) {
    gates
        .par_chunks(4 * h * ROWS_PER_TASK)
        .zip(tc.par_chunks(h * ROWS_PER_TASK))
        .zip(dh.par_chunks(h * ROWS_PER_TASK))
        .zip(dcn.par_chunks_mut(h * ROWS_PER_TASK))
        .zip(da.par_chunks_mut(4 * h * ROWS_PER_TASK))
        .for_each(|((((g, t), d), dc), a)| hidden_backward_rows(g, t, d, dc, a, h));
}

multiversion! {
    fn hidden_backward_rows(gates: &[f32], tc: &[f32], dh: &[f32], dcn: &mut [f32], da: &mut [f32], h: usize) {
        for ((((g, t), d), dc), a) in gates
            .chunks(4 * h)
            .zip(tc.chunks(h))
            .zip(dh.chunks(h))
            .zip(dcn.chunks_mut(h))
            .zip(da.chunks_mut(4 * h))
        {
            for ((((&o, &t), &d), dc), a) in g[3 * h..].iter().zip(t).zip(d).zip(dc.iter_mut()).zip(a[3 * h..].iter_mut()) {
                *dc = d * o * (1.0 - t * t);
                *a = d * t * o * (1.0 - o);
            }
        }
    }
}

// dc = dc_in + dc_next;  da_i = dc·g·i(1−i), da_f = dc·c_prev·f(1−f), da_g = dc·i·(1−g²);
// dc_next ← dc·f
pub fn lstm_cell_backward(gates: &[f32], c_prev: &[f32], dc_in: &[f32], dc_next: &mut [f32], da: &mut [f32], h: usize) {
    gates
        .par_chunks(4 * h * ROWS_PER_TASK)
        .zip(c_prev.par_chunks(h * ROWS_PER_TASK))
        .zip(dc_in.par_chunks(h * ROWS_PER_TASK))
        .zip(dc_next.par_chunks_mut(h * ROWS_PER_TASK))
        .zip(da.par_chunks_mut(4 * h * ROWS_PER_TASK))
        .for_each(|((((g, cp), din), dn), a)| cell_backward_rows(g, cp, din, dn, a, h));
}

multiversion! {
    fn cell_backward_rows(gates: &[f32], c_prev: &[f32], dc_in: &[f32], dc_next: &mut [f32], da: &mut [f32], h: usize) {
        for ((((g, cp), din), dn), a) in gates
            .chunks(4 * h)
            .zip(c_prev.chunks(h))
            .zip(dc_in.chunks(h))
            .zip(dc_next.chunks_mut(h))
            .zip(da.chunks_mut(4 * h))
        {
            let (a_i, rest) = a.split_at_mut(h);
            let (a_f, rest) = rest.split_at_mut(h);
            let a_g = &mut rest[..h];
            for (((((((&i, &f), &gg), &cp), &din), dn), ai), (af, ag)) in g[..h]
                .iter()
                .zip(&g[h..2 * h])
                .zip(&g[2 * h..3 * h])
                .zip(cp)
                .zip(din)
                .zip(dn.iter_mut())
                .zip(a_i.iter_mut())
                .zip(a_f.iter_mut().zip(a_g.iter_mut()))
            {
                let dc = din + *dn;
                *ai = dc * gg * i * (1.0 - i);
                *af = dc * cp * f * (1.0 - f);
                *ag = dc * i * (1.0 - gg * gg);
                *dn = dc * f;
            }
        }
    }
}

/// Per-set statistics of a normalization: mean and 1/sqrt(var + eps) (biased variance).
#[derive(Clone, Copy, Debug, Default)]
pub struct NormStats {
    pub mean: f64,
    pub rstd: f64,
}

// LayerNorm of each row: y = (z − μ_row)/σ_row · γ + β   (γ, β per column; None = 1, 0)
pub fn row_norm_forward(
    z: &[f32],
    cols: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f64,
    y: &mut [f32],
    stats: &mut [NormStats],
) {
    for ((row, out), st) in z.chunks(cols).zip(y.chunks_mut(cols)).zip(stats.iter_mut()) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        *st = NormStats {
            mean,
            rstd: 1.0 / (var + eps).sqrt(),
        };
        for (k, (o, &v)) in out.iter_mut().zip(row).enumerate() {
            let xh = (v as f64 - mean) * st.rstd;
            *o = (xh * gamma.map_or(1.0, |g| g[k] as f64) + beta.map_or(0.0, |b| b[k] as f64)) as f32;
        }
    }
}

// dγ += Σ_rows dy·x̂, dβ += Σ_rows dy;  dz = rstd·(dŷ − mean(dŷ) − x̂·mean(dŷ·x̂)), dŷ = dy·γ
#[allow(clippy::too_many_arguments)]
pub fn row_norm_backward(
    z: &[f32],
    cols: usize,
    stats: &[NormStats],
    gamma: Option<&[f32]>,
    dy: &[f32],
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
    dz: &mut [f32],
) {
    let (mut dgamma, mut dbeta) = (dgamma, dbeta);
    let g = |k: usize| gamma.map_or(1.0, |g| g[k] as f64);
    for (((row, d), out), st) in z.chunks(cols).zip(dy.chunks(cols)).zip(dz.chunks_mut(cols)).zip(stats) {
        let (mut s1, mut s2) = (0.0f64, 0.0f64);
        for k in 0..cols {
            let xh = (row[k] as f64 - st.mean) * st.rstd;
            if let Some(dg) = dgamma.as_deref_mut() {
                dg[k] += (d[k] as f64 * xh) as f32;
            }
            if let Some(db) = dbeta.as_deref_mut() {
                db[k] += d[k];
            }
            let dyh = d[k] as f64 * g(k);
            s1 += dyh;
            s2 += dyh * xh;
        }
        let (m1, m2) = (s1 / cols as f64, s2 / cols as f64);
        for k in 0..cols {
            let xh = (row[k] as f64 - st.mean) * st.rstd;
            out[k] = (st.rstd * (d[k] as f64 * g(k) - m1 - xh * m2)) as f32;
        }
    }
}

// BatchNorm of each column over the rows (the batch): y = (z − μ_col)/σ_col · γ + β
pub fn col_norm_forward(
    z: &[f32],
    cols: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f64,
    y: &mut [f32],
    stats: &mut [NormStats],
) {
    let rows = z.len() / cols;
    for (k, st) in stats.iter_mut().enumerate().take(cols) {
        let mean = (0..rows).map(|r| z[r * cols + k] as f64).sum::<f64>() / rows as f64;
        let var = (0..rows).map(|r| (z[r * cols + k] as f64 - mean).powi(2)).sum::<f64>() / rows as f64;
        *st = NormStats {
            mean,
            rstd: 1.0 / (var + eps).sqrt(),
        };
    }
    col_norm_apply(z, cols, gamma, beta, stats, y);
}

// y = (z − mean_col)·rstd_col·γ + β with given statistics (running ones in eval mode)
pub fn col_norm_apply(
    z: &[f32],
    cols: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    stats: &[NormStats],
    y: &mut [f32],
) {
    for (row, out) in z.chunks(cols).zip(y.chunks_mut(cols)) {
        for k in 0..cols {
            let xh = (row[k] as f64 - stats[k].mean) * stats[k].rstd;
            out[k] = (xh * gamma.map_or(1.0, |g| g[k] as f64) + beta.map_or(0.0, |b| b[k] as f64)) as f32;
        }
    }
}

// Per column over the rows: dγ += Σ dy·x̂, dβ += Σ dy;
// dz = rstd·(dŷ − mean_rows(dŷ) − x̂·mean_rows(dŷ·x̂)), dŷ = dy·γ
#[allow(clippy::too_many_arguments)]
pub fn col_norm_backward(
    z: &[f32],
    cols: usize,
    stats: &[NormStats],
    gamma: Option<&[f32]>,
    dy: &[f32],
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
    dz: &mut [f32],
) {
    let rows = z.len() / cols;
    let (mut dgamma, mut dbeta) = (dgamma, dbeta);
    for k in 0..cols {
        let st = stats[k];
        let g = gamma.map_or(1.0, |g| g[k] as f64);
        let (mut s1, mut s2, mut sdy, mut sdyx) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for r in 0..rows {
            let xh = (z[r * cols + k] as f64 - st.mean) * st.rstd;
            let d = dy[r * cols + k] as f64;
            sdy += d;
            sdyx += d * xh;
            s1 += d * g;
            s2 += d * g * xh;
        }
        if let Some(dg) = dgamma.as_deref_mut() {
            dg[k] += sdyx as f32;
        }
        if let Some(db) = dbeta.as_deref_mut() {
            db[k] += sdy as f32;
        }
        let (m1, m2) = (s1 / rows as f64, s2 / rows as f64);
        for r in 0..rows {
            let xh = (z[r * cols + k] as f64 - st.mean) * st.rstd;
            dz[r * cols + k] = (st.rstd * (dy[r * cols + k] as f64 * g - m1 - xh * m2)) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_fast_is_within_a_few_ulp_of_exp() {
        let mut worst = 0.0f64;
        // Inside the clamp [-87, 88] (below it the result is e^-87, a flush toward zero).
        for k in -86_999..88_000 {
            let x = k as f32 * 1e-3;
            let (got, want) = (exp_fast(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "largest relative error {worst:e}");
        assert_eq!(exp_fast(-200.0), exp_fast(-87.0));
        assert!(tanh(0.0).abs() < 1e-7 && (sigmoid(0.0) - 0.5).abs() < 1e-7);
        assert!((tanh(20.0) - 1.0).abs() < 1e-7 && (tanh(-20.0) + 1.0).abs() < 1e-7);
    }
}
