"""diffusers text-to-image transformers (SD3, FLUX, SANA) as our teachers and students.

diffusers' flow matching is our convention (docs/methods.md §0): x_σ = (1 - σ) x + σ ε, the
transformer predicts v = ε - x, and FlowMatchEulerDiscreteScheduler steps x <- x + (σ' - σ) v. What
differs per family is the timestep's scale, the latent's layout (FLUX packs 2x2 patches into tokens
with position ids), and the text embeddings it takes.

A text condition travels as one tensor [B, rows, width]: the token embeddings, then the pooled
embedding (SD3, FLUX) spread over whole rows, then the attention mask (SANA) in one row. So every
method, graph and batcher treats it like a class label, one entry per image; `TextLayout` packs and
unpacks it.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from distill.flow import flow_map
from distill.nets import ScalarEmbedder, guidance_input


@dataclass(frozen=True)
class Family:
    name: str
    class_name: str  # the diffusers class in transformer/config.json
    timestep_scale: float  # what the transformer takes for σ
    pooled: bool  # takes a pooled text embedding
    mask: bool  # takes the text attention mask
    packed: bool  # 2x2 latent patches as tokens, with image and text position ids


FAMILIES = {family.class_name: family for family in (
    Family("sd3", "SD3Transformer2DModel", 1000.0, pooled=True, mask=False, packed=False),
    Family("flux", "FluxTransformer2DModel", 1.0, pooled=True, mask=False, packed=True),  # scales by 1000 inside
    Family("sana", "SanaTransformer2DModel", 1000.0, pooled=False, mask=True, packed=False),
)}


@dataclass(frozen=True)
class TextLayout:
    """How token embeddings [B, tokens, width], a pooled embedding [B, pooled] and a mask [B, tokens]
    share one condition tensor [B, rows, width]."""

    tokens: int
    width: int
    pooled: int = 0
    mask: bool = False

    @property
    def pooled_rows(self) -> int:
        return math.ceil(self.pooled / self.width)

    @property
    def rows(self) -> int:
        return self.tokens + self.pooled_rows + int(self.mask)

    def pack(self, hidden: torch.Tensor, pooled: torch.Tensor | None = None,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        parts = [hidden]
        if self.pooled:
            padded = nn.functional.pad(pooled, (0, self.pooled_rows * self.width - self.pooled))
            parts.append(padded.reshape(hidden.shape[0], self.pooled_rows, self.width))
        if self.mask:
            parts.append(nn.functional.pad(mask.to(hidden.dtype), (0, self.width - self.tokens))[:, None])
        return torch.cat(parts, dim=1)

    def unpack(self, condition: torch.Tensor):
        """(hidden, pooled or None, mask or None)."""
        hidden = condition[:, :self.tokens]
        pooled = condition[:, self.tokens:self.tokens + self.pooled_rows].flatten(1)[:, :self.pooled] \
            if self.pooled else None
        mask = condition[:, -1, :self.tokens] if self.mask else None
        return hidden, pooled, mask


@dataclass(frozen=True)
class DiffusersConfig:
    """What rebuilds a diffusers teacher or student: its folder, family, latent shape and text layout."""

    path: str  # the pipeline folder (model_index.json, transformer/, ...)
    family: str
    shape: tuple[int, int, int]  # the latent (C, H, W)
    layout: TextLayout
    embedded_guidance: float = 3.5  # FLUX-dev-style guidance-distilled transformers take it as an input

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "diffusers": True}

    @classmethod
    def from_dict(cls, meta: dict) -> DiffusersConfig:
        return cls(meta["path"], meta["family"], tuple(meta["shape"]), TextLayout(**meta["layout"]),
                   meta["embedded_guidance"])


def family_of(path: str | Path) -> Family:
    config = json.loads((Path(path) / "transformer" / "config.json").read_text())
    name = config.get("_class_name")
    if name not in FAMILIES:
        raise ValueError(f"{path}/transformer is a {name}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def latent_shape(path: str | Path, transformer: nn.Module, family: Family) -> tuple[int, int, int]:
    """(C, H, W) of the latents: the transformer's sample size, else the VAE's image size over its factor."""
    channels = transformer.config.in_channels // (4 if family.packed else 1)
    size = transformer.config.get("sample_size")
    if not size:
        vae = json.loads((Path(path) / "vae" / "config.json").read_text())
        size = vae["sample_size"] // 2 ** (len(vae["block_out_channels"]) - 1)
    return channels, size, size


def diffusers_config(path: str | Path, transformer: nn.Module, layout: TextLayout) -> DiffusersConfig:
    family = family_of(path)
    return DiffusersConfig(str(path), family.name, latent_shape(path, transformer, family), layout)


def save_pipeline(folder: str | Path, pipeline_class: str, parts: dict) -> Path:
    """A diffusers pipeline folder as save_pretrained writes one: each part in its subfolder and
    model_index.json naming each part's library and class."""
    folder = Path(folder)
    index = {"_class_name": pipeline_class}
    for name, part in parts.items():
        part.save_pretrained(folder / name)
        index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def local_folder(path: str | Path, what: str) -> Path:
    """`path`, a folder on this machine: models load from local folders only, and a missing one is named here
    rather than looked up on the Hugging Face Hub."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: no folder {path} (models are read from local folders; nothing is "
                                "downloaded)")
    return path


def load_transformer(path: str | Path) -> nn.Module:
    import diffusers

    family = family_of(path)
    # low_cpu_mem_usage off: without `accelerate` diffusers would warn, at every load, that it cannot be on
    return getattr(diffusers, family.class_name).from_pretrained(
        local_folder(Path(path) / "transformer", "the pipeline's transformer"), low_cpu_mem_usage=False,
        local_files_only=True).float().eval()


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C], FLUX's 2x2 patches as tokens."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack_latents(tokens: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    c, h, w = shape
    b = tokens.shape[0]
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(shape: tuple[int, int, int]) -> torch.Tensor:
    """FLUX's (row, column) position of each packed token, as [tokens, 3] with a zero first axis."""
    _, h, w = shape
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()


class MaskedCrossAttention:
    """SANA's cross-attention as diffusers computes it, with the text mask broadcast as [B, 1, 1, T]:
    diffusers repeats it per head and views it back with a -1 axis, which torch.export cannot resolve
    under a dynamic batch (so the graph would not export)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (tensor.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
                             for tensor in (query, key, value))
        bias = attention_mask[:, None] if attention_mask is not None else None  # [B, 1, T] -> [B, 1, 1, T]
        out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)))
        return out / attn.rescale_output_factor


class DiffusersVelocity(nn.Module):
    """u(x, t, condition) of a diffusers transformer, in our convention."""

    # SANA's linear attention divides by `sum + 1e-15`, which onnxscript's optimizer (0.7) rounds to zero
    # (0/0 = NaN in the graph): the graphs of diffusers models skip that pass (export/onnx_export.py)
    onnx_optimize = False

    def __init__(self, transformer: nn.Module, config: DiffusersConfig):
        super().__init__()
        self.transformer, self.config = transformer, config
        self.family = next(f for f in FAMILIES.values() if f.name == config.family)
        if self.family.mask:
            for module in transformer.modules():
                if type(getattr(module, "processor", None)).__name__ == "SanaAttnProcessor2_0":
                    module.set_processor(MaskedCrossAttention())

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        hidden, pooled, mask = self.config.layout.unpack(condition)
        timestep = t * self.family.timestep_scale
        if self.family.name == "sd3":
            out = self.transformer(x, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=timestep,
                                   return_dict=False)[0]
        elif self.family.name == "flux":
            guidance = (torch.full_like(t, self.config.embedded_guidance)
                        if self.transformer.config.guidance_embeds else None)
            out = self.transformer(pack_latents(x), encoder_hidden_states=hidden, pooled_projections=pooled,
                                   timestep=timestep, img_ids=image_ids(self.config.shape).to(x),
                                   txt_ids=torch.zeros(hidden.shape[1], 3).to(x), guidance=guidance,
                                   return_dict=False)[0]
            out = unpack_latents(out, self.config.shape)
        else:
            out = self.transformer(x, encoder_hidden_states=hidden, timestep=timestep,
                                   encoder_attention_mask=mask, return_dict=False)[0]
        return out


class DiffusersTeacher(nn.Module):
    """A diffusers transformer as a teacher; it knows the empty prompt's embedding (the null condition)
    and draws training conditions from a bank of encoded prompts."""

    def __init__(self, transformer: nn.Module, config: DiffusersConfig, null: torch.Tensor,
                 bank: torch.Tensor | None = None):
        super().__init__()
        self.model, self.config = DiffusersVelocity(transformer, config), config
        self.register_buffer("null", null.reshape(1, *null.shape[-2:]), persistent=False)
        # not a buffer: the bank stays in host memory when the teacher moves to a GPU (a real T5's 2,000 prompts
        # are 11 GB), and each batch's conditions go to the device as they are drawn
        self.bank = (bank if bank is not None else self.null).cpu()

    num_classes = 0  # no class labels: conditions are text
    onnx_optimize = DiffusersVelocity.onnx_optimize

    def velocity(self, x, t, condition) -> torch.Tensor:
        return self.model(x, t, condition)

    def null_condition(self, condition: torch.Tensor) -> torch.Tensor:
        return self.null.expand(condition.shape[0], -1, -1)

    def sample_conditions(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        drawn = self.bank[torch.randint(0, self.bank.shape[0], (batch,), generator=generator)]
        return drawn.to(self.null.device, non_blocking=True)

    def make_student(self) -> DiffusersStudent:
        """A trainable copy of the transformer with the student's extra inputs (starts as this teacher)."""
        return DiffusersStudent(copy.deepcopy(self.model.transformer), self.config).requires_grad_(True)

    def make_fake_flow(self) -> DiffusersFakeFlow:
        """A trainable copy with a guidance input, for the methods' online flow of the student's samples."""
        return DiffusersFakeFlow(copy.deepcopy(self.model.transformer), self.config).requires_grad_(True)


def timestep_embedder(transformer: nn.Module) -> nn.Module:
    """The module that embeds the diffusion time (every family has one named `timestep_embedder`)."""
    for name, module in transformer.named_modules():
        if name.endswith("timestep_embedder"):
            return module
    raise ValueError(f"{type(transformer).__name__} has no timestep_embedder to add the student's inputs to")


class DiffusersStudent(nn.Module):
    """The teacher's transformer plus embeddings of the jump length t - s and the guidance scale w,
    added to its time embedding; zero-initialised, so F(x, t, s) starts as the teacher's velocity."""

    extras = ("s", "w")

    def __init__(self, transformer: nn.Module, config: DiffusersConfig):
        super().__init__()
        self.model, self.config = DiffusersVelocity(transformer, config), config
        width = timestep_embedder(transformer).linear_2.out_features
        self.extra_embed = nn.ModuleDict({name: ScalarEmbedder(width, zero_init=True) for name in self.extras})
        self._extra = None  # the current call's extra embedding, read by the hook below
        timestep_embedder(transformer).register_forward_hook(self._add_extra)

    num_classes = 0
    onnx_optimize = DiffusersVelocity.onnx_optimize

    def _add_extra(self, module, inputs, output):
        return output if self._extra is None else output + self._extra.to(output.dtype)

    def average_velocity(self, x, t, s, condition, w) -> torch.Tensor:
        # both embeddings as in FlowNet: the jump length, and w centred on 1 over the usual range
        self._extra = self.extra_embed["w"](guidance_input(w))
        if "s" in self.extra_embed:
            self._extra = self._extra + self.extra_embed["s"](t - s)
        try:
            return self.model(x, t, condition)
        finally:
            self._extra = None

    def jump(self, x, t, s, condition, w) -> torch.Tensor:
        return flow_map(self.average_velocity, x, t, s, condition, w)



class DiffusersFakeFlow(DiffusersStudent):
    """g(x, t, c, w): the transformer with a guidance input only (FakeFlow's interface)."""

    extras = ("w",)

    def velocity(self, x, t, condition, w) -> torch.Tensor:
        return self.average_velocity(x, t, t, condition, w)
