//! Weights from a local safetensors file (nothing is downloaded): a backbone that takes
//! pretrained weights names how the file's tensor names map to its own
//! ([`crate::BackboneConfig::pretrained_names`]), and [`load_pretrained`] copies every
//! tensor whose mapped name and shape match a parameter, leaving the rest as initialised.
//!
//! For [`crate::deeplab::DeepLab`] ([`torchvision_deeplab`]): a torchvision DeepLabV3
//! checkpoint (`backbone.*`, `classifier.*`; `aux_classifier.*` is not used) loads as it is
//! named; a torchvision ImageNet ResNet (`conv1.weight`, `layer1.0.bn1.running_mean`, ...)
//! loads into `backbone.*`, its `fc.*` classifier left out. `num_batches_tracked` counters
//! are skipped. A head whose class count differs (torchvision's 21 classes against our one
//! logit) keeps its fresh initialisation and is reported. Convert a `.pth` once with
//! `safetensors.torch.save_file(torch.load(path), "weights.safetensors")`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;
use genseg_nn::params::ParamStore;

/// Maps a checkpoint's tensor name to the model's parameters it initialises (none: not
/// used by the model; several: one tensor seeds more than one parameter).
pub type NameMapping = fn(&str) -> Vec<String>;

/// torchvision's DeepLabV3 and ResNet names → [`crate::deeplab::DeepLab`]'s.
pub fn torchvision_deeplab(name: &str) -> Vec<String> {
    if name.ends_with("num_batches_tracked")
        || name.starts_with("aux_classifier.")
        || name.starts_with("fc.")
    {
        return Vec::new();
    }
    if name.starts_with("backbone.") || name.starts_with("classifier.") {
        return vec![name.to_string()];
    }
    vec![format!("backbone.{name}")]
}

/// What [`load_pretrained`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PretrainedReport {
    /// Parameters (and BatchNorm statistics) copied from the file.
    pub loaded: usize,
    /// The model's tensors the file did not provide (kept as initialised).
    pub kept_fresh: Vec<String>,
    /// The file's tensors not used, each with the reason.
    pub skipped: Vec<String>,
}

impl std::fmt::Display for PretrainedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tensor(s) loaded, {} kept as initialised",
            self.loaded,
            self.kept_fresh.len()
        )?;
        if !self.kept_fresh.is_empty() {
            write!(f, " ({})", abbreviate(&self.kept_fresh))?;
        }
        if !self.skipped.is_empty() {
            write!(
                f,
                ", {} of the file's not used ({})",
                self.skipped.len(),
                abbreviate(&self.skipped)
            )?;
        }
        Ok(())
    }
}

/// The first few entries of a long list.
fn abbreviate(items: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut text = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        text.push_str(&format!(", ... {} more", items.len() - SHOWN));
    }
    text
}

/// Copies the tensors of the safetensors file `path` into the variables of `store` under
/// `prefix` (the model's `VarBuilder` prefix; empty for none), names mapped by `mapping`.
/// An error names the file when it cannot be read or when nothing in it fits the model.
pub fn load_pretrained(
    store: &ParamStore,
    prefix: &str,
    path: &Path,
    mapping: NameMapping,
) -> Result<PretrainedReport> {
    let file = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading pretrained weights {}", path.display()))?;
    let full = |name: &str| match prefix {
        "" => name.to_string(),
        p => format!("{p}.{name}"),
    };
    let mut report = PretrainedReport::default();
    let mut selected = BTreeMap::new();
    let mut names: Vec<&String> = file.keys().collect();
    names.sort();
    for name in names {
        let tensor = &file[name];
        let targets = mapping(name);
        if targets.is_empty() {
            report
                .skipped
                .push(format!("{name} (not part of the model)"));
            continue;
        }
        // Used when it fits one of its targets; otherwise the first reason is reported.
        let mut reason = None;
        for ours in targets.iter().map(|t| full(t)) {
            match store.get(&ours) {
                Some(var) if var.shape() == tensor.shape() => {
                    selected.insert(ours, tensor.clone());
                }
                Some(var) => {
                    reason.get_or_insert(format!(
                        "{name} (shape {:?}, the model's {:?})",
                        tensor.dims(),
                        var.dims()
                    ));
                }
                None => {
                    reason.get_or_insert(format!("{name} (no such parameter)"));
                }
            }
        }
        if !targets.iter().any(|t| selected.contains_key(&full(t))) {
            report.skipped.extend(reason);
        }
    }
    anyhow::ensure!(
        !selected.is_empty(),
        "pretrained weights {}: none of its {} tensor(s) fits the model (expected a \
         torchvision checkpoint; first names: {})",
        path.display(),
        file.len(),
        abbreviate(&report.skipped)
    );
    report.loaded = selected.len();
    let under = format!("{prefix}.");
    report.kept_fresh = store
        .names()
        .into_iter()
        .filter(|name| prefix.is_empty() || name.starts_with(&under))
        .filter(|name| !selected.contains_key(name))
        .collect();
    store
        .load_named_tensors(&selected, false)
        .with_context(|| format!("loading pretrained weights {}", path.display()))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SegModel;
    use crate::deeplab::{Decoder, DeepLab, DeepLabConfig, Encoder};
    use candle_core::{DType, Tensor};

    fn small() -> DeepLabConfig {
        DeepLabConfig {
            in_channels: 1,
            encoder: Encoder::Resnet18,
            decoder: Decoder::V3,
            aspp_channels: 8,
            ..DeepLabConfig::default()
        }
    }

    /// A checkpoint written the way torchvision names an ImageNet ResNet-18, from a model
    /// of ours with other weights: every encoder tensor and BatchNorm statistic lands, the
    /// head keeps its initialisation, `fc` and `num_batches_tracked` are left out.
    #[test]
    fn a_torchvision_resnet_checkpoint_fills_the_encoder() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let source = ParamStore::new(7, DType::F32, &Device::Cpu);
        DeepLab::new(&small(), source.var_builder().pp("backbone_src"))?;
        let mut file: std::collections::HashMap<String, Tensor> = source
            .named_tensors()?
            .into_iter()
            .filter_map(|(name, tensor)| {
                let name = name.strip_prefix("backbone_src.backbone.")?;
                Some((name.to_string(), tensor))
            })
            .collect();
        let encoder_tensors = file.len();
        file.insert(
            "fc.weight".into(),
            Tensor::zeros((1000, 512), DType::F32, &Device::Cpu)?,
        );
        file.insert(
            "bn1.num_batches_tracked".into(),
            Tensor::new(3i64, &Device::Cpu)?,
        );
        let path = dir.path().join("resnet18.safetensors");
        candle_core::safetensors::save(&file, &path)?;

        let store = ParamStore::new(1, DType::F32, &Device::Cpu);
        let model = DeepLab::new(&small(), store.var_builder().pp("seg"))?;
        let head = |store: &ParamStore| store.get("seg.classifier.4.weight").expect("head");
        let head_before = head(&store).as_tensor().copy()?;
        let report = load_pretrained(&store, "seg", &path, torchvision_deeplab)?;
        assert_eq!(report.loaded, encoder_tensors);
        assert_eq!(report.skipped.len(), 2, "{report}");
        assert!(
            report
                .kept_fresh
                .iter()
                .all(|n| n.starts_with("seg.classifier."))
        );
        let loaded = store.named_tensors()?;
        for (name, tensor) in &file {
            for ours in torchvision_deeplab(name) {
                let diff = (&loaded[&format!("seg.{ours}")] - tensor)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert_eq!(diff, 0.0, "{name}");
            }
        }
        let head_after = head(&store).as_tensor().copy()?;
        assert_eq!(
            (head_after - &head_before)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?,
            0.0
        );
        let x = Tensor::rand(0f32, 1.0, (1, 1, 32, 32), &Device::Cpu)?;
        assert_eq!(model.forward_t(&x, false)?.dims(), &[1, 1, 32, 32]);
        Ok(())
    }

    #[test]
    fn a_torchvision_deeplab_checkpoint_loads_by_name_and_a_wrong_head_is_reported() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let source = ParamStore::new(7, DType::F32, &Device::Cpu);
        let mut cfg = small();
        cfg.out_channels = 21;
        DeepLab::new(&cfg, source.var_builder())?;
        let mut file: std::collections::HashMap<String, Tensor> =
            source.named_tensors()?.into_iter().collect();
        file.insert(
            "aux_classifier.0.weight".into(),
            Tensor::zeros((8, 256, 3, 3), DType::F32, &Device::Cpu)?,
        );
        let path = dir.path().join("deeplab.safetensors");
        candle_core::safetensors::save(&file, &path)?;
        let store = ParamStore::new(1, DType::F32, &Device::Cpu);
        DeepLab::new(&small(), store.var_builder())?;
        let report = load_pretrained(&store, "", &path, torchvision_deeplab)?;
        // The 21-class logit layer (weight and bias) and the aux head are not used.
        assert_eq!(report.loaded, file.len() - 3, "{report}");
        assert_eq!(
            report.kept_fresh,
            ["classifier.4.bias", "classifier.4.weight"]
        );
        assert!(report.to_string().contains("shape [21"), "{report}");
        Ok(())
    }

    #[test]
    fn unreadable_or_unrelated_files_are_named_errors() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = ParamStore::new(1, DType::F32, &Device::Cpu);
        DeepLab::new(&small(), store.var_builder())?;
        let missing = dir.path().join("missing.safetensors");
        let err = format!(
            "{:#}",
            load_pretrained(&store, "", &missing, torchvision_deeplab).unwrap_err()
        );
        assert!(err.contains("missing.safetensors"), "{err}");
        let garbage = dir.path().join("garbage.safetensors");
        std::fs::write(&garbage, b"not safetensors")?;
        let err = format!(
            "{:#}",
            load_pretrained(&store, "", &garbage, torchvision_deeplab).unwrap_err()
        );
        assert!(err.contains("garbage.safetensors"), "{err}");
        let unrelated = dir.path().join("unrelated.safetensors");
        let mut file = std::collections::HashMap::new();
        file.insert(
            "fc.weight".to_string(),
            Tensor::zeros((2, 2), DType::F32, &Device::Cpu)?,
        );
        candle_core::safetensors::save(&file, &unrelated)?;
        let err = format!(
            "{:#}",
            load_pretrained(&store, "", &unrelated, torchvision_deeplab).unwrap_err()
        );
        assert!(
            err.contains("unrelated.safetensors") && err.contains("none of its 1"),
            "{err}"
        );
        Ok(())
    }
}
