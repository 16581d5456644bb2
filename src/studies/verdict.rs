//! The verdict rule every study uses: a claim is a per-seed difference between arms that the
//! paper predicts to be positive (or, for an equivalence claim, near zero); the verdict comes
//! from the mean and a 95% t-interval across seeds, set against a practical threshold stated
//! in the report. Fewer than 3 seeds, or a `--quick` run, gives no verdict.
//!
//! A claim may also declare what must hold for its comparison to be fair (`Condition`: the
//! arms at matched fit, training curves that have flattened, a grid that brackets the limit
//! measured). When the run breaks it, the difference is arithmetic on a confounded comparison:
//! the verdict is `inconclusive (confounded: why)`, whatever the interval says.

use serde::{Deserialize, Serialize};

/// What a claim predicts about its per-seed difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The difference is positive, by at least the threshold.
    Greater,
    /// The difference is within ±threshold of zero ("about as well").
    Equivalent,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    pub claim: String,
    /// What is measured and how the difference is taken ("test error (%) at batch 2 minus at batch 128, BN").
    pub metric: String,
    pub arms: Vec<String>,
    pub kind: Kind,
    /// The difference of each seed (finite values only).
    pub per_seed: Vec<f64>,
    /// NaN (JSON null) when no seed has a value.
    #[serde(deserialize_with = "null_as_nan")]
    pub mean_difference: f64,
    /// 95% t-interval of the mean difference across seeds (null ends: unbounded or unknown).
    #[serde(deserialize_with = "nulls_as_nan")]
    pub interval: [f64; 2],
    pub threshold: f64,
    pub seeds: usize,
    /// agrees, disagrees, inconclusive, inconclusive (N seeds), inconclusive (quick run),
    /// inconclusive (confounded: why).
    pub verdict: String,
    /// What must hold for the comparison to be fair, and whether it held (absent: nothing to
    /// hold, as when both arms take the same steps and are measured at the same point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<Condition>,
}

/// What a claim needs of the run for its comparison to mean anything.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    /// What must hold, stated for the report ("every arm reaches training loss 0.05").
    pub requires: String,
    /// Why it did not hold in this run (None: it held).
    pub broken: Option<String>,
}

/// JSON has no NaN or infinity (serde_json writes null): read null back as NaN. Every study
/// value that can be NaN (a diverged run's accuracy, loss or probe) is read through it, so
/// `normlab report` rebuilds any results.json a study wrote.
pub fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn nulls_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[f64; 2], D::Error> {
    let [a, b] = <[Option<f64>; 2]>::deserialize(d)?;
    Ok([a.unwrap_or(f64::NAN), b.unwrap_or(f64::NAN)])
}

/// Two-sided 95% quantile of Student's t with `df` degrees of freedom.
pub fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => T[df - 1],
        // Beyond 30 degrees of freedom: the normal quantile plus the first correction term.
        _ => 1.96 + 2.4 / df as f64,
    }
}

/// (mean, lower, upper) of the 95% t-interval of `v`'s mean.
pub fn t_interval(v: &[f64]) -> (f64, f64, f64) {
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (m, f64::NEG_INFINITY, f64::INFINITY);
    }
    let sd = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    let h = t975(n - 1) * sd / (n as f64).sqrt();
    (m, m - h, m + h)
}

/// The verdict on a claim from its per-seed differences (`quick`: a smoke run, no verdict).
pub fn judge(kind: Kind, per_seed: &[f64], threshold: f64, quick: bool) -> (f64, [f64; 2], String) {
    let v: Vec<f64> = per_seed.iter().copied().filter(|x| x.is_finite()).collect();
    let (m, lo, hi) = t_interval(&v);
    let verdict = if quick {
        "inconclusive (quick run)".to_string()
    } else if v.len() < 3 {
        format!("inconclusive ({} seeds)", v.len())
    } else {
        match kind {
            Kind::Greater if lo > 0.0 && m >= threshold => "agrees",
            Kind::Greater if hi < 0.0 || (lo >= -threshold && hi <= threshold) => "disagrees",
            Kind::Equivalent if lo >= -threshold && hi <= threshold => "agrees",
            Kind::Equivalent if lo > threshold || hi < -threshold => "disagrees",
            _ => "inconclusive",
        }
        .to_string()
    };
    (m, [lo, hi], verdict)
}

impl Claim {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        claim: impl Into<String>,
        metric: impl Into<String>,
        arms: &[&str],
        kind: Kind,
        per_seed: Vec<f64>,
        threshold: f64,
        quick: bool,
    ) -> Claim {
        let per_seed: Vec<f64> = per_seed.into_iter().filter(|x| x.is_finite()).collect();
        let (mean_difference, interval, verdict) = judge(kind, &per_seed, threshold, quick);
        Claim {
            claim: claim.into(),
            metric: metric.into(),
            arms: arms.iter().map(|a| a.to_string()).collect(),
            kind,
            seeds: per_seed.len(),
            per_seed,
            mean_difference,
            interval,
            threshold,
            verdict,
            condition: None,
        }
    }

    /// The claim with what its comparison requires; `broken` says why the run breaks it (None:
    /// it holds). A broken condition makes the verdict `inconclusive (confounded: ...)`, except
    /// in a quick run, which gives no verdict anyway.
    pub fn given(mut self, requires: impl Into<String>, broken: Option<String>) -> Claim {
        if let Some(why) = &broken {
            if !self.verdict.ends_with("(quick run)") {
                self.verdict = format!("inconclusive (confounded: {why})");
            }
        }
        self.condition = Some(Condition {
            requires: requires.into(),
            broken,
        });
        self
    }

    /// Whether the claim's comparison was confounded in this run.
    pub fn confounded(&self) -> bool {
        self.condition.as_ref().is_some_and(|c| c.broken.is_some())
    }

    /// The threshold as the report states it.
    pub fn rule(&self) -> String {
        match self.kind {
            Kind::Greater => format!("> 0 and mean ≥ {}", self.threshold),
            Kind::Equivalent => format!("within ±{}", self.threshold),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_separated_seeds_give_a_verdict_and_overlap_does_not() {
        let (_, _, v) = judge(Kind::Greater, &[5.0, 5.5, 4.8, 5.2], 1.0, false);
        assert_eq!(v, "agrees");
        let (_, _, v) = judge(Kind::Greater, &[-5.0, -5.5, -4.8], 1.0, false);
        assert_eq!(v, "disagrees");
        // Tightly around zero, inside the threshold: the claimed effect is absent.
        let (_, _, v) = judge(Kind::Greater, &[0.1, -0.1, 0.05, 0.0], 1.0, false);
        assert_eq!(v, "disagrees");
        // Spread across zero and beyond the threshold: nothing can be said.
        let (_, [lo, hi], v) = judge(Kind::Greater, &[4.0, -3.0, 2.0], 1.0, false);
        assert!(lo < 0.0 && hi > 1.0);
        assert_eq!(v, "inconclusive");
        // Positive but below the practical threshold.
        let (_, _, v) = judge(Kind::Greater, &[0.5, 0.6, 0.55], 1.0, false);
        assert_eq!(v, "disagrees");
        let (_, _, v) = judge(Kind::Greater, &[0.5, 0.9, 1.6], 1.0, false);
        assert_eq!(v, "inconclusive");
    }

    #[test]
    fn few_seeds_and_quick_runs_are_inconclusive() {
        assert_eq!(judge(Kind::Greater, &[9.0], 1.0, false).2, "inconclusive (1 seeds)");
        assert_eq!(
            judge(Kind::Greater, &[9.0, 9.1], 1.0, false).2,
            "inconclusive (2 seeds)"
        );
        assert_eq!(
            judge(Kind::Greater, &[9.0, 9.1, 9.2], 1.0, true).2,
            "inconclusive (quick run)"
        );
        // Non-finite seeds (a diverged arm) do not count.
        assert_eq!(
            judge(Kind::Greater, &[9.0, f64::NAN, 9.2], 1.0, false).2,
            "inconclusive (2 seeds)"
        );
    }

    #[test]
    fn equivalence_needs_the_whole_interval_inside_the_margin() {
        assert_eq!(judge(Kind::Equivalent, &[0.2, -0.1, 0.1, 0.0], 1.0, false).2, "agrees");
        assert_eq!(judge(Kind::Equivalent, &[3.0, 3.2, 2.9], 1.0, false).2, "disagrees");
        assert_eq!(judge(Kind::Equivalent, &[0.2, 1.9, -1.5], 1.0, false).2, "inconclusive");
    }

    #[test]
    fn a_broken_condition_overrides_the_interval() {
        let seeds = vec![5.0, 5.5, 4.8, 5.2];
        let held =
            Claim::new("c", "m", &["a", "b"], Kind::Greater, seeds.clone(), 1.0, false).given("both arms fit", None);
        assert_eq!(held.verdict, "agrees");
        assert!(!held.confounded());
        let broken = Claim::new("c", "m", &["a", "b"], Kind::Greater, seeds.clone(), 1.0, false)
            .given("both arms fit", Some("b never reached the target".into()));
        assert_eq!(broken.verdict, "inconclusive (confounded: b never reached the target)");
        assert!(broken.confounded());
        // The interval is still reported; only the verdict is withheld.
        assert_eq!(broken.mean_difference, held.mean_difference);
        let quick = Claim::new("c", "m", &["a", "b"], Kind::Greater, seeds, 1.0, true)
            .given("both arms fit", Some("b never reached the target".into()));
        assert_eq!(quick.verdict, "inconclusive (quick run)");
        // results.json keeps the condition; one written before conditions existed still reads.
        let json = serde_json::to_string(&broken).unwrap();
        let back: Claim = serde_json::from_str(&json).unwrap();
        assert_eq!(back, broken);
        let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
        old.as_object_mut().unwrap().remove("condition");
        assert!(serde_json::from_value::<Claim>(old).unwrap().condition.is_none());
    }

    #[test]
    fn t_quantiles() {
        assert!((t975(2) - 4.303).abs() < 1e-9);
        let (m, lo, hi) = t_interval(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12);
        assert!((hi - m - 4.303 / 3f64.sqrt()).abs() < 1e-9 && (m - lo - (hi - m)).abs() < 1e-12);
    }
}
