"""``python -m trainerd.worker.fetch ORG/NAME``: download a Hugging Face model into the local cache.

``trainerd run`` starts this once when ``model.path`` is a hub id that is not cached yet
(trainerd/core/modelref.py): huggingface_hub (a dependency of transformers) lives on the worker's
side, never in the supervisor. Only the top-level files a causal LM loads from are fetched: the
JSON files (config, tokenizer, generation config), the tokenizer's own files, and the weights in
safetensors (``*.bin`` only where there is no safetensors file): not the ONNX, GGUF or training
run folders many model repositories also hold. On success it prints the snapshot folder.

Exit codes: 0 fetched (or already there), 69 (EX_UNAVAILABLE) it cannot be fetched now: offline
(HF_HUB_OFFLINE=1), no such model, no access, a network error.
"""

from __future__ import annotations

import fnmatch
import sys

from trainerd.core.contract import ExitCode

__all__ = ["files_to_fetch", "main"]

_ALWAYS = ("*.json", "tokenizer.model", "*.tiktoken", "vocab.txt", "merges.txt", "*.jinja")


def files_to_fetch(names: list[str]) -> list[str]:
    """The files of a repository listing that loading a causal LM needs (top level only)."""
    top = [n for n in names if "/" not in n]
    weights = [n for n in top if n.endswith(".safetensors")] or [n for n in top if n.endswith(".bin")]
    return sorted({n for n in top if any(fnmatch.fnmatch(n, pat) for pat in _ALWAYS)} | set(weights))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m trainerd.worker.fetch ORG/NAME", file=sys.stderr)
        return ExitCode.USAGE
    model_id = args[0]
    try:
        from huggingface_hub import HfApi, snapshot_download

        wanted = files_to_fetch(HfApi().list_repo_files(model_id))
        # Exact names as patterns: a name with [ ] would be a glob; none of the above has one.
        path = snapshot_download(model_id, allow_patterns=wanted)
    except Exception as e:  # noqa: BLE001 - every way a download fails is "not now", with its reason
        print(f"cannot fetch {model_id} from the Hugging Face hub: {type(e).__name__}: {e}", file=sys.stderr)
        return ExitCode.UNAVAILABLE
    print(path)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
