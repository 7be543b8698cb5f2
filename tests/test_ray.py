"""Merges and farms on a local Ray cluster: every output equals the single-process merge byte
for byte, a worker killed mid-unit ends in a complete output (retried) or a clean error, and a
farm's sweep equals separate merges.

One Ray instance serves the whole session (2 CPUs, token authentication off, a small object
store). Units and farm actors each take one CPU, so a farm of two workers runs alone: every
farm here is closed by the test that opens it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastmerge
from fastmerge import distributed
from fastmerge.cli import EXIT_BAD_INPUT, app
from fastmerge.distributed import DistributedError, UnitFailure
from fastmerge.synthetic import write_pair

from .conftest import copy_model
from .test_merge import load_output, no_leftovers

ray = pytest.importorskip(
    "ray", reason="the Ray tests need the ray extra: pip install -e '.[test,ray]'"
)

SHARD_SIZE = 40_000
"""Cuts the tiny pair's 266,880 output bytes (float16) into 9 shards, so 9 units."""


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local Ray instance for the session; yields the directory of fault triggers that its
    workers watch (fastmerge.distributed._fault_point)."""
    faults = tmp_path_factory.mktemp("faults")
    environment = {"RAY_AUTH_MODE": "disabled", distributed.FAULTS_ENV: str(faults)}
    previous = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)  # before ray.init: the workers inherit it

    # Ray puts the driver's working directory on its workers' sys.path; from the checkout's
    # root, its kernels/ would then shadow the PyPI package transformers imports. Without it
    # the workers cannot import this package of tests, so the functions the farm tests send
    # them (evaluations, model factories) travel by value.
    from . import test_farm

    for module in (sys.modules[__name__], test_farm):
        ray.cloudpickle.register_pickle_by_value(module)
    driver_directory = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("ray-driver"))
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=100 * 2**20,
            logging_level=logging.WARNING,
        )
    finally:
        os.chdir(driver_directory)
    yield faults
    ray.shutdown()
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def sharded_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An untied tiny pair, each model in 3 input shards."""
    return write_pair(tmp_path_factory.mktemp("ray-pairs"), "tiny", tied=False, shards=3)


def digests(directory: Path) -> dict[str, str]:
    """sha256 of every file of an output directory, by name; directories show as such."""
    return {
        path.name: "directory" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
    }


def assert_same_files(got: Path, want: Path) -> None:
    mine, theirs = digests(got), digests(want)
    assert sorted(mine) == sorted(theirs), sorted(set(mine) ^ set(theirs))
    differing = [name for name in theirs if mine[name] != theirs[name]]
    assert not differing, f"{len(differing)} file(s) differ: {differing}"


def test_importing_fastmerge_does_not_import_ray():
    code = (
        "import sys, fastmerge, fastmerge.distributed, fastmerge.cli; "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_unreachable_or_malformed_address_is_refused_at_once(tiny_pair, tmp_path):
    """In a fresh process, where no Ray connection exists yet; port 1 on the loopback is
    closed, so the head is unreachable."""
    for address, message in [
        ("127.0.0.1:1", "cannot reach the Ray head at 127.0.0.1:1"),
        ("ray://127.0.0.1:1", "cannot reach the Ray head at 127.0.0.1:1"),
        ("somewhere", "expected local, auto, HOST:PORT"),
    ]:
        command = [sys.executable, "-m", "fastmerge", "slerp", *map(str, tiny_pair)]
        command += ["-o", str(tmp_path / "out"), "--ray", address]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert completed.returncode == EXIT_BAD_INPUT, completed.stderr
        assert message in completed.stderr
        assert list(tmp_path.iterdir()) == []


def test_without_ray_installed_the_message_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(fastmerge.FastmergeError, match=r"pip install 'fastmerge\[ray\]'"):
        distributed.import_ray()


@pytest.mark.parametrize(
    ("t", "dtype", "shards_per_unit"),
    [
        (0.6, "float16", 1),
        ([{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.4}], "bfloat16", 2),
    ],
    ids=["one-shard-units", "schedule-two-shard-units"],
)
def test_ray_merge_equals_the_single_process_merge_byte_for_byte(
    ray_cluster, sharded_pair, tmp_path, t, dtype, shards_per_unit
):
    a, b = sharded_pair
    fastmerge.merge(a, b, tmp_path / "single", t, dtype=dtype, shard_size=SHARD_SIZE)

    result = distributed.merge(
        a,
        b,
        tmp_path / "ray",
        t,
        ray="local",
        dtype=dtype,
        shard_size=SHARD_SIZE,
        shards_per_unit=shards_per_unit,
    )

    assert len(list((tmp_path / "ray").glob("model-*-of-00009.safetensors"))) == 9
    assert_same_files(tmp_path / "ray", tmp_path / "single")
    assert result.device.startswith(f"ray: {9 // shards_per_unit + 9 % shards_per_unit} unit(s)")
    assert [r.name for r in result.tensors] == list(load_output(tmp_path / "single"))
    assert result.bytes_written == sum(
        tensor.numel() * tensor.element_size() for tensor in load_output(tmp_path / "ray").values()
    )
    assert no_leftovers(tmp_path)


def test_a_single_shard_output_is_one_unit_and_the_same_bytes(ray_cluster, tiny_pair, tmp_path):
    a, b = tiny_pair
    fastmerge.merge(a, b, tmp_path / "single", 0.3)
    result = fastmerge.merge(a, b, tmp_path / "ray", 0.3, ray="local")

    assert result.device.startswith("ray: 1 unit(s)")
    assert_same_files(tmp_path / "ray", tmp_path / "single")


def test_requests_the_cluster_cannot_meet_are_refused_before_anything_is_written(
    ray_cluster, tiny_pair, tmp_path
):
    a, b = tiny_pair
    with pytest.raises(fastmerge.FastmergeError, match="the Ray cluster has no GPU"):
        distributed.merge(a, b, tmp_path / "out", ray="local", device="cuda")
    with pytest.raises(fastmerge.FastmergeError, match="the largest node of the Ray cluster has 2"):
        distributed.merge(a, b, tmp_path / "out", ray="local", cpus_per_unit=3)
    with pytest.raises(fastmerge.FastmergeError, match="the Ray cluster has no GPU"):
        distributed.Farm(a, b, memory_budget=10**7, ray="local", device="cuda")
    with pytest.raises(fastmerge.FastmergeError, match="asks for 3 1-CPU slots, but the Ray"):
        distributed.Farm(a, b, workers=3, memory_budget=10**7, ray="local")
    assert list(tmp_path.iterdir()) == []


def test_ray_sweep_equals_separate_merges(ray_cluster, sharded_pair, tmp_path):
    a, b = sharded_pair
    outs = [tmp_path / "ray-0.3", tmp_path / "ray-0.7"]
    results = fastmerge.sweep(a, b, [0.3, 0.7], outs, shard_size=SHARD_SIZE, ray="local")

    for t, out, result in zip((0.3, 0.7), outs, results, strict=True):
        fastmerge.merge(a, b, tmp_path / f"single-{t}", t, shard_size=SHARD_SIZE)
        assert_same_files(out, tmp_path / f"single-{t}")
        assert {report.t for report in result.tensors} == {t}


def _trigger(faults: Path, shard: str, mode: str = "once") -> tuple[Path, Path]:
    trigger, killed = faults / f"kill-{shard}", faults / f"killed-{shard}"
    trigger.write_text(mode)
    killed.unlink(missing_ok=True)
    return trigger, killed


def test_a_worker_killed_mid_unit_is_retried_and_the_output_is_complete(
    ray_cluster, sharded_pair, tmp_path
):
    a, b = sharded_pair
    shard = "model-00004-of-00009.safetensors"
    trigger, killed = _trigger(ray_cluster, shard)
    try:
        distributed.merge(
            a, b, tmp_path / "ray", 0.6, ray="local", shard_size=SHARD_SIZE, max_retries=2
        )
    finally:
        trigger.unlink()

    assert len(killed.read_text().splitlines()) == 1, "the unit was not killed once"
    fastmerge.merge(a, b, tmp_path / "single", 0.6, shard_size=SHARD_SIZE)
    assert_same_files(tmp_path / "ray", tmp_path / "single")
    assert no_leftovers(tmp_path)


@pytest.mark.parametrize("retries", [0, 1])
def test_a_unit_whose_worker_keeps_dying_ends_in_a_clean_error_and_no_output(
    ray_cluster, sharded_pair, tmp_path, retries
):
    a, b = sharded_pair
    shard = "model-00002-of-00009.safetensors"
    trigger, killed = _trigger(ray_cluster, shard, "always")
    try:
        with pytest.raises(DistributedError) as caught:
            distributed.merge(
                a,
                b,
                tmp_path / "ray",
                0.6,
                ray="local",
                shard_size=SHARD_SIZE,
                max_retries=retries,
            )
    finally:
        trigger.unlink()

    message = str(caught.value)
    assert f"unit 2 of 9 ({shard}) lost its worker {retries + 1} time(s)" in message
    assert "no output was written" in message
    assert len(killed.read_text().splitlines()) == retries + 1
    assert not (tmp_path / "ray").exists() and no_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [], "a lock file or temporary was left"


def test_bad_input_found_by_a_unit_names_the_unit_and_tensor_and_leaves_no_output(
    ray_cluster, sharded_pair, tmp_path
):
    from safetensors.torch import load_file, save_file

    a, b = sharded_pair
    damaged = copy_model(b, tmp_path / "damaged")
    name = "model.layers.1.mlp.up_proj.weight"
    files = sorted(damaged.glob("model-*.safetensors"))
    holder = next(path for path in files if name in load_file(path))
    tensors = load_file(holder)
    tensors[name][3, 5] = float("nan")
    save_file(tensors, holder, metadata={"format": "pt"})

    with pytest.raises(DistributedError) as caught:
        distributed.merge(a, damaged, tmp_path / "ray", 0.6, ray="local", shard_size=SHARD_SIZE)

    message = str(caught.value)
    assert message.startswith("unit ") and " failed on " in message
    assert f"tensor {name!r} of {damaged} holds NaN or infinite values" in message
    assert not (tmp_path / "ray").exists() and no_leftovers(tmp_path)


def test_a_unit_refuses_inputs_that_differ_from_what_the_driver_planned(
    ray_cluster, sharded_pair, tmp_path
):
    """A unit run in this process (no Ray needed) with the driver's view of the inputs altered,
    as a node with other copies of the files would see them."""
    a, b = sharded_pair
    with fastmerge.Pair(a, b, t=0.5, shard_size=SHARD_SIZE) as pair:
        plans = [pair.plan]
        inputs = distributed.input_identities(pair.plan)
    spec = distributed.UnitSpec(
        index=0,
        count=9,
        shards=(0,),
        a=str(a),
        b=str(b),
        ts=(0.5,),
        directories=(str(tmp_path),),
        options={"shard_size": SHARD_SIZE},
        device="cpu",
        threads=1,
        plan_digest=distributed.plan_digest(plans),
        inputs=inputs,
    )
    first = next(iter(inputs))
    size, mtime_ns = inputs[first]

    with pytest.raises(UnitFailure) as caught:
        distributed.run_unit(
            distributed.replace(spec, inputs={**inputs, first: (size, mtime_ns + 1)})
        )
    assert f"{first}: the driver saw {size:,} bytes, mtime {mtime_ns + 1}" in caught.value.message
    assert "storage all nodes share" in caught.value.message

    with pytest.raises(UnitFailure, match="differs from the driver's"):
        distributed.run_unit(distributed.replace(spec, ts=(0.25,)))
    assert list(tmp_path.iterdir()) == []

    outcome = distributed.run_unit(spec)
    assert outcome.shard_names == ["model-00001-of-00009.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == outcome.shard_names


def test_cli_slerp_and_run_with_ray_local(ray_cluster, runner, sharded_pair, tmp_path):
    a, b = sharded_pair
    common = ["--t", "0.6", "--shard-size", str(SHARD_SIZE)]
    single = runner.invoke(app, ["slerp", str(a), str(b), "-o", str(tmp_path / "single"), *common])
    assert single.exit_code == 0, single.output

    merged = runner.invoke(
        app, ["slerp", str(a), str(b), "-o", str(tmp_path / "ray"), *common, "--ray", "local"]
    )
    assert merged.exit_code == 0, merged.output
    assert "on ray: 9 unit(s) on 1 node(s)" in merged.stdout
    assert_same_files(tmp_path / "ray", tmp_path / "single")

    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"
        "parameters:\n  t: 0.6\ndtype: float16\n"
    )
    options = ["--shard-size", str(SHARD_SIZE), "--ray", "local", "-q"]
    ran = runner.invoke(app, ["run", str(recipe), "-o", str(tmp_path / "run"), *options])
    assert ran.exit_code == 0, ran.output
    assert digests(tmp_path / "run").keys() == digests(tmp_path / "ray").keys()
    shards = [name for name in digests(tmp_path / "ray") if name.endswith(".safetensors")]
    assert all(digests(tmp_path / "run")[s] == digests(tmp_path / "ray")[s] for s in shards)

    refused = runner.invoke(
        app, ["slerp", str(a), str(b), "-o", str(tmp_path / "ray"), *common, "--ray", "local"]
    )
    assert refused.exit_code == EXIT_BAD_INPUT
    assert "already exists; pass --force" in refused.stderr


# Farms.


def norm_sum(weights: dict[str, torch.Tensor]) -> float:
    """An "evaluation" that runs inside the worker: a number from the merged weights."""
    return float(weights["model.norm.weight"].double().sum())


def test_farm_map_equals_separate_merges_and_evaluates_in_the_worker(
    ray_cluster, tiny_pair, tmp_path
):
    a, b = tiny_pair
    ts = [0.2, 0.5, 0.8]
    with distributed.Farm(a, b, workers=2, memory_budget=10**7, ray="local") as farm:
        assert len({info["pid"] for info in farm.workers_info}) == 2
        results = list(farm.map(ts, into=str(tmp_path / "farm-{t}"), evaluate=norm_sum))
        handles = list(farm._workers)

    assert sorted(result.t for result in results) == ts
    for result in results:
        single = tmp_path / f"single-{result.t}"
        fastmerge.merge(a, b, single, result.t)
        assert result.output == tmp_path / f"farm-{result.t}"
        assert_same_files(result.output, single)
        assert result.score == norm_sum(load_output(single))
        assert result.result.bytes_read == 0  # resident: nothing read per merge

    with pytest.raises(ray.exceptions.RayActorError):  # close() stopped the actors
        ray.get(handles[0].describe.remote(), timeout=60)


def test_farm_workers_merge_into_a_module_of_their_own_in_place(ray_cluster, tiny_pair, tmp_path):
    from .test_farm import _module

    def evaluate(module: torch.nn.Module) -> tuple[float, float, int]:
        norm, embedding = module.model.norm.weight, module.model.embed_tokens.weight
        return float(norm.double().sum()), float(embedding.double().sum()), norm.data_ptr()

    a, b = tiny_pair
    model = functools.partial(_module, True)
    with distributed.Farm(a, b, memory_budget=10**7, ray="local", model=model) as farm:
        results = sorted(farm.map([0.3, 0.6], evaluate=evaluate), key=lambda r: r.t)

    for result in results:
        fastmerge.merge(a, b, tmp_path / f"single-{result.t}", result.t)
        want = load_output(tmp_path / f"single-{result.t}")
        norm, embedding = want["model.norm.weight"], want["model.embed_tokens.weight"]
        assert result.score[:2] == (float(norm.double().sum()), float(embedding.double().sum()))
    assert results[0].score[2] == results[1].score[2], "the module's tensor was reallocated"


def wait_for_release(release: Path):
    """An evaluation that blocks until `release` exists (at most 60 s), to hold one worker."""

    def evaluate(weights: dict[str, torch.Tensor]) -> str:
        import time

        for _ in range(600):
            if release.exists():
                return "released"
            time.sleep(0.1)
        return "never released"

    return evaluate


def test_farm_results_come_in_completion_order_and_errors_leave_it_usable(
    ray_cluster, tiny_pair, tmp_path
):
    a, b = tiny_pair
    release = tmp_path / "release"
    with distributed.Farm(a, b, workers=2, memory_budget=10**7, ray="local") as farm:
        # One worker is held by the first candidate; the other must take all of the rest,
        # and their results must come back before the held one's.
        held = farm.submit(0.1, evaluate=wait_for_release(release))
        quick = [farm.submit(t, evaluate=norm_sum) for t in (0.3, 0.5, 0.7)]
        arrived = [farm.next(timeout=120) for _ in quick]
        release.touch()
        last = farm.next(timeout=120)

        assert [r.ticket for r in arrived] == quick
        assert len({r.worker for r in arrived}) == 1
        assert (last.ticket, last.score) == (held, "released")
        assert last.worker != arrived[0].worker

        farm.submit(1.5, evaluate=norm_sum)
        with pytest.raises(DistributedError, match=r"t = 1\.5 is outside \[0, 1\]"):
            farm.next(timeout=120)
        farm.submit(0.5, evaluate=norm_sum)
        again = farm.next(timeout=120)
        assert again.score == arrived[1].score and farm.pending == 0


def test_a_farm_over_its_memory_budget_is_refused(ray_cluster, tiny_pair):
    a, b = tiny_pair
    with pytest.raises(DistributedError, match="more than memory_budget=1,000") as caught:
        distributed.Farm(a, b, workers=1, memory_budget=1000, ray="local")
    assert "failed on " in str(caught.value)


def test_the_readme_examples_run(ray_cluster, tiny_pair, tmp_path):
    """The Python examples of "Beyond one machine (Ray)", on this session's cluster, with
    /shared/ standing for a temporary directory and 2 farm workers for the cluster's 2 CPUs."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Beyond one machine (Ray)", 1)[1].split("\n## ", 1)[0]
    examples = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(examples) == 2, "the section's Python examples changed: update this test"

    for name, source in zip(("base", "instruct"), tiny_pair, strict=True):
        copy_model(source, tmp_path / name)
    for index, example in enumerate(examples):
        code = example.replace("/shared/", f"{tmp_path}/").replace("workers=8", "workers=2")
        namespace: dict = {"__name__": "__main__"}
        exec(compile(code, f"README.md (Ray example {index + 1})", "exec"), namespace)

    assert sorted(namespace["written"]) == [tmp_path / "merged-0.4", tmp_path / "merged-0.6"]
    assert {namespace["first"].ticket, namespace["second"].ticket} == set(namespace["tickets"])
    fastmerge.merge(tmp_path / "base", tmp_path / "instruct", tmp_path / "single-0.4", 0.4)
    assert_same_files(tmp_path / "merged-0.4", tmp_path / "single-0.4")
    fastmerge.merge(tmp_path / "base", tmp_path / "instruct", tmp_path / "single", 0.6)
    assert_same_files(tmp_path / "merged", tmp_path / "single")
