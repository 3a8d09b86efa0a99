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

- deeplabv3_r50: crates/backbones/src/deeplab.rs, i.e. torchvision's
  deeplabv3_resnet50(num_classes=1, aux_loss=False) itself; 1-channel images repeated to 3.
- swin_unet: crates/backbones/src/swin_unet.rs, i.e. Swin-Unet's SwinTransformerSys
  (HuCaoFighting/Swin-Unet, "expand_first") at the reference configuration, written out
  below; 1-channel images repeated to 3. Input 224.

FLOPs are counted by torch itself (FlopCounterMode) on one forward and multiplied by 3 for
forward + backward, the convention of genseg's count. For unet and pix2pix only the
convolutions are counted, so the two counts check each other; for deeplabv3_r50 and
swin_unet every op FlopCounterMode knows (conv, mm, addmm, bmm, ...) is, and genseg does
not cross-check them ("flop_counted" in the JSON says which).
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


# ------------------------------------------------- Swin-Unet (swin_unet.rs)

SWIN = dict(patch=4, embed=96, depths=(2, 2, 2, 2), heads=(3, 6, 12, 24), window=7,
            mlp_ratio=4, drop_path=0.2, image_size=224)


def drop_path(x, p, training):
    """timm's per-sample stochastic depth (scaled by 1 / keep)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype)).floor_()
    return x.div(keep) * mask


def window_partition(x, ws):
    """[B, H, W, C] -> [B * nW, ws * ws, C]."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows, ws, h, w):
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class WindowAttention(nn.Module):
    def __init__(self, dim, window, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        side = 2 * window - 1
        self.relative_position_bias_table = nn.Parameter(torch.zeros(side * side, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                            indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * side + rel[..., 1])
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, mask=None):
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim, resolution, heads, window, shift, dpr):
        super().__init__()
        if resolution <= window:  # one window of the whole side, no shift
            window, shift = resolution, 0
        self.resolution, self.window, self.shift, self.dpr = resolution, window, shift, dpr
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, SWIN["mlp_ratio"] * dim), nn.GELU(),
                                 nn.Linear(SWIN["mlp_ratio"] * dim, dim))
        mask = None
        if shift > 0:
            img = torch.zeros(1, resolution, resolution, 1)
            cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
            for region, (hs, ws) in enumerate((hs, ws) for hs in cuts for ws in cuts):
                img[:, hs, ws, :] = region
            m = window_partition(img, window).squeeze(-1)
            mask = m.unsqueeze(1) - m.unsqueeze(2)
            mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        self.register_buffer("attn_mask", mask)

    def forward(self, x):
        b, l, c = x.shape
        r = self.resolution
        y = self.norm1(x).view(b, r, r, c)
        if self.shift > 0:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, self.window), self.attn_mask),
                           self.window, r, r)
        if self.shift > 0:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + drop_path(y.reshape(b, l, c), self.dpr, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.dpr, self.training)


class PatchMerging(nn.Module):
    def __init__(self, dim, resolution):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        b, _, c = x.shape
        x = x.view(b, self.resolution, self.resolution, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class PatchExpand(nn.Module):
    """PatchExpand (scale 2: linear C -> 2C, C/2 out) and FinalPatchExpand_X4 (scale 4:
    linear C -> 16C, C out); 'b h w (p1 p2 c) -> b (h p1) (w p2) c', then LayerNorm."""

    def __init__(self, dim, resolution, scale):
        super().__init__()
        self.resolution, self.scale = resolution, scale
        self.out_dim = dim // 2 if scale == 2 else dim
        self.expand = nn.Linear(dim, scale * scale * self.out_dim, bias=False)
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(self, x):
        b = x.shape[0]
        r, s, c = self.resolution, self.scale, self.out_dim
        x = self.expand(x).view(b, r, r, s, s, c).permute(0, 1, 3, 2, 4, 5)
        return self.norm(x.reshape(b, -1, c))


class SwinStage(nn.Module):
    """BasicLayer / BasicLayer_up: the blocks, then an optional down- or up-sampling."""

    def __init__(self, dim, resolution, depth, heads, dprs, sample=None):
        super().__init__()
        w = SWIN["window"]
        self.blocks = nn.ModuleList(SwinBlock(dim, resolution, heads, w, 0 if j % 2 == 0
                                              else w // 2, dprs[j]) for j in range(depth))
        self.sample = sample

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.sample is None else self.sample(x)


class SwinUnet(nn.Module):
    def __init__(self, in_channels, out_channels=1):
        super().__init__()
        e, depths, heads = SWIN["embed"], SWIN["depths"], SWIN["heads"]
        stages, res0 = len(depths), SWIN["image_size"] // SWIN["patch"]
        self.repeat = in_channels == 1
        self.side = SWIN["image_size"]
        self.patch_embed = nn.Conv2d(3 if self.repeat else in_channels, e, SWIN["patch"],
                                     stride=SWIN["patch"])
        self.patch_norm = nn.LayerNorm(e)
        dpr = torch.linspace(0, SWIN["drop_path"], sum(depths)).tolist()
        rates = lambda i: dpr[sum(depths[:i]):sum(depths[:i + 1])]  # noqa: E731
        self.layers = nn.ModuleList(
            SwinStage(e << i, res0 >> i, depths[i], heads[i], rates(i),
                      PatchMerging(e << i, res0 >> i) if i + 1 < stages else None)
            for i in range(stages))
        self.norm = nn.LayerNorm(e << (stages - 1))
        self.layers_up = nn.ModuleList([PatchExpand(e << (stages - 1), res0 >> (stages - 1), 2)])
        self.concat_back_dim = nn.ModuleList([nn.Identity()])
        for i in range(1, stages):
            s = stages - 1 - i
            self.concat_back_dim.append(nn.Linear(2 * (e << s), e << s))
            self.layers_up.append(SwinStage(e << s, res0 >> s, depths[s], heads[s], rates(s),
                                            PatchExpand(e << s, res0 >> s, 2)
                                            if i + 1 < stages else None))
        self.norm_up = nn.LayerNorm(e)
        self.up = PatchExpand(e, res0, SWIN["patch"])
        self.output = nn.Conv2d(e, out_channels, 1, bias=False)
        for m in self.modules():  # the reference's _init_weights
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images):
        x = images.repeat(1, 3, 1, 1) if self.repeat else images
        x = self.patch_norm(self.patch_embed(x).flatten(2).transpose(1, 2))
        skips = []
        for layer in self.layers:
            skips.append(x)
            x = layer(x)
        x = self.norm(x)
        for i, layer in enumerate(self.layers_up):
            if i > 0:
                x = self.concat_back_dim[i](torch.cat([x, skips[len(skips) - 1 - i]], -1))
            x = layer(x)
        x = self.up(self.norm_up(x))
        b, e = x.shape[0], x.shape[-1]
        return self.output(x.view(b, self.side, self.side, e).permute(0, 3, 1, 2))


# ------------------------------------------- DeepLabV3-ResNet50 (deeplab.rs), torchvision


class DeepLabV3R50(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        from torchvision.models.segmentation import deeplabv3_resnet50

        self.repeat = in_channels == 1
        self.net = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=1,
                                      aux_loss=False)

    def forward(self, images):
        return self.net(images.repeat(1, 3, 1, 1) if self.repeat else images)["out"]


# ------------------------------------------------------------------------ the step


# Segmenters: (channels, base) -> network, trained on (images, masks) with the lungs loss.
SEGMENTERS = {
    "unet": lambda c, base: UNet(c, base),
    "deeplabv3_r50": lambda c, _base: DeepLabV3R50(c),
    "swin_unet": lambda c, _base: SwinUnet(c),
}
# Models whose FLOP count is every op's, not the convolutions' only.
ALL_FLOP_MODELS = {"deeplabv3_r50", "swin_unet"}


def build(args):
    """The model, its fixed batch and a closure computing the training loss."""
    b, c, s = args.batch, args.channels, args.size
    masks = (torch.rand(b, 1, s, s) >= 0.5).float()
    if args.model in SEGMENTERS:
        model = SEGMENTERS[args.model](c, args.base)
        images = torch.rand(b, c, s, s)
        return model, images, lambda out: lungs_loss(out, masks)
    model = Pix2PixGenerator(1, c, args.base, s)
    targets = torch.rand(b, c, s, s) * 2 - 1
    return model, masks, lambda out: (out - targets).abs().mean()


def forward_flop(model, inputs, all_ops):
    """One forward and its FLOPs: the convolutions', or with `all_ops` every op's."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(inputs)
    counts = counter.get_flop_counts().get("Global", {})
    return out, sum(v for op, v in counts.items() if all_ops or "convolution" in str(op))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        choices=["unet", "pix2pix", "deeplabv3_r50", "swin_unet"])
    parser.add_argument("--base", type=int, default=64,
                        help="base width (unet, pix2pix); ignored by the others")
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
    all_ops = args.model in ALL_FLOP_MODELS
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

    def step(count_flop=False):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if count_flop:
            out, flop = forward_flop(model, inputs, all_ops)
        else:
            out, flop = model(inputs), None
        loss_of(out).backward()
        optimizer.step()
        return time.perf_counter() - start, flop

    # Count on the first warm-up step (untimed); without one, on a separate forward.
    if args.warmup > 0:
        flop = step(count_flop=True)[1]
        for _ in range(args.warmup - 1):
            step()
    else:
        with torch.no_grad():
            flop = forward_flop(model, inputs, all_ops)[1]
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
        "gflop_per_step": 3 * flop / 1e9,
        "flop_counted": "all" if all_ops else "convolutions",
        "torch_version": torch.__version__,
    }))


if __name__ == "__main__":
    main()
