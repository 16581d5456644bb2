//! SyncBatchNorm's passes: per-process sums combined over every process of a data-parallel
//! job (Chan's combination in f64), and the backward's two channel sums all-reduced.

use super::*;

impl BatchNorm {
    /// The communicator a training forward of SyncBN synchronizes over: only in training (in
    /// eval, as in PyTorch, a SyncBN without running statistics uses its own batch) and only
    /// with more than one process (with one, SyncBN is BatchNorm, bit for bit).
    pub(super) fn sync_comm(&self, mode: Mode) -> Option<Arc<dyn Communicator>> {
        match &self.comm {
            Some(c) if self.config.stats == BatchStats::Sync && mode == Mode::Train && c.size() > 1 => Some(c.clone()),
            _ => None,
        }
    }

    // SyncBN forward: each process's per-channel mean and variance (the kernel plain BN uses),
    // combined exactly (Chan et al.): μ = Σ n_k·μ_k / N, then N·σ² = Σ n_k·(σ_k² + (μ_k - μ)²),
    // two all-reductions of C values in f64 and no extra pass over x; running_var is unbiased
    // with the global count.
    pub(super) fn forward_sync(
        &mut self,
        x: &Tensor,
        y: &mut Tensor,
        mode: Mode,
        shape: Ncs,
        comm: &dyn Communicator,
    ) -> Result<()> {
        let mut sc = std::mem::take(&mut self.scratch);
        let (c, local) = (shape.c, shape.per_channel() as f64);
        sc.stats.resize(c, ChannelStats::default());
        sc.stats
            .par_iter_mut()
            .enumerate()
            .for_each(|(ch, st)| *st = k::channel_stats(&x.data, shape, ch));
        sc.global.clear();
        sc.global
            .extend(sc.stats.iter().flat_map(|st| [local, local * st.mean]));
        comm.all_reduce_sum_f64(&mut sc.global);
        let m = sc.global[0];
        if m <= 1.0 {
            self.scratch = sc;
            return Err(Error::shape(
                self.name(),
                format!(
                    "Expected more than 1 value per channel when training, got {m} over all processes (input size {:?} here)",
                    x.shape
                ),
            ));
        }
        // The global means, in the fixed-apply scratch until `apply_fixed` refills it.
        sc.mean.clear();
        sc.mean.extend((0..c).map(|ch| sc.global[2 * ch + 1] / m));
        sc.global.clear();
        sc.global.extend(sc.stats.iter().zip(&sc.mean).map(|(st, &mu)| {
            let d = st.mean - mu;
            local * (st.var as f64 + d * d)
        }));
        comm.all_reduce_sum_f64(&mut sc.global);
        for ch in 0..c {
            sc.stats[ch] = ChannelStats {
                mean: sc.mean[ch],
                var: (sc.global[ch] / m) as f32,
            };
        }
        let eps = self.config.eps;
        sc.r.clear();
        sc.r.resize(c, 1.0);
        sc.d.clear();
        sc.d.resize(c, 0.0);
        self.apply_fixed(&mut sc, x, y, shape, |sc, ch| k::inverse_std(sc.stats[ch].var, eps));
        self.scratch = sc;
        self.last_sync = Some(m);
        if self.stats_mode.updates_running(mode) {
            self.update_running_stats(c, 1, m as usize);
        }
        Ok(())
    }

    // SyncBN backward: Σg and Σg·x̂ of this process go into γ's and β's gradients (the gradient
    // all-reduction sums them), and, all-reduced, into dx over the global batch.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_sync(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        dx: &mut Tensor,
        shape: Ncs,
        m: f64,
        comm: &dyn Communicator,
    ) -> Result<()> {
        let c = shape.c;
        dx.resize_to(&x.shape)?;
        let mut sc = std::mem::take(&mut self.scratch);
        let eps = self.config.eps;
        sc.grads.clear();
        sc.mean.clear();
        sc.scale.clear();
        sc.shift.clear();
        for ch in 0..c {
            let st = sc.stats[ch];
            let g = ChannelGrad {
                mean: st.mean,
                invstd: k::inverse_std(st.var, eps),
                gain: self.gamma_or_one(ch),
            };
            sc.grads.push(g);
            sc.mean.push(g.mean);
            sc.scale.push(g.invstd);
            sc.shift.push(g.gain);
        }
        sc.sums.resize(c, ChannelSums::default());
        k::batch_norm_backward_fixed(
            &x.data,
            &y.data,
            &dy.data,
            None,
            shape,
            &sc.mean,
            &sc.scale,
            &sc.shift,
            self.relu,
            &mut sc.sums,
        );
        self.add_affine_grads(&sc.sums);
        sc.global.clear();
        sc.global.extend(sc.sums.iter().flat_map(|p| [p.sum_dy, p.sum_dy_xhat]));
        comm.all_reduce_sum_f64(&mut sc.global);
        for (ch, sum) in sc.sums.iter_mut().enumerate() {
            *sum = ChannelSums {
                sum_dy: sc.global[2 * ch],
                sum_dy_xhat: sc.global[2 * ch + 1],
            };
        }
        k::batch_norm_backward_dx(
            &x.data,
            &y.data,
            &dy.data,
            &mut dx.data,
            shape,
            self.relu,
            &sc.grads,
            &sc.sums,
            m,
            &mut sc.ws,
        );
        self.scratch = sc;
        Ok(())
    }
}
