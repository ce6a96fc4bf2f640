"""The fused loss and the precision rules, in-process on the tiny model (no subprocess, seconds)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from trainerd.core.config import from_dict  # noqa: E402
from trainerd.worker import model as mdl  # noqa: E402
from trainerd.worker.loss import chunk_rows, loss_path, token_loss  # noqa: E402

BF16 = torch.bfloat16


class ListLog:
    def __init__(self):
        self.records = []

    def info(self, event, **kw):
        self.records.append(("info", event, kw))

    def warning(self, event, **kw):
        self.records.append(("warning", event, kw))


def _peft(model_dir, targets=("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets),
                                            task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero, so that every LoRA matrix gets a gradient
            torch.nn.init.normal_(p, std=0.05)
    return model


def _batch(vocab, b=3, t=40):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100          # a prompt
    labels[1, 30:] = -100         # padding
    labels[2, :] = -100           # a block with nothing to learn
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    n_items = int((labels[:, 1:] != -100).sum()) + 5  # as if other micro-batches shared the step
    return ids, mask, labels, n_items


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _hf_loss(model, ids, mask, labels, n_items, amp):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=BF16, enabled=amp is not None):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items).loss
    loss.backward()
    return loss.item(), _grads(model)


def _fused_loss(model, ids, mask, labels, n_items, amp, **kw):
    model.zero_grad(set_to_none=True)
    loss, n = token_loss(model, ids, mask, labels, divide_by=n_items, autocast_dtype=amp, **kw)
    loss.backward()
    return loss.item(), n, _grads(model)


def _max_rel(a, b):
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


def test_fused_loss_equals_transformers_loss_in_fp32(tiny_model_dir):
    """fp32: the chunked loss and its LoRA gradients equal transformers' full-logits loss (labels masked, step-normalised)."""
    model = _peft(tiny_model_dir)
    assert loss_path(model).kind == "fused"
    ids, mask, labels, n_items = _batch(model.config.vocab_size)
    ref, gref = _hf_loss(model, ids, mask, labels, n_items, None)
    got, n, g = _fused_loss(model, ids, mask, labels, n_items, None, chunk=16)  # several chunks
    assert n == n_items - 5
    assert got == pytest.approx(ref, rel=1e-6)
    assert _max_rel(g, gref) < 1e-5


def test_fused_loss_matches_transformers_under_bf16_autocast(tiny_model_dir):
    """bf16 autocast: same loss value within float tolerance, gradients within bf16 noise."""
    model = _peft(tiny_model_dir)
    ids, mask, labels, n_items = _batch(model.config.vocab_size)
    ref, gref = _hf_loss(model, ids, mask, labels, n_items, BF16)
    got, _, g = _fused_loss(model, ids, mask, labels, n_items, BF16, chunk=16)
    assert got == pytest.approx(ref, rel=1e-5)
    assert _max_rel(g, gref) < 0.02


def test_forward_only_loss_keeps_no_graph(tiny_model_dir):
    """Under no_grad (an evaluation pass) the same sum comes back with nothing kept for backward."""
    model = _peft(tiny_model_dir)
    ids, mask, labels, _ = _batch(model.config.vocab_size)
    with_grad, n1 = token_loss(model, ids, mask, labels)
    with torch.no_grad():
        no_grad, n2 = token_loss(model, ids, mask, labels)
    assert not no_grad.requires_grad and n1 == n2
    assert no_grad.item() == pytest.approx(with_grad.item(), rel=1e-6)


def test_micro_batch_without_labels_gives_zero_and_backward_works(tiny_model_dir):
    """A block whose tokens are all masked contributes 0 and backward() still runs."""
    model = _peft(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    loss, n = token_loss(model, ids, torch.ones_like(ids), torch.full_like(ids, -100), divide_by=4)
    loss.backward()
    assert n == 0 and loss.item() == 0.0


def test_trained_lm_head_takes_the_full_path_with_the_same_value(tiny_model_dir):
    """A LoRA on the lm-head is not fused (its module must run): the full path gives the same loss."""
    fused = _peft(tiny_model_dir)
    model = _peft(tiny_model_dir, targets=("q_proj", "v_proj", "lm_head"))
    path = loss_path(model)
    assert path.kind == "full" and "lm-head" in path.reason
    ids, mask, labels, n_items = _batch(model.config.vocab_size)
    ref, _ = _hf_loss(model, ids, mask, labels, n_items, None)
    got, _, _ = _fused_loss(model, ids, mask, labels, n_items, None)
    assert got == pytest.approx(ref, rel=1e-6)
    assert loss_path(fused, fused=False).kind == "full"


def test_bf16_base_linears_change_nothing_under_autocast(tiny_model_dir):
    """Holding the frozen Linear weights in bf16 gives bit-identical loss and gradients to fp32 weights under autocast."""
    a = _peft(tiny_model_dir)
    b = _peft(tiny_model_dir)
    ids, mask, labels, n_items = _batch(a.config.vocab_size)
    narrowed = mdl.hold_frozen_linears_in_bf16(b)
    assert narrowed > 0
    assert all(p.dtype == torch.float32 for p in b.parameters() if p.requires_grad)
    assert b.get_base_model().get_output_embeddings().weight.dtype == torch.float32  # tied to the embeddings
    la, _, ga = _fused_loss(a, ids, mask, labels, n_items, BF16)
    lb, _, gb = _fused_loss(b, ids, mask, labels, n_items, BF16)
    assert la == lb
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


def test_chunk_rows_budget():
    """A chunk holds about 96 MiB of fp32 logits, in multiples of 64 rows, never fewer than 64."""
    assert chunk_rows(49152) == 512
    assert chunk_rows(512) % 64 == 0 and chunk_rows(512) * 512 * 4 <= 96 << 20
    assert chunk_rows(10**9) == 64


def _settings(dtype):
    return from_dict({"model": {"dtype": dtype}})


@pytest.mark.parametrize("flags, expected", [
    ({"native_bf16": True, "cpuinfo_flags": ["amx_bf16", "avx512_bf16"]}, "bfloat16"),
    ({"native_bf16": False, "cpuinfo_flags": ["avx2"]}, "float32"),
])
def test_auto_precision_follows_the_cpu(monkeypatch, flags, expected):
    """auto picks bf16 on a CPU with native bf16 (AVX512-BF16 or AMX) and fp32 elsewhere, and logs what it found."""
    monkeypatch.setattr(mdl, "cpu_features", lambda: dict(flags))
    log = ListLog()
    p = mdl.resolve_precision(_settings("auto"), torch.device("cpu"), None, "", log)
    assert (p.name, p.source) == (expected, "auto")
    (_lvl, event, fields), = log.records
    assert event == "precision_resolved" and fields["cpuinfo_flags"] == flags["cpuinfo_flags"]


def test_forced_precision_and_kept_precision():
    """float32/bfloat16 force the choice; a batch's recorded precision wins over both, with a warning."""
    log = ListLog()
    assert mdl.resolve_precision(_settings("float32"), torch.device("cpu"), None, "", log).name == "float32"
    assert mdl.resolve_precision(_settings("bfloat16"), torch.device("cpu"), None, "", log).autocast is BF16
    kept = mdl.resolve_precision(_settings("float32"), torch.device("cpu"), "bfloat16", "checkpoint", log)
    assert (kept.name, kept.source) == ("bfloat16", "checkpoint")
    assert log.records[-1][:2] == ("warning", "precision_kept")
    quiet = ListLog()
    assert mdl.resolve_precision(_settings("auto"), torch.device("cpu"), "float32", "batch", quiet).name == "float32"
    assert quiet.records[-1][:2] == ("info", "precision_kept")


def test_cpu_features_reads_this_machine():
    """The detection returns the cpuinfo flags it looked at and a yes/no for native bf16."""
    f = mdl.cpu_features()
    assert isinstance(f["native_bf16"], bool) and isinstance(f["cpuinfo_flags"], list)
