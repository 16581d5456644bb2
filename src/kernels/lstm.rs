//! LSTM kernels on slices: the gate nonlinearities and cell update of one time step, their
//! backward, and the two normalizations the recurrent norms need on an [rows, cols] matrix —
//! along a row (LayerNorm: one sample's features) and down a column (BatchNorm: one feature
//! over the batch). Gates are laid out as PyTorch's nn.LSTM lays them: i, f, g, o blocks of H.

#[inline]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

// i = σ(a_i), f = σ(a_f), g = tanh(a_g), o = σ(a_o);  c = f·c_prev + i·g   (a becomes the gates)
pub fn lstm_cell_forward(a: &mut [f32], c_prev: &[f32], c: &mut [f32], h: usize) {
    for ((gates, cp), cn) in a.chunks_mut(4 * h).zip(c_prev.chunks(h)).zip(c.chunks_mut(h)) {
        let (ifg, o) = gates.split_at_mut(3 * h);
        let (i, fg) = ifg.split_at_mut(h);
        let (f, g) = fg.split_at_mut(h);
        for k in 0..h {
            i[k] = sigmoid(i[k]);
            f[k] = sigmoid(f[k]);
            g[k] = g[k].tanh();
            o[k] = sigmoid(o[k]);
            cn[k] = f[k] * cp[k] + i[k] * g[k];
        }
    }
}

// h = o · tanh(cn)   (cn: the cell state, normalized for LN/BN-LSTM); keeps tanh(cn)
pub fn lstm_hidden_forward(gates: &[f32], cn: &[f32], tc: &mut [f32], hid: &mut [f32], h: usize) {
    for (((g, c), t), y) in gates
        .chunks(4 * h)
        .zip(cn.chunks(h))
        .zip(tc.chunks_mut(h))
        .zip(hid.chunks_mut(h))
    {
        for k in 0..h {
            t[k] = c[k].tanh();
            y[k] = g[3 * h + k] * t[k];
        }
    }
}

// do = dh·tanh(cn);  dcn = dh·o·(1 − tanh²(cn))   (dcn is written; do goes into da's o block)
pub fn lstm_hidden_backward(gates: &[f32], tc: &[f32], dh: &[f32], dcn: &mut [f32], da: &mut [f32], h: usize) {
    for ((((g, t), d), dc), a) in gates
        .chunks(4 * h)
        .zip(tc.chunks(h))
        .zip(dh.chunks(h))
        .zip(dcn.chunks_mut(h))
        .zip(da.chunks_mut(4 * h))
    {
        for k in 0..h {
            let o = g[3 * h + k];
            dc[k] = d[k] * o * (1.0 - t[k] * t[k]);
            a[3 * h + k] = d[k] * t[k] * o * (1.0 - o);
        }
    }
}

// dc = dc_in + dc_next;  da_i = dc·g·i(1−i), da_f = dc·c_prev·f(1−f), da_g = dc·i·(1−g²);
// dc_next ← dc·f
pub fn lstm_cell_backward(gates: &[f32], c_prev: &[f32], dc_in: &[f32], dc_next: &mut [f32], da: &mut [f32], h: usize) {
    for ((((g, cp), din), dn), a) in gates
        .chunks(4 * h)
        .zip(c_prev.chunks(h))
        .zip(dc_in.chunks(h))
        .zip(dc_next.chunks_mut(h))
        .zip(da.chunks_mut(4 * h))
    {
        for k in 0..h {
            let (i, f, gg) = (g[k], g[h + k], g[2 * h + k]);
            let dc = din[k] + dn[k];
            a[k] = dc * gg * i * (1.0 - i);
            a[h + k] = dc * cp[k] * f * (1.0 - f);
            a[2 * h + k] = dc * i * (1.0 - gg * gg);
            dn[k] = dc * f;
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
