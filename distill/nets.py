"""One backbone family for teacher, student and fake flow: a small DiT for images, an MLP for vectors,
and the SiT/DiT transformer of the public class-conditional latent models (`arch="sit"`).

All take (x, t, label) and optional extra scalar conditions (`s` as the jump length t - s, and the
guidance scale `w`). Extras enter through embeddings whose last layer is zero-initialised, so a
student built from a teacher's weights computes exactly the teacher's velocity until it trains.
Attention is torch's fused kernel (flash attention on a GPU, a fused one on the CPU): it exports to ONNX
as plain products, and forward-mode AD (MeanFlow's JVP) runs it as its math kernel (distill/flow.py `jvp`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class NetConfig:
    """Architecture of one network. `shape` is the per-sample data shape: (C, H, W) or (D,)."""

    arch: str = "dit"  # "dit", "mlp", or "sit" (the SiT/DiT layout; distill/sit.py loads official checkpoints)
    shape: tuple[int, ...] = (1, 8, 8)  # per sample: (C, H, W) or (D,); set from the data
    num_classes: int = 10  # set from the data; label num_classes is the null label for guidance
    width: int = 128  # hidden size (dit: token width)
    depth: int = 4  # blocks
    heads: int = 4  # dit and sit only
    patch: int = 2  # dit and sit only
    mlp_ratio: float = 4.0  # hidden size of each block's MLP, as a multiple of width
    extras: tuple[str, ...] = field(default_factory=tuple)  # subset of ("s", "w")

    def __post_init__(self) -> None:
        self.shape = tuple(int(v) for v in self.shape)
        self.extras = tuple(self.extras)
        if self.arch not in ("dit", "mlp", "sit"):
            raise ValueError(f"arch must be 'dit', 'mlp' or 'sit', got {self.arch!r}")
        unknown = set(self.extras) - {"s", "w"}
        if unknown:
            raise ValueError(f"extras may only name 's' and 'w', got {sorted(unknown)}")
        if self.arch in ("dit", "sit"):
            if len(self.shape) != 3:
                raise ValueError(f"the {self.arch} backbone needs image data (C, H, W), got shape {self.shape}")
            _, height, width = self.shape
            if height % self.patch or width % self.patch:
                raise ValueError(f"patch {self.patch} must divide the image size {height}x{width}")
            if self.width % self.heads:
                raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_extras(self, *extras: str) -> NetConfig:
        """The same architecture with these extra conditions (a student or fake flow of a teacher)."""
        return NetConfig(**{**self.to_dict(), "extras": tuple(extras)})


def timestep_embedding(values: torch.Tensor, dim: int, max_freq: float = 100.0, min_freq: float = 0.1) -> torch.Tensor:
    """Sinusoidal embedding of scalars in about [0, 1], frequencies geometric in [min_freq, max_freq].

    The top frequency is kept at 100 rad per unit time (not DDPM's 1000) because students are
    differentiated in time (JVP or a 1e-3 finite difference): a smoother embedding keeps both exact.
    """
    half = dim // 2
    ratio = torch.arange(half, dtype=torch.float32, device=values.device) / max(half - 1, 1)
    freqs = max_freq * (min_freq / max_freq) ** ratio
    args = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def guidance_input(w: torch.Tensor) -> torch.Tensor:
    """What a student's guidance embedding sees of w: centred so the usual 1..3 range lies near 0."""
    return (w - 1.0) / 4.0


class ScalarEmbedder(nn.Module):
    """Sinusoidal features -> MLP. With `zero_init`, the output is exactly zero until trained."""

    def __init__(self, width: int, zero_init: bool = False, freq_dim: int = 128, max_freq: float = 100.0,
                 min_freq: float = 0.1):
        super().__init__()
        self.freq_dim, self.max_freq, self.min_freq = freq_dim, max_freq, min_freq
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        if zero_init:
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(values, self.freq_dim, self.max_freq, self.min_freq))


def sit_time_embedder(width: int) -> ScalarEmbedder:
    """SiT's (and DiT's) time embedding: 256 features, frequencies 10000^(-k/128) for k = 0..127."""
    return ScalarEmbedder(width, freq_dim=256, max_freq=1.0, min_freq=10000.0 ** (-127 / 128))


def sincos_positions(width: int, grid: int) -> torch.Tensor:
    """The fixed 2-D sine-cosine position embedding of SiT/DiT (MAE's): [1, grid * grid, width]."""
    def one_axis(dim: int, positions: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
        angles = positions.reshape(-1, 1).double() * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")  # token = row * grid + col
    return torch.cat([one_axis(width // 2, cols), one_axis(width // 2, rows)], dim=1).float()[None]


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # h is [B, N, D] for the DiT and [B, D] for the MLP; shift/scale are [B, D].
    if h.dim() == 3:
        shift, scale = shift[:, None], scale[:, None]
    return h * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = h.shape
        head_dim = width // self.heads
        qkv = self.qkv(h).reshape(batch, tokens, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(head_dim)) v, fused: the [tokens, tokens] weights are never held whole, which at
        # 1024 px (4096 tokens a head) would take more memory than the rest of the forward
        out = nn.functional.scaled_dot_product_attention(*qkv.unbind(0))
        out = out.transpose(1, 2).reshape(batch, tokens, width)
        return self.proj(out)


class Block(nn.Module):
    """adaLN-zero residual block; attention is optional (the MLP backbone has none)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, attention: bool):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.attn = Attention(width, heads) if attention else None
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.n_mod = 6 if attention else 3
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, self.n_mod * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        mods = self.ada(cond).chunk(self.n_mod, dim=-1)
        if self.attn is not None:
            shift_a, scale_a, gate_a = mods[:3]
            gate_a = gate_a[:, None]
            h = h + gate_a * self.attn(modulate(self.norm1(h), shift_a, scale_a))
        shift_m, scale_m, gate_m = mods[-3:]
        if h.dim() == 3:
            gate_m = gate_m[:, None]
        return h + gate_m * self.mlp(modulate(self.norm2(h), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)
        for layer in (self.ada[1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(h), shift, scale))


class FlowNet(nn.Module):
    """v = net(x, t, label, s=None, w=None): the shared backbone of every model in the project."""

    gradient_checkpointing = False  # set by `enable_gradient_checkpointing`, as on a diffusers model

    def __init__(self, config: NetConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.t_embed = sit_time_embedder(width) if config.arch == "sit" else ScalarEmbedder(width)
        self.y_embed = nn.Embedding(config.num_classes + 1, width)  # last index is the null label
        nn.init.normal_(self.y_embed.weight, std=0.02)
        self.extra_embed = nn.ModuleDict({name: ScalarEmbedder(width, zero_init=True) for name in config.extras})
        if config.arch in ("dit", "sit"):
            channels, height, img_width = config.shape
            self.grid = (height // config.patch, img_width // config.patch)
            patch_dim = channels * config.patch * config.patch
            self.patch_in = nn.Linear(patch_dim, width)
            self.pos = nn.Parameter(sincos_positions(width, self.grid[0]) if config.arch == "sit" and
                                    self.grid[0] == self.grid[1] else
                                    torch.randn(1, self.grid[0] * self.grid[1], width) * 0.02)
            out_dim = patch_dim
        else:
            dim = math.prod(config.shape)
            self.x_in = nn.Linear(dim, width)
            out_dim = dim
        self.blocks = nn.ModuleList(
            Block(width, config.heads, config.mlp_ratio, attention=config.arch != "mlp") for _ in range(config.depth)
        )
        self.final = FinalLayer(width, out_dim)

    def condition(self, t, label, s=None, w=None) -> torch.Tensor:
        # SiT's time runs the other way (t = 1 is data): it sees 1 - t
        cond = self.t_embed(1 - t if self.config.arch == "sit" else t) + self.y_embed(label)
        if "s" in self.extra_embed:
            if s is None:
                raise ValueError("this network takes the jump end time s")
            cond = cond + self.extra_embed["s"](t - s)
        if "w" in self.extra_embed:
            if w is None:
                raise ValueError("this network takes the guidance scale w")
            cond = cond + self.extra_embed["w"](guidance_input(w))
        return cond

    def enable_gradient_checkpointing(self) -> None:
        """Keep only each block's input for the backward pass and recompute the rest there: less memory for
        activations, one more forward of the blocks."""
        self.gradient_checkpointing = True

    def _blocks(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, cond, use_reentrant=False)
            else:
                h = block(h, cond)
        return h

    def forward(self, x, t, label, s=None, w=None) -> torch.Tensor:
        cond = self.condition(t, label, s, w)
        if self.config.arch == "mlp":
            h = self._blocks(self.x_in(x.reshape(x.shape[0], -1)), cond)
            return self.final(h, cond).reshape(x.shape)
        if self.config.arch == "sit":  # SiT predicts x - eps along its own time: minus our velocity
            return -self._dit(x, cond)
        return self._dit(x, cond)

    def _dit(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        patch, (gh, gw) = self.config.patch, self.grid
        tokens = x.reshape(batch, channels, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
        h = self._blocks(self.patch_in(tokens.reshape(batch, gh * gw, channels * patch * patch)) + self.pos, cond)
        out = self.final(h, cond).reshape(batch, gh, gw, channels, patch, patch)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


# The MLP member of the backbone family, the one the embedded digits bundle uses: on 2 CPU cores the DiT
# learns digits far slower per minute (docs/recipe.md); width 192 keeps that bundle near 16 MB.
DIGITS_NET = NetConfig(arch="mlp", width=192, depth=4, mlp_ratio=2.0)
