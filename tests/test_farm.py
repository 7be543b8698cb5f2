"""The API for merge farms: every sink agrees with the directory output bit for bit, a
resident re-merge equals a fresh merge and reads nothing, a sweep equals separate merges."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fastmerge
from fastmerge.cli import EXIT_BAD_INPUT, app
from fastmerge.engine.cpu import CpuEngine
from fastmerge.reader import SafetensorsFile
from fastmerge.writer import ShardWriter

from .conftest import copy_model
from .test_merge import load_output, no_leftovers

SCHEDULE = [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.6}]


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        differ = got[name].cpu().view(-1).view(torch.int16) != tensor.view(-1).view(torch.int16)
        assert not differ.any(), f"{name}: {int(differ.sum())} of {tensor.numel()} elements differ"


@pytest.fixture(scope="module")
def reference(tiny_pair, tmp_path_factory) -> dict[tuple, dict[str, torch.Tensor]]:
    """Directory outputs of fresh one-shot merges, by (t as text, dtype)."""
    a, b = tiny_pair
    root = tmp_path_factory.mktemp("reference")
    outputs = {}
    for key, (t, dtype) in {
        ("0.6", "float16"): (0.6, "float16"),
        ("0.3", "float16"): (0.3, "float16"),
        ("schedule", "bfloat16"): (SCHEDULE, "bfloat16"),
    }.items():
        out = root / f"{key[0]}-{dtype}"
        fastmerge.merge(a, b, out, t, dtype=dtype)
        outputs[key] = load_output(out)
    return outputs


@pytest.fixture(params=["disk", "resident"])
def pair(request, tiny_pair):
    a, b = tiny_pair
    if request.param == "disk":
        opened = fastmerge.Pair(a, b)
    else:
        opened = fastmerge.ResidentPair(a, b, memory_budget=10**7)
    with opened:
        yield opened


def test_every_sink_agrees_with_the_directory_output(pair, reference, tmp_path):
    want = reference[("0.6", "float16")]

    result = pair.merge(0.6, tmp_path / "out")
    assert_same_tensors(load_output(tmp_path / "out"), want)
    assert result.output == tmp_path / "out" and result.bytes_written == sum(
        t.nbytes for t in want.values()
    )

    sink = fastmerge.StateDictSink(device="cpu")
    result = pair.merge(0.6, sink)
    assert_same_tensors(sink.state_dict, want)
    assert result.output is None and len(result.tensors) == len(want)

    merged = pair.tensors(0.6, device="cpu")
    yielded = list(merged)
    assert [name for name, _ in yielded] == [p.name for p in pair.plan.tensors]
    assert_same_tensors(dict(yielded), want)
    assert merged.result.bytes_written == result.bytes_written

    reports = {r.name: r for r in merged.result.tensors}
    for report in result.tensors:
        assert reports[report.name].angle == report.angle and report.t == 0.6


def test_merging_into_a_module_writes_its_parameters_in_place(pair, reference, tiny_pair):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float16)
    addresses = {name: p.data_ptr() for name, p in model.named_parameters()}

    pair.merge(0.6, model)
    state = model.state_dict()
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == addresses
    assert_same_tensors(
        {name: state[name] for name in reference[("0.6", "float16")]}, reference[("0.6", "float16")]
    )
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_a_re_merge_at_a_new_t_equals_a_fresh_merge(pair, reference, monkeypatch):
    sink = fastmerge.StateDictSink()
    pair.merge(0.6, sink)
    first = {name: tensor.data_ptr() for name, tensor in sink.state_dict.items()}

    # From here on the statistics come from the cache, and a resident pair reads no file.
    calls = {"statistics": 0, "view": 0}
    original_statistics, original_view = CpuEngine.statistics, SafetensorsFile.view

    def counted_statistics(self, *args):
        calls["statistics"] += 1
        return original_statistics(self, *args)

    def counted_view(self, *args):
        calls["view"] += 1
        return original_view(self, *args)

    monkeypatch.setattr(CpuEngine, "statistics", counted_statistics)
    monkeypatch.setattr(SafetensorsFile, "view", counted_view)

    pair.merge(0.3, sink)
    assert_same_tensors(sink.state_dict, reference[("0.3", "float16")])
    assert {name: tensor.data_ptr() for name, tensor in sink.state_dict.items()} == first
    assert calls["statistics"] == 0
    if isinstance(pair, fastmerge.ResidentPair):
        assert calls["view"] == 0

    bf16 = fastmerge.ResidentPair(*pair.names, dtype="bfloat16", memory_budget=10**7)
    with bf16:
        schedule_sink = fastmerge.StateDictSink()
        bf16.merge(SCHEDULE, schedule_sink)
    assert_same_tensors(schedule_sink.state_dict, reference[("schedule", "bfloat16")])


def test_a_sweep_equals_separate_merges_and_reads_each_tensor_once(
    tiny_pair, tmp_path, monkeypatch
):
    a, b = tiny_pair
    ts = [0.2, 0.6, SCHEDULE]
    separate = []
    for index, t in enumerate(ts):
        fastmerge.merge(a, b, tmp_path / f"separate-{index}", t)
        separate.append(tmp_path / f"separate-{index}")

    calls = {"statistics": 0}
    original = CpuEngine.statistics

    def counted(self, *args):
        calls["statistics"] += 1
        return original(self, *args)

    monkeypatch.setattr(CpuEngine, "statistics", counted)
    outs = [tmp_path / f"sweep-{index}" for index in range(len(ts))]
    results = fastmerge.sweep(a, b, ts, outs)

    assert calls["statistics"] == len(results[0].tensors)
    for out, one, result, t in zip(outs, separate, results, ts, strict=True):
        for name in ("model.safetensors", "config.json", "README.md"):
            assert (out / name).read_bytes() == (one / name).read_bytes(), (out, name)
        assert result.output == out
        assert result.tensors[0].t == (t if isinstance(t, float) else 0.6)


def test_a_sweep_into_mixed_targets(tiny_pair, reference, tmp_path):
    with fastmerge.ResidentPair(*tiny_pair, memory_budget=10**7) as pair:
        sink = fastmerge.StateDictSink()
        results = pair.sweep([0.3, 0.6], [sink, tmp_path / "out"])
    assert_same_tensors(sink.state_dict, reference[("0.3", "float16")])
    assert_same_tensors(load_output(tmp_path / "out"), reference[("0.6", "float16")])
    assert results[0].output is None and results[1].output == tmp_path / "out"
    assert results[0].bytes_read == 0


class _DiskFull(OSError):
    pass


def test_a_failing_sweep_leaves_no_output(tiny_pair, tmp_path, monkeypatch):
    original = ShardWriter._write_bytes
    calls = {"n": 0}

    def failing(self, fd, view):
        calls["n"] += 1
        if calls["n"] > 7:
            raise _DiskFull(28, "No space left on device")
        original(self, fd, view)

    monkeypatch.setattr(ShardWriter, "_write_bytes", failing)
    outs = [tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"]
    with pytest.raises(_DiskFull):
        fastmerge.sweep(*tiny_pair, [0.1, 0.5, 0.9], outs)
    assert not any(out.exists() for out in outs)
    assert no_leftovers(tmp_path)


def test_sweep_command(tiny_pair, tmp_path, reference):
    from typer.testing import CliRunner

    runner = CliRunner()
    template = str(tmp_path / "out-{t}")
    result = runner.invoke(
        app, ["slerp", *map(str, tiny_pair), "--sweep", "0.3,0.6", "-o", template]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("merged 20 tensors") == 2
    assert_same_tensors(load_output(tmp_path / "out-0.3"), reference[("0.3", "float16")])
    assert_same_tensors(load_output(tmp_path / "out-0.6"), reference[("0.6", "float16")])

    refused = runner.invoke(
        app, ["slerp", *map(str, tiny_pair), "--sweep", "0.3,0.6", "-o", str(tmp_path / "plain")]
    )
    assert refused.exit_code == EXIT_BAD_INPUT and "put {t} in the output name" in refused.stderr
    both = runner.invoke(
        app, ["slerp", *map(str, tiny_pair), "--sweep", "0.3", "--t", "0.2", "-o", template]
    )
    assert both.exit_code == EXIT_BAD_INPUT and "leave out --t" in both.stderr


def test_t_schedules_on_the_command_line(tiny_pair, tmp_path, reference):
    from typer.testing import CliRunner

    args = ["--t", "mlp=0.2,0.9", "--t", "0.6", "--dtype", "bfloat16"]
    result = CliRunner().invoke(
        app, ["slerp", *map(str, tiny_pair), *args, "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert_same_tensors(load_output(tmp_path / "out"), reference[("schedule", "bfloat16")])
    card = (tmp_path / "out" / "README.md").read_text()
    assert '    - filter: "mlp"\n      value: [0.2, 0.9]\n    - value: 0.6' in card


def test_the_memory_budget_is_enforced_before_anything_is_copied(tiny_pair):
    # Both models, each tensor once (the tied head shares the embeddings).
    resident = sum(tensor.nbytes for model in tiny_pair for tensor in load_output(model).values())
    with pytest.raises(fastmerge.FastmergeError, match=f"needs {resident:,} bytes, more than"):
        fastmerge.ResidentPair(*tiny_pair, memory_budget=resident - 1)
    with fastmerge.ResidentPair(*tiny_pair, memory_budget=resident) as pair:
        assert pair.resident_bytes == resident


def test_a_resident_pair_reads_nothing_after_loading(tiny_pair, reference, tmp_path):
    models = [copy_model(model, tmp_path / model.name) for model in tiny_pair]
    with fastmerge.ResidentPair(*models, memory_budget=10**7) as pair:
        # Overwrite the files in place: a merge that still read them would see zeros.
        for model in models:
            path = model / "model.safetensors"
            with open(path, "r+b") as handle:
                handle.seek(1024)
                handle.write(bytes(path.stat().st_size - 1024))
        sink = fastmerge.StateDictSink()
        pair.merge(0.6, sink)
    assert_same_tensors(sink.state_dict, reference[("0.6", "float16")])


def _module(tied: bool, dtype=torch.float16, extra: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastmerge.synthetic import PRESETS

    shape = PRESETS["tiny"]
    config = LlamaConfig(**{**shape.config(dtype), "tie_word_embeddings": tied})
    model = LlamaForCausalLM(config).to(dtype)
    if extra:
        model.register_parameter("adapter", torch.nn.Parameter(torch.zeros(3, dtype=dtype)))
    return model


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (lambda: _module(True, torch.float32), "dtype float32, but the merge makes float16"),
        (
            lambda: _module(True, extra=True),
            "1 parameter(s) of the module are not produced by the merge: 'adapter'",
        ),
        (lambda: _module(False), "'lm_head.weight'"),
        (lambda: torch.nn.Linear(2, 2), "20 merged tensor(s) have no parameter or buffer"),
    ],
)
def test_a_module_that_does_not_fit_is_refused_before_writing(tiny_pair, module, message):
    target = module()
    before = {name: p.detach().clone() for name, p in target.named_parameters()}
    with fastmerge.Pair(*tiny_pair) as pair, pytest.raises(fastmerge.OutputError) as caught:
        pair.merge(0.6, target)
    assert "the merge cannot be written into this module" in str(caught.value)
    assert message in str(caught.value), str(caught.value)
    for name, p in target.named_parameters():
        assert torch.equal(p, before[name]), name


def test_a_tied_module_cannot_take_an_untied_merge(tiny_pair, tiny_untied_sharded_pair):
    with (
        fastmerge.Pair(tiny_pair[0], tiny_untied_sharded_pair[1]) as pair,
        pytest.raises(fastmerge.OutputError, match=r"the module ties 'model\.embed_tokens"),
    ):
        pair.merge(0.6, _module(True))


def test_a_sweep_needs_distinct_outputs_and_one_per_t(tiny_pair, tmp_path):
    with fastmerge.Pair(*tiny_pair) as pair:
        with pytest.raises(fastmerge.FastmergeError, match="must be different directories"):
            pair.sweep([0.1, 0.2], [tmp_path / "x", tmp_path / "x"])
        with pytest.raises(fastmerge.FastmergeError, match="one target per t"):
            pair.sweep([0.1, 0.2], [tmp_path / "x"])
        with pytest.raises(TypeError, match="a merge goes into a directory"):
            pair.merge(0.1, 42)
    assert not (tmp_path / "x").exists()


def test_the_readme_example_runs(tiny_pair, tmp_path, monkeypatch):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Merge farms", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)

    for name, source in zip(("base", "instruct"), tiny_pair, strict=True):
        (tmp_path / name).mkdir()
        for path in source.iterdir():
            (tmp_path / name / path.name).write_bytes(path.read_bytes())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md (Merge farms)", "exec"), namespace)
    assert (tmp_path / "merged-0.6" / "model.safetensors").exists()


def test_a_non_finite_input_is_found_while_loading(tiny_pair, tmp_path):
    from safetensors.torch import save_file

    damaged = copy_model(tiny_pair[1], tmp_path / "damaged")
    tensors = load_output(damaged)
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 3] = float("inf")
    save_file(tensors, damaged / "model.safetensors")
    with pytest.raises(fastmerge.MergeError) as caught:
        fastmerge.ResidentPair(tiny_pair[0], damaged, memory_budget=10**7)
    message = str(caught.value)
    assert "'model.layers.1.self_attn.q_proj.weight'" in message and str(damaged) in message
