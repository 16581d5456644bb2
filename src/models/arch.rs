//! The architectures normlab builds (`--model`), typed: parsed once from the command line or
//! from checkpoint metadata, and written back as canonical text.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The widest conv or linear layer a model spec may ask for. Specs come from the command line
/// and from checkpoint metadata, which is untrusted: beyond the limits a spec is an error,
/// never an allocation.
pub const MAX_WIDTH: usize = 4096;
/// Items of a vgg cfg (convs and pools).
pub const MAX_VGG_ITEMS: usize = 64;
/// The default VGG configuration: numbers are 3x3 conv widths, `M` a 2x2 max-pool.
pub const DEFAULT_VGG: &str = "32,32,M,64,64,M,128,128,M";
/// The articles' seed-cnn conv width.
pub const DEFAULT_SEED_WIDTH: usize = 32;

/// A model's architecture: which template, and its widths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arch {
    /// The conv width (32 in the articles).
    SeedCnn(usize),
    Mlp,
    /// 3x3 conv widths, `None` for a 2x2 max-pool.
    Vgg(Vec<Option<usize>>),
    /// The inner (conv1) width of each of the six basic blocks.
    ResNet(Vec<usize>),
    /// Hidden size and layers of an LSTM reading the image row by row.
    Lstm(usize, usize),
    /// A Vision Transformer in timm's layout.
    Vit(VitConfig),
}

/// `vit:D,L,H,P[,R][,post]`: width D, L blocks of H heads, P×P patches, MLP ratio R.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VitConfig {
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub patch: usize,
    pub mlp_ratio: usize,
    pub placement: crate::nn::vit::Placement,
}

impl VitConfig {
    /// The MLP's hidden width (timm: int(D·R)).
    pub fn hidden(&self) -> usize {
        self.dim * self.mlp_ratio
    }
}

/// The default ViT (`vit`): width 64, 4 blocks of 4 heads, 4×4 patches, MLP ratio 4, pre-norm.
pub const DEFAULT_VIT: &str = "64,4,4,4";
/// Limits of a vit spec (untrusted, like every spec): blocks, heads and the MLP ratio.
pub const MAX_VIT_DEPTH: usize = 64;
pub const MAX_VIT_HEADS: usize = 64;
pub const MAX_VIT_RATIO: usize = 16;

/// The default ResNet: a 16-channel stem, then three stages of two basic blocks with 16, 32
/// and 64 channels (strides 1, 2, 2), global average pooling and a linear classifier.
pub const DEFAULT_RESNET: &str = "16,16,32,32,64,64";
/// The default LSTM hidden size.
pub const DEFAULT_LSTM_HIDDEN: usize = 128;
pub(crate) const RESNET_STAGES: [(usize, usize); 3] = [(16, 1), (32, 2), (64, 2)];

impl Arch {
    /// A spec written in the source (tests, studies); panics only on a typo there.
    pub fn builtin(spec: &'static str) -> Arch {
        spec.parse()
            .unwrap_or_else(|e| panic!("built-in model spec '{spec}': {e}"))
    }

    /// The shortest text that parses back to this architecture (`vgg` for the default cfg),
    /// as a user would write it: run-folder names and run records.
    pub fn short(&self) -> String {
        let full = self.to_string();
        match full.split_once(':') {
            Some((name, _)) if name.parse::<Arch>().ok().as_ref() == Some(self) => name.to_string(),
            _ => full,
        }
    }

    /// The norm a fresh run of this architecture gets without `--norm`: BN, except the ViT's
    /// LayerNorm with timm's eps 1e-6.
    pub fn default_norm(&self) -> crate::nn::norm_spec::NormSpec {
        match self {
            Arch::Vit(_) => crate::nn::norm_spec::NormSpec::builtin("layernorm:eps=1e-6"),
            _ => crate::nn::norm_spec::NormSpec::builtin("bn"),
        }
    }

    /// Serializes as `short()`.
    pub fn serialize_short<S: serde::Serializer>(arch: &Arch, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&arch.short())
    }
}

/// The canonical text: `seed-cnn`, `seed-cnn:W`, `mlp`, `vgg:<cfg>`, `resnet:<six widths>`,
/// `lstm:H,L` (checkpoint metadata holds this).
impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let list = |items: Vec<String>| items.join(",");
        match self {
            Arch::SeedCnn(DEFAULT_SEED_WIDTH) => write!(f, "seed-cnn"),
            Arch::SeedCnn(w) => write!(f, "seed-cnn:{w}"),
            Arch::Mlp => write!(f, "mlp"),
            Arch::Vgg(items) => write!(
                f,
                "vgg:{}",
                list(
                    items
                        .iter()
                        .map(|i| i.map_or("M".to_string(), |w| w.to_string()))
                        .collect()
                )
            ),
            Arch::ResNet(mids) => write!(f, "resnet:{}", list(mids.iter().map(|w| w.to_string()).collect())),
            Arch::Lstm(h, l) => write!(f, "lstm:{h},{l}"),
            Arch::Vit(v) => {
                write!(f, "vit:{},{},{},{},{}", v.dim, v.depth, v.heads, v.patch, v.mlp_ratio)?;
                if v.placement == crate::nn::vit::Placement::Post {
                    write!(f, ",post")?;
                }
                Ok(())
            }
        }
    }
}

impl serde::Serialize for Arch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Arch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Arch {
    type Err = Error;

    /// Parses `--model`; errors name the bad part.
    fn from_str(model: &str) -> Result<Arch> {
        let (name, cfg) = model.split_once(':').unwrap_or((model, ""));
        match (name, cfg) {
            ("seed-cnn", "") => Ok(Arch::SeedCnn(32)),
            ("seed-cnn", w) => match w.parse::<usize>() {
                Ok(w) if (1..=MAX_WIDTH).contains(&w) => Ok(Arch::SeedCnn(w)),
                _ => Err(Error::invalid(format!(
                    "seed-cnn width '{w}' is not a whole number in 1..={MAX_WIDTH}"
                ))),
            },
            ("mlp", "") => Ok(Arch::Mlp),
            ("vgg", cfg) => {
                let cfg = if cfg.is_empty() { DEFAULT_VGG } else { cfg };
                let items = cfg
                    .split(',')
                    .map(|t| match t.trim() {
                        "M" | "m" => Ok(None),
                        w => match w.parse::<usize>() {
                            Ok(c) if (1..=MAX_WIDTH).contains(&c) => Ok(Some(c)),
                            _ => Err(Error::invalid(format!(
                                "vgg cfg item '{w}' is neither a width in 1..={MAX_WIDTH} nor M"
                            ))),
                        },
                    })
                    .collect::<Result<Vec<_>>>()?;
                if items.len() > MAX_VGG_ITEMS {
                    return Err(Error::invalid(format!(
                        "vgg cfg has {} items, more than {MAX_VGG_ITEMS}",
                        items.len()
                    )));
                }
                if !items.iter().any(|i| i.is_some()) {
                    return Err(Error::invalid(format!("vgg cfg '{cfg}' has no conv layer")));
                }
                Ok(Arch::Vgg(items))
            }
            ("resnet", cfg) => {
                let cfg = if cfg.is_empty() { DEFAULT_RESNET } else { cfg };
                let mids = cfg
                    .split(',')
                    .map(|t| match t.trim().parse::<usize>() {
                        Ok(w) if (1..=MAX_WIDTH).contains(&w) => Ok(w),
                        _ => Err(Error::invalid(format!(
                            "resnet width '{t}' is not a whole number in 1..={MAX_WIDTH}"
                        ))),
                    })
                    .collect::<Result<Vec<_>>>()?;
                if mids.len() != 6 {
                    return Err(Error::invalid(format!(
                        "resnet takes six block widths, got {} in '{cfg}'",
                        mids.len()
                    )));
                }
                Ok(Arch::ResNet(mids))
            }
            ("lstm", cfg) => {
                let parts: Vec<&str> = if cfg.is_empty() {
                    vec![]
                } else {
                    cfg.split(',').collect()
                };
                let num = |t: &str, what: &str, max: usize| match t.trim().parse::<usize>() {
                    Ok(v) if (1..=max).contains(&v) => Ok(v),
                    _ => Err(Error::invalid(format!(
                        "lstm {what} '{t}' is not a whole number in 1..={max}"
                    ))),
                };
                match parts.as_slice() {
                    [] => Ok(Arch::Lstm(DEFAULT_LSTM_HIDDEN, 1)),
                    [h] => Ok(Arch::Lstm(num(h, "hidden size", MAX_WIDTH)?, 1)),
                    [h, l] => Ok(Arch::Lstm(
                        num(h, "hidden size", MAX_WIDTH)?,
                        num(l, "layer count", crate::nn::lstm::MAX_LAYERS)?,
                    )),
                    _ => Err(Error::invalid(format!("lstm takes lstm[:H[,layers]], got '{model}'"))),
                }
            }
            ("vit", cfg) => parse_vit(if cfg.is_empty() { DEFAULT_VIT } else { cfg }).map(Arch::Vit),
            _ => Err(Error::invalid(format!(
                "unknown model '{model}' (known: seed-cnn[:width], mlp, vgg[:cfg], resnet[:widths], lstm[:H[,layers]], \
                 vit[:D,L,H,P[,R][,pre|post]])"
            ))),
        }
    }
}

/// `D,L,H,P[,R][,pre|post]`, each number checked against its limit.
fn parse_vit(cfg: &str) -> Result<VitConfig> {
    use crate::nn::vit::Placement;
    let mut parts: Vec<&str> = cfg.split(',').map(str::trim).collect();
    let placement = match parts.last() {
        Some(&"post") => Placement::Post,
        Some(&"pre") => Placement::Pre,
        _ => Placement::Pre,
    };
    if matches!(parts.last(), Some(&"post") | Some(&"pre")) {
        parts.pop();
    }
    let num = |t: &str, what: &str, max: usize| match t.parse::<usize>() {
        Ok(v) if (1..=max).contains(&v) => Ok(v),
        _ => Err(Error::invalid(format!(
            "vit {what} '{t}' is not a whole number in 1..={max}"
        ))),
    };
    let (dim, depth, heads, patch, ratio) = match parts.as_slice() {
        [d, l, h, p] => (d, l, h, p, "4"),
        [d, l, h, p, r] => (d, l, h, p, *r),
        _ => {
            return Err(Error::invalid(format!(
                "vit takes vit:D,L,H,P[,R][,pre|post] (width, blocks, heads, patch side, MLP ratio), got 'vit:{cfg}'"
            )))
        }
    };
    let v = VitConfig {
        dim: num(dim, "width D", MAX_WIDTH)?,
        depth: num(depth, "block count L", MAX_VIT_DEPTH)?,
        heads: num(heads, "head count H", MAX_VIT_HEADS)?,
        patch: num(patch, "patch side P", crate::data::MAX_INPUT_SIDE)?,
        mlp_ratio: num(ratio, "MLP ratio R", MAX_VIT_RATIO)?,
        placement,
    };
    if !v.dim.is_multiple_of(v.heads) {
        return Err(Error::invalid(format!(
            "vit width {} is not divisible by its {} heads; choose D a multiple of H",
            v.dim, v.heads
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_short_drops_defaults() {
        for (text, full, short) in [
            ("seed-cnn", "seed-cnn", "seed-cnn"),
            ("seed-cnn:32", "seed-cnn", "seed-cnn"),
            ("seed-cnn:5", "seed-cnn:5", "seed-cnn:5"),
            ("mlp", "mlp", "mlp"),
            ("vgg", "vgg:32,32,M,64,64,M,128,128,M", "vgg"),
            ("vgg: 8, m,16", "vgg:8,M,16", "vgg:8,M,16"),
            ("resnet", "resnet:16,16,32,32,64,64", "resnet"),
            ("lstm", "lstm:128,1", "lstm"),
            ("lstm:64", "lstm:64,1", "lstm:64,1"),
            ("vit", "vit:64,4,4,4,4", "vit"),
            ("vit:32,2,2,7", "vit:32,2,2,7,4", "vit:32,2,2,7,4"),
            ("vit:32,2,2,7,2,post", "vit:32,2,2,7,2,post", "vit:32,2,2,7,2,post"),
            ("vit:32,2,2,7,2,pre", "vit:32,2,2,7,2", "vit:32,2,2,7,2"),
        ] {
            let arch: Arch = text.parse().unwrap();
            assert_eq!(arch.to_string(), full, "{text}");
            assert_eq!(arch.short(), short, "{text}");
            assert_eq!(full.parse::<Arch>().unwrap(), arch);
            assert_eq!(short.parse::<Arch>().unwrap(), arch);
        }
        for bad in [
            "",
            "vgg:M",
            "vgg:0",
            "resnet:1,2",
            "seed-cnn:x",
            "lstm:1,2,3",
            "transformer",
            "vit:30,2,4,4",
            "vit:0,2,2,4",
            "vit:64,4,4",
            "vit:64,100,4,4",
            "vit:64,4,4,4,4,sideways",
        ] {
            assert!(bad.parse::<Arch>().is_err(), "{bad}");
        }
    }
}
