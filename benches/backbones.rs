//! Segmentation backbone throughput on this machine's CPU (images/s):
//! forward (eval mode) and a full training step (forward + backward +
//! RMSprop step), at the `cpu` profile size and the reference `paper` size.
//!
//! `cargo bench --bench backbones` (all) or `cargo bench --bench backbones -- cpu`.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use genseg_backbones::SegModel;
use genseg_backbones::unet::UNet;
use genseg_nn::params::ParamStore;
use genseg_pipelines::config::{Profile, RunConfig};

fn bench_unet(c: &mut Criterion) {
    let device = Device::Cpu;
    // (label, profile, input channels)
    for (label, profile, channels) in [("cpu", Profile::Cpu, 1usize), ("paper", Profile::Paper, 3)]
    {
        let cfg = RunConfig::profile(profile);
        let mut unet_cfg = cfg.model.unet.clone();
        unet_cfg.in_channels = channels;
        let (batch, size) = (cfg.train.batch_size, cfg.data.size as usize);
        let store = ParamStore::new(0, DType::F32, &device);
        let model = UNet::new(&unet_cfg, store.var_builder()).expect("valid config");
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

        let mut group = c.benchmark_group(format!(
            "unet-{label}-b{}-w{}-{size}px",
            batch, unet_cfg.base_width
        ));
        group.throughput(Throughput::Elements(batch as u64));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(if profile == Profile::Paper {
            60
        } else {
            10
        }));
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

criterion_group!(benches, bench_unet);
criterion_main!(benches);
