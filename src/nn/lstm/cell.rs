//! One layer of the stack over all time steps: its weights, the norm sites inside the
//! recurrence (`Site`: LN or per-step/shared BN of W_ih·x, W_hh·h and the cell), the forward
//! that keeps what BPTT needs, and the backward through time.

use super::*;

/// A name that lives as long as the process: state-dict keys are `&'static str`, and an LSTM's
/// depend on its layer index. Interned once per distinct name (a few per layer).
pub(super) fn intern(s: String) -> &'static str {
    static POOL: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut pool = POOL
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(&name) = pool.get(s.as_str()) {
        return name;
    }
    let name: &'static str = Box::leak(s.into_boxed_str());
    pool.insert(name);
    name
}

/// One normalization site of the recurrence (x, h or c) over `features` values.
pub(super) struct Site {
    pub(super) features: usize,
    pub(super) gamma: Param,
    pub(super) beta: Option<Param>,
    /// BN: [T, F] per step or [F] shared.
    pub(super) running_mean: Option<Tensor>,
    pub(super) running_var: Option<Tensor>,
    pub(super) names: [&'static str; 4],
}

impl Site {
    pub(super) fn new(
        norm: RecurrentNorm,
        features: usize,
        steps: usize,
        with_beta: bool,
        prefix: String,
    ) -> Option<Site> {
        let (gamma0, running) = match norm {
            RecurrentNorm::None => return None,
            RecurrentNorm::Layer { .. } => (1.0, None),
            RecurrentNorm::Batch { per_step, .. } => {
                let shape = if per_step {
                    vec![steps, features]
                } else {
                    vec![features]
                };
                (0.1, Some(shape))
            }
        };
        Some(Site {
            features,
            gamma: Param::new(Tensor::full(&[features], gamma0), ParamKind::Norm),
            beta: with_beta.then(|| Param::new(Tensor::zeros(&[features]), ParamKind::Norm)),
            running_mean: running.as_ref().map(|s| Tensor::zeros(s)),
            running_var: running.as_ref().map(|s| Tensor::full(s, 1.0)),
            names: [
                intern(format!("{prefix}.weight")),
                intern(format!("{prefix}.bias")),
                intern(format!("{prefix}.running_mean")),
                intern(format!("{prefix}.running_var")),
            ],
        })
    }

    /// Normalizes step `t`'s [rows, F] values `z` into `y`; `stats` gets the statistics the
    /// backward needs (per row for LN, per feature for BN).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &mut self,
        norm: RecurrentNorm,
        z: &[f32],
        t: usize,
        train: bool,
        y: &mut [f32],
        stats: &mut [NormStats],
    ) -> Result<()> {
        let (f, gamma, beta) = (
            self.features,
            Some(self.gamma.value.data.as_slice()),
            self.beta.as_ref().map(|b| b.value.data.as_slice()),
        );
        match norm {
            RecurrentNorm::None => y.copy_from_slice(z),
            RecurrentNorm::Layer { eps } => k::row_norm_forward(z, f, gamma, beta, eps, y, stats),
            RecurrentNorm::Batch {
                eps,
                momentum,
                per_step,
            } => {
                let (rm, rv) = match (self.running_mean.as_mut(), self.running_var.as_mut()) {
                    (Some(m), Some(v)) => (m, v),
                    _ => return Err(Error::invalid("BN-LSTM site without running statistics")),
                };
                let at = if per_step { t * f } else { 0 };
                let rows = z.len() / f;
                if train {
                    if rows < 2 {
                        return Err(Error::invalid(
                            "BN-LSTM needs more than one sample per time step to compute batch statistics; \
                             use a --batch-size (and a last batch) of at least 2",
                        ));
                    }
                    k::col_norm_forward(z, f, gamma, beta, eps, y, stats);
                    let unbiased = rows as f64 / (rows - 1) as f64;
                    for (j, st) in stats.iter().enumerate().take(f) {
                        let var = 1.0 / (st.rstd * st.rstd) - eps;
                        let (m, v) = (&mut rm.data[at + j], &mut rv.data[at + j]);
                        *m = ((1.0 - momentum) * *m as f64 + momentum * st.mean) as f32;
                        *v = ((1.0 - momentum) * *v as f64 + momentum * var * unbiased) as f32;
                    }
                } else {
                    for (j, st) in stats.iter_mut().enumerate().take(f) {
                        *st = NormStats {
                            mean: rm.data[at + j] as f64,
                            rstd: 1.0 / (rv.data[at + j] as f64 + eps).sqrt(),
                        };
                    }
                    k::col_norm_apply(z, f, gamma, beta, stats, y);
                }
            }
        }
        Ok(())
    }

    pub(super) fn backward(&mut self, norm: RecurrentNorm, z: &[f32], stats: &[NormStats], dy: &[f32], dz: &mut [f32]) {
        let gamma = Some(self.gamma.value.data.as_slice());
        let dgamma = Some(self.gamma.grad.data.as_mut_slice());
        let dbeta = self.beta.as_mut().map(|b| b.grad.data.as_mut_slice());
        match norm {
            RecurrentNorm::None => dz.copy_from_slice(dy),
            RecurrentNorm::Layer { .. } => k::row_norm_backward(z, self.features, stats, gamma, dy, dgamma, dbeta, dz),
            RecurrentNorm::Batch { .. } => k::col_norm_backward(z, self.features, stats, gamma, dy, dgamma, dbeta, dz),
        }
    }
}

/// One layer of the stack, with its caches (time-major: step t's [N, ·] block at t·N·width).
pub struct LstmLayer {
    pub input: usize,
    pub hidden: usize,
    pub weight_ih: Param,
    pub weight_hh: Param,
    pub bias_ih: Param,
    pub bias_hh: Param,
    pub(super) sites: [Option<Site>; 3],
    pub(super) names: [&'static str; 4],
    // Forward caches.
    pub(super) xin: Vec<f32>,
    pub(super) zx: Vec<f32>,
    pub(super) zh: Vec<f32>,
    pub(super) gates: Vec<f32>,
    /// (T+1)·N·H: c[0] = 0.
    pub(super) c: Vec<f32>,
    pub(super) cn: Vec<f32>,
    pub(super) tc: Vec<f32>,
    /// (T+1)·N·H: h[0] = 0.
    pub(super) h: Vec<f32>,
    pub(super) stats: [Vec<NormStats>; 3],
    // Backward scratch.
    pub(super) nx: Vec<f32>,
    pub(super) da: Vec<f32>,
    pub(super) dzx: Vec<f32>,
    pub(super) dzh: Vec<f32>,
    pub(super) dh: Vec<f32>,
    pub(super) dc_next: Vec<f32>,
    pub(super) dcn: Vec<f32>,
    pub(super) dc: Vec<f32>,
    /// dL/d(input sequence), time-major.
    pub(super) dx: Vec<f32>,
}

impl LstmLayer {
    pub(super) fn new(
        index: usize,
        input: usize,
        hidden: usize,
        steps: usize,
        norm: RecurrentNorm,
        rng: &mut impl rand::Rng,
    ) -> Self {
        let g = 4 * hidden;
        let p = |shape: &[usize], rng: &mut dyn rand::RngCore, kind| {
            let mut r = rng;
            let v = crate::nn::init::uniform_fan_in(&mut r, shape.iter().product(), hidden);
            Param::new(
                Tensor {
                    shape: shape.to_vec(),
                    data: v,
                },
                kind,
            )
        };
        let prefix = match norm {
            RecurrentNorm::Layer { .. } => "ln",
            _ => "bn",
        };
        LstmLayer {
            input,
            hidden,
            weight_ih: p(&[g, input], rng, ParamKind::Weight),
            weight_hh: p(&[g, hidden], rng, ParamKind::Weight),
            bias_ih: p(&[g], rng, ParamKind::Bias),
            bias_hh: p(&[g], rng, ParamKind::Bias),
            sites: [
                Site::new(
                    norm,
                    g,
                    steps,
                    matches!(norm, RecurrentNorm::Layer { .. }),
                    format!("{prefix}_ih_l{index}"),
                ),
                Site::new(
                    norm,
                    g,
                    steps,
                    matches!(norm, RecurrentNorm::Layer { .. }),
                    format!("{prefix}_hh_l{index}"),
                ),
                Site::new(norm, hidden, steps, true, format!("{prefix}_c_l{index}")),
            ],
            names: [
                intern(format!("weight_ih_l{index}")),
                intern(format!("weight_hh_l{index}")),
                intern(format!("bias_ih_l{index}")),
                intern(format!("bias_hh_l{index}")),
            ],
            xin: Vec::new(),
            zx: Vec::new(),
            zh: Vec::new(),
            gates: Vec::new(),
            c: Vec::new(),
            cn: Vec::new(),
            tc: Vec::new(),
            h: Vec::new(),
            stats: Default::default(),
            nx: Vec::new(),
            da: Vec::new(),
            dzx: Vec::new(),
            dzh: Vec::new(),
            dh: Vec::new(),
            dc_next: Vec::new(),
            dcn: Vec::new(),
            dc: Vec::new(),
            dx: Vec::new(),
        }
    }

    pub(super) fn size(&mut self, n: usize, t: usize, norm: RecurrentNorm) {
        let (h, g) = (self.hidden, 4 * self.hidden);
        self.xin.resize(t * n * self.input, 0.0);
        for v in [
            &mut self.zx,
            &mut self.zh,
            &mut self.gates,
            &mut self.da,
            &mut self.dzx,
            &mut self.dzh,
        ] {
            v.resize(t * n * g, 0.0);
        }
        self.nx.resize(n * g, 0.0);
        for v in [&mut self.c, &mut self.h] {
            v.resize((t + 1) * n * h, 0.0);
            v[..n * h].fill(0.0);
        }
        for v in [&mut self.cn, &mut self.tc] {
            v.resize(t * n * h, 0.0);
        }
        for v in [&mut self.dh, &mut self.dc_next, &mut self.dcn, &mut self.dc] {
            v.resize(n * h, 0.0);
        }
        self.dx.resize(t * n * self.input, 0.0);
        // LN keeps statistics per row (sample), BN per feature, for every step.
        let widths = [norm_width(norm, n, g), norm_width(norm, n, g), norm_width(norm, n, h)];
        for (s, w) in self.stats.iter_mut().zip(widths) {
            s.resize(t * w, NormStats::default());
        }
    }

    // For each step t: a = N_x(x_t·W_ihᵀ) + N_h(h_{t−1}·W_hhᵀ) + b_ih + b_hh; gates; c_t;
    // h_t = o·tanh(N_c(c_t))
    pub(super) fn forward(&mut self, n: usize, t_steps: usize, norm: RecurrentNorm, train: bool) -> Result<()> {
        let (h, g, i) = (self.hidden, 4 * self.hidden, self.input);
        let threads = rayon::current_num_threads();
        // Without a norm, x·W_ihᵀ + b goes straight into the gates and each step's h·W_hhᵀ is
        // accumulated onto it: no separate products to keep, add or copy.
        let plain = self.sites[0].is_none();
        matmul(
            if plain { &mut self.gates } else { &mut self.zx },
            t_steps * n,
            g,
            i,
            &self.xin,
            Op::N,
            &self.weight_ih.value.data,
            Op::T,
            false,
            threads,
        );
        let (b_ih, b_hh) = (&self.bias_ih.value.data, &self.bias_hh.value.data);
        let add_bias = |rows: &mut [f32]| {
            rows.par_chunks_mut(g * 16).for_each(|chunk| {
                for row in chunk.chunks_mut(g) {
                    for ((v, a), b) in row.iter_mut().zip(b_ih).zip(b_hh) {
                        *v += a + b;
                    }
                }
            })
        };
        if plain {
            add_bias(&mut self.gates);
        }
        let (sw, bw) = (norm_width(norm, n, g), norm_width(norm, n, h));
        for t in 0..t_steps {
            let (step, hs) = (t * n * g..(t + 1) * n * g, t * n * h..(t + 1) * n * h);
            let h_prev = &self.h[t * n * h..(t + 1) * n * h];
            let a = &mut self.gates[step.clone()];
            let [sx, sh, sc] = &mut self.sites;
            let [st_x, st_h, st_c] = &mut self.stats;
            match (sx, sh) {
                (Some(sx), Some(sh)) => {
                    matmul(
                        &mut self.zh[step.clone()],
                        n,
                        g,
                        h,
                        h_prev,
                        Op::N,
                        &self.weight_hh.value.data,
                        Op::T,
                        false,
                        threads,
                    );
                    sx.forward(
                        norm,
                        &self.zx[step.clone()],
                        t,
                        train,
                        &mut self.nx,
                        &mut st_x[t * sw..(t + 1) * sw],
                    )?;
                    sh.forward(
                        norm,
                        &self.zh[step.clone()],
                        t,
                        train,
                        a,
                        &mut st_h[t * sw..(t + 1) * sw],
                    )?;
                    a.iter_mut().zip(&self.nx).for_each(|(v, x)| *v += x);
                    add_bias(a);
                }
                _ => matmul(
                    a,
                    n,
                    g,
                    h,
                    h_prev,
                    Op::N,
                    &self.weight_hh.value.data,
                    Op::T,
                    true,
                    threads,
                ),
            }
            let (c_prev, c_next) = self.c.split_at_mut((t + 1) * n * h);
            k::lstm_cell_forward(a, &c_prev[t * n * h..], &mut c_next[..n * h], h);
            let cn = &mut self.cn[hs.clone()];
            match sc {
                Some(sc) => sc.forward(norm, &c_next[..n * h], t, train, cn, &mut st_c[t * bw..(t + 1) * bw])?,
                None => cn.copy_from_slice(&c_next[..n * h]),
            }
            k::lstm_hidden_forward(
                a,
                cn,
                &mut self.tc[hs],
                &mut self.h[(t + 1) * n * h..(t + 2) * n * h],
                h,
            );
        }
        Ok(())
    }

    /// Backward through time. `dh_seq` is dL/dh_t for every step (time-major [T, N, H]);
    /// with `input_grad` the layer's input gradient goes to `self.dx`.
    pub(super) fn backward(&mut self, n: usize, t_steps: usize, norm: RecurrentNorm, dh_seq: &[f32], input_grad: bool) {
        let (h, g, i) = (self.hidden, 4 * self.hidden, self.input);
        let threads = rayon::current_num_threads();
        let (sw, bw) = (norm_width(norm, n, g), norm_width(norm, n, h));
        let plain = self.sites[0].is_none();
        self.dh.fill(0.0);
        self.dc_next.fill(0.0);
        for t in (0..t_steps).rev() {
            let (step, hs) = (t * n * g..(t + 1) * n * g, t * n * h..(t + 1) * n * h);
            // dh = external + recurrent (the latter already in self.dh).
            self.dh.iter_mut().zip(&dh_seq[hs.clone()]).for_each(|(a, b)| *a += b);
            let gates = &self.gates[step.clone()];
            let da = &mut self.da[step.clone()];
            k::lstm_hidden_backward(gates, &self.tc[hs.clone()], &self.dh, &mut self.dcn, da, h);
            let [sx, sh, sc] = &mut self.sites;
            let [st_x, st_h, st_c] = &self.stats;
            match sc {
                Some(sc) => sc.backward(
                    norm,
                    &self.c[(t + 1) * n * h..(t + 2) * n * h],
                    &st_c[t * bw..(t + 1) * bw],
                    &self.dcn,
                    &mut self.dc,
                ),
                None => self.dc.copy_from_slice(&self.dcn),
            }
            k::lstm_cell_backward(
                gates,
                &self.c[t * n * h..(t + 1) * n * h],
                &self.dc,
                &mut self.dc_next,
                da,
                h,
            );
            // Without a norm dz_x = dz_h = da: the gemms below read da itself.
            if let (Some(sx), Some(sh)) = (sx, sh) {
                sx.backward(
                    norm,
                    &self.zx[step.clone()],
                    &st_x[t * sw..(t + 1) * sw],
                    da,
                    &mut self.dzx[step.clone()],
                );
                sh.backward(
                    norm,
                    &self.zh[step.clone()],
                    &st_h[t * sw..(t + 1) * sw],
                    da,
                    &mut self.dzh[step.clone()],
                );
            }
            let dzh = if plain { &self.da[step] } else { &self.dzh[step] };
            // dh_{t−1} = dz_h · W_hh
            matmul(
                &mut self.dh,
                n,
                h,
                g,
                dzh,
                Op::N,
                &self.weight_hh.value.data,
                Op::N,
                false,
                threads,
            );
        }
        // db = Σ da over every step and sample (the same for b_ih and b_hh)
        let rows = t_steps * n;
        for row in self.da[..rows * g].chunks(g) {
            for ((bi, bh), v) in self
                .bias_ih
                .grad
                .data
                .iter_mut()
                .zip(&mut self.bias_hh.grad.data)
                .zip(row)
            {
                *bi += v;
                *bh += v;
            }
        }
        let (dzx, dzh) = if plain {
            (&self.da, &self.da)
        } else {
            (&self.dzx, &self.dzh)
        };
        // dW_hh = Σ_t dz_hᵀ·h_{t−1};  dW_ih = dz_xᵀ·x;  dx = dz_x·W_ih
        matmul(
            &mut self.weight_hh.grad.data,
            g,
            h,
            rows,
            dzh,
            Op::T,
            &self.h[..rows * h],
            Op::N,
            true,
            threads,
        );
        matmul(
            &mut self.weight_ih.grad.data,
            g,
            i,
            rows,
            dzx,
            Op::T,
            &self.xin,
            Op::N,
            true,
            threads,
        );
        if input_grad {
            matmul(
                &mut self.dx,
                rows,
                i,
                g,
                dzx,
                Op::N,
                &self.weight_ih.value.data,
                Op::N,
                false,
                threads,
            );
        }
    }
}

/// Statistics per step: one per sample (LN) or per feature (BN).
pub(super) fn norm_width(norm: RecurrentNorm, n: usize, features: usize) -> usize {
    match norm {
        RecurrentNorm::Layer { .. } => n,
        _ => features,
    }
}
