//! Segmentation backbone throughput on this machine's CPU (images/s): forward (eval mode)
//! and a full training step (forward + backward + the profile's optimizer step), per
//! backbone, at the `cpu` profile size and the reference `paper` size (224 px for
//! SwinUnet).
//!
//! `cargo bench --bench backbones` (all) or e.g. `cargo bench --bench backbones -- deeplab`.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use genseg_backbones::deeplab::{Decoder, Encoder};
use genseg_nn::params::ParamStore;
use genseg_pipelines::config::{ModelKind, Profile, RunConfig};

/// One benchmarked backbone: its group name and its configuration.
fn backbones() -> Vec<(String, RunConfig)> {
    let mut all = Vec::new();
    for (label, profile, channels) in [("cpu", Profile::Cpu, 1usize), ("paper", Profile::Paper, 3)]
    {
        let mut cfg = RunConfig::profile(profile);
        cfg.model.fit_to_data(channels);
        all.push((
            format!("unet-{label}-w{}", cfg.model.unet.base_width),
            cfg.clone(),
        ));
        let paper = profile == Profile::Paper;
        // CPU-sized encoders at the cpu profile; the reference's ResNet-50 at paper size.
        let deeplabs = match paper {
            false => vec![
                (Encoder::Resnet18, Decoder::V3, 8),
                (Encoder::Resnet18, Decoder::V3Plus, 16),
            ],
            true => vec![(Encoder::Resnet50, Decoder::V3, 8)],
        };
        for (encoder, decoder, stride) in deeplabs {
            let mut cfg = cfg.clone();
            cfg.model.kind = ModelKind::Deeplab;
            let d = &mut cfg.model.deeplab;
            (d.encoder, d.decoder, d.output_stride) = (encoder, decoder, stride);
            cfg.model.fit_to_data(channels);
            let name = format!("deeplab{decoder:?}-{encoder:?}-os{stride}-{label}").to_lowercase();
            all.push((name, cfg));
        }
        // SwinUnet: the reference at its 224 px; at the cpu profile's 64 px, 4x4 windows.
        let mut swin = cfg.clone();
        swin.model.kind = ModelKind::SwinUnet;
        match paper {
            true => swin.data.size = 224,
            false => swin.model.swin_unet.window_size = 4,
        }
        swin.model.swin_unet.image_size = swin.data.size as usize;
        swin.model.fit_to_data(channels);
        all.push((format!("swin_unet-{label}"), swin));
    }
    all
}

fn bench_backbones(c: &mut Criterion) {
    let device = Device::Cpu;
    for (name, cfg) in backbones() {
        let channels = cfg.model.in_channels();
        let (batch, size) = (cfg.train.batch_size, cfg.data.size as usize);
        let store = ParamStore::new(0, DType::F32, &device);
        let model = cfg.model.build(store.var_builder()).expect("valid config");
        let x = Tensor::rand(0f32, 1.0, (batch, channels, size, size), &device).expect("input");
        let y = Tensor::rand(0f32, 1.0, (batch, 1, size, size), &device)
            .and_then(|t| t.ge(0.5))
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("target");
        let mut opt = cfg
            .train
            .build_optimizer(store.trainable_vars())
            .expect("optimizer");
        let loss = cfg.train.loss.clone();

        let mut group = c.benchmark_group(format!("{name}-b{batch}-{size}px"));
        group.throughput(Throughput::Elements(batch as u64));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(if size > 64 { 60 } else { 10 }));
        group.bench_function("forward", |b| {
            b.iter(|| model.forward_t(&x, false).expect("forward"))
        });
        group.bench_function("train_step", |b| {
            b.iter(|| {
                let l = loss
                    .forward(&model.forward_t(&x, true).expect("forward"), &y)
                    .expect("loss");
                opt.step(&l.backward().expect("backward")).expect("step");
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench_backbones);
criterion_main!(benches);
