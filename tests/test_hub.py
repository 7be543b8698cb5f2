"""Hub ids resolved through a huggingface_hub cache that the tests lay out, offline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fastmerge
from fastmerge import hub
from fastmerge.errors import CheckpointError
from fastmerge.reader import open_checkpoint

from .conftest import copy_model, write_hub_cache


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_ids_resolve_to_cached_snapshots_offline(tiny_pair, offline_cache, tmp_path):
    a, b = tiny_pair
    snapshot = write_hub_cache(offline_cache, "org/base", a)
    write_hub_cache(offline_cache, "org/other", b)

    assert hub.resolve("org/base") == snapshot
    result = fastmerge.merge("org/base", "org/other", tmp_path / "out", 0.6)
    local = fastmerge.merge(a, b, tmp_path / "local", 0.6)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        tmp_path / "local" / "model.safetensors"
    ).read_bytes()
    assert [r.angle for r in result.tensors] == [r.angle for r in local.tensors]
    card = (tmp_path / "out" / "README.md").read_text()
    assert 'base_model: "org/base"' in card and '  - model: "org/other"' in card


def test_existing_local_paths_win_over_hub_ids(tiny_pair, offline_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    copy_model(tiny_pair[0], tmp_path / "org" / "base")
    assert hub.resolve("org/base") == Path("org/base")
    assert hub.resolve("/absolute/missing") == Path("/absolute/missing")
    assert not hub.is_repo_id("../escape") and not hub.is_repo_id("a/b/c")


def test_a_model_missing_from_the_offline_cache_is_named(tiny_pair, offline_cache, tmp_path):
    with pytest.raises(CheckpointError) as caught:
        fastmerge.merge("org/absent", tiny_pair[1], tmp_path / "out", 0.6)
    message = str(caught.value)
    assert message.startswith("org/absent: no such file or directory, and not found in the local")
    assert "HF_HUB_OFFLINE is set" in message and "HF_HUB_CACHE" in message
    assert not (tmp_path / "out").exists()


def test_a_sharded_snapshot_of_links_into_blobs_opens(tiny_untied_sharded_pair, offline_cache):
    snapshot = write_hub_cache(offline_cache, "org/sharded", tiny_untied_sharded_pair[0])
    with (
        open_checkpoint(hub.resolve("org/sharded")) as cached,
        open_checkpoint(tiny_untied_sharded_pair[0]) as local,
    ):
        assert len(cached.files) == 3 and cached.directory == snapshot
        for name in local.tensors:
            assert torch.equal(cached.view(name), local.view(name)), name


def test_a_pickle_only_snapshot_gets_the_pickle_message(offline_cache, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    (pickled / "config.json").write_text("{}")
    write_hub_cache(offline_cache, "org/pickled", pickled)
    with pytest.raises(CheckpointError, match=r"is a pickle checkpoint.*save_pretrained"):
        open_checkpoint(hub.resolve("org/pickled"))


def test_a_pickle_only_repository_is_refused_before_downloading(monkeypatch):
    class FakeApi:
        def list_repo_files(self, repo_id):
            return ["config.json", "pytorch_model.bin"]

    class FakeHub:
        HfApi = FakeApi

        @staticmethod
        def snapshot_download(*args, **kwargs):
            raise AssertionError("nothing may be downloaded")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", FakeHub)
    with pytest.raises(CheckpointError, match="org/pickled holds only pickle checkpoints"):
        hub.resolve("org/pickled")


def test_without_huggingface_hub_the_message_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match=r"pip install 'fastmerge\[hub\]'"):
        hub.resolve("org/anything")


def test_a_snapshot_link_leaving_its_repository_is_still_refused(offline_cache, tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "outside.safetensors")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors.index.json").write_text(
        '{"weight_map": {"w": "model-00001-of-00001.safetensors"}}'
    )
    snapshot = write_hub_cache(offline_cache, "org/escape", model)
    (snapshot / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(CheckpointError, match="through a symbolic link"):
        open_checkpoint(hub.resolve("org/escape"))


def test_hub_ids_on_the_command_line(runner, tiny_pair, offline_cache, tmp_path):
    from fastmerge.cli import app

    write_hub_cache(offline_cache, "org/base", tiny_pair[0])
    write_hub_cache(offline_cache, "org/other", tiny_pair[1])
    result = runner.invoke(app, ["slerp", "org/base", "org/other", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    fastmerge.merge(*tiny_pair, tmp_path / "local", 0.5)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        tmp_path / "local" / "model.safetensors"
    ).read_bytes()


def test_only_the_files_a_merge_uses_are_downloaded(monkeypatch, tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    listing = [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "consolidated.safetensors",
        "pytorch_model.bin",
        "onnx/model.onnx",
        "README.md",
    ]
    calls = {}

    class FakeHub:
        class HfApi:
            def list_repo_files(self, repo_id):
                return listing

        @staticmethod
        def snapshot_download(repo_id, **kwargs):
            calls.update(kwargs, repo_id=repo_id)
            return str(tmp_path)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", FakeHub)
    assert hub.resolve("org/model") == tmp_path
    assert calls["repo_id"] == "org/model" and calls["local_files_only"] is False

    selected = set(filter_repo_objects(listing, allow_patterns=calls["allow_patterns"]))
    assert selected == set(listing[:8])
