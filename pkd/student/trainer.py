"""`ProxyKDTrainer`: a `transformers.Trainer` whose loss is the chunked Proxy-KD loss on batches of
a `CacheStream`. Everything else (DDP/FSDP, mixed precision, checkpoints, logging) is Trainer's.

Overridden hooks and why:
- `get_train_dataloader`: the stream shards itself per rank, so accelerate must neither
  dispatch batches from rank 0 nor re-shard an IterableDataset; batches arrive whole.
- `compute_loss`: the KD loss, normalised by `num_items_in_batch` (response tokens over the
  whole accumulated, all-rank batch), so gradient accumulation and DDP give the gradient of the
  global token mean; `loss_is_scaled_for_ga` tells Trainer not to divide again.
- `log`: adds CE, KL and weight statistics to the training loss (so they reach every tracker
  `report_to` names), and logs the true epoch: samples consumed / cache rows (Trainer cannot
  know an IterableDataset's length and would log a fraction of max_steps instead).
Resume: Trainer's own batch skipping is turned off; a callback tells the stream how many
batches were consumed, and the stream jumps there without reading them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from pkd.student.losses import Tail, proxy_kd_loss
from pkd.student.sampled_loss import sampled_kd_loss
from pkd.student.data import CacheStream


@dataclass(frozen=True)
class KDSettings:
    alpha: float = 1.0
    tail: Tail = "tail"
    temperature: float = 1.0
    proposal_temperature: float = 1.0  # sampled caches: what the draws came from (codec spec)


class _ResumeStream(TrainerCallback):
    """After Trainer restores its state, skip the batches the checkpointed run consumed."""

    def __init__(self, stream: CacheStream) -> None:
        self.stream = stream

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.stream.start_batch = state.global_step * args.gradient_accumulation_steps


class ProxyKDTrainer(Trainer):
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, kd: KDSettings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.train_dataset, CacheStream):
            raise TypeError("ProxyKDTrainer trains on a pkd.student.data.CacheStream")
        self.kd = kd
        self.args.ignore_data_skip = True  # the stream skips consumed batches itself
        self.model_accepts_loss_kwargs = True  # makes Trainer count num_items_in_batch
        self.add_callback(_ResumeStream(self.train_dataset))
        self._sums = torch.zeros(6, dtype=torch.float64)  # nll, kl, tokens, Σw, Σw², samples
        self._w_range = [float("inf"), float("-inf")]

    def get_train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset,
            batch_size=None,  # the stream yields whole per-rank batches
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        tokens = (inputs["shift_labels"] != -100).sum()
        if num_items_in_batch is None:  # outside training: a per-batch mean
            scale = 1.0 / max(int(tokens), 1)
        else:  # DDP averages gradients over ranks: undo it, the normaliser is already global
            procs = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            scale = procs / max(float(num_items_in_batch), 1.0)
        if "topk_counts" in inputs:  # a sampled cache: the RS-KD estimator (tail does not apply)
            out = sampled_kd_loss(
                outputs.logits,
                inputs["shift_labels"],
                inputs["topk_ids"],
                inputs["topk_logprobs"],
                inputs["topk_counts"],
                inputs["weights"],
                alpha=self.kd.alpha,
                temperature=self.kd.temperature,
                proposal_temperature=self.kd.proposal_temperature,
                scale=scale,
            )
        else:
            out = proxy_kd_loss(
                outputs.logits,
                inputs["shift_labels"],
                inputs["topk_ids"],
                inputs["topk_logprobs"],
                inputs["weights"],
                alpha=self.kd.alpha,
                tail=self.kd.tail,
                temperature=self.kd.temperature,
                scale=scale,
            )
        if model.training:
            w = inputs["weights"].double().cpu()
            self._sums += torch.stack([out.nll.double().cpu(), out.kl.double().cpu(), out.tokens.double().cpu(), w.sum(), (w * w).sum(), torch.tensor(float(len(w)))])
            self._w_range = [min(self._w_range[0], float(w.min())), max(self._w_range[1], float(w.max()))]
        return (out.loss, outputs) if return_outputs else out.loss

    def epoch_at(self, step: int) -> float:
        """Passes over the cache after `step` optimizer steps, all ranks together."""
        a = self.args
        return step * a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size / max(self.train_dataset.manifest.rows, 1)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # every rank logs at the same steps: collectives are safe here
            sums = self.accelerator.reduce(self._sums.to(self.args.device), reduction="sum")
            ranges = self.accelerator.gather(torch.tensor([self._w_range], dtype=torch.float64, device=self.args.device))
            nll, kl, tokens, w_sum, w_sq, n = sums.double().cpu().tolist()
            if tokens:
                logs.update(ce=round(nll / tokens, 5), kl=round(kl / tokens, 5), tokens=int(tokens))
            if n:
                mean = w_sum / n
                std = max(w_sq / n - mean * mean, 0.0) ** 0.5
                logs.update(w_mean=round(mean, 5), w_std=round(std, 5), w_min=round(float(ranges[:, 0].min()), 5), w_max=round(float(ranges[:, 1].max()), 5))
            self._sums.zero_()
            self._w_range = [float("inf"), float("-inf")]
        trainer_epoch = self.state.epoch  # Trainer.log writes state.epoch into the record: lend it ours
        if trainer_epoch is not None:
            self.state.epoch = round(self.epoch_at(self.state.global_step), 4)
        try:
            super().log(logs, start_time)
        finally:
            self.state.epoch = trainer_epoch
