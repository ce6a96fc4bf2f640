"""The bf16-as-stored layout of an fp32 batch (trainerd/worker/weights.py): the same numbers as the
fp32 layout, through a few shared fp32 buffers instead of a copy of every weight."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


class _Log:
    def info(self, *a, **k) -> None:
        pass


def _lora_model(model_dir, load_dtype, *, to_fp32: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=load_dtype)
    if to_fp32:
        base = base.float()  # the same (bf16-rounded) values, held in fp32: the float32 layout's numbers
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                            init_lora_weights=False))  # B != 0: the input gradients are not trivial
    return model


def test_bf16_weights_in_an_fp32_batch_give_the_fp32_layouts_loss_and_gradients(tiny_model_dir):
    """A model whose frozen weights stay bf16 (computed in fp32 through UpcastLinear and the embedding's upcast hook)
    gives the same loss and the same LoRA gradients, bit for bit, as the same weights held in fp32; every
    decoder projection of one size shares one fp32 buffer, and the lm-head none."""
    from trainerd.worker import weights as wt
    from trainerd.worker.loss import loss_path, token_loss

    held = _lora_model(tiny_model_dir, torch.bfloat16, to_fp32=False)
    counts = wt.shape_base(held, "float32", _Log())
    ref = _lora_model(tiny_model_dir, torch.bfloat16, to_fp32=True)
    # The same adapter in both. (A new adapter's random A is drawn in fp32 and passes through the base
    # layer's bf16 in peft before it is upcast again: a new adapter on bf16 weights starts rounded.)
    ref.load_state_dict({k: v for k, v in held.state_dict().items() if "lora_" in k}, strict=False)
    assert counts["upcast_linears"] > 0 and counts["embedding_bf16"] > 0
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    wt._BUFFERS.clear()
    losses, grads = [], []
    for model in (held, ref):
        loss, n = token_loss(model, ids, mask, ids.clone(), path=loss_path(model))
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == losses[1]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k
    base = held.get_base_model()
    sizes = {m.weight.numel() for m in base.model.modules() if isinstance(m, wt.UpcastLinear)}
    assert {k[0] for k in wt._BUFFERS} == sizes  # one buffer per size, not one per layer
    head = base.get_output_embeddings()
    assert type(head) is wt.UpcastLinear and not head.shared_buffer
