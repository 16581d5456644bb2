//! BatchNorm with its running statistics: the eval-mode (or frozen) forward and its backward,
//! where the running statistics are constants, and their update after a training forward.

use super::*;

impl BatchNorm {
    /// (mean, 1/σ) per channel of the running statistics: σ = sqrt(running_var + eps), or
    /// running_scale + eps for Lp BN.
    pub(super) fn running_inverse(&self, ch: usize) -> (f64, f32) {
        let rm = &self.running_mean.as_ref().expect("tracked").data;
        let rv = &self.running_var.as_ref().expect("tracked").data;
        let inv = if matches!(self.config.stats, BatchStats::Lp(_)) {
            (1.0 / (rv[ch] as f64 + self.config.eps)) as f32
        } else {
            k::inverse_std(rv[ch], self.config.eps)
        };
        (rm[ch] as f64, inv)
    }

    /// Eval with running statistics: y = act((x - running_mean)·γ/σ + β) with σ =
    /// sqrt(running_var + eps), or running_scale + eps for Lp BN.
    pub(super) fn forward_running(&mut self, x: &Tensor, y: &mut Tensor, shape: Ncs) {
        let mut scale = std::mem::take(&mut self.scratch.scale);
        let mut shift = std::mem::take(&mut self.scratch.shift);
        let mut mean = std::mem::take(&mut self.scratch.mean);
        scale.clear();
        shift.clear();
        mean.clear();
        for ch in 0..shape.c {
            let (m, inv) = self.running_inverse(ch);
            scale.push(inv * self.gamma_or_one(ch));
            shift.push(self.beta_or_zero(ch));
            mean.push(m);
        }
        let affine = ChannelAffine {
            mean: &mean,
            scale: &scale,
            shift: &shift,
        };
        k::batch_norm_forward_fixed(&x.data, &mut y.data, shape, affine, self.relu);
        self.scratch.scale = scale;
        self.scratch.shift = shift;
        self.scratch.mean = mean;
    }

    /// The backward of the eval-mode affine map y = act((x - running_mean)·γ/σ + β): the
    /// running statistics are constants, as in PyTorch's eval-mode autograd.
    pub(super) fn backward_running(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        dx: &mut Tensor,
        shape: Ncs,
    ) -> Result<()> {
        let c = shape.c;
        dx.resize_to(&x.shape)?;
        // The fixed-apply scratch holds mean, 1/σ and γ here (no allocation per step).
        let mut sc = std::mem::take(&mut self.scratch);
        sc.mean.clear();
        sc.scale.clear();
        sc.shift.clear();
        for ch in 0..c {
            let (m, inv) = self.running_inverse(ch);
            sc.mean.push(m);
            sc.scale.push(inv);
            sc.shift.push(self.gamma_or_one(ch));
        }
        sc.sums.resize(c, ChannelSums::default());
        k::batch_norm_backward_fixed(
            &x.data,
            &y.data,
            &dy.data,
            Some(&mut dx.data),
            shape,
            &sc.mean,
            &sc.scale,
            &sc.shift,
            self.relu,
            &mut sc.sums,
        );
        self.add_affine_grads(&sc.sums);
        self.scratch = sc;
        Ok(())
    }

    /// running = (1 - f)·running + f·batch, with batch statistics averaged over virtual batches
    /// (Keras' Ghost BN) and the variance unbiased over each set's `m` values.
    /// Lp BN keeps its running scale the same way (no unbiasing).
    pub(super) fn update_running_stats(&mut self, c: usize, sets: usize, m: usize) {
        if !self.config.track_running_stats {
            return;
        }
        let f = self.next_factor();
        let lp = matches!(self.config.stats, BatchStats::Lp(_));
        let unbias = if lp { 1.0 } else { m as f64 / (m - 1) as f64 };
        let (st, lps) = (&self.scratch.stats, &self.scratch.lp);
        let rm = self.running_mean.as_mut().expect("tracked");
        let rv = self.running_var.as_mut().expect("tracked");
        for ch in 0..c {
            let (bm, bv) = if lp {
                (lps[ch].0, lps[ch].1 as f64)
            } else {
                let bm = (0..sets).map(|j| st[j * c + ch].mean).sum::<f64>() / sets as f64;
                let bv = (0..sets).map(|j| st[j * c + ch].var as f64).sum::<f64>() / sets as f64;
                (bm, bv * unbias)
            };
            rm.data[ch] = ((1.0 - f) * rm.data[ch] as f64 + f * bm) as f32;
            rv.data[ch] = ((1.0 - f) * rv.data[ch] as f64 + f * bv) as f32;
        }
    }
}
