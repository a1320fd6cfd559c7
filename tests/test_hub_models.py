"""A Hugging Face Hub id is read from the Hugging Face cache, in the cache's own layout
(blobs named by their hash, snapshots of links to them, refs naming snapshots): offline,
the same tokens as the directory it was made from, a revision picks its snapshot, and an
id that is not cached is a clear error naming it."""

import hashlib
import json
import os
import subprocess
import sys

from jattn.llm import EMBEDDED_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER_MODEL = os.path.join(ROOT, "..", "shared", "models", "tiny-llama3-random")


def cache_model(cache: str, repo_id: str, revisions: dict[str, str]) -> None:
    """Puts each `revisions` ref -> local model directory into the hub cache `cache`."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    for ref, directory in revisions.items():
        commit = hashlib.sha1(f"{repo_id}@{ref}".encode()).hexdigest()
        snapshot = os.path.join(repo, "snapshots", commit)
        os.makedirs(snapshot)
        for name in os.listdir(directory):
            if name == "reference_outputs.json" or name.endswith(".md"):
                continue
            data = open(os.path.join(directory, name), "rb").read()
            blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
            with open(blob, "wb") as f:
                f.write(data)
            os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, name))
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)


SCRIPT = """
import json, sys
from jattn import LLM
prompt = [5, 6, 7, 8, 9] * 3
def tokens(model, **kwargs):
    return LLM(model, store=None, **kwargs).generate(prompt, max_tokens=6).token_ids
answers = {"local": tokens(sys.argv[1]), "hub": tokens("jattn-tests/tiny"),
           "hub v1": tokens("jattn-tests/tiny", revision="v1"), "other": tokens(sys.argv[2])}
try:
    LLM("jattn-tests/not-cached", store=None)
except FileNotFoundError as error:
    answers["missing"] = str(error)
print(json.dumps(answers))
"""


def test_a_hub_id_is_served_offline_from_the_hugging_face_cache(tmp_path):
    cache = str(tmp_path / "hub")
    cache_model(cache, "jattn-tests/tiny", {"main": EMBEDDED_MODEL, "v1": OTHER_MODEL})
    env = {**os.environ, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1",
           "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, EMBEDDED_MODEL, OTHER_MODEL],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert answers["hub"] == answers["local"]
    assert answers["hub v1"] == answers["other"] != answers["local"]
    assert "'jattn-tests/not-cached'" in answers["missing"]
    assert "not in the Hugging Face cache" in answers["missing"]
    assert "HF_HUB_OFFLINE" in answers["missing"]
