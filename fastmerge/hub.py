"""Models named by Hugging Face Hub id (`HuggingFaceTB/SmolLM-135M`), resolved to a directory.

A name that is not an existing path and looks like `org/name` is fetched with
huggingface_hub (the optional extra `fastmerge[hub]`) into its usual cache, and only the
files a merge uses: safetensors shards and index, config.json, the tokenizer files, chat
template and generation config. With HF_HUB_OFFLINE=1 nothing is downloaded and the model
must already be in the cache (HF_HUB_CACHE, or HF_HOME/hub), which these variables name at
the time of the call.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .errors import CheckpointError
from .output import COMPANION_FILES
from .reader import CONFIG_FILE, INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE

logger = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")
"""`org/name`: one slash, no leading dot or slash, so that it cannot be a relative path."""

ALLOW_PATTERNS = [
    SINGLE_FILE,
    "model-*-of-*.safetensors",
    INDEX_FILE,
    CONFIG_FILE,
    *COMPANION_FILES,
]
"""What transformers saves: not other weights some repositories carry beside them (Mistral's
consolidated.safetensors would double the download)."""

_TRUE = {"1", "true", "yes", "on"}


def is_repo_id(name: str) -> bool:
    return bool(REPO_ID.match(name)) and ".." not in name


def resolve(model: str | os.PathLike[str]) -> Path:
    """A local path as it is; a hub id not found locally, as its snapshot directory."""
    path = Path(model)
    if path.exists() or not is_repo_id(str(model)):
        return path
    return _snapshot(str(model))


def _snapshot(repo_id: str) -> Path:
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"{repo_id} is not a local path, and fastmerge fetches models by hub id only with "
            "huggingface_hub installed: pip install 'fastmerge[hub]' (or download the model "
            "yourself and pass its directory)"
        ) from None

    offline = any(
        os.environ.get(name, "").strip().lower() in _TRUE
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    if not offline:
        _refuse_pickle_only(huggingface_hub, repo_id)

    logger.info("resolving %s through huggingface_hub%s", repo_id, " (offline)" if offline else "")
    try:
        directory = huggingface_hub.snapshot_download(
            repo_id,
            cache_dir=_cache_dir(),
            allow_patterns=ALLOW_PATTERNS,
            local_files_only=offline,
        )
    except Exception as exc:  # huggingface_hub's errors vary by version; all mean "not here"
        where = "in the local cache (HF_HUB_OFFLINE is set)" if offline else "on the Hub"
        raise CheckpointError(
            f"{repo_id}: no such file or directory, and not found {where} as a Hub model "
            f"({type(exc).__name__}: {exc}). "
            + (
                "Download it once with network access (huggingface-cli download "
                f"{repo_id}), point HF_HUB_CACHE at the cache holding it, or pass a local "
                "directory"
                if offline
                else "Check the name and your access (huggingface-cli login), or pass a local "
                "directory"
            )
        ) from exc
    return Path(directory)


def _refuse_pickle_only(huggingface_hub, repo_id: str) -> None:
    """Refuse, before downloading, a repository without safetensors weights."""
    try:
        files = huggingface_hub.HfApi().list_repo_files(repo_id)
    except Exception:  # the download below reports unreachable or missing repositories
        return
    if any(name.endswith(".safetensors") for name in files):
        return
    pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(
            f"{repo_id} holds only pickle checkpoints ({pickles[0]}, ...); loading one can run "
            "arbitrary code, so fastmerge only reads safetensors. Convert it once, in an "
            'environment you trust: python -c "from transformers import AutoModelForCausalLM '
            f"as M; M.from_pretrained('{repo_id}').save_pretrained('local-copy')\" and merge "
            "local-copy"
        )


def _cache_dir() -> str | None:
    """The hub cache named by the environment now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None
