"""The naive merge that fastmerge is measured against: load both state dicts whole, merge
each tensor with whole-tensor fp32 math, save the result with safetensors' save_file.

    python benchmarks/naive_merge.py BASE_DIR OTHER_DIR OUT_DIR T
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def naive_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """The textbook formula on whole tensors: full-size fp32 copies, fp32 norms."""
    x, y = a.float(), b.float()
    norm_x, norm_y = x.norm(), y.norm()
    unit_x = x / norm_x if norm_x > 1e-8 else x
    unit_y = y / norm_y if norm_y > 1e-8 else y
    dot = (unit_x * unit_y).sum().clamp(-1, 1).item()
    if abs(dot) > 0.9995:
        return ((1 - t) * x + t * y).half()
    theta = math.acos(dot)
    return (
        math.sin((1 - t) * theta) / math.sin(theta) * x + math.sin(t * theta) / math.sin(theta) * y
    ).half()


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return load_file(directory / "model.safetensors")
    state = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(directory / shard))
    return state


def main() -> None:
    base, other, out, t = (
        Path(sys.argv[1]),
        Path(sys.argv[2]),
        Path(sys.argv[3]),
        float(sys.argv[4]),
    )
    a, b = load_state_dict(base), load_state_dict(other)
    merged = {name: naive_slerp(a[name], b[name], t) for name in a}
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, out / "model.safetensors", metadata={"format": "pt"})


if __name__ == "__main__":
    main()
