"""Train a text-to-image flow-matching teacher on the shapes data set, in the diffusers layout.

The result is a SANA-layout pipeline folder, as a user's would be: a SanaTransformer2DModel on
pixels (3 x 32 x 32, no VAE), the shapes CLIP's text tower as its text encoder (the token states and
the mask go to the transformer's cross-attention; the tower stays frozen) and CLIP's tokenizer. So
everything downstream (`--teacher diffusers:FOLDER`, distillation, export, serving) is the path a
diffusers user takes. The loss is the teacher's flow matching (docs/methods.md §1) with captions
dropped to the empty prompt at `label_dropout`, so the teacher supports guidance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from distill.diffusers_models import DiffusersTeacher, diffusers_config, save_pipeline
from distill.shapes import ShapesConfig, batch
from distill.teacher import TeacherConfig, flow_matching_loss
from distill.text import encode_prompts, load_conditioner


@dataclass(frozen=True)
class ShapesTeacherConfig:
    width: int = 128  # attention heads x head width
    heads: int = 4
    layers: int = 4
    patch: int = 4  # 8x8 tokens at 32 px: far cheaper a step on a CPU than 2 px patches (16x16 tokens)
    loss: TeacherConfig = field(default_factory=TeacherConfig)


def shapes_transformer(config: ShapesTeacherConfig, text_width: int, shapes: ShapesConfig):
    import diffusers

    head = config.width // config.heads
    return diffusers.SanaTransformer2DModel(
        in_channels=3, out_channels=3, num_attention_heads=config.heads, attention_head_dim=head,
        num_layers=config.layers, num_cross_attention_heads=config.heads, cross_attention_head_dim=head,
        cross_attention_dim=config.width, caption_channels=text_width, sample_size=shapes.size,
        patch_size=config.patch)


def write_pipeline(folder: str | Path, transformer, clip, tokenizer) -> Path:
    """A SanaPipeline folder (model_index.json and its parts) around `transformer` and `clip`'s text tower."""
    import diffusers
    import transformers

    folder = Path(folder)
    text = transformers.CLIPTextModel(clip.config.text_config)
    getattr(text, "text_model", text).load_state_dict(clip.text_model.state_dict())  # transformers 4 / 5 layouts
    return save_pipeline(folder, "SanaPipeline", {
        "transformer": transformer, "text_encoder": text, "tokenizer": tokenizer,
        "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)})


class ShapesTeacherTraining:
    """Trainer method: flow matching on fresh scenes each step, their captions through the frozen text
    encoder (each caption encoded once: a few thousand exist)."""

    ema_name = "teacher"

    def __init__(self, folder: str | Path, config: ShapesTeacherConfig, batch_size: int,
                 shapes: ShapesConfig | None = None):
        from distill.diffusers_models import load_transformer

        self.conditioner, self.tokenizers = load_conditioner(folder)
        transformer = load_transformer(folder).requires_grad_(True)
        null = encode_prompts(self.conditioner, self.tokenizers, [""])[0]
        self.teacher = DiffusersTeacher(transformer, diffusers_config(folder, transformer, self.conditioner.layout),
                                        null)
        self.trainable = {"teacher": self.teacher}
        self.config, self.batch_size, self.shapes = config, batch_size, shapes or ShapesConfig()
        self.known: dict[str, torch.Tensor] = {}

    def conditions(self, captions: list[str]) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in self.known]
        if new:
            self.known.update(zip(new, encode_prompts(self.conditioner, self.tokenizers, new), strict=True))
        return torch.stack([self.known[c] for c in captions])

    def losses(self, generator, logs):
        start = int(torch.randint(0, 2**40, (1,), generator=generator))
        images, scenes = batch(range(start, start + self.batch_size), self.shapes)
        condition = self.conditions([scene.caption for scene in scenes])
        loss = flow_matching_loss(self.teacher, torch.from_numpy(images), condition, self.config.loss, generator)
        logs["loss"] = loss.item()
        yield "teacher", loss


def train_shapes_teacher(clip, tokenizer, out: str | Path, config: ShapesTeacherConfig, train_config,
                         shapes: ShapesConfig | None = None, progress: bool = True) -> Path:
    """Write a fresh pipeline to `out/pipeline`, train its transformer (checkpoints in `out/run`), and
    write the EMA weights back: the returned folder is the teacher, `diffusers:<folder>`."""
    from distill.checkpoint import load_checkpoint, module_state
    from distill.trainer import local_batch_size, train

    shapes = shapes or ShapesConfig()
    folder = Path(out) / "pipeline"
    if not (folder / "model_index.json").is_file():
        write_pipeline(folder, shapes_transformer(config, clip.config.text_config.hidden_size, shapes), clip, tokenizer)
    method = ShapesTeacherTraining(folder, config, local_batch_size(train_config.batch_size), shapes)
    meta = {"kind": "teacher", "net": {"diffusers": str(folder)}, "teacher": asdict(config),
            "data": {"name": "shapes", "shape": [3, shapes.size, shapes.size], "classes": []}}
    train(method, Path(out) / "run", meta, train_config, progress=progress)
    teacher = DiffusersTeacher(method.teacher.model.transformer, method.teacher.config, method.teacher.null[0])
    teacher.load_state_dict(module_state(load_checkpoint(Path(out) / "run")[1], "ema"), strict=False)
    teacher.model.transformer.save_pretrained(folder / "transformer")
    return folder
