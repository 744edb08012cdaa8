"""The SiT/DiT transformer in our convention, and public-layout checkpoints loaded into it: checked
against a reference forward written from the SiT model's structure, on random weights."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from distill.flow import euler_sample, flow_map_sample
from distill.models import Student, load_teacher
from distill.nets import FlowNet, sincos_positions
from distill.sit import config_of, sit_config

HIDDEN, DEPTH, HEADS, PATCH, CHANNELS, SIDE, CLASSES = 128, 2, 2, 2, 4, 8, 10  # heads of 64 dims, as DiT


def public_state(learn_sigma: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the public SiT key names and shapes (nothing zero, so every path shows)."""
    gen = torch.Generator().manual_seed(seed)
    out = CHANNELS * (2 if learn_sigma else 1)
    shapes = {
        "x_embedder.proj.weight": (HIDDEN, CHANNELS, PATCH, PATCH), "x_embedder.proj.bias": (HIDDEN,),
        "pos_embed": (1, (SIDE // PATCH) ** 2, HIDDEN),
        "t_embedder.mlp.0.weight": (HIDDEN, 256), "t_embedder.mlp.0.bias": (HIDDEN,),
        "t_embedder.mlp.2.weight": (HIDDEN, HIDDEN), "t_embedder.mlp.2.bias": (HIDDEN,),
        "y_embedder.embedding_table.weight": (CLASSES + 1, HIDDEN),
        "final_layer.adaLN_modulation.1.weight": (2 * HIDDEN, HIDDEN),
        "final_layer.adaLN_modulation.1.bias": (2 * HIDDEN,),
        "final_layer.linear.weight": (PATCH * PATCH * out, HIDDEN), "final_layer.linear.bias": (PATCH * PATCH * out,),
    }
    for b in range(DEPTH):
        shapes.update({f"blocks.{b}.attn.qkv.weight": (3 * HIDDEN, HIDDEN), f"blocks.{b}.attn.qkv.bias": (3 * HIDDEN,),
                       f"blocks.{b}.attn.proj.weight": (HIDDEN, HIDDEN), f"blocks.{b}.attn.proj.bias": (HIDDEN,),
                       f"blocks.{b}.mlp.fc1.weight": (4 * HIDDEN, HIDDEN), f"blocks.{b}.mlp.fc1.bias": (4 * HIDDEN,),
                       f"blocks.{b}.mlp.fc2.weight": (HIDDEN, 4 * HIDDEN), f"blocks.{b}.mlp.fc2.bias": (HIDDEN,),
                       f"blocks.{b}.adaLN_modulation.1.weight": (6 * HIDDEN, HIDDEN),
                       f"blocks.{b}.adaLN_modulation.1.bias": (6 * HIDDEN,)})
    return {k: 0.1 * torch.randn(v, generator=gen) for k, v in shapes.items()}


def reference_sit(state, x, t, y, learn_sigma=True):
    """SiT's forward in its own convention, written from the reference model's structure: convolutional
    patch embedding, DiT timestep features, adaLN-zero blocks, unpatchify (p, q, c), sigma dropped."""
    def linear(name, h):
        return h @ state[f"{name}.weight"].T + state[f"{name}.bias"]

    def norm(h):
        return nn.functional.layer_norm(h, h.shape[-1:], eps=1e-6)

    h = nn.functional.conv2d(x, state["x_embedder.proj.weight"], state["x_embedder.proj.bias"], stride=PATCH)
    h = h.flatten(2).transpose(1, 2) + state["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    t_emb = linear("t_embedder.mlp.2", nn.functional.silu(linear("t_embedder.mlp.0",
                                                                    torch.cat([torch.cos(args), torch.sin(args)], -1))))
    c = t_emb + state["y_embedder.embedding_table.weight"][y]
    for b in range(DEPTH):
        mods = linear(f"blocks.{b}.adaLN_modulation.1", nn.functional.silu(c)).chunk(6, dim=1)
        shift, scale, gate = mods[0][:, None], mods[1][:, None], mods[2][:, None]
        a = norm(h) * (1 + scale) + shift
        qkv = linear(f"blocks.{b}.attn.qkv", a).reshape(a.shape[0], a.shape[1], 3, HEADS, HIDDEN // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(HIDDEN // HEADS), -1) @ v
        h = h + gate * linear(f"blocks.{b}.attn.proj", attended.transpose(1, 2).reshape(a.shape))
        shift, scale, gate = mods[3][:, None], mods[4][:, None], mods[5][:, None]
        m = norm(h) * (1 + scale) + shift
        h = h + gate * linear(f"blocks.{b}.mlp.fc2", nn.functional.gelu(linear(f"blocks.{b}.mlp.fc1", m),
                                                                         approximate="tanh"))
    shift, scale = linear("final_layer.adaLN_modulation.1", nn.functional.silu(c)).chunk(2, dim=1)
    h = linear("final_layer.linear", norm(h) * (1 + scale[:, None]) + shift[:, None])
    grid, out = SIDE // PATCH, CHANNELS * (2 if learn_sigma else 1)
    image = torch.einsum("nhwpqc->nchpwq", h.reshape(h.shape[0], grid, grid, PATCH, PATCH, out))
    image = image.reshape(h.shape[0], out, SIDE, SIDE)
    return image[:, :CHANNELS]


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_a_public_checkpoint_loads_into_our_convention(learn_sigma, tmp_path):
    state = public_state(learn_sigma)
    path = tmp_path / "sit.pt"
    torch.save({"ema": state, "opt": {}}, path)  # a training checkpoint holding the EMA weights
    teacher = load_teacher(f"sit:{path}")
    assert teacher.config == config_of(state) and teacher.num_classes == CLASSES
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, CHANNELS, SIDE, SIDE, generator=gen), torch.rand(3, generator=gen)
    y = torch.tensor([0, 7, CLASSES])  # the null label too
    with torch.no_grad():
        ours = teacher.velocity(x, t, y)
        theirs = reference_sit(state, x, 1 - t, y, learn_sigma)  # SiT's time runs the other way
    assert torch.allclose(ours, -theirs, atol=1e-5), (ours + theirs).abs().max()  # ...and predicts x - eps


def test_the_benches_write_a_teacher_back_in_the_public_layout(tmp_path):
    """flowmap/bench_stages.public_layout (the real-size benches' SiT teachers) inverts our loader: the written
    checkpoint loads as the same network."""
    from distill.models import Teacher
    from flowmap.bench_stages import public_layout

    torch.manual_seed(0)
    teacher = Teacher(sit_config("S/2", (CHANNELS, SIDE, SIDE), num_classes=CLASSES))
    with torch.no_grad():
        for parameter in teacher.parameters():  # adaLN-Zero's zeros would hide a dropped or misplaced key
            parameter.add_(0.02 * torch.randn(parameter.shape))
    torch.save(public_layout(teacher), tmp_path / "sit.pt")
    loaded = load_teacher(f"sit:{tmp_path / 'sit.pt'}")
    gen = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, CHANNELS, SIDE, SIDE, generator=gen), torch.rand(2, generator=gen), torch.tensor([3, 9])
    with torch.no_grad():
        assert torch.allclose(loaded.velocity(x, t, y), teacher.velocity(x, t, y), atol=1e-5)


def test_sizes_and_errors():
    xl = sit_config("XL/2")
    assert (xl.width, xl.depth, xl.heads, xl.patch, xl.shape, xl.num_classes) == (1152, 28, 16, 2, (4, 32, 32), 1000)
    with pytest.raises(ValueError, match="unknown SiT size 'XXL/2'"):
        sit_config("XXL/2")
    with pytest.raises(ValueError, match="not a SiT/DiT checkpoint: it has no 'x_embedder.proj.weight'"):
        config_of({"foo": torch.zeros(1)})


def test_a_file_that_is_not_a_whole_sit_checkpoint_is_one_clear_error(tmp_path):
    """A text file, a checkpoint missing a tensor, one with a tensor of another shape: each a line naming it."""
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    state = public_state()
    torch.save({k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}, tmp_path / "missing.pt")
    torch.save({**state, "blocks.0.attn.proj.weight": torch.zeros(3, 3)}, tmp_path / "shape.pt")
    for name, detail in (("prompts.txt", ""), ("missing.pt", "it has no tensor 'blocks.1.mlp.fc2.bias'"),
                         ("shape.pt", "size mismatch")):
        with pytest.raises(ValueError, match=f"teacher 'sit:.*{name}': not a SiT/DiT checkpoint in the public "
                                             f"layout we read \\(.*{detail}"):
            load_teacher(f"sit:{tmp_path / name}")


def test_position_embedding_is_maes_sine_cosine():
    grid, width = 4, 16

    def one_axis(dim, pos):  # MAE's 1-D formula, in numpy
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))  # w goes first
    expected = np.concatenate([one_axis(width // 2, w), one_axis(width // 2, h)], axis=1)
    assert np.allclose(sincos_positions(width, grid)[0].numpy(), expected, atol=1e-6)


def test_a_student_of_a_sit_teacher_starts_as_its_euler_step(tmp_path):
    path = tmp_path / "sit.pt"
    torch.save(public_state(), path)
    teacher = load_teacher(f"sit:{path}")
    student = Student.from_teacher(teacher).eval()
    assert isinstance(student.net, FlowNet) and student.config.arch == "sit"
    gen = torch.Generator().manual_seed(2)
    eps, label = torch.randn(2, CHANNELS, SIDE, SIDE, generator=gen), torch.tensor([3, 4])
    with torch.no_grad():
        jump = flow_map_sample(student.average_velocity, eps, 1, label, torch.full((2,), 1.5))
        euler = euler_sample(lambda xx, tt: teacher.velocity(xx, tt, label), eps, 1)
    assert torch.allclose(jump, euler, atol=1e-5)
