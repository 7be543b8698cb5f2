"""Shared fixtures: small generated Llama-shaped checkpoint pairs, and a CLI runner."""

from __future__ import annotations

import json
import os
import struct
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from typer.testing import CliRunner

from fastmerge.synthetic import PRESETS, ModelShape, write_pair

TINY_30_LAYERS = ModelShape(**{**PRESETS["tiny"].__dict__, "layers": 30})
"""The tiny widths with SmolLM-135M's 30 layers, for recipes with layer_range [0, 30]."""

# Fuzzing budgets (tests/test_fuzz.py): "ci" is the default and bounded; "long" is the run on
# demand, chosen with `pytest --hypothesis-profile=long` or FASTMERGE_FUZZ_PROFILE=long. The
# deadline is the "never hang" check: parsing a file of a few kB takes milliseconds, so 5 s
# only trips on a real hang, even on a loaded machine.
settings.register_profile("ci", max_examples=250, deadline=timedelta(seconds=5))
settings.register_profile("long", max_examples=20_000, deadline=timedelta(seconds=5))
settings.load_profile(os.environ.get("FASTMERGE_FUZZ_PROFILE", "ci"))


@pytest.fixture(scope="session")
def pair_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pairs")


@pytest.fixture(scope="session")
def tiny_pair(pair_cache: Path) -> tuple[Path, Path]:
    """A tied, single-file pair of the tiny preset. Tests must not modify it."""
    return write_pair(pair_cache / "tied", "tiny")


@pytest.fixture(scope="session")
def tiny_untied_sharded_pair(pair_cache: Path) -> tuple[Path, Path]:
    """An untied pair, each model in 3 shards with an index."""
    return write_pair(pair_cache / "untied-sharded", "tiny", tied=False, shards=3)


@pytest.fixture(scope="session")
def tiny_30_layer_pair(pair_cache: Path) -> tuple[Path, Path]:
    """A tied pair of 30 tiny layers: base and "instruct". Tests must not modify it."""
    return write_pair(pair_cache / "tiny-30", TINY_30_LAYERS, names=("base", "instruct"))


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def copy_model(source: Path, destination: Path) -> Path:
    """A writable copy of a model directory, for tests that damage or change it."""
    destination.mkdir(parents=True)
    for path in source.iterdir():
        (destination / path.name).write_bytes(path.read_bytes())
    return destination


def read_header(path: Path) -> dict:
    length = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return json.loads(path.read_bytes()[8 : 8 + length])


def write_raw(path: Path, header: dict | bytes, data: bytes) -> None:
    """A safetensors file with exactly this header (JSON object or raw bytes) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def entries_of(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def write_hub_cache(cache: Path, repo_id: str, model: Path, revision: str = "0" * 40) -> Path:
    """Lay `model`'s files out as huggingface_hub caches a download of `repo_id`: blobs, a
    snapshot of links to them, and refs/main. Returns the snapshot directory."""
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for path in model.iterdir():
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snapshot
