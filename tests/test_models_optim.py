"""Backbones, their initialisation, LARS and the learning-rate schedules, pinned to the official code.

Expected values are literals (or math.sin/cos of explicitly written positions), each commented with the source's
file and line, and checked on what the method files build (their make_backbone / make_optimizer / learning_rate,
the functions main() calls), never on the RECIPES table or on the function under test itself. No training runs.

Mechanism -> test -> the deliberate one-line bug that made it fail:
- sin-cos position embedding: test_sincos_embedding_at_known_positions (row and column halves swapped)
- ViT head count survives export: test_a_12_head_export_reloads_with_12_heads (backbone_from_state_dict using
  dim // 64 heads)
- MoCo v3's ViT init: test_moco_v3_vit_is_vits_py (qkv initialised by xavier_uniform_ over the fused weight;
  heads=12 removed from make_backbone)
- zero-init residual per source: test_zero_init_residual_follows_each_source (byol.make_backbone with
  zero_init_residual=True)
- LARS momentum forms: test_lars_two_steps_by_hand (lr_in_momentum ignored: always the lr outside the buffer)
- LARC clipping: test_lars_two_steps_by_hand[clip] (clamp(max=1) dropped)
- optimizer per method: test_<method>_optimizer_and_lr_are_the_sources (simclr.make_optimizer without
  lr_in_momentum=True; moco param_groups excluding nothing)
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import byol
import common as C
import moco
import simclr
import simsiam

IMAGENET_TRAIN = 1_281_167  # images in the ImageNet-1k train split


# ---- position embedding ----------------------------------------------------------------------------------------
def test_sincos_embedding_at_known_positions():
    """moco-v3 vits.py:53-64 at grid 2, dim 8: pos_dim 2, omega = (1, 1/100); the first half of the channels
    encodes the token's row (vits.py's grid_w after meshgrid 'ij'), the second its column."""
    omega = (1.0, 0.01)  # 1 / 10000^(0/2), 1 / 10000^(1/2)
    expected = []
    for r, c in ((0, 0), (0, 1), (1, 0), (1, 1)):  # tokens in row-major order
        expected.append(
            [math.sin(r * w) for w in omega]
            + [math.cos(r * w) for w in omega]
            + [math.sin(c * w) for w in omega]
            + [math.cos(c * w) for w in omega]
        )
    expected = torch.tensor(expected)
    torch.testing.assert_close(C.sincos_2d(2, 8), expected)
    vit = C.ViT(8, 4, 8, 1, 2, sincos_pos=True)  # 8 px, patch 4: a 2 x 2 grid
    assert not vit.pos_embed.requires_grad
    torch.testing.assert_close(vit.pos_embed[0, 1:].detach(), expected)
    assert vit.pos_embed[0, 0].abs().sum() == 0  # vits.py:67: the class token's entry is 0


# ---- ViT heads and init ----------------------------------------------------------------------------------------
def test_a_12_head_export_reloads_with_12_heads(tmp_path):
    g = torch.Generator().manual_seed(0)
    vit = C.build_backbone("vit_tiny", 32, small=True, heads=12, sincos_pos=True).eval()  # 192 / 12: 16-d heads
    torch.save(vit.state_dict(), tmp_path / "backbone.pt")
    sd = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert int(sd["num_heads"]) == 12
    rebuilt = C.backbone_from_state_dict(sd, 32)
    rebuilt.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32, generator=g)
    torch.testing.assert_close(rebuilt.eval()(x), vit(x))
    # The same weights in DeiT's 3-head layout compute something else: the head count matters.
    six = C.build_backbone("vit_tiny", 32, small=True, sincos_pos=True).eval()
    with pytest.raises(C.UserError, match="12 heads"):
        six.load_state_dict(sd)
    del sd["num_heads"]  # an export from before the head count was recorded: dim // 64 heads
    six.load_state_dict(sd)
    assert not torch.allclose(six(x), vit(x), atol=1e-4)


def test_moco_v3_vit_is_vits_py():
    """moco-v3 vits.py:31-51, 115-120: ViT-S with 12 heads; Linear layers Xavier-uniform with zero bias, Q, K, V
    each as a d x d matrix; class token N(0, 1e-6); patch projection U(+-sqrt(6 / (3 p^2 + d))), zero bias, frozen."""
    args = moco.parser.parse_args(["--version", "v3", "--arch", "vit_small"])
    args.image_size = 224
    vit = moco.make_backbone(args, small=False)
    d = 384
    assert vit.heads == 12 and int(vit.num_heads) == 12 and {b.attn.heads for b in vit.blocks} == {12}
    assert not any(p.requires_grad for p in vit.patch_embed.parameters())
    assert not vit.pos_embed.requires_grad

    def fills(w, bound):  # a uniform draw of that many entries reaches within 2% of its bound
        return w.abs().max() <= bound and w.abs().max() > 0.98 * bound

    assert fills(vit.patch_embed.weight, math.sqrt(6 / (3 * 16 * 16 + d)))
    assert vit.patch_embed.bias.abs().sum() == 0
    for blk in vit.blocks:
        assert fills(blk.attn.qkv.weight, math.sqrt(6 / (d + d)))  # vits.py:36: not sqrt(6 / (3d + d))
        assert fills(blk.attn.proj.weight, math.sqrt(6 / (d + d)))
        assert fills(blk.mlp[0].weight, math.sqrt(6 / (d + 4 * d)))
        assert fills(blk.mlp[2].weight, math.sqrt(6 / (4 * d + d)))
        assert all(m.bias.abs().sum() == 0 for m in blk.modules() if isinstance(m, nn.Linear))
    assert 0 < vit.cls_token.abs().max() < 1e-5  # std 1e-6
    # Without the method file's choice a ViT-S is DeiT/DINO's: 6 heads, trunc-normal(0.02) Linear weights.
    dino = C.build_backbone("vit_small", 224, small=False)
    assert dino.heads == 6 and abs(dino.blocks[0].mlp[0].weight.std().item() - 0.02) < 0.001


def _args(module, *flags, image_size=224):
    """The method's arguments as main() resolves them for data of this image size (224: the ImageNet recipe)."""
    args = module.parser.parse_args(list(flags))
    recipes = module.RECIPES.get(getattr(args, "version", None), module.RECIPES)  # per version: simclr, moco
    data, env = SimpleNamespace(name="folder", image_size=image_size), SimpleNamespace(device=torch.device("cpu"))
    assert C.pick_recipe(recipes, data, env, args) == ("imagenet" if image_size > C.SMALL_IMAGE else "small")
    return args


def _last_bn_scales(backbone):
    """The scale of the last BN of every residual branch (bn2 of basic blocks, bn3 of bottlenecks)."""
    blocks = [b for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4) for b in layer]
    return torch.cat([(b.bn3 if hasattr(b, "bn3") else b.bn2).weight.detach() for b in blocks])


@pytest.mark.parametrize(
    "module, flags, zero",
    [
        (simclr, ["--arch", "resnet18"], True),  # simclr resnet.py:395 (residual_block): init_zero=True
        (simclr, ["--arch", "resnet50"], True),  # simclr resnet.py:480 (bottleneck_block): init_zero=True
        (byol, ["--arch", "resnet18"], False),  # haiku nets/resnet.py BlockV1: basic blocks, default scale 1
        (byol, ["--arch", "resnet50"], True),  # haiku BlockV1 bottleneck: batchnorm_2 scale_init=jnp.zeros
        (simsiam, ["--arch", "resnet18"], True),  # simsiam builder.py:24: zero_init_residual=True
        (moco, ["--version", "v2", "--arch", "resnet18"], False),  # moco builder.py: base_encoder(num_classes)
        (moco, ["--version", "v3", "--arch", "resnet18"], True),  # moco-v3 main_moco.py:186: zero_init_residual
    ],
)
def test_zero_init_residual_follows_each_source(module, flags, zero):
    args = _args(module, *flags, image_size=32)
    scales = _last_bn_scales(module.make_backbone(args, small=True))
    assert torch.equal(scales, torch.zeros_like(scales) if zero else torch.ones_like(scales))


# ---- LARS ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lr_in_momentum", [False, True])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_lars_two_steps_by_hand(lr_in_momentum, clip):
    """Two steps with momentum and a change of lr between them (where the two momentum forms differ):
    moco-v3 moco/optimizer.py:27-43 and BYOL utils/optimizers.py:87-103, 187 (v = m v + t g; w -= lr v); SimCLR
    lars_optimizer.py:101-118 (v = m v + lr t g; w -= v). With `clip` (LARC) lr * t becomes min(lr * t, lr)."""
    g = torch.Generator().manual_seed(0)
    w0, b0 = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    grads = [(torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64))]
    grads.append((grads[0][0] * 0.01, grads[0][1] * 0.5))  # step 2: a small weight gradient -> a large trust ratio
    lrs, m, wd, eta = (0.5, 0.2), 0.9, 0.01, 0.02
    weight, bias = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    opt = C.LARS(
        [{"params": [weight], "weight_decay": wd}, {"params": [bias], "weight_decay": 0.0, "lars_exclude": True}],
        momentum=m,
        eta=eta,
        clip=clip,
        lr_in_momentum=lr_in_momentum,
    )
    w, b, vw, vb = w0.clone(), b0.clone(), torch.zeros_like(w0), torch.zeros_like(b0)
    clipped = []
    for (gw, gb), lr in zip(grads, lrs):
        weight.grad, bias.grad = gw.clone(), gb.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        # By hand: decayed gradient, trust ratio, LARC clip, then the momentum form.
        d = gw + wd * w
        trust = eta * w.norm() / d.norm()
        if clip:
            clipped.append(bool(trust > lr))
            trust = min(trust, lr) / lr
        if lr_in_momentum:
            vw, vb = m * vw + lr * trust * d, m * vb + lr * gb
            w, b = w - vw, b - vb
        else:
            vw, vb = m * vw + trust * d, m * vb + gb
            w, b = w - lr * vw, b - lr * vb
        torch.testing.assert_close(weight.detach(), w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bias.detach(), b, rtol=1e-12, atol=1e-12)
    if clip:
        assert clipped == [False, True]  # the clip is exercised once and idle once


@pytest.mark.parametrize("clip", [False, True])
def test_larc_two_steps_by_hand(clip):
    """LARS(larc=True), SwAV's optimizer: apex/parallel/LARC.py around torch SGD (and solo-learn's lars.py):
    t = eta ||w|| / (||g|| + wd ||w|| + 1e-8) from the raw gradient, d = t (g + wd w) (clip: t <- min(t / lr, 1)),
    v = m v + d, w -= lr v; three steps with lr changes, against the update written out in float64. Step 3 has a
    zero gradient: LARC then adds neither the decay nor the scaling (only momentum moves w)."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    grads = [torch.randn(3, 4, generator=g, dtype=torch.float64)]
    grads += [grads[0] * 0.01, torch.zeros_like(w0)]  # step 2: a small gradient -> a large trust ratio
    lrs, m, wd, eta = (0.5, 0.02, 0.1), 0.9, 0.5, 0.02  # a large wd, so that where it enters the trust ratio shows
    weight = nn.Parameter(w0.clone())
    opt = C.LARS([{"params": [weight], "weight_decay": wd}], momentum=m, eta=eta, clip=clip, larc=True)
    w, v, clipped = w0.clone(), torch.zeros_like(w0), []
    for gw, lr in zip(grads, lrs):
        weight.grad = gw.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        trust = eta * w.norm() / (gw.norm() + wd * w.norm() + 1e-8)
        if clip and gw.norm() > 0:
            clipped.append(bool(trust > lr))
            trust = min(trust, lr) / lr
        v = m * v + (trust * (gw + wd * w) if gw.norm() > 0 else gw)
        w = w - lr * v
        torch.testing.assert_close(weight.detach(), w, rtol=1e-12, atol=1e-12)
    if clip:
        assert clipped == [False, True]


# ---- each method's optimizer and lr, ImageNet recipe --------------------------------------------------------------
def _groups_by_name(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in group["params"]} for group in optimizer.param_groups]


def _bn_and_bias(model):
    """The parameters SimCLR (names with 'batch_normalization' or 'bias') and BYOL (exclude_bias_and_norm: 'b' or
    a '*norm*' module) exclude, and that moco-v3 excludes by p.ndim <= 1: every trainable BN or bias parameter."""
    out = set()
    for mod_name, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if p.requires_grad and (isinstance(mod, nn.modules.batchnorm._BatchNorm) or name == "bias"):
                out.add(f"{mod_name}.{name}" if mod_name else name)
    return out


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _lars_groups(model, optimizer, wd, eta, lr_in_momentum):
    decay, rest = _groups_by_name(model, optimizer)
    assert rest == _bn_and_bias(model) and decay == _trainable(model) - rest and rest  # nothing else left out
    g0, g1 = optimizer.param_groups
    assert (g0["weight_decay"], g0["lars_exclude"], g1["weight_decay"], g1["lars_exclude"]) == (wd, False, 0.0, True)
    for group in (g0, g1):
        assert (group["momentum"], group["eta"], group["clip"], group["lr_in_momentum"]) == (
            0.9,
            eta,
            False,
            lr_in_momentum,
        )


def _lr(module, args, steps):
    spe = IMAGENET_TRAIN // args.batch_size  # steps per epoch
    return [module.learning_rate(s, spe, args) for s in steps]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_simclr_optimizer_and_lr_are_the_sources(version):
    args = _args(simclr, "--version", version, "--arch", "resnet18")  # ResNet-50 in the recipe: same rules
    model = simclr.SimCLR(simclr.make_backbone(args, small=False), args.proj_layers, args.dim)
    optimizer = simclr.make_optimizer(model, args)
    assert type(optimizer) is C.LARS
    # simclr 1.0 model.py:175-179 / HEAD model_util.py:95-100: LARS, momentum 0.9 (run.py:170), weight decay
    # 1e-6 (1.0 run.py:50; v2: HEAD run.py:55, 1e-4), eeta 1e-3 (lars_optimizer.py:26), 'batch_normalization'
    # and 'bias' excluded from decay and adaptation, classic momentum (lars_optimizer.py:43, 111-118).
    _lars_groups(model, optimizer, {"v1": 1e-6, "v2": 1e-4}[version], 1e-3, lr_in_momentum=True)
    # 312 steps/epoch at batch 4096; lr 0.3 x 4096/256 = 4.8 (v1, model_util.py:55 linear scaling; run.py:42) or
    # 0.075 x sqrt(4096) = 4.8 (v2, README: --learning_rate_scaling=sqrt); 10 warmup epochs = 3120 steps
    # (run.py:46); then cosine to 0 over the remaining 28080 steps (model_util.py:62-66). Step 0 gets 4.8 / 3120:
    # Deviation (common.cosine_lr): model_util.py:56 gives 0 at step 0 and 4.8 at step 3120.
    expected = [4.8 / 3120, 4.8 / 2, 4.8, 4.8, 2.4, 0.0]
    got = _lr(simclr, args, [0, 1559, 3119, 3120, 3120 + 14040, 31200])
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_byol_optimizer_and_lr_are_the_sources():
    args = _args(byol, "--arch", "resnet18")
    model = byol.BYOL(byol.make_backbone(args, small=False), args.hidden_dim, args.dim)
    optimizer = byol.make_optimizer(model, args)
    assert type(optimizer) is C.LARS
    # byol_experiment.py:191-195 + utils/optimizers.py:30-35: biases and norms excluded from decay and adaptation;
    # configs/byol.py:57-60 and :21 (1000 epochs): weight decay 1.5e-6, eta 1e-3, momentum 0.9; optimizers.py:
    # 101-102, 187: momentum over the adapted update, then optax.scale(-lr): the lr outside the buffer.
    _lars_groups(model, optimizer, 1.5e-6, 1e-3, lr_in_momentum=False)
    assert not _groups_by_name(model, optimizer)[0] & {n for n in _trainable(model) if n.startswith("target_")}
    # schedules.py:34 lr 0.2 (configs/byol.py:20, 1000 epochs) x 4096/256 = 3.2; warmup 10 epochs (configs/byol.py
    # :64; 3120 steps here, 3127 there: it counts 10 x 1281167 // 4096); cosine over 1000 epochs (312000 steps).
    expected = [3.2 / 3120, 3.2, 3.2, 1.6, 0.0]
    got = _lr(byol, args, [0, 3119, 3120, 3120 + 154440, 312000])
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_simsiam_optimizer_and_lr_are_the_sources():
    args = _args(simsiam, "--arch", "resnet18")
    model = simsiam.SimSiam(simsiam.make_backbone(args, small=False), args.proj_layers, args.dim, args.pred_dim)
    optimizer = simsiam.make_optimizer(model, args)
    assert type(optimizer) is torch.optim.SGD
    # main_simsiam.py:194-201: SGD over [encoder (backbone + projector), fix_lr False], [predictor, fix_lr True]
    # (--fix-pred-lr, the README's command), momentum 0.9 (:58), weight decay 1e-4 (:60) on every parameter.
    encoder, predictor = _groups_by_name(model, optimizer)
    assert predictor == {n for n in _trainable(model) if n.startswith("predictor.")}
    assert encoder == _trainable(model) - predictor
    for group, fix in zip(optimizer.param_groups, (False, True)):
        assert (group["momentum"], group["weight_decay"], group["nesterov"], group["fix_lr"]) == (0.9, 1e-4, False, fix)
    # main_simsiam.py:157 lr 0.05 (:56) x 512/256 = 0.1; :359-366 cosine to 0 over 100 epochs (2502 steps each at
    # batch 512), no warmup; the predictor keeps 0.1.
    spe = IMAGENET_TRAIN // 512
    assert _lr(simsiam, args, [0, 125100, 250200]) == pytest.approx([0.1, 0.05, 0.0], abs=1e-12)
    assert simsiam.learning_rate(125100, spe, args, fixed=True) == pytest.approx(0.1)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_moco_v1_v2_optimizer_and_lr_are_the_sources(version):
    args = _args(moco, "--version", version, "--arch", "resnet18")
    model = moco.MoCo(moco.make_backbone(args, small=False), version, args.dim, args.hidden_dim, args.queue_size)
    optimizer = moco.make_optimizer(model, args)
    assert type(optimizer) is torch.optim.SGD
    # moco@132aea9 main_moco.py:293-298: SGD over model.parameters() (the key encoder gets no gradient), momentum
    # 0.9 (:97), weight decay 1e-4 (:102) on every parameter.
    (params,) = _groups_by_name(model, optimizer)
    assert params == {n for n, _ in model.named_parameters()}
    assert _trainable(model) == {n for n in params if not n.startswith("momentum_")}  # keys: no gradient, no step
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 1e-4, False)
    # lr 0.03 (:83) at batch 256 (:73; the README's linear scaling: 0.015 at 128); 5004 steps/epoch, 200 epochs
    # (:61). v1 (:91, :503-504): x 0.1 at epochs 120 and 160; v2 (--cos, :500-501): cosine to 0.
    steps = [0, 600479, 600480, 800640, 500400]
    expected = {"v1": [0.03, 0.03, 0.003, 0.0003, 0.03], "v2": [0.03, None, None, None, 0.015]}[version]
    for got, want in zip(_lr(moco, args, steps), expected):
        assert want is None or got == pytest.approx(want, rel=1e-9)


def test_moco_v3_optimizer_and_lr_are_the_sources():
    args = _args(moco, "--version", "v3", "--arch", "resnet18")
    model = moco.MoCo(moco.make_backbone(args, small=False), "v3", args.dim, args.hidden_dim)
    optimizer = moco.make_optimizer(model, args)
    assert type(optimizer) is C.LARS
    # moco-v3 main_moco.py:224-227 and moco/optimizer.py:14, 27-43: LARS over model.parameters(), trust
    # coefficient 1e-3, momentum 0.9 (main_moco.py:67), weight decay 1e-6 (:69); parameters with ndim <= 1 get
    # neither decay nor adaptation; the lr multiplies the momentum buffer (optimizer.py:42-43).
    _lars_groups(model, optimizer, 1e-6, 1e-3, lr_in_momentum=False)
    # main_moco.py:190 lr 0.6 (:65) x 4096/256 = 9.6; :420-425 warmup 10 epochs (:115), then cosine over the
    # other 90 of 100 (CONFIG.md R50 100 epochs).
    expected = [9.6 / 3120, 9.6, 9.6, 4.8, 0.0]
    assert _lr(moco, args, [0, 3119, 3120, 3120 + 14040, 31200]) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_moco_v3_vit_optimizer_and_lr_are_the_sources():
    args = moco.parser.parse_args(["--version", "v3", "--arch", "vit_tiny"])
    recipes = dict(moco.RECIPES["v3"])
    recipes |= {k: recipes[k] | moco.V3_VIT for k in ("imagenet", "small")}  # as main() does for a ViT
    data, env = SimpleNamespace(name="folder", image_size=224), SimpleNamespace(device=torch.device("cpu"))
    C.pick_recipe(recipes, data, env, args)
    args.image_size = 64  # a small ViT-Ti for speed: the optimizer's rules do not depend on it
    model = moco.MoCo(moco.make_backbone(args, small=False), "v3", args.dim, 256)
    optimizer = moco.make_optimizer(model, args)
    assert type(optimizer) is torch.optim.AdamW
    # main_moco.py:228-230 AdamW over every parameter with a gradient (the patch projection is frozen,
    # vits.py:49-51), weight decay 0.1 (CONFIG.md ViT-Small/Base), PyTorch's default betas.
    (params,) = _groups_by_name(model, optimizer)
    assert params == _trainable(model) and not any(n.startswith("backbone.patch_embed") for n in params)
    group = optimizer.param_groups[0]
    assert (group["weight_decay"], group["betas"]) == (0.1, (0.9, 0.999))
    # lr 1.5e-4 x 4096/256 = 2.4e-3 (CONFIG.md; main_moco.py:190); 40 warmup epochs of 300 (12480 of 93600 steps).
    expected = [2.4e-3 / 12480, 2.4e-3, 1.2e-3, 0.0]
    assert _lr(moco, args, [0, 12479, 12480 + 40560, 93600]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
