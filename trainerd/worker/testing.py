"""Build a tiny random Llama with its own tokenizer, offline, in well under a second.

Used by the tests and the benchmarks. The tokenizer is a byte-level BPE trained with the
``tokenizers`` library on a fixed corpus (deterministic, no network), wrapped as a
``PreTrainedTokenizerFast`` with ChatML special tokens and a chat template, so all three data
formats, offsets and the chat template work exactly as they do with SmolLM2.

Imports torch/transformers lazily: importing this module costs nothing on the supervisor side.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "trainerd keeps fine-tuning a LoRA adapter on every new file, one after another.",
    "Question: what is two plus two? Answer: four.",
    "user assistant system: hello there, how are you today? I am fine, thank you.",
    "0123456789 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "Memory is measured the way the kernel measures it: cgroup usage against its limit.",
] * 4


def build_tiny_model(dest: str | Path, *, vocab_size: int = 512, hidden: int = 64, layers: int = 2,
                     seed: int = 0) -> Path:
    """Write a tiny LlamaForCausalLM + tokenizer folder to ``dest`` and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
        pad_token="<pad>", unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dest)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(dest)
    return dest


def _same_shape(model_dir: Path, shape: dict) -> bool:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return all(cfg.get(k) == v for k, v in shape.items())


def build_random_model(dest: str | Path, shape: dict, *, tokenizer_from: str | Path | None = None,
                       seed: int = 0) -> Path:
    """A Llama of ``shape`` (LlamaConfig fields) with random weights, saved in bf16 as most released
    checkpoints are, with ``tokenizer_from``'s tokenizer (else the tiny one). Kept when ``dest``
    already holds one."""
    dest = Path(dest)
    if any(dest.glob("*.safetensors")) and _same_shape(dest, shape):
        return dest
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shutil.rmtree(dest, ignore_errors=True)  # another shape under that name: made again
    tok_dir = Path(tokenizer_from) if tokenizer_from else build_tiny_model(dest.parent / f"{dest.name}.tokenizer")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed build left
    tok.save_pretrained(str(tmp))
    cfg = LlamaConfig(**{"max_position_embeddings": 8192, "tie_word_embeddings": True, **shape},
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    # Made on the meta device and filled once: the default construction draws every weight twice
    # (nn.Linear's own init, then transformers'): 26 s of CPU instead of 11 for the 0.92 B model.
    # Projections and embeddings ~ N(0, initializer_range), norms 1, as transformers does.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # stored in bf16, as most released checkpoints are
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.to_empty(device="cuda" if torch.cuda.is_available() else "cpu")
    model.tie_weights()  # to_empty gives the head its own tensor: saved twice, 0.1 B parameters more
    gen = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # each tied weight once
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, cfg.initializer_range, generator=gen)
    model.save_pretrained(str(tmp))
    del model
    tmp.rename(dest)  # complete before it appears: a cached half-written model would be reused
    return dest
