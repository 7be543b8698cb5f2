"""The peer: mergekit on the same pair and t, when it is installed (`pip install -e .[peer]`).

Both tools run in a fresh process under the same peak-RSS wrapper; their outputs are then
compared tensor by tensor, within one fp16 ulp (mergekit's float32 math and fastmerge's
float64 sums round a few elements differently).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from fastmerge.model_card import mergekit_recipe
from fastmerge.reader import open_checkpoint
from fastmerge.reference import max_ulp_distance, slerp_reference, ulp_distance

from .conftest import run_measured, slerp_command

T = 0.6

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mergekit") is None,
    reason="mergekit is not installed (pip install -e '.[peer]' to compare with it)",
)


@pytest.mark.parametrize("size", ["135m", "1b"])
def test_against_mergekit(report, request, tmp_path, size):
    a, b = request.getfixturevalue(f"pair_{size}")
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(mergekit_recipe(str(a), str(b), T, "float16") + "\n")
    mergekit_yaml = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent))

    mergekit_s, mergekit_rss = run_measured(
        [mergekit_yaml, str(recipe), str(tmp_path / "mergekit"), "--no-copy-tokenizer"]
    )
    fastmerge_s, fastmerge_rss = run_measured(slerp_command(a, b, tmp_path / "fastmerge", T))

    label = {"135m": "SmolLM-135M pair", "1b": "1.1B pair"}[size]
    report.add(
        f"peer, {label}",
        "mergekit 0.1.5 (mergekit-yaml, CPU)",
        f"{mergekit_s:.2f} s, peak RSS {mergekit_rss / 2**30:.2f} GiB",
        f"fastmerge {fastmerge_s:.2f} s, {fastmerge_rss / 2**30:.2f} GiB",
        f"fastmerge {mergekit_s / fastmerge_s:.1f}x faster, "
        f"{mergekit_rss / fastmerge_rss:.1f}x less memory",
    )

    # Where the two differ by more than one ulp, fastmerge must be the one within one ulp of
    # the float64 reference (mergekit's fp32 sums put it 2 ulp off on near-cancelling terms).
    worst, apart, checked = 0, 0, 0
    base, other = open_checkpoint(a), open_checkpoint(b)
    theirs, ours = open_checkpoint(tmp_path / "mergekit"), open_checkpoint(tmp_path / "fastmerge")
    with base, other, theirs, ours:
        assert set(theirs.tensors) == set(ours.tensors)
        for name in ours.tensors:
            distance = ulp_distance(theirs.view(name), ours.view(name))
            worst = max(worst, int(distance.max()))
            if distance.max() <= 1:
                continue
            apart += int((distance > 1).sum())
            source = name if name in base.tensors else "model.embed_tokens.weight"
            want = slerp_reference(base.view(source), other.view(source), T)
            assert max_ulp_distance(ours.view(name), want) <= 1, name
            checked += 1
    report.add(
        f"peer, {label}",
        "largest difference from mergekit",
        f"{worst} ulp (fp16), {apart} elements over 1 ulp",
        f"fastmerge within 1 ulp of float64 there ({checked} tensors checked)",
    )
