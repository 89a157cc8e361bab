"""`ProxyKDTrainer` fuses the output layer with the loss where the model allows it, trains the
same as the unfused path, and normalises the loss like Trainer under tensor parallelism."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from pkd.store import Folder
from pkd.student.data import CacheStream
from pkd.student.trainer import KDSettings, ProxyKDTrainer, data_parallel_scale


def make_trainer(family, cache: str, tmp_path, *, fused: bool, tied: bool = False, lora_head: bool = False, steps: int = 3) -> ProxyKDTrainer:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(family.student, dtype=torch.float32)
    if tied:  # one parameter for the input embedding and the output layer
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    if lora_head:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "lm_head"]))
    folder = Folder(cache)
    stream = CacheStream(folder, folder.read_manifest(), batch_size=4, max_length=64, shuffle_buffer=16)
    args = TrainingArguments(output_dir=str(tmp_path / f"run-{fused}"), per_device_train_batch_size=4, max_steps=steps, learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, remove_unused_columns=False)
    return ProxyKDTrainer(model=model, args=args, train_dataset=stream, processing_class=AutoTokenizer.from_pretrained(family.student), kd=KDSettings(alpha=0.7, fused=fused))


def train(trainer: ProxyKDTrainer) -> tuple[list[float], dict[str, torch.Tensor]]:
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
def test_fused_trains_like_unfused(tiny_family, scored_cache, tmp_path, tied):
    fused = make_trainer(tiny_family, scored_cache, tmp_path, fused=True, tied=tied)
    a, pa = train(fused)
    assert fused._fused is True and fused.loss_path.startswith("fused")  # the fused path ran
    unfused = make_trainer(tiny_family, scored_cache, tmp_path, fused=False, tied=tied)
    b, pb = train(unfused)
    assert unfused._fused is False and "turned off" in unfused.loss_path and len(a) == len(b) == 3 and len(set(a)) > 1
    assert a == pytest.approx(b, rel=1e-5)
    for name in pa:  # every weight, the output layer included, moved the same way
        torch.testing.assert_close(pa[name], pb[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_on_the_output_layer_is_not_fused(tiny_family, scored_cache, tmp_path, caplog):
    trainer = make_trainer(tiny_family, scored_cache, tmp_path, fused=True, lora_head=True, steps=1)
    train(trainer)
    assert trainer._fused is False and "not fused with the output layer" in caplog.text and "LoRA on lm_head" in caplog.text
    assert caplog.text.count("Proxy-KD loss:") == 1 and trainer.loss_path.startswith("not fused") and "LoRA on lm_head" in trainer.loss_path


def test_tensor_parallel_ranks_are_not_counted_as_data_parallel(tiny_family, scored_cache, tmp_path, monkeypatch):
    """4 processes of tensor-parallel size 2 are 2 data-parallel replicas: the loss is scaled by
    2 / num_items_in_batch, as Trainer's own compute_loss does, not by 4 / num_items_in_batch."""
    assert data_parallel_scale(4, 2) == 2 and data_parallel_scale(8, 1) == 8
    trainer = make_trainer(tiny_family, scored_cache, tmp_path, fused=True, steps=1)
    batch = next(iter(trainer.get_train_dataloader()))
    items = torch.tensor(100)
    one = trainer.compute_loss(trainer.model, batch, num_items_in_batch=items).item()
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 4))
    monkeypatch.setattr(trainer, "get_tp_size", lambda: 2)
    assert trainer.compute_loss(trainer.model, batch, num_items_in_batch=items).item() == pytest.approx(2 * one, rel=1e-6)


def test_logit_transforms_in_the_config_are_not_fused(tiny_family, scored_cache, tmp_path):
    trainer = make_trainer(tiny_family, scored_cache, tmp_path, fused=True, steps=1)
    weight, _ = trainer._output_weight(trainer.model)
    assert weight is trainer.model.lm_head.weight
    trainer.model.config.final_logit_softcapping = 30.0  # Gemma-2 style: logits = 30·tanh(h·Wᵀ/30)
    weight, why = trainer._output_weight(trainer.model)
    assert weight is None and "final_logit_softcapping" in why


def test_one_process_with_several_gpus_is_scaled_once(tiny_family, scored_cache, tmp_path):
    """DataParallel: Trainer passes num_items_in_batch as the count repeated per GPU, shape
    (n_gpu, 1), and args.n_gpu = 2. pkd's loss is computed once on the gathered outputs, so it is
    the one-GPU loss (it raised ValueError on the (2, 1) tensor, and scaled by 2 once that passed)."""
    assert data_parallel_scale(1, 1) == 1
    trainer = make_trainer(tiny_family, scored_cache, tmp_path, fused=True, steps=1)
    batch = next(iter(trainer.get_train_dataloader()))
    one = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(100)).item()
    trainer.args._n_gpu = 2  # what TrainingArguments holds in one process that sees two GPUs
    per_gpu = torch.tensor(100).unsqueeze(0).expand(2, -1)  # (2, 1): Trainer._get_num_items_in_batch under DataParallel
    assert trainer.compute_loss(trainer.model, batch, num_items_in_batch=per_gpu).item() == pytest.approx(one, rel=1e-6)
