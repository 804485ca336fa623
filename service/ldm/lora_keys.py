"""Names of the layers a LoRA file may adapt, as each file format spells them.

Our UNet keeps the original CompVis module names (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`);
most adapters are named after diffusers' `UNet2DConditionModel`
(`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`), some (LyCORIS, kohya's SDXL
scripts) after the original layout. Both layouts are derived here from the `UNetConfig`, block by
block as `unet.UNet` builds them, so any SD 1.x / 2.x size maps without a table per size.

kohya names are module paths with dots turned into underscores; since underscores also occur inside
names (`transformer_blocks`, `to_q`), they are not split back but looked up in a table built from
the model's own modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from .config import ModelConfig, TextEncoderConfig, UNetConfig
from .layout import UNET_PREFIX

Part = Literal["unet", "text", "text2"]  # text2: SDXL's second text encoder (OpenCLIP ViT-bigG)

# Inside a ResBlock: original name -> diffusers' ResnetBlock2D name.
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def unet_blocks(cfg: UNetConfig) -> dict[str, tuple[str, str]]:
    """Original block prefix -> (diffusers prefix, kind), kind one of resnet, attention, down, up.

    Follows `UNet.__init__`: per level, `num_res_blocks` (ResBlock [+ transformer]) then a
    Downsample except at the last level; the middle block; per level in reverse, one more
    (ResBlock [+ transformer]) and an Upsample except at level 0.
    """
    blocks: dict[str, tuple[str, str]] = {}
    last = len(cfg.channel_mult) - 1
    index = 1  # input_blocks.0 is conv_in
    for level in range(len(cfg.channel_mult)):
        for j in range(cfg.num_res_blocks):
            blocks[f"input_blocks.{index}.0"] = (f"down_blocks.{level}.resnets.{j}", "resnet")
            if level in cfg.attention_levels:
                blocks[f"input_blocks.{index}.1"] = (f"down_blocks.{level}.attentions.{j}", "attention")
            index += 1
        if level != last:
            blocks[f"input_blocks.{index}.0"] = (f"down_blocks.{level}.downsamplers.0", "down")
            index += 1
    blocks["middle_block.0"] = ("mid_block.resnets.0", "resnet")
    blocks["middle_block.1"] = ("mid_block.attentions.0", "attention")
    blocks["middle_block.2"] = ("mid_block.resnets.1", "resnet")
    index = 0
    for up, level in enumerate(reversed(range(len(cfg.channel_mult)))):
        for j in range(cfg.num_res_blocks + 1):
            blocks[f"output_blocks.{index}.0"] = (f"up_blocks.{up}.resnets.{j}", "resnet")
            layer = 1
            if level in cfg.attention_levels:
                blocks[f"output_blocks.{index}.1"] = (f"up_blocks.{up}.attentions.{j}", "attention")
                layer = 2
            if level != 0 and j == cfg.num_res_blocks:
                blocks[f"output_blocks.{index}.{layer}"] = (f"up_blocks.{up}.upsamplers.0", "up")
            index += 1
    return blocks


def diffusers_unet_path(path: str, blocks: dict[str, tuple[str, str]]) -> str | None:
    """Our module path -> diffusers' path of the same module (None for modules it does not have)."""
    if path in _TOP:
        return _TOP[path]
    parts = path.split(".")
    depth = 2 if parts[0] == "middle_block" else 3
    prefix, rest = ".".join(parts[:depth]), ".".join(parts[depth:])
    if prefix not in blocks:
        return None
    target, kind = blocks[prefix]
    if kind == "resnet":
        inner = _RESNET.get(rest)
    elif kind == "attention":
        inner = rest
    elif kind == "down":
        inner = "conv" if rest == "op" else None
    else:
        inner = rest if rest == "conv" else None
    return None if inner is None else f"{target}.{inner}"


@dataclass(frozen=True)
class Target:
    part: Part
    path: str  # our module path inside the UNet or the text model


class LoraNames:
    """Every name a LoRA file may give a layer of one model -> that layer.

    kohya: `lora_unet_` + diffusers or original path, `lora_te_` + text path with or without
    `text_model_`. diffusers/PEFT: `unet.` + diffusers path, `text_encoder.` + text path with or
    without `text_model.` (transformers 5 dropped that level from `CLIPTextModel`'s module paths;
    older files and releases keep it).
    """

    def __init__(
        self,
        unet_config: UNetConfig,
        unet_paths: Iterable[str],
        text_paths: Iterable[str],
        text2_paths: Iterable[str] = (),
    ) -> None:
        self.kohya: dict[str, Target] = {}
        self.peft: dict[str, Target] = {}
        blocks = unet_blocks(unet_config)
        for path in unet_paths:
            target = Target("unet", path)
            self._add(self.kohya, "lora_unet_" + path.replace(".", "_"), target)
            diffusers = diffusers_unet_path(path, blocks)
            if diffusers is not None:
                self._add(self.kohya, "lora_unet_" + diffusers.replace(".", "_"), target)
                self._add(self.peft, "unet." + diffusers, target)
        # SD 1/2's one encoder is `lora_te_`; SDXL's are `lora_te1_` (CLIP ViT-L) and `lora_te2_`.
        encoders: list[tuple[Part, Iterable[str], tuple[str, ...], str]] = [
            ("text", text_paths, ("lora_te_", "lora_te1_"), "text_encoder."),
            ("text2", text2_paths, ("lora_te2_",), "text_encoder_2."),
        ]
        for part, paths, kohya, peft in encoders:
            for path in paths:
                target = Target(part, path)
                bare = path.removeprefix("text_model.")
                for spelled in (bare, "text_model." + bare):
                    for prefix in kohya:
                        self._add(self.kohya, prefix + spelled.replace(".", "_"), target)
                    self._add(self.peft, peft + spelled, target)

    @staticmethod
    def _add(table: dict[str, Target], name: str, target: Target) -> None:
        known = table.setdefault(name, target)
        if known.path != target.path or known.part != target.part:
            raise ValueError(f"two layers map to the LoRA name {name}: {known.path} and {target.path}")

    def find(self, module: str) -> Target | None:
        """The layer a file's module name (its key without the LoRA suffix) adapts, if any."""
        if module.startswith("lora_"):
            return self.kohya.get(module)
        bare = module.removeprefix("base_model.model.")
        hit = self.peft.get(bare)
        if hit is None and not bare.startswith(("unet.", "text_encoder")):
            # PEFT's own state dicts of a bare UNet or text model carry no component prefix.
            hit = self.peft.get("unet." + bare) or self.peft.get("text_encoder." + bare)
        return hit


def names_from_header(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> LoraNames:
    """The names of a checkpoint's adaptable layers, from its header alone (torch-free, for the
    gateway): the UNet's Linear and Conv2d weights (2-D and 4-D) as the file spells them, and the text
    encoders' attention and MLP projections in transformers' layout, from their configs (SDXL's
    refiner has ViT-bigG alone: SDXL's second encoder)."""
    unet = [
        key.removeprefix(UNET_PREFIX).removesuffix(".weight")
        for key, shape in shapes.items()
        if key.startswith(UNET_PREFIX) and key.endswith(".weight") and len(shape) in (2, 4)
    ]
    if config.is_refiner:
        return LoraNames(config.unet, unet, (), _text_paths(config.text))
    return LoraNames(config.unet, unet, _text_paths(config.text), _text_paths(config.text_2))


def _text_paths(config: TextEncoderConfig | None) -> list[str]:
    if config is None:
        return []
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
    return [
        f"text_model.encoder.layers.{i}.{name}"
        for i in range(config.num_layers)
        for name in (*projections, "mlp.fc1", "mlp.fc2")
    ]
