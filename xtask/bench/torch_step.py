"""PyTorch twin of `genseg bench-step` (crates/cli/src/bench_step.rs): the same networks,
data, loss and optimizer, timed the same way, printing the same JSON line with
"side": "torch". `cargo xtask bench-vs-torch` runs it from target/bench-venv.

Networks, mirrored layer for layer (the parameter counts must equal genseg's):
- unet: crates/backbones/src/unet.rs at depth 4 with transposed-conv up-sampling, i.e.
  milesial's Pytorch-UNet (bilinear=False).
- pix2pix: crates/generator/src/generator.rs with its default cells
  (crates/generator/src/mixed.rs): every up-convolution a searchable cell computed in the
  fused form, one 8x8 stride-2 transposed convolution (padding 3) whose kernel is the
  softmax(alpha)-weighted sum of the three candidate kernels (4x4, 6x6, 8x8) zero-padded to
  8x8 and centred; plain 4x4 stride-2 down convolutions; pix2pix init N(0, 0.02).

FLOPs are counted by torch itself (FlopCounterMode, convolutions only) on one forward and
multiplied by 3 for forward + backward, the convention of genseg's count, so the two
counts check each other.
"""

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

LEARNING_RATE = 1e-4  # genseg's bench_step::LEARNING_RATE

# ---------------------------------------------------------------- UNet (unet.rs)


class DoubleConv(nn.Module):
    """(Conv 3x3 p1 no-bias -> BatchNorm -> ReLU) x 2."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.double_conv(x)


class Up(nn.Module):
    """ConvTranspose 2x2 s2 (c_in -> c_in/2, bias), zero-pad to the skip, cat [skip, up],
    DoubleConv(c_in -> c_out)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_in // 2, 2, stride=2)
        self.conv = DoubleConv(c_in, c_out)

    def forward(self, x, skip):
        up = self.up(x)
        dh = skip.shape[2] - up.shape[2]
        dw = skip.shape[3] - up.shape[3]
        up = F.pad(up, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
        return self.conv(torch.cat([skip, up], dim=1))


class UNet(nn.Module):
    def __init__(self, in_channels, base, depth=4, out_channels=1):
        super().__init__()
        width = lambda level: base << level  # noqa: E731
        self.inc = DoubleConv(in_channels, width(0))
        self.downs = nn.ModuleList(
            DoubleConv(width(level - 1), width(level)) for level in range(1, depth + 1)
        )
        self.ups = nn.ModuleList(
            Up(width(level), width(level - 1)) for level in range(depth, 0, -1)
        )
        self.outc = nn.Conv2d(width(0), out_channels, 1)

    def forward(self, images):
        skips = []
        x = self.inc(images)
        for down in self.downs:
            skips.append(x)
            x = down(F.max_pool2d(x, 2))
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)
        return self.outc(x)


def lungs_loss(logits, masks):
    """BCE-with-logits (mean) + 1 - soft Dice over the batch as one volume, eps 1e-6
    (genseg_backbones::loss::SegLoss::lungs)."""
    probs = torch.sigmoid(logits)
    inter = (probs * masks).sum()
    sets = probs.sum() + masks.sum()
    sets = torch.where(sets == 0, inter, sets)
    dice = (2 * inter + 1e-6) / (sets + 1e-6)
    return F.binary_cross_entropy_with_logits(logits, masks) + (1 - dice)


# ------------------------------------------------- pix2pix generator (generator.rs)

# (kernel, padding) of the candidates, stride 2 (mixed.rs CANDIDATES), in alpha column order.
CANDIDATES = [(4, 1), (6, 2), (8, 3)]
FUSED_KERNEL, FUSED_PADDING = 8, 3
LEAKY_SLOPE = 0.2
FIRST_DROPOUT_LEVEL = 4


class MixedUpConv(nn.Module):
    """Searchable up cell, fused form: one transposed conv with the alpha-weighted,
    centre-aligned 8x8 kernel (and alpha-weighted bias)."""

    def __init__(self, c_in, c_out, bias, row):
        super().__init__()
        self.ops = nn.ModuleList(
            nn.ConvTranspose2d(c_in, c_out, k, stride=2, padding=p, bias=bias)
            for k, p in CANDIDATES
        )
        self.row = row

    def forward(self, x, alphas):
        weights = F.softmax(alphas[self.row], dim=-1)
        kernel = 0
        bias = 0 if self.ops[0].bias is not None else None
        for w, op, (k, _) in zip(weights, self.ops, CANDIDATES):
            off = (FUSED_KERNEL - k) // 2
            kernel = kernel + w * F.pad(op.weight, [off, off, off, off])
            if bias is not None:
                bias = bias + w * op.bias
        return F.conv_transpose2d(x, kernel, bias, stride=2, padding=FUSED_PADDING)


class Level(nn.Module):
    """One skip block, level 0 outermost (the table in generator.rs's module docs)."""

    def __init__(self, cfg, level, depth):
        super().__init__()
        ngf, outermost, innermost = cfg["ngf"], level == 0, level == depth - 1
        inner = ngf << min(level, 3)
        outer = cfg["out_channels"] if outermost else ngf << min(level - 1, 3)
        down_in = cfg["in_channels"] if outermost else outer
        up_in = inner if innermost else 2 * inner
        self.down = nn.Conv2d(down_in, inner, 4, stride=2, padding=1, bias=False)
        self.down_norm = None if outermost or innermost else nn.BatchNorm2d(inner)
        self.up = MixedUpConv(up_in, outer, bias=outermost, row=depth - 1 - level)
        self.up_norm = None if outermost else nn.BatchNorm2d(outer)
        self.dropout = not outermost and not innermost and level >= FIRST_DROPOUT_LEVEL


class Pix2PixGenerator(nn.Module):
    def __init__(self, in_channels, out_channels, ngf, image_size, dropout=0.5):
        super().__init__()
        depth = image_size.bit_length() - 1
        cfg = dict(in_channels=in_channels, out_channels=out_channels, ngf=ngf)
        self.alphas = nn.Parameter(1e-3 * torch.randn(depth, len(CANDIDATES)))
        self.levels = nn.ModuleList(Level(cfg, level, depth) for level in range(depth))
        self.p = dropout
        pix2pix_init(self)

    def forward(self, mask):
        # skips[i] is what level i concatenates: lrelu(x_i), the reference's in-place quirk.
        skips, x = [], mask
        for i, level in enumerate(self.levels):
            a = x if i == 0 else F.leaky_relu(x, LEAKY_SLOPE)
            skips.append(None if i == 0 else a)
            x = level.down(a)
            if level.down_norm is not None:
                x = level.down_norm(x)
        for level, skip in zip(reversed(self.levels), reversed(skips)):
            y = level.up(F.relu(x), self.alphas)
            if skip is None:
                return torch.tanh(y)
            y = level.up_norm(y)
            if level.dropout:
                y = F.dropout(y, self.p, training=self.training)
            x = torch.cat([skip, y], dim=1)
        raise ValueError("generator: no levels")


def pix2pix_init(net):
    """init_weights(net, 'normal', 0.02): conv weights N(0, 0.02), biases 0, BatchNorm
    gamma N(1, 0.02), beta 0."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------ the step


def build(args):
    """The model, its fixed batch and a closure computing the training loss."""
    b, c, s = args.batch, args.channels, args.size
    masks = (torch.rand(b, 1, s, s) >= 0.5).float()
    if args.model == "unet":
        model = UNet(c, args.base)
        images = torch.rand(b, c, s, s)
        return model, images, lambda out: lungs_loss(out, masks)
    model = Pix2PixGenerator(1, c, args.base, s)
    targets = torch.rand(b, c, s, s) * 2 - 1
    return model, masks, lambda out: (out - targets).abs().mean()


def forward_conv_flop(model, inputs):
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(inputs)
    counts = counter.get_flop_counts().get("Global", {})
    return out, sum(v for op, v in counts.items() if "convolution" in str(op))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["unet", "pix2pix"], required=True)
    parser.add_argument("--base", type=int, default=64)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, inputs, loss_of = build(args)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

    def step(count_flop=False):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if count_flop:
            out, flop = forward_conv_flop(model, inputs)
        else:
            out, flop = model(inputs), None
        loss_of(out).backward()
        optimizer.step()
        return time.perf_counter() - start, flop

    # Count on the first warm-up step (untimed); without one, on a separate forward.
    if args.warmup > 0:
        forward_flop = step(count_flop=True)[1]
        for _ in range(args.warmup - 1):
            step()
    else:
        with torch.no_grad():
            forward_flop = forward_conv_flop(model, inputs)[1]
    step_seconds = [step()[0] for _ in range(args.steps)]

    config = {k: getattr(args, k) for k in
              ["model", "base", "channels", "size", "batch", "steps", "warmup", "seed"]}
    print(json.dumps({
        "side": "torch",
        "config": config,
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "step_seconds": step_seconds,
        # ru_maxrss is in KiB on Linux.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "gflop_per_step": 3 * forward_flop / 1e9,
        "torch_version": torch.__version__,
    }))


if __name__ == "__main__":
    main()
