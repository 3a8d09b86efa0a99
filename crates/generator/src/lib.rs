//! genseg-generator: GenSeg's conditional image generator (spec §2–§3).
//!
//! GenSeg synthesises training images from (augmented) segmentation masks with a pix2pix
//! conditional GAN whose up-convolutions are *searchable*: each mixes three candidate
//! transposed convolutions with softmax weights of learnable architecture variables α.
//!
//! - [`generator::Pix2PixGenerator`] (built from a serde [`generator::GeneratorConfig`] and a
//!   candle `VarBuilder`) is pix2pix's U-Net, mask `[B, 1, H, W]` → image `[B, 1 or 3, H, W]`
//!   in `(-1, 1)`; its depth follows the image size (8 levels for 256 px). Its
//!   `forward_t(mask, train, rng)` takes the seeded RNG that draws the dropout masks.
//! - [`mixed::MixedUpConv`] / [`mixed::MixedDownConv`] are the searchable cells and
//!   [`mixed::ArchWeights`] the α tables they read. α lives in the same parameter store as the
//!   weights (so checkpoints carry it) under its own prefix; the generator's `param_groups()`
//!   names the `"weights"` and `"arch"` groups so that GenSeg's levels step them separately.
//!   Cells compute in a fused form (one 8×8 convolution, equal values and gradients).
//! - [`discriminator::PatchDiscriminator`] is the 70×70 PatchGAN judging `concat(mask, image)`.
//! - [`loss`] has the pix2pix objectives: [`loss::gan_loss`] (vanilla or least squares),
//!   [`loss::generator_loss`] (GAN + 100·L1) and [`loss::discriminator_loss`].
//! - [`postprocess::PostProcessor`] turns raw generator output into segmentation inputs:
//!   batch min-max to `[0, 1]`, then per-dataset 8-bit steps ([`photometric`]) — equalisation
//!   and gamma for X-ray, torchvision's photometric chain for RGB — with the gradient either
//!   detached (the reference) or passed straight through.
//!
//! - [`pix2pix::Pix2Pix`] trains the pair (networks, discriminator optimizer and step, the
//!   generator's objective), for pre-training and for GenSeg's first level alike;
//!   [`ssim`] scores generated images against real ones.
//!
//! How they meet in one pix2pix step (spec §1.7): `fake = G(m)`; the discriminator steps on
//! `discriminator_loss(D(m, fake.detach()), D(m, x))`, the generator on
//! `generator_loss(D(m, fake), fake, x)`; the segmentation side receives
//! `PostProcessor::apply(G(aug(m)))`.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use genseg_generator::discriminator::{DiscriminatorConfig, PatchDiscriminator};
//! use genseg_generator::generator::{GeneratorConfig, Pix2PixGenerator};
//! use genseg_generator::loss::{LossConfig, discriminator_loss, generator_loss};
//! use genseg_generator::postprocess::{PostProcessConfig, PostProcessor};
//! use genseg_nn::params::ParamStore;
//! use genseg_nn::rng::SeededRng;
//!
//! let store = ParamStore::new(0, DType::F32, &Device::Cpu);
//! let g_cfg = GeneratorConfig { ngf: 2, image_size: 32, ..GeneratorConfig::default() };
//! let netg = Pix2PixGenerator::new(&g_cfg, store.var_builder().pp("netG"))?;
//! let d_cfg = DiscriminatorConfig { ndf: 2, ..DiscriminatorConfig::default() };
//! let netd = PatchDiscriminator::new(&d_cfg, store.var_builder().pp("netD"))?;
//! assert_eq!(netg.param_groups()[1], ("arch", "netG.arch".to_string()));
//!
//! let mut rng = SeededRng::new(7);
//! let mask = Tensor::zeros((2, 1, 32, 32), DType::F32, &Device::Cpu)?;
//! let real = Tensor::ones((2, 1, 32, 32), DType::F32, &Device::Cpu)?;
//! let fake = netg.forward_t(&mask, true, &mut rng)?;
//!
//! let d_loss = discriminator_loss(
//!     &netd.forward_t(&mask, &fake.detach(), true)?,
//!     &netd.forward_t(&mask, &real, true)?,
//!     LossConfig::default().gan_mode,
//! )?;
//! let g_loss = generator_loss(&netd.forward_t(&mask, &fake, true)?, &fake, &real, &LossConfig::default())?;
//! assert!(g_loss.total.to_scalar::<f32>()? > d_loss.total.to_scalar::<f32>()?);
//!
//! let post = PostProcessor::new(PostProcessConfig::xray())?;
//! let synthetic = post.apply(&fake, &mut rng)?;
//! assert_eq!(synthetic.dims(), &[2, 1, 32, 32]);
//! # Ok::<(), anyhow::Error>(())
//! ```

#![warn(missing_docs)]

pub mod discriminator;
pub mod generator;
pub mod loss;
pub mod mixed;
pub mod photometric;
pub mod pix2pix;
pub mod postprocess;
pub mod ssim;

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use genseg_nn::gradcheck::assert_all_params_receive_gradient;
    use genseg_nn::params::ParamStore;
    use genseg_nn::rng::SeededRng;

    use crate::discriminator::{DiscriminatorConfig, PatchDiscriminator};
    use crate::generator::{GeneratorConfig, Pix2PixGenerator};
    use crate::loss::{LossConfig, generator_loss};
    use crate::mixed::MixedForm;

    /// Every generator parameter, α included, gets a non-zero gradient from the pix2pix
    /// generator loss, in both cell forms and with searchable down cells.
    #[test]
    fn generator_loss_reaches_every_parameter() -> anyhow::Result<()> {
        for form in [MixedForm::Fused, MixedForm::Branches] {
            let store = ParamStore::new(11, DType::F32, &Device::Cpu);
            let cfg = GeneratorConfig {
                ngf: 2,
                image_size: 64,
                out_channels: 3,
                searchable_down: true,
                mixed_form: form,
                ..GeneratorConfig::default()
            };
            let netg = Pix2PixGenerator::new(&cfg, store.var_builder().pp("netG"))?;
            let d_cfg = DiscriminatorConfig {
                in_channels: 4,
                ndf: 2,
                ..DiscriminatorConfig::default()
            };
            let netd = PatchDiscriminator::new(&d_cfg, store.var_builder().pp("netD"))?;
            let mask = Tensor::rand(0f32, 1., (2, 1, 64, 64), &Device::Cpu)?
                .ge(0.5)?
                .to_dtype(DType::F32)?;
            let real = Tensor::rand(0f32, 1., (2, 3, 64, 64), &Device::Cpu)?;
            let fake = netg.forward_t(&mask, true, &mut SeededRng::new(3))?;
            let pred = netd.forward_t(&mask, &fake, true)?;
            let loss = generator_loss(&pred, &fake, &real, &LossConfig::default())?;
            let vars = store.trainable_vars_with_prefix("netG");
            assert!(vars.iter().any(|(n, _)| n == "netG.arch.upconv"));
            assert!(vars.iter().any(|(n, _)| n == "netG.arch.conv"));
            assert_all_params_receive_gradient(&loss.total, &vars)?;
        }
        Ok(())
    }
}
