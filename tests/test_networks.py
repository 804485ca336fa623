"""UNet and autoencoder against diffusers, through the original (CompVis) checkpoint layout.

The oracle is independent of our code: diffusers' own single-file converters turn our state dict,
under the real `model.diffusion_model.` / `first_stage_model.` prefixes, into its
`UNet2DConditionModel` / `AutoencoderKL` layout, with diffusers configs derived from the original
LDM yaml parameters by diffusers' own functions. If our module names, shapes or maths deviated from
the original networks, either the strict load or the output comparison would fail.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from service.ldm.arch import infer_autoencoder_config, infer_unet_config
from service.ldm.autoencoder import Autoencoder
from service.ldm.config import AutoencoderConfig, UNetConfig
from service.ldm.unet import UNet

from .reference import diffusers_unet, diffusers_vae, randomize

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

SD1_TINY = UNetConfig(
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
    transformer_depth=2, context_dim=24, num_heads=8, head_dim=None, use_linear_projection=False,
)  # fmt: skip
SD1_THREE_LEVELS = UNetConfig(
    model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0,),
    transformer_depth=1, context_dim=16, num_heads=8, head_dim=None, use_linear_projection=False,
)  # fmt: skip
SD2_TINY = UNetConfig(
    model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
    transformer_depth=1, context_dim=32, num_heads=None, head_dim=64, use_linear_projection=True,
)  # fmt: skip
SD1_TINY_INPAINT = UNetConfig(**{**SD1_TINY.__dict__, "in_channels": 9})
TINY_UNETS: list[tuple[str, UNetConfig, str]] = [
    ("sd1", SD1_TINY, "sd1"),
    ("sd1-3-levels", SD1_THREE_LEVELS, "sd1"),
    ("sd2", SD2_TINY, "sd2"),
    ("sd1-inpaint", SD1_TINY_INPAINT, "sd1"),
]
# The real architectures: SD 1.x, SD 2.x (768-v and base), and the 9-channel inpainting UNet.
SD1_FULL = UNetConfig()
SD2_FULL = UNetConfig(context_dim=1024, num_heads=None, head_dim=64, use_linear_projection=True)
SD1_INPAINT_FULL = UNetConfig(in_channels=9)

AE_TINY = AutoencoderConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)
AE_THREE_LEVELS = AutoencoderConfig(base_channels=32, channel_mult=(1, 1, 2), num_res_blocks=2)


def shapes_of(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def assert_close(ours: Tensor, ref: Tensor, tol: float) -> None:
    """Max abs difference within tol times the output's scale (at least 1)."""
    scale = max(1.0, ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= tol * scale, f"max abs diff {diff:.3g} (output scale {scale:.3g})"


# UNet ----------------------------------------------------------------------------------------------


def unet_inputs(cfg: UNetConfig, batch: int = 2, tokens: int = 7) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, 8, 8, generator=g)
    t = torch.tensor([999.0, 0.0, 417.25, 1.5][:batch])  # per-sample, one fractional
    context = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    return x, t, context


@pytest.mark.parametrize(("name", "cfg", "family"), TINY_UNETS, ids=[c[0] for c in TINY_UNETS])
def test_unet_matches_diffusers(name: str, cfg: UNetConfig, family: str) -> None:
    ours = randomize(UNet(cfg), seed=zlib.crc32(name.encode()))
    state = {UNET_PREFIX + k: v for k, v in ours.state_dict().items()}
    ref, converted = diffusers_unet(cfg, state)
    assert len(converted) == len(state)  # the converter maps keys one to one: nothing left over
    ref.load_state_dict(converted, strict=True)
    ref.eval()

    x, t, context = unet_inputs(cfg)
    mask = torch.ones(context.shape[:2], dtype=torch.bool)
    mask[1, 4:] = False  # the second prompt is shorter
    with torch.no_grad():
        out = ours(x, t, context)
        expected = ref(x, t, encoder_hidden_states=context).sample
        out_masked = ours(x, t, context, mask)
        expected_masked = ref(x, t, encoder_hidden_states=context, encoder_attention_mask=mask.float()).sample
    assert out.shape == (2, cfg.out_channels, 8, 8)
    assert_close(out, expected, 1e-4)
    assert_close(out_masked, expected_masked, 1e-4)
    assert not torch.allclose(out_masked[1], out[1])  # the mask did something


@pytest.mark.parametrize(("name", "cfg", "family"), TINY_UNETS, ids=[c[0] for c in TINY_UNETS])
def test_unet_config_inferred_back(name: str, cfg: UNetConfig, family: Any) -> None:
    assert infer_unet_config(shapes_of(UNet(cfg)), family) == cfg


@pytest.mark.parametrize(
    ("cfg", "family"),
    [(SD1_FULL, "sd1"), (SD2_FULL, "sd2"), (SD1_INPAINT_FULL, "sd1")],
    ids=["sd1", "sd2", "sd1-inpaint"],
)
def test_full_size_unet_layout(cfg: UNetConfig, family: Any) -> None:
    """The real SD layouts, weightless (meta tensors): our keys convert to exactly diffusers' keys
    and shapes, and the config comes back from the shapes."""
    with torch.device("meta"):
        ours = UNet(cfg)
        state = {UNET_PREFIX + k: v for k, v in ours.state_dict().items()}
        ref, converted = diffusers_unet(cfg, state)
    assert len(converted) == len(state)
    assert {k: tuple(v.shape) for k, v in converted.items()} == shapes_of(ref)
    assert infer_unet_config(shapes_of(ours), family) == cfg


def test_unet_attention_only_in_middle_inferred() -> None:
    cfg = UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(), context_dim=8
    )
    assert infer_unet_config(shapes_of(UNet(cfg)), "sd1") == cfg


def test_context_mask_equals_unpadded_context() -> None:
    cfg = SD1_TINY
    unet = randomize(UNet(cfg), seed=3)
    x, t, context = unet_inputs(cfg, batch=2, tokens=9)
    lengths = [4, 9]
    mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]  # (2, 9)
    padded = context.clone()
    padded[0, 4:] = 100.0  # garbage in the padding must not leak through
    with torch.no_grad():
        alone = [unet(x[i : i + 1], t[i : i + 1], context[i : i + 1, :n]) for i, n in enumerate(lengths)]
        # Masking itself is exact: padded keys get probability 0.
        padded_alone = unet(x[:1], t[:1], padded[:1], mask[:1])
        assert (padded_alone - alone[0]).abs().max().item() <= 1e-6
        # Prompts of different lengths in one batch; batch size alone moves CPU convs by ~1e-6.
        batched = unet(x, t, padded, mask)
        for i in range(2):
            assert (batched[i : i + 1] - alone[i]).abs().max().item() <= 1e-5


def test_batch_of_timesteps_equals_single_calls() -> None:
    cfg = SD2_TINY
    unet = randomize(UNet(cfg), seed=4)
    x, t, context = unet_inputs(cfg, batch=3)
    with torch.no_grad():
        batched = unet(x, t, context)
        for i in range(3):
            single = unet(x[i : i + 1], t[i : i + 1], context[i : i + 1])
            assert (batched[i : i + 1] - single).abs().max().item() <= 1e-5


def test_unet_rejects_bad_inputs() -> None:
    unet = UNet(SD1_TINY)
    x, t, context = unet_inputs(SD1_TINY)
    with pytest.raises(ValueError, match="t must have shape"):
        unet(x, torch.tensor(1.0), context)
    with pytest.raises(ValueError, match="bool"):
        unet(x, t, context, torch.ones(context.shape[:2]))


def test_unet_is_trainable() -> None:
    unet = randomize(UNet(SD1_TINY), seed=5).train()
    x, t, context = unet_inputs(SD1_TINY)
    unet(x, t, context).square().mean().backward()
    for name, p in unet.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# Autoencoder ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [AE_TINY, AE_THREE_LEVELS], ids=["two-levels", "three-levels"])
def test_autoencoder_matches_diffusers(cfg: AutoencoderConfig) -> None:
    ours = randomize(Autoencoder(cfg), seed=len(cfg.channel_mult))
    state = {VAE_PREFIX + k: v for k, v in ours.state_dict().items()}
    ref, converted = diffusers_vae(cfg, state)
    assert len(converted) == len(state)
    ref.load_state_dict(converted, strict=True)
    ref.eval()

    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    f = cfg.downsample_factor
    z = torch.randn(2, cfg.latent_channels, 16 // f, 16 // f, generator=g)
    with torch.no_grad():
        posterior = ours.encode(x)
        expected = ref.encode(x).latent_dist
        decoded = ours.decode(z)
        expected_decoded = ref.decode(z).sample
    assert posterior.mean.shape == (2, cfg.latent_channels, 16 // f, 16 // f)
    assert_close(posterior.mean, expected.mean, 1e-4)
    assert_close(posterior.logvar, expected.logvar, 1e-4)
    assert decoded.shape == x.shape
    assert_close(decoded, expected_decoded, 1e-4)


@pytest.mark.parametrize("cfg", [AE_TINY, AE_THREE_LEVELS, AutoencoderConfig()], ids=["tiny", "3", "sd"])
def test_autoencoder_config_inferred_back(cfg: AutoencoderConfig) -> None:
    with torch.device("meta"):
        model = Autoencoder(cfg)
    assert infer_autoencoder_config(shapes_of(model)) == cfg


def test_full_size_autoencoder_layout() -> None:
    cfg = AutoencoderConfig()
    with torch.device("meta"):
        state = {VAE_PREFIX + k: v for k, v in Autoencoder(cfg).state_dict().items()}
        ref, converted = diffusers_vae(cfg, state)
    assert len(converted) == len(state)
    assert {k: tuple(v.shape) for k, v in converted.items()} == shapes_of(ref)
    # The original stores the mid-attention projections as 1x1 convs; so do we.
    assert state[VAE_PREFIX + "encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_posterior_sampling_scaling_and_kl() -> None:
    cfg = AE_TINY
    ae = randomize(Autoencoder(cfg), seed=6)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior = ae.encode(x)
        a = posterior.sample(torch.Generator().manual_seed(7))
        b = posterior.sample(torch.Generator().manual_seed(7))
        c = posterior.sample(torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert torch.equal(posterior.mode(), posterior.mean)
        kl = posterior.kl()
        assert kl.shape == (2,) and (kl >= 0).all()
        assert posterior.logvar.min() >= -30 and posterior.logvar.max() <= 20
        # encode_latents / decode_latents apply the scaling factor; encode / decode do not.
        latents = ae.encode_latents(x, sample=False)
        assert torch.allclose(latents, posterior.mean * cfg.scaling_factor)
        seeded = ae.encode_latents(x, torch.Generator().manual_seed(7))
        assert torch.allclose(seeded, a * cfg.scaling_factor)
        assert torch.allclose(ae.decode_latents(latents), ae.decode(posterior.mean), atol=1e-5)


def test_autoencoder_is_trainable() -> None:
    ae = randomize(Autoencoder(AE_TINY), seed=9).train()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    recon, posterior = ae(x, torch.Generator().manual_seed(0))
    ((recon - x).square().mean() + 1e-6 * posterior.kl().mean()).backward()
    for name, p in ae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# Architecture inference failures -------------------------------------------------------------------


def test_inference_rejects_foreign_weights() -> None:
    unet_shapes = shapes_of(UNet(SD1_TINY))
    ae_shapes = shapes_of(Autoencoder(AE_TINY))
    with pytest.raises(ValueError, match="UNet"):
        infer_unet_config(ae_shapes, "sd1")
    with pytest.raises(ValueError, match="autoencoder"):
        infer_autoencoder_config(unet_shapes)
    with pytest.raises(ValueError, match="UNet"):
        infer_unet_config({}, "sd2")
    # SD 2.x heads are 64 wide: 32-channel attention layers cannot be SD 2.x.
    with pytest.raises(ValueError, match="heads"):
        infer_unet_config(shapes_of(UNet(SD1_THREE_LEVELS)), "sd2")
    # A level with a missing res block.
    broken = {k: v for k, v in unet_shapes.items() if not k.startswith("input_blocks.1.")}
    with pytest.raises(ValueError):
        infer_unet_config(broken, "sd1")


def test_sizes_that_do_not_halve_evenly_match_diffusers() -> None:
    """SD accepts multiples of 8 pixels: latents like 9x13 do not halve evenly at every level."""
    cfg = SD1_THREE_LEVELS
    ours = randomize(UNet(cfg), seed=5)
    state = {UNET_PREFIX + k: v for k, v in ours.state_dict().items()}
    reference, converted = diffusers_unet(cfg, state)
    reference.load_state_dict(converted, strict=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, cfg.in_channels, 9, 13, generator=g)
    t = torch.tensor([10.0, 700.0])
    context = torch.randn(2, 5, cfg.context_dim, generator=g)
    with torch.no_grad():
        out = ours(x, t, context)
        expected = reference.eval()(x, t, encoder_hidden_states=context).sample
    assert out.shape == (2, cfg.out_channels, 9, 13)
    assert_close(out, expected, 1e-4)
