"""Synthetic Llama-shaped checkpoint pairs for the demo, the tests and the benchmarks.

No model can be downloaded where fastmerge is tested, so it builds its own: a base model of
random weights (std 0.02 matrices, unit norm weights, like a fresh Llama) and a perturbed
"fine-tuned" copy. Each tensor of the copy is b = a + r·‖a‖·n/‖n‖ with n Gaussian noise, so
that cos(a, b) ≈ 1/√(1 + r²): about a fifth of the tensors get r = 0.01 and fall under
SLERP's linear threshold (|cos| > 0.9995), the rest get r log-uniform in [0.05, 3], angles
of about 3° to 72°. Everything is seeded: the same arguments give the same bytes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
STAMP_FILE = "fastmerge-synthetic.json"


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes in the order transformers saves a LlamaForCausalLM."""
        kv = self.kv_heads * self.head_dim
        shapes: list[tuple[str, tuple[int, ...]]] = [
            ("model.embed_tokens.weight", (self.vocab, self.hidden))
        ]
        for i in range(self.layers):
            prefix = f"model.layers.{i}"
            shapes += [
                (f"{prefix}.input_layernorm.weight", (self.hidden,)),
                (f"{prefix}.mlp.down_proj.weight", (self.hidden, self.intermediate)),
                (f"{prefix}.mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                (f"{prefix}.mlp.up_proj.weight", (self.intermediate, self.hidden)),
                (f"{prefix}.post_attention_layernorm.weight", (self.hidden,)),
                (f"{prefix}.self_attn.k_proj.weight", (kv, self.hidden)),
                (f"{prefix}.self_attn.o_proj.weight", (self.hidden, self.hidden)),
                (f"{prefix}.self_attn.q_proj.weight", (self.hidden, self.hidden)),
                (f"{prefix}.self_attn.v_proj.weight", (kv, self.hidden)),
            ]
        shapes.append(("model.norm.weight", (self.hidden,)))
        if not self.tied:
            shapes.append(("lm_head.weight", (self.vocab, self.hidden)))
        return shapes

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensor_shapes())

    def config(self, dtype: torch.dtype) -> dict:
        """A transformers LlamaConfig as config.json holds it."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tied,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }


PRESETS: dict[str, ModelShape] = {
    # Small enough for unit tests: builds and merges in well under a second.
    "tiny": ModelShape(
        layers=2, hidden=64, intermediate=176, heads=4, kv_heads=2, vocab=320, tied=True
    ),
    # The shape of HuggingFaceTB/SmolLM-135M, the seed model card's base.
    "smollm-135m": ModelShape(
        layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152, tied=True
    ),
    # A 1.1B-parameter Llama (the shape of TinyLlama-1.1B), untied.
    "1b": ModelShape(
        layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000, tied=False
    ),
}

LERP_SHARE = 5
"""One tensor in LERP_SHARE is perturbed so little that SLERP interpolates it linearly."""


def perturbation_scale(index: int, seed: int) -> float:
    """The relative size r of tensor `index`'s perturbation (cos ≈ 1/√(1 + r²))."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    if index % LERP_SHARE == 2:
        return 0.01
    u = torch.rand((), generator=generator).item()
    return math.exp(math.log(0.05) + u * (math.log(3.0) - math.log(0.05)))


def generate_pair(
    shape: ModelShape, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, base tensor, perturbed tensor) for every tensor of the model, in order."""
    for index, (name, tensor_shape) in enumerate(shape.tensor_shapes()):
        generator = torch.Generator().manual_seed(seed * 7919 + index)
        if len(tensor_shape) == 1:
            a = torch.ones(tensor_shape) + 0.05 * torch.randn(tensor_shape, generator=generator)
        else:
            a = 0.02 * torch.randn(tensor_shape, generator=generator)

        noise = torch.randn(tensor_shape, generator=generator)
        scale = perturbation_scale(index, seed) * a.norm() / noise.norm()
        b = a + scale * noise
        yield name, a.to(dtype), b.to(dtype)


def write_pair(
    directory: str | Path,
    preset: str | ModelShape = "smollm-135m",
    *,
    shards: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    tied: bool | None = None,
    names: tuple[str, str] = ("base", "other"),
) -> tuple[Path, Path]:
    """Write the pair as `directory/names[0]` and `directory/names[1]`.

    A pair already there from the same arguments is reused, not written again.
    """
    shape = PRESETS[preset] if isinstance(preset, str) else preset
    if tied is not None:
        shape = ModelShape(**{**asdict(shape), "tied": tied})

    root = Path(directory)
    paths = root / names[0], root / names[1]
    stamp = {
        "version": GENERATOR_VERSION,
        "shape": asdict(shape),
        "shards": shards,
        "dtype": str(dtype),
        "seed": seed,
    }
    if all(
        (p / STAMP_FILE).is_file() and json.loads((p / STAMP_FILE).read_text()) == stamp
        for p in paths
    ):
        logger.info("reusing the synthetic pair in %s", root)
        return paths

    logger.info("writing a synthetic %d-parameter pair into %s", shape.parameters, root)
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
        for old in [*path.glob("*.safetensors"), *path.glob("*.json")]:
            old.unlink()

    groups = _shard_groups(shape, shards)
    shards = len(set(groups.values()))
    files = (
        ["model.safetensors"]
        if shards == 1
        else [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    )
    pending_a: dict[str, torch.Tensor] = {}
    pending_b: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    for name, a, b in generate_pair(shape, dtype=dtype, seed=seed):
        pending_a[name], pending_b[name] = a, b
        shard = groups[name]
        weight_map[name] = files[shard]
        if len(pending_a) == sum(1 for g in groups.values() if g == shard):
            save_file(pending_a, paths[0] / files[shard], metadata={"format": "pt"})
            save_file(pending_b, paths[1] / files[shard], metadata={"format": "pt"})
            pending_a, pending_b = {}, {}

    total = sum(math.prod(s) for _, s in shape.tensor_shapes()) * dtype.itemsize
    for path in paths:
        if shards > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (path / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
        (path / "generation_config.json").write_text(
            json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=2)
        )
        (path / STAMP_FILE).write_text(json.dumps(stamp))
    return paths


def _shard_groups(shape: ModelShape, shards: int) -> dict[str, int]:
    """Assign tensors, in order, to `shards` groups of about equal size."""
    sizes = [(name, math.prod(s)) for name, s in shape.tensor_shapes()]
    total = sum(size for _, size in sizes)
    groups, filled = {}, 0
    for name, size in sizes:
        groups[name] = min(shards - 1, filled * shards // total)
        filled += size

    # A tensor larger than a share leaves some groups empty; number the others densely.
    dense = {group: i for i, group in enumerate(sorted(set(groups.values())))}
    return {name: dense[group] for name, group in groups.items()}
