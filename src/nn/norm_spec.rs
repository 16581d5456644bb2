//! `--norm SPEC`: which normalization a model puts after each conv or linear layer.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::nn::batch_norm::{BatchNorm, BatchNormConfig};
use crate::nn::layer::Layer;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormSpec {
    /// No normalization; the layer before keeps its bias.
    None,
    /// BatchNorm1d/2d.
    Batch(BatchNormConfig),
}

impl NormSpec {
    /// True when the preceding conv/linear layer should have a bias (nothing re-centres its output).
    pub fn wants_bias(&self) -> bool {
        matches!(self, NormSpec::None)
    }

    /// The layer for `channels` features: `dims` 1 after a Linear, 2 after a Conv2d.
    pub fn build(&self, dims: usize, channels: usize) -> Option<Box<dyn Layer>> {
        match self {
            NormSpec::None => None,
            NormSpec::Batch(cfg) => Some(Box::new(BatchNorm::new(dims, channels, *cfg))),
        }
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

fn parse_f64(key: &str, v: &str) -> Result<f64> {
    v.parse::<f64>()
        .map_err(|_| Error::invalid(format!("norm option {key} takes a number, got '{v}'")))
}

impl FromStr for NormSpec {
    type Err = Error;

    /// `none`, `bn`, or `bn:momentum=0.01,eps=1e-3,affine=false,track=false` (`momentum=none`
    /// for the cumulative average).
    fn from_str(s: &str) -> Result<Self> {
        let (name, opts) = s.split_once(':').unwrap_or((s, ""));
        match name {
            "none" if opts.is_empty() => Ok(NormSpec::None),
            "bn" => {
                let mut cfg = BatchNormConfig::default();
                for kv in opts.split(',').filter(|o| !o.is_empty()) {
                    let (key, v) = kv
                        .split_once('=')
                        .ok_or_else(|| Error::invalid(format!("norm option '{kv}' in '{s}' is not key=value")))?;
                    match key {
                        "eps" => cfg.eps = parse_f64(key, v)?,
                        "momentum" if v == "none" => cfg.momentum = None,
                        "momentum" => cfg.momentum = Some(parse_f64(key, v)?),
                        "affine" => cfg.affine = parse_bool(key, v)?,
                        "track" => cfg.track_running_stats = parse_bool(key, v)?,
                        _ => {
                            return Err(Error::invalid(format!(
                                "unknown option '{key}' for bn (known: eps, momentum, affine, track)"
                            )))
                        }
                    }
                }
                cfg.validate()?;
                Ok(NormSpec::Batch(cfg))
            }
            _ => Err(Error::invalid(format!("unknown norm spec '{s}' (known: none, bn)"))),
        }
    }
}

impl fmt::Display for NormSpec {
    /// The canonical spec, which parses back to the same value (stored in checkpoints).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NormSpec::None => write!(f, "none"),
            NormSpec::Batch(c) => {
                let m = c.momentum.map_or("none".to_string(), |m| m.to_string());
                write!(
                    f,
                    "bn:momentum={m},eps={},affine={},track={}",
                    c.eps, c.affine, c.track_running_stats
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_and_reject_bad_values() {
        for s in ["none", "bn", "bn:momentum=none,eps=0.001,affine=false,track=false"] {
            let spec: NormSpec = s.parse().unwrap();
            assert_eq!(spec.to_string().parse::<NormSpec>().unwrap(), spec);
        }
        for bad in [
            "bn:eps=0",
            "bn:eps=-1",
            "bn:momentum=1.5",
            "bn:affine=maybe",
            "bn:foo=1",
            "gnx",
            "bn:eps",
        ] {
            assert!(bad.parse::<NormSpec>().is_err(), "{bad} should fail");
        }
    }
}
