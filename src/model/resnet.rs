//! ResNet descriptions: CIFAR basic-block ResNets of depth 6n+2, bottleneck ResNets of depth
//! 9n+2, and the ImageNet-style bottleneck stacks 3-4-23-3 (101) and 3-8-36-3 (152) with a
//! 3x3 stem of 64 channels for small inputs. Input channels and classes come from the data.

use std::fmt;
use std::str::FromStr;

use super::{LayerSpec, ModelSpec};
use crate::error::{Error, Result};
use crate::kernels::shortcut::ChannelPad;
use crate::layers::bottleneck::EXPANSION;

/// Which family of ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Basic blocks, depth 6n+2 (20, 32, 44, 56, 110, ...), option-A shortcuts.
    ResNet,
    /// Bottleneck blocks, depth 9n+2 (164, ...), projection shortcuts.
    ResNetBottleneck,
    /// ImageNet-style bottleneck stacks 3-4-23-3 with a 3x3 stem of 64 channels.
    ResNet101,
    /// ImageNet-style bottleneck stacks 3-8-36-3 with a 3x3 stem of 64 channels.
    ResNet152,
}

impl FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Arch> {
        match s.to_ascii_lowercase().as_str() {
            "resnet" | "resnet-basic" => Ok(Arch::ResNet),
            "resnet-bottleneck" | "bottleneck" => Ok(Arch::ResNetBottleneck),
            "resnet101" => Ok(Arch::ResNet101),
            "resnet152" => Ok(Arch::ResNet152),
            _ => Err(Error::InvalidConfig {
                op: "model",
                detail: format!("unknown architecture '{s}'; choose resnet, resnet-bottleneck, resnet101 or resnet152"),
            }),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::ResNet => "resnet",
            Arch::ResNetBottleneck => "resnet-bottleneck",
            Arch::ResNet101 => "resnet101",
            Arch::ResNet152 => "resnet152",
        })
    }
}

/// What to build.
#[derive(Debug, Clone, PartialEq)]
pub struct ResNetConfig {
    pub arch: Arch,
    /// Depth for `ResNet` (6n+2) and `ResNetBottleneck` (9n+2); ignored by 101/152.
    pub depth: usize,
    /// Per-sample input shape [C, H, W].
    pub input: Vec<usize>,
    pub classes: usize,
    /// Where basic blocks' option-A shortcuts put their zero channels.
    pub shortcut_pad: ChannelPad,
}

impl ResNetConfig {
    /// A basic-block ResNet of `depth` (6n+2) for per-sample inputs `input` and `classes`
    /// classes, with the option-A shortcut's zero channels on both sides.
    pub fn basic(depth: usize, input: &[usize], classes: usize) -> ResNetConfig {
        ResNetConfig { arch: Arch::ResNet, depth, input: input.to_vec(), classes, shortcut_pad: ChannelPad::Both }
    }
}

fn conv(name: &str, cin: usize, cout: usize) -> LayerSpec {
    LayerSpec::Conv { name: name.into(), in_channels: cin, out_channels: cout, kernel: 3, stride: 1, pad: 1 }
}

/// Builds the flat layer list of `cfg`.
pub fn build(cfg: &ResNetConfig) -> Result<ModelSpec> {
    let [c, h, w]: [usize; 3] = cfg.input.as_slice().try_into().map_err(|_| Error::ShapeMismatch {
        op: "model",
        detail: format!("input must be [C, H, W], got {:?}", cfg.input),
    })?;
    if c == 0 || h < 4 || w < 4 {
        return Err(Error::ShapeMismatch { op: "model", detail: format!("input {:?} is too small", cfg.input) });
    }
    if cfg.classes < 2 {
        return Err(Error::InvalidConfig { op: "model", detail: format!("{} classes: need at least 2", cfg.classes) });
    }
    let bad_depth = |rule: &str| Error::InvalidConfig {
        op: "model",
        detail: format!("depth {} is not valid for {}: it must be {rule}", cfg.depth, cfg.arch),
    };
    let (stem, groups): (usize, Vec<(usize, usize, usize)>) = match cfg.arch {
        Arch::ResNet => {
            if cfg.depth < 8 || !(cfg.depth - 2).is_multiple_of(6) {
                return Err(bad_depth("6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)"));
            }
            let n = (cfg.depth - 2) / 6;
            (16, vec![(16, n, 1), (32, n, 2), (64, n, 2)])
        }
        Arch::ResNetBottleneck => {
            if cfg.depth < 11 || !(cfg.depth - 2).is_multiple_of(9) {
                return Err(bad_depth("9n+2 with n >= 1 (11, 20, 29, ..., 164, ...)"));
            }
            let n = (cfg.depth - 2) / 9;
            (16, vec![(16, n, 1), (32, n, 2), (64, n, 2)])
        }
        Arch::ResNet101 => (64, vec![(64, 3, 1), (128, 4, 2), (256, 23, 2), (512, 3, 2)]),
        Arch::ResNet152 => (64, vec![(64, 3, 1), (128, 8, 2), (256, 36, 2), (512, 3, 2)]),
    };
    let mut layers =
        vec![conv("conv1", c, stem), LayerSpec::BatchNorm { name: "bn1".into(), channels: stem }, LayerSpec::Relu];
    let mut channels = stem;
    for (g, &(width, blocks, stride)) in groups.iter().enumerate() {
        for b in 0..blocks {
            let name = format!("layer{}.{b}", g + 1);
            let s = if b == 0 { stride } else { 1 };
            if cfg.arch == Arch::ResNet {
                layers.push(LayerSpec::Basic {
                    name,
                    in_channels: channels,
                    out_channels: width,
                    stride: s,
                    shortcut_pad: cfg.shortcut_pad,
                });
                channels = width;
            } else {
                layers.push(LayerSpec::Bottleneck { name, in_channels: channels, planes: width, stride: s });
                channels = width * EXPANSION;
            }
        }
    }
    layers.push(LayerSpec::GlobalAvgPool);
    layers.push(LayerSpec::Linear { name: "linear".into(), in_features: channels, out_features: cfg.classes });
    let depth = match cfg.arch {
        Arch::ResNet101 => 101,
        Arch::ResNet152 => 152,
        _ => cfg.depth,
    };
    let name = match cfg.arch {
        Arch::ResNet => format!("resnet{depth}"),
        Arch::ResNetBottleneck => format!("resnet{depth}-bottleneck"),
        _ => format!("resnet{depth}"),
    };
    let spec = ModelSpec { name, input: cfg.input.clone(), classes: cfg.classes, layers };
    spec.costs()?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_convs(spec: &ModelSpec) -> usize {
        spec.layers
            .iter()
            .map(|l| match l {
                LayerSpec::Conv { .. } => 1,
                LayerSpec::Basic { .. } => 2,
                LayerSpec::Bottleneck { .. } => 3,
                LayerSpec::Linear { .. } => 1,
                _ => 0,
            })
            .sum()
    }

    #[test]
    fn depths_count_weighted_layers() {
        for depth in [8, 20, 32, 44, 56, 110] {
            let s = build(&ResNetConfig::basic(depth, &[3, 32, 32], 10)).unwrap();
            assert_eq!(count_convs(&s), depth, "resnet{depth}");
        }
        let s = build(&ResNetConfig {
            shortcut_pad: Default::default(),
            arch: Arch::ResNetBottleneck,
            depth: 164,
            input: vec![3, 32, 32],
            classes: 100,
        })
        .unwrap();
        assert_eq!(count_convs(&s), 164);
        for (arch, depth) in [(Arch::ResNet101, 101), (Arch::ResNet152, 152)] {
            let s = build(&ResNetConfig {
                shortcut_pad: Default::default(),
                arch,
                depth: 0,
                input: vec![3, 32, 32],
                classes: 10,
            })
            .unwrap();
            assert_eq!(count_convs(&s), depth);
        }
    }

    #[test]
    fn resnet20_has_the_papers_shape_and_size() {
        let s = build(&ResNetConfig::basic(20, &[3, 32, 32], 10)).unwrap();
        // conv, bn, relu, 9 blocks, pool, fc
        assert_eq!(s.layers.len(), 14);
        // 0.27M parameters (He et al. 2016, table 6).
        let p = s.params().unwrap();
        assert!((265_000..=275_000).contains(&p), "{p}");
        let costs = s.costs().unwrap();
        assert_eq!(costs[11].out_shape, vec![64, 8, 8]);
        // Grayscale 28x28 inputs (Fashion-MNIST) work too: 28 -> 14 -> 7.
        let g = build(&ResNetConfig::basic(20, &[1, 28, 28], 10)).unwrap();
        assert_eq!(g.costs().unwrap()[11].out_shape, vec![64, 7, 7]);
    }

    #[test]
    fn bad_depths_and_shapes_are_errors() {
        for depth in [0, 7, 21, 22] {
            let e = build(&ResNetConfig::basic(depth, &[3, 32, 32], 10)).unwrap_err();
            assert!(e.to_string().contains("6n+2"), "{e}");
        }
        let e = build(&ResNetConfig {
            shortcut_pad: Default::default(),
            arch: Arch::ResNetBottleneck,
            depth: 20,
            input: vec![3, 32, 32],
            classes: 10,
        });
        assert!(e.is_ok(), "20 = 9*2+2 is a valid bottleneck depth");
        let e = build(&ResNetConfig {
            shortcut_pad: Default::default(),
            arch: Arch::ResNetBottleneck,
            depth: 57,
            input: vec![3, 32, 32],
            classes: 10,
        })
        .unwrap_err();
        assert!(e.to_string().contains("9n+2"), "{e}");
        assert!(build(&ResNetConfig::basic(20, &[3, 32], 10)).is_err());
        assert!(build(&ResNetConfig::basic(20, &[3, 32, 32], 1)).is_err());
        assert!("resnet9000".parse::<Arch>().is_err());
    }
}
