//! `--norm SPEC`: which normalization a model puts after each conv or linear layer.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::kernels::lp_norm::LpKind;
use crate::nn::batch_norm::{BatchNorm, BatchNormConfig, BatchStats};
use crate::nn::group_norm::{GroupNorm, WithinSample, WithinSampleConfig};
use crate::nn::layer::Layer;
use crate::nn::noisy_batch_norm::NoisyBatchNorm;
use crate::nn::rms_norm::RmsNorm;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormSpec {
    /// No normalization; the layer before keeps its bias.
    None,
    /// BatchNorm1d/2d and its variants (Ghost, Renorm, Lp).
    Batch(BatchNormConfig),
    /// Santurkar et al.'s noisy BN: BatchNorm plus random per-sample scale/shift in training.
    NoisyBatch(BatchNormConfig),
    /// GroupNorm with G groups; `None` means min(32, C).
    Group {
        groups: Option<usize>,
        eps: f64,
        affine: bool,
    },
    /// LayerNorm (both forms) and InstanceNorm.
    Within(WithinSampleConfig),
    /// The LSTM's naive BN: one set of running statistics shared by every time step
    /// (`bn-shared`; only the lstm model has time steps).
    SharedBatch(BatchNormConfig),
    /// RMSNorm over the trailing dims (torch.nn.RMSNorm, timm's RmsNorm): no centring, an
    /// elementwise scale and no shift.
    Rms { eps: f64, affine: bool },
}

/// Every spec with one line on what it does (`normlab norms`).
pub const CATALOG: &[(&str, &str)] = &[
    ("none", "no normalization; the conv/linear layer before keeps its bias"),
    (
        "bn",
        "BatchNorm1d/2d: batch statistics per channel; options momentum=0.1|none, eps=1e-5, affine, track",
    ),
    (
        "syncbn",
        "SyncBatchNorm: BN with statistics over the global batch of all processes (mpirun); one process: bn; bn's options",
    ),
    (
        "gn:G",
        "GroupNorm: statistics per sample over G channel groups (gn alone: min(32, C) groups); eps, affine",
    ),
    (
        "ln",
        "LayerNorm of the GN paper: GroupNorm(1), statistics over (C,H,W), per-channel affine; eps, affine",
    ),
    (
        "layernorm",
        "PyTorch nn.LayerNorm over the trailing dims (C,H,W) with an elementwise affine; eps, affine",
    ),
    (
        "in",
        "InstanceNorm: statistics per (sample, channel); PyTorch defaults affine=false, track=false; momentum",
    ),
    (
        "brn",
        "Batch Renormalization: r, d corrections toward running stats; rmax=3, dmax=5, warmup=1000 steps",
    ),
    (
        "ghost:V",
        "Ghost BatchNorm: BN statistics over virtual batches of V samples (V must divide the batch)",
    ),
    (
        "bn-l1",
        "Lp BatchNorm: subtract the batch mean, divide by the mean L1 norm (Santurkar et al.)",
    ),
    (
        "bn-linf",
        "Lp BatchNorm: subtract the batch mean, divide by the L-infinity norm (Santurkar et al.)",
    ),
    (
        "bn-shared",
        "lstm only: recurrent BN whose running statistics are shared by all time steps (the naive use; bn keeps them per step)",
    ),
    (
        "bn-noisy",
        "Noisy BN (Santurkar et al.): BN, then a random per-sample, per-unit scale and shift in training; eval = BN",
    ),
    (
        "rms",
        "RMSNorm (torch.nn.RMSNorm, timm's RmsNorm) over the trailing dims (C,H,W): x/√(mean(x²)+eps), elementwise scale, no shift, no centring; eps=1e-6, affine",
    ),
];

impl NormSpec {
    /// A spec written in normlab's own code (a study's arms, the benchmark's models); what a
    /// user types goes through `FromStr` at the command line.
    pub fn builtin(spec: &'static str) -> NormSpec {
        spec.parse()
            .unwrap_or_else(|e| panic!("built-in norm spec {spec}: {e}"))
    }

    /// The shortest spelling that parses back to this value: the name (with a group count or
    /// virtual batch) and only the options that differ from that name's defaults (`bn`,
    /// `gn:8`, `bn:momentum=0.01`): for run names, messages and run records. Checkpoints keep
    /// the full form (`Display`).
    pub fn short(&self) -> String {
        let long = self.to_string();
        let (name, rest) = long.split_once(':').unwrap_or((&long, ""));
        let (positional, options): (Vec<&str>, Vec<&str>) = rest
            .split(',')
            .filter(|s| !s.is_empty())
            .partition(|i| !i.contains('='));
        let head = if positional.is_empty() {
            name.to_string()
        } else {
            format!("{name}:{}", positional.join(","))
        };
        let defaults = head.parse::<NormSpec>().map(|d| d.to_string()).unwrap_or_default();
        let default_items: Vec<&str> = defaults.split([':', ',']).collect();
        let changed: Vec<&str> = options.into_iter().filter(|o| !default_items.contains(o)).collect();
        match (changed.is_empty(), positional.is_empty()) {
            (true, _) => head,
            (false, true) => format!("{name}:{}", changed.join(",")),
            (false, false) => format!("{head},{}", changed.join(",")),
        }
    }

    /// Serializes as `short()` (a run record keeps "bn" where the user wrote bn).
    pub fn serialize_short<S: serde::Serializer>(spec: &NormSpec, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&spec.short())
    }

    /// True when the preceding conv/linear layer should have a bias (nothing re-centres its output).
    pub fn wants_bias(&self) -> bool {
        matches!(self, NormSpec::None)
    }

    /// Checks, before training starts, that every batch of an epoch (`batch`, and a last
    /// partial batch `last`) suits the norm: Ghost BN's virtual batch must divide both.
    pub fn check_batches(&self, batch: usize, last: usize) -> Result<()> {
        if let NormSpec::Batch(BatchNormConfig {
            stats: BatchStats::Ghost(v),
            ..
        }) = *self
        {
            for (what, n) in [("batch size", batch), ("last batch of the epoch", last)] {
                if n > 0 && n % v != 0 {
                    return Err(Error::invalid(format!(
                        "ghost BN virtual batch {v} does not divide the {what} ({n}); choose a --batch-size and \
                         --train-limit that are multiples of {v}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The layer for a per-sample shape of [C] (after a linear layer) or [C, H, W] (after a
    /// conv); `layer` names it in errors ("bn1"). With `relu` a following ReLU is fused in.
    pub fn build(&self, sample_shape: &[usize], layer: &str, relu: bool) -> Result<Option<Box<dyn Layer>>> {
        let c = sample_shape[0];
        let dims = if sample_shape.len() == 3 { 2 } else { 1 };
        let fuse_bn = |l: BatchNorm| if relu { l.with_relu() } else { l };
        let fuse_gn = |l: GroupNorm| if relu { l.with_relu() } else { l };
        Ok(match *self {
            NormSpec::None => None,
            NormSpec::Batch(cfg) => Some(Box::new(fuse_bn(BatchNorm::new(dims, c, cfg)))),
            NormSpec::NoisyBatch(cfg) => Some(Box::new(NoisyBatchNorm::new(BatchNorm::new(dims, c, cfg), relu))),
            NormSpec::Group { groups, eps, affine } => {
                let g = groups.unwrap_or(c.min(32));
                let cfg = WithinSampleConfig {
                    kind: WithinSample::Group(g),
                    eps,
                    affine,
                    track_running_stats: false,
                    momentum: 0.1,
                };
                Some(Box::new(fuse_gn(GroupNorm::new(cfg, sample_shape, layer)?)))
            }
            NormSpec::Within(cfg) => Some(Box::new(fuse_gn(GroupNorm::new(cfg, sample_shape, layer)?))),
            NormSpec::Rms { eps, affine } => Some(Box::new(
                RmsNorm::new(eps, affine, sample_shape, layer)?.with_relu(relu),
            )),
            NormSpec::SharedBatch(_) => {
                return Err(Error::invalid(format!(
                    "{layer}: bn-shared is the LSTM's BN with statistics shared across time steps; \
                     conv and linear models have no time steps (use bn)"
                )))
            }
        })
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(Error::invalid(format!(
            "norm option {key} takes true or false, got '{v}'"
        ))),
    }
}

fn parse_num<T: FromStr>(key: &str, v: &str) -> Result<T> {
    v.parse::<T>()
        .map_err(|_| Error::invalid(format!("norm option {key} takes a number, got '{v}'")))
}

/// A spec split into its name, an optional leading bare value and its key=value pairs.
type SplitSpec<'a> = (&'a str, Option<&'a str>, Vec<(&'a str, &'a str)>);

/// The options of a norm that takes only eps (default `eps`) and affine (default true).
fn eps_and_affine(name: &str, pairs: &[(&str, &str)], eps: f64) -> Result<(f64, bool)> {
    let (mut eps, mut affine) = (eps, true);
    for &(key, v) in pairs {
        match key {
            "eps" => eps = parse_num(key, v)?,
            "affine" => affine = parse_bool(key, v)?,
            _ => return Err(unknown(key, name, "eps, affine")),
        }
    }
    check_eps(eps)?;
    Ok((eps, affine))
}

/// Splits `name:a,k=v,...` into the name, an optional leading bare value and the key=value pairs.
fn split(spec: &str) -> Result<SplitSpec<'_>> {
    let (name, rest) = spec.split_once(':').unwrap_or((spec, ""));
    let mut bare = None;
    let mut pairs = Vec::new();
    for (i, item) in rest.split(',').filter(|o| !o.is_empty()).enumerate() {
        match item.split_once('=') {
            Some((k, v)) => pairs.push((k, v)),
            None if i == 0 => bare = Some(item),
            None => {
                return Err(Error::invalid(format!(
                    "norm option '{item}' in '{spec}' is not key=value"
                )))
            }
        }
    }
    Ok((name, bare, pairs))
}

fn unknown(key: &str, name: &str, known: &str) -> Error {
    Error::invalid(format!("unknown option '{key}' for {name} (known: {known})"))
}

/// Stored as its canonical text (`bn`, `gn:8`, `brn:rmax=3,...`): checkpoints and run records
/// keep the string they always had, and two spellings of one layer are one value.
impl serde::Serialize for NormSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for NormSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        <String as serde::Deserialize>::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl FromStr for NormSpec {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        let (name, bare, pairs) = split(spec)?;
        let needs_bare = matches!(name, "ghost");
        let takes_bare = matches!(name, "ghost" | "gn");
        if bare.is_some() && !takes_bare {
            return Err(Error::invalid(format!(
                "norm option '{}' in '{spec}' is not key=value",
                bare.unwrap_or("")
            )));
        }
        if needs_bare && bare.is_none() {
            return Err(Error::invalid(format!(
                "'{spec}': ghost needs a virtual batch size, as in ghost:16"
            )));
        }
        match name {
            "none" if pairs.is_empty() => Ok(NormSpec::None),
            "bn" | "syncbn" | "brn" | "ghost" | "bn-l1" | "bn-linf" | "bn-noisy" | "bn-shared" => {
                let mut cfg = BatchNormConfig::default();
                let (mut rmax, mut dmax, mut warmup) = (3.0, 5.0, 1000u64);
                cfg.stats = match name {
                    "ghost" => {
                        let v: usize = parse_num("virtual batch", bare.unwrap_or(""))?;
                        BatchStats::Ghost(v)
                    }
                    "bn-l1" => BatchStats::Lp(LpKind::L1),
                    "bn-linf" => BatchStats::Lp(LpKind::Linf),
                    "syncbn" => BatchStats::Sync,
                    _ => BatchStats::Standard,
                };
                for (key, v) in pairs {
                    match key {
                        "eps" => cfg.eps = parse_num(key, v)?,
                        "momentum" if v == "none" => cfg.momentum = None,
                        "momentum" => cfg.momentum = Some(parse_num(key, v)?),
                        "affine" => cfg.affine = parse_bool(key, v)?,
                        "track" => cfg.track_running_stats = parse_bool(key, v)?,
                        "rmax" if name == "brn" => rmax = parse_num(key, v)?,
                        "dmax" if name == "brn" => dmax = parse_num(key, v)?,
                        "warmup" if name == "brn" => warmup = parse_num(key, v)?,
                        _ => {
                            let extra = if name == "brn" { ", rmax, dmax, warmup" } else { "" };
                            return Err(unknown(key, name, &format!("eps, momentum, affine, track{extra}")));
                        }
                    }
                }
                if name == "brn" {
                    if !cfg.track_running_stats {
                        return Err(Error::invalid("brn needs running statistics (track=true)"));
                    }
                    cfg.stats = BatchStats::Renorm { rmax, dmax, warmup };
                }
                cfg.validate()?;
                Ok(if name == "bn-shared" {
                    NormSpec::SharedBatch(cfg)
                } else if name == "bn-noisy" {
                    NormSpec::NoisyBatch(cfg)
                } else {
                    NormSpec::Batch(cfg)
                })
            }
            "gn" => {
                let groups = match bare {
                    Some(g) => match g.parse::<usize>() {
                        Ok(g) if g > 0 => Some(g),
                        _ => {
                            return Err(Error::invalid(format!(
                                "gn groups must be a whole number > 0, got '{g}'"
                            )))
                        }
                    },
                    None => None,
                };
                let (eps, affine) = eps_and_affine(name, &pairs, 1e-5)?;
                Ok(NormSpec::Group { groups, eps, affine })
            }
            "ln" | "layernorm" | "in" => {
                let instance = name == "in";
                let mut cfg = WithinSampleConfig {
                    kind: match name {
                        "ln" => WithinSample::Layer,
                        "layernorm" => WithinSample::LayerElementwise,
                        _ => WithinSample::Instance,
                    },
                    eps: 1e-5,
                    affine: !instance,
                    track_running_stats: false,
                    momentum: 0.1,
                };
                for (key, v) in pairs {
                    match key {
                        "eps" => cfg.eps = parse_num(key, v)?,
                        "affine" => cfg.affine = parse_bool(key, v)?,
                        "track" if instance => cfg.track_running_stats = parse_bool(key, v)?,
                        "momentum" if instance => cfg.momentum = parse_num(key, v)?,
                        _ => {
                            let known = if instance {
                                "eps, affine, track, momentum"
                            } else {
                                "eps, affine"
                            };
                            return Err(unknown(key, name, known));
                        }
                    }
                }
                check_eps(cfg.eps)?;
                if !(0.0..=1.0).contains(&cfg.momentum) {
                    return Err(Error::invalid(format!(
                        "in momentum must be in [0, 1], got {}",
                        cfg.momentum
                    )));
                }
                Ok(NormSpec::Within(cfg))
            }
            "rms" => {
                let (eps, affine) = eps_and_affine(name, &pairs, 1e-6)?;
                Ok(NormSpec::Rms { eps, affine })
            }
            _ => {
                let known: Vec<&str> = CATALOG.iter().map(|(s, _)| *s).collect();
                Err(Error::invalid(format!(
                    "unknown norm spec '{spec}' (known: {})",
                    known.join(", ")
                )))
            }
        }
    }
}

fn check_eps(eps: f64) -> Result<()> {
    if eps > 0.0 && eps.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(format!("norm eps must be > 0, got {eps}")))
    }
}

impl fmt::Display for NormSpec {
    /// The canonical spec, which parses back to the same value (stored in checkpoints).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NormSpec::None => write!(f, "none"),
            NormSpec::Batch(c) => {
                let m = c.momentum.map_or("none".to_string(), |m| m.to_string());
                let common = format!(
                    "momentum={m},eps={},affine={},track={}",
                    c.eps, c.affine, c.track_running_stats
                );
                match c.stats {
                    BatchStats::Standard => write!(f, "bn:{common}"),
                    BatchStats::Sync => write!(f, "syncbn:{common}"),
                    BatchStats::Ghost(v) => write!(f, "ghost:{v},{common}"),
                    BatchStats::Renorm { rmax, dmax, warmup } => {
                        write!(f, "brn:rmax={rmax},dmax={dmax},warmup={warmup},{common}")
                    }
                    BatchStats::Lp(LpKind::L1) => write!(f, "bn-l1:{common}"),
                    BatchStats::Lp(LpKind::Linf) => write!(f, "bn-linf:{common}"),
                }
            }
            NormSpec::SharedBatch(c) => {
                let m = c.momentum.map_or("none".to_string(), |m| m.to_string());
                write!(
                    f,
                    "bn-shared:momentum={m},eps={},affine={},track={}",
                    c.eps, c.affine, c.track_running_stats
                )
            }
            NormSpec::NoisyBatch(c) => {
                let m = c.momentum.map_or("none".to_string(), |m| m.to_string());
                write!(
                    f,
                    "bn-noisy:momentum={m},eps={},affine={},track={}",
                    c.eps, c.affine, c.track_running_stats
                )
            }
            NormSpec::Group { groups, eps, affine } => match groups {
                Some(g) => write!(f, "gn:{g},eps={eps},affine={affine}"),
                None => write!(f, "gn:eps={eps},affine={affine}"),
            },
            NormSpec::Rms { eps, affine } => write!(f, "rms:eps={eps},affine={affine}"),
            NormSpec::Within(c) => match c.kind {
                WithinSample::Layer => write!(f, "ln:eps={},affine={}", c.eps, c.affine),
                WithinSample::LayerElementwise => write!(f, "layernorm:eps={},affine={}", c.eps, c.affine),
                _ => write!(
                    f,
                    "in:eps={},affine={},track={},momentum={}",
                    c.eps, c.affine, c.track_running_stats, c.momentum
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_short_form_keeps_only_what_differs_from_the_defaults() {
        let short = |s: &str| s.parse::<NormSpec>().unwrap().short();
        assert_eq!(short("bn:momentum=0.1,eps=1e-5"), "bn");
        assert_eq!(short("gn:8,eps=1e-5"), "gn:8");
        assert_eq!(short("bn:momentum=0.01"), "bn:momentum=0.01");
        assert_eq!(short("ghost:8,momentum=0.01"), "ghost:8,momentum=0.01");
        assert_eq!(short("in:affine=true"), "in:affine=true");
    }

    #[test]
    fn specs_round_trip_and_reject_bad_values() {
        for s in [
            "none",
            "bn",
            "bn:momentum=none,eps=0.001,affine=false,track=false",
            "gn",
            "gn:4",
            "gn:8,eps=1e-3,affine=false",
            "ln",
            "layernorm:affine=false",
            "in",
            "in:affine=true,track=true,momentum=0.2",
            "brn",
            "brn:rmax=2,dmax=1,warmup=50",
            "ghost:16",
            "ghost:8,momentum=0.01",
            "bn-l1",
            "bn-linf:eps=1e-3",
            "bn-noisy",
        ] {
            let spec: NormSpec = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(spec.to_string().parse::<NormSpec>().unwrap(), spec, "{s}");
            assert_eq!(
                spec.short().parse::<NormSpec>().unwrap(),
                spec,
                "{s} as {}",
                spec.short()
            );
        }
        for bad in [
            "bn:eps=0",
            "bn:eps=-1",
            "bn:momentum=1.5",
            "bn:momentum=-0.1",
            "bn:affine=maybe",
            "bn:foo=1",
            "gnx",
            "bn:eps",
            "gn:0",
            "gn:x",
            "ghost",
            "ghost:0",
            "ln:track=true",
            "in:momentum=2",
            "brn:rmax=0.5",
            "brn:track=false",
            "layernorm:eps=0",
            "none:eps=1",
        ] {
            assert!(bad.parse::<NormSpec>().is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn group_count_must_divide_channels() {
        let spec: NormSpec = "gn:5".parse().unwrap();
        let err = spec.build(&[32, 4, 4], "bn1", false).err().unwrap().to_string();
        assert!(err.contains("bn1") && err.contains("C % G"), "{err}");
        let auto: NormSpec = "gn".parse().unwrap();
        assert!(
            auto.build(&[16, 4, 4], "bn1", true).is_ok(),
            "gn alone uses min(32, C) groups"
        );
    }
}
