"""The command line: exit codes, messages on stderr, no tracebacks, no partial output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmerge.cli import EXIT_BAD_INPUT, app, parse_size

from .conftest import copy_model, read_header, write_raw


def _run(runner, *args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_slerp_writes_the_merge_and_prints_a_summary(runner, tiny_pair, tmp_path):
    a, b = tiny_pair
    result = _run(runner, "slerp", a, b, "--t", "0.6", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "merged 20 tensors" in result.stdout
    assert "branches:" in result.stdout and "slerp" in result.stdout
    assert f"output: {tmp_path / 'out'}" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_quiet_prints_nothing(runner, tiny_pair, tmp_path):
    result = _run(runner, "slerp", *tiny_pair, "-o", tmp_path / "out", "--quiet")
    assert result.exit_code == 0 and result.stdout == ""


def test_shard_size_and_dtype_options(runner, tiny_pair, tmp_path):
    result = _run(
        runner,
        "slerp",
        *tiny_pair,
        "-o",
        tmp_path / "out",
        "--shard-size",
        "40kB",
        "--dtype",
        "bfloat16",
    )
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    shard = sorted((tmp_path / "out").glob("model-*.safetensors"))[0]
    assert {t.dtype for t in load_file(shard).values()} == {torch.bfloat16}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5GB", 5_000_000_000), ("2GiB", 2 * 2**30), ("1000", 1000), ("1.5 MB", 1_500_000)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def _assert_refused(result, out: Path, *fragments: str) -> None:
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr.replace("\n", " "), result.stderr
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if "fastmerge-partial" in p.name]


def _damaged_copy(source: Path, destination: Path, edit) -> Path:
    model = copy_model(source, destination)
    path = model / "model.safetensors"
    raw = path.read_bytes()
    header = read_header(path)
    data = raw[8 + int.from_bytes(raw[:8], "little") :]
    edit(header)
    write_raw(path, header, data)
    return model


def test_every_bad_input_gets_its_message_exit_2_and_no_output(runner, tiny_pair, tmp_path):
    a, b = tiny_pair
    out = tmp_path / "out"
    some = "model.layers.0.mlp.up_proj.weight"

    def entry(key, value):
        return lambda header: header[some].__setitem__(key, value)

    cases = {
        # The entry goes but its bytes stay: the safetensors library refuses such a file too.
        "entry without bytes": (
            lambda h: h.pop("model.norm.weight"),
            ["bytes 225792-225920 of the data buffer belong to no tensor"],
        ),
        "shape": (entry("shape", [88, 32]), ["needs 5632 bytes but data_offsets"]),
        "unknown dtype": (entry("dtype", "Q4"), [f"tensor '{some}': unknown dtype 'Q4'"]),
        "offsets past the end": (
            entry("data_offsets", [0, 10**9]),
            ["reach past the end of the data buffer"],
        ),
    }
    for label, (edit, fragments) in cases.items():
        damaged = _damaged_copy(a, tmp_path / label.replace(" ", "-"), edit)
        result = _run(runner, "slerp", damaged, b, "-o", out)
        _assert_refused(result, out, *fragments)

    bad_json = copy_model(a, tmp_path / "bad-json")
    (bad_json / "model.safetensors").write_bytes(b"\x05\0\0\0\0\0\0\0{oops")
    _assert_refused(_run(runner, "slerp", bad_json, b, "-o", out), out, "not valid JSON")

    pickle_dir = tmp_path / "pickled"
    pickle_dir.mkdir()
    (pickle_dir / "pytorch_model.bin").write_bytes(b"\x80\x04")
    _assert_refused(
        _run(runner, "slerp", pickle_dir, b, "-o", out), out, "pickle checkpoint", "save_pretrained"
    )

    _assert_refused(
        _run(runner, "slerp", a, tmp_path / "nowhere", "-o", out), out, "no such file or directory"
    )
    _assert_refused(
        _run(runner, "slerp", a, b, "--t", "1.5", "-o", out),
        out,
        "t = 1.5 is outside [0, 1]",
        "--extrapolate",
    )
    _assert_refused(
        _run(runner, "slerp", a, b, "--dtype", "int8", "-o", out),
        out,
        "output dtype 'int8' is not supported",
    )
    _assert_refused(
        _run(runner, "slerp", a, b, "--device", "tpu", "-o", out), out, "unknown device 'tpu'"
    )


def test_architecture_and_vocabulary_differences(runner, tiny_pair, tmp_path):
    a, b = tiny_pair
    other = copy_model(b, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    out = tmp_path / "out"

    result = _run(runner, "slerp", a, other, "-o", out)
    _assert_refused(result, out, "config.json model_type differs", "--allow-architecture-mismatch")
    result = _run(runner, "slerp", a, other, "-o", out, "--allow-architecture-mismatch", "-q")
    assert result.exit_code == 0

    tensors = load_file(other / "model.safetensors")
    tensors["model.embed_tokens.weight"] = torch.zeros(330, 64, dtype=torch.bfloat16)
    save_file(tensors, other / "model.safetensors")
    result = _run(
        runner, "slerp", a, other, "-o", tmp_path / "out2", "--allow-architecture-mismatch"
    )
    _assert_refused(
        result,
        tmp_path / "out2",
        "vocabularies differ (320 vs 330 tokens)",
        "resize_token_embeddings",
    )


def test_existing_output_and_output_inside_input(runner, tiny_pair, tmp_path):
    a, b = tiny_pair
    out = tmp_path / "out"
    out.mkdir()
    result = _run(runner, "slerp", a, b, "-o", out)
    assert result.exit_code == EXIT_BAD_INPUT and "already exists; pass --force" in result.stderr
    assert list(out.iterdir()) == []

    base = copy_model(a, tmp_path / "base")
    result = _run(runner, "slerp", base, b, "-o", base / "merged")
    assert result.exit_code == EXIT_BAD_INPUT and "inside the input" in result.stderr
    assert not (base / "merged").exists()


def test_debug_shows_the_traceback(runner, tiny_pair, tmp_path):
    result = _run(
        runner, "slerp", tiny_pair[0], tmp_path / "nowhere", "-o", tmp_path / "o", "--debug"
    )
    assert result.exit_code != 0
    assert "no such file or directory" in str(result.exception)


def test_cuda_without_a_gpu_is_refused(runner, tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = _run(runner, "slerp", *tiny_pair, "-o", tmp_path / "out", "--device", "cuda")
    _assert_refused(result, tmp_path / "out", "--device cuda: torch sees no CUDA device")


def test_inspect_one_model_lists_tensors(runner, tiny_pair):
    result = _run(runner, "inspect", tiny_pair[0])
    assert result.exit_code == 0, result.output
    assert "model.embed_tokens.weight" in result.stdout and "320x64" in result.stdout
    assert "20 tensors" in result.stdout


def test_inspect_two_models_shows_angles_without_writing(runner, tiny_pair, tmp_path):
    import fastmerge

    before = sorted(p for model in tiny_pair for p in model.iterdir())
    result = _run(runner, "inspect", *tiny_pair)
    assert result.exit_code == 0, result.output
    assert sorted(p for model in tiny_pair for p in model.iterdir()) == before

    merged = fastmerge.merge(*tiny_pair, tmp_path / "out", 0.5)
    for report in merged.tensors:
        assert f"{report.angle_degrees:.2f}" in result.stdout, report.name
    slerps = merged.count("slerp")
    assert f"{slerps} would take the SLERP branch" in result.stdout


def test_inspect_refuses_incompatible_models(runner, tiny_pair, tmp_path):
    other = copy_model(tiny_pair[1], tmp_path / "other")
    tensors = load_file(other / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, other / "model.safetensors")
    result = _run(runner, "inspect", tiny_pair[0], other)
    _assert_refused(result, None, "1 tensor(s) missing from", "'model.norm.weight'")


def test_demo_builds_and_merges_the_default_pair(runner, tmp_path):
    result = _run(runner, "demo", "--dir", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    assert "134.5M parameters" in result.stdout
    assert "merged 272 tensors" in result.stdout
    merged = load_file(tmp_path / "demo" / "merged" / "model.safetensors")
    assert merged["model.embed_tokens.weight"].shape == (49152, 576)


def test_module_entry_point_and_help():
    script = Path(sys.executable).parent / "fastmerge"  # the console script beside python
    for command in ([sys.executable, "-m", "fastmerge", "--help"], [script, "slerp", "--help"]):
        completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert completed.returncode == 0, completed.stderr
        assert "slerp" in completed.stdout


def test_cli_process_exit_code_and_stderr(tiny_pair, tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastmerge",
            "slerp",
            str(tiny_pair[0]),
            str(tmp_path / "none"),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr.startswith("error: ") and "Traceback" not in completed.stderr
    assert completed.stdout == ""
