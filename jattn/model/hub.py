"""Where a model's files are: a local directory, or a Hugging Face Hub id.

A Hub id (`org/name`) is resolved by `huggingface_hub` into its standard cache, as every
peer does: downloaded once (with a progress bar), then read from the cache. Only what
jattn reads is fetched: the config and generation config, safetensors weights and their
index, and the tokenizer. `huggingface_hub` honours its environment: `HF_TOKEN` for
gated and private models, `HF_HOME` / `HF_HUB_CACHE` for where the cache is,
`HF_HUB_OFFLINE=1` to use the cache without the network.
"""

from __future__ import annotations

import os
import re

MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors",
               "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*")


def model_directory(model: str, revision: str | None = None) -> str:
    """The directory holding `model`'s files: `model` itself if it is a directory, else
    the cached snapshot of the Hub id `model` at `revision` (a branch, tag or commit;
    None: the default branch), downloaded first if it is not cached.

    Raises FileNotFoundError naming `model` when it is neither, or when it is not cached
    and the Hub cannot be asked (offline); PermissionError for a gated model without a
    token that may read it."""
    if os.path.isdir(model):
        if revision is not None:
            raise ValueError(f"revision {revision!r} names a version of a Hub model, but "
                             f"{model!r} is a local directory")
        return model
    if model.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model directory {model!r} does not exist")
    if not _REPO_ID.fullmatch(model) or ".." in model:
        raise FileNotFoundError(f"model {model!r} is neither a directory nor a Hugging Face "
                                f"Hub id (org/name)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub

    at = f" at revision {revision!r}" if revision else ""
    try:
        return snapshot_download(model, revision=revision, allow_patterns=MODEL_FILES)
    except hub.LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"model {model!r}{at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and the Hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if constants.HF_HUB_OFFLINE else ''}: download "
            f"it once online, or give a local directory") from None
    except hub.GatedRepoError:
        raise PermissionError(f"model {model!r} is gated on the Hub: accept its terms there "
                              f"and set HF_TOKEN to a token that may read it") from None
    except hub.RepositoryNotFoundError:
        raise FileNotFoundError(f"no model {model!r} on the Hugging Face Hub (if it is "
                                f"private, set HF_TOKEN)") from None
    except hub.RevisionNotFoundError:
        raise FileNotFoundError(f"model {model!r} has no revision {revision!r} on the "
                                f"Hugging Face Hub") from None
