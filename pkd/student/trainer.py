"""`ProxyKDTrainer`: a `transformers.Trainer` whose loss is the chunked Proxy-KD loss on batches of
a `CacheStream`. Everything else (DDP/FSDP, mixed precision, checkpoints, logging) is Trainer's.

The loss is fused with the output layer (`fused_proxy_kd_loss`: the (B, L, V) logits are never
built) whenever the logits are provably hidden · Wᵀ: a bias-free `nn.Linear` head (tied or not;
LoRA on the body is fine, LoRA on the head is not), a forward that takes `logits_to_keep`, and no
FSDP (it shards W outside the module's forward). The first batch double-checks it: the model's
own logits at the last position must equal hidden · Wᵀ there. Otherwise the unfused chunked loss
runs on the model's logits, and the log says why.

Overridden hooks and why:
- `get_train_dataloader`: the stream shards itself per rank, so accelerate must neither
  dispatch batches from rank 0 nor re-shard an IterableDataset; batches arrive whole.
- `compute_loss`: the KD loss, normalised by `num_items_in_batch` (response tokens over the
  whole accumulated, all-rank batch), so gradient accumulation and DDP give the gradient of the
  global token mean; `loss_is_scaled_for_ga` tells Trainer not to divide again. DDP averages
  gradients over the data-parallel ranks, so the loss is multiplied back by their number:
  processes // tp_size, as Trainer's own `compute_loss` does (tensor-parallel ranks share a batch).
  Under DataParallel (one process, several GPUs) the loss is computed once on the gathered
  outputs: Trainer's count arrives repeated per GPU, and nothing averages the loss (scale 1).
  A sampled cache's batches (they carry `topk_counts`) take the RS-KD estimator, fused the same way.
- `log`: adds CE, KL and weight statistics to the training loss (so they reach every tracker
  `report_to` names), and logs the true epoch: samples consumed / cache rows (Trainer cannot
  know an IterableDataset's length and would log a fraction of max_steps instead).
Resume: Trainer's own batch skipping is turned off; a callback tells the stream how many
batches were consumed, and the stream jumps there without reading them.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from pkd.student.losses import Tail, fused_proxy_kd_loss, proxy_kd_loss
from pkd.student.sampled_loss import fused_sampled_kd_loss, sampled_kd_loss
from pkd.student.data import CacheStream


@dataclass(frozen=True)
class KDSettings:
    alpha: float = 1.0
    tail: Tail = "tail"
    temperature: float = 1.0
    proposal_temperature: float = 1.0  # sampled caches: what the draws came from (codec spec)
    fused: bool = True  # fuse the output layer with the loss where the model allows it
    ce_scale: float | None = None  # --weight-ce: CE of sample b weighted by w_b · ce_scale (1 / the cache's token-weighted mean w)

log = logging.getLogger(__name__)
HEAD_CHECK_RTOL = {torch.float32: 1e-3, torch.float64: 1e-3}  # |hidden·Wᵀ − logits| / max |logits|; 3e-2 for 16-bit logits
# config fields of families whose logits are not hidden · Wᵀ (Gemma 2/3, Cohere, Granite)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def data_parallel_scale(num_processes: int, tp_size: int) -> int:
    """The factor DDP's gradient averaging divides by: processes // tp_size (tensor-parallel
    ranks see the same batch). Under DataParallel (one process, several GPUs) it is 1: Trainer
    multiplies by the GPU count because a model's own loss is computed per replica and averaged,
    but pkd's loss is computed once, on the gathered outputs, and nothing averages it."""
    return num_processes // tp_size


def global_tokens(num_items_in_batch: torch.Tensor | int) -> float:
    """Trainer's `num_items_in_batch` as a number: a count, or under DataParallel the same count
    repeated per GPU, shape (n_gpu, 1), for a loss computed per replica."""
    return float(num_items_in_batch.reshape(-1)[0]) if torch.is_tensor(num_items_in_batch) else float(num_items_in_batch)


class _ResumeStream(TrainerCallback):
    """After Trainer restores its state, skip the batches the checkpointed run consumed."""

    def __init__(self, stream: CacheStream) -> None:
        self.stream = stream

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.stream.start_batch = state.global_step * args.gradient_accumulation_steps


class _LogLastStep(TrainerCallback):
    """Log the last step too: the tokens, CE and KL since the last logging step would otherwise
    be left out of the log, and of the run's summary ("0 tokens" when logging_steps > steps)."""

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step >= state.max_steps:
            control.should_log = True


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
        self.add_callback(_LogLastStep())
        self._sums = torch.zeros(6, dtype=torch.float64)  # nll, kl, tokens, Σw, Σw², samples
        self._w_range = [float("inf"), float("-inf")]
        self._fused: bool | None = None  # decided on the first batch
        self.loss_path = "not decided (no batch trained)"  # the path taken, for the log and the run summary
        if not kd.fused:
            self._decide(False, "fusion turned off")

    def _output_weight(self, model) -> tuple[torch.Tensor | None, str]:  # noqa: ANN001
        """The output layer's weight W if logits = hidden · Wᵀ can be fused with the loss, else
        (None, why not)."""
        inner = self.accelerator.unwrap_model(model)
        base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # under PEFT
        head = inner.get_output_embeddings()
        if self.is_fsdp_enabled:
            return None, "FSDP shards the output layer's weight outside its forward"
        if type(head) is not torch.nn.Linear or head.bias is not None:
            return None, f"the output layer is a {type(head).__name__}{' with a bias' if getattr(head, 'bias', None) is not None else ''}, not a bias-free nn.Linear (LoRA on lm_head?)"
        transform = next((f for f in LOGIT_TRANSFORMS if getattr(base.config, f, None) not in (None, 1, 1.0)), None)
        if transform:
            return None, f"the model's config sets {transform}: its logits are not hidden · Wᵀ"
        if "logits_to_keep" not in inspect.signature(base.forward).parameters:
            return None, f"{type(base).__name__}.forward takes no logits_to_keep"
        return head.weight, ""

    def _losses(self, inputs, scale: float):  # noqa: ANN001
        """(loss from the logits, fused loss from hidden states and W) for this batch: the RS-KD
        estimator for a sampled cache (its batches carry `topk_counts`; tail does not apply),
        else the top-k Proxy-KD loss."""
        head = (inputs["shift_labels"], inputs["topk_ids"], inputs["topk_logprobs"])
        ce_weights = None if self.kd.ce_scale is None else inputs["weights"] * self.kd.ce_scale  # (B,)
        if "topk_counts" in inputs:
            batch = (*head, inputs["topk_counts"], inputs["weights"])
            kd = dict(alpha=self.kd.alpha, temperature=self.kd.temperature, proposal_temperature=self.kd.proposal_temperature, scale=scale, ce_weights=ce_weights)
            return (lambda logits: sampled_kd_loss(logits, *batch, **kd)), (lambda h, w: fused_sampled_kd_loss(h, w, *batch, **kd))
        batch = (*head, inputs["weights"])
        kd = dict(alpha=self.kd.alpha, tail=self.kd.tail, temperature=self.kd.temperature, scale=scale, ce_weights=ce_weights)
        return (lambda logits: proxy_kd_loss(logits, *batch, **kd)), (lambda h, w: fused_proxy_kd_loss(h, w, *batch, **kd))

    def _student_loss(self, model, inputs, scale: float):  # noqa: ANN001
        """(KDLoss, model outputs), fused with the output layer when possible."""
        from_logits, fused = self._losses(inputs, scale)
        weight, why = self._output_weight(model) if self._fused is not False else (None, "")
        if weight is None:
            if self._fused is None:
                self._decide(False, why)
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            return from_logits(outputs.logits), outputs
        # logits at the last position only: cheap, and they let the first batch check the fusion
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False, logits_to_keep=1, output_hidden_states=True)
        hidden = outputs.hidden_states[-1]  # (B, L, d) the output layer's input
        if self._fused is None:
            with torch.no_grad():
                mine = hidden[:, -1].float() @ weight.float().T  # (B, V)
                theirs = outputs.logits[:, -1].float()  # (B, V)
                err = float((mine - theirs).abs().max() / theirs.abs().max().clamp_min(1e-6))
            if not err <= HEAD_CHECK_RTOL.get(outputs.logits.dtype, 3e-2):
                self._decide(False, f"the model's logits differ from hidden · Wᵀ by {err:.2g} relative")
                return self._student_loss(model, inputs, scale)
            self._decide(True, "")
        return fused(hidden, weight), outputs

    def _decide(self, fused: bool, why: str) -> None:
        """Record the loss path once, in the step's log and for the run summary: the fused path
        saves the (B, L, V) logits' memory, so a user should see which one a run took."""
        self._fused = fused
        if fused:
            self.loss_path = "fused with the output layer (no (B, L, V) logits)"
            log.info("Proxy-KD loss: %s", self.loss_path)
        else:
            self.loss_path = f"not fused with the output layer ({why}): the (B, L, V) logits are built"
            log.warning("Proxy-KD loss: %s", self.loss_path)

    def get_train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset,
            batch_size=None,  # the stream yields whole per-rank batches
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        tokens = (inputs["shift_labels"] != -100).sum()
        if num_items_in_batch is None:  # outside training: a per-batch mean
            scale = 1.0 / max(int(tokens), 1)
        else:  # DDP averages gradients over data-parallel ranks: undo it, the normaliser is global
            procs = data_parallel_scale(self.accelerator.num_processes, self.get_tp_size()) if self.args.average_tokens_across_devices else 1
            scale = procs / max(global_tokens(num_items_in_batch), 1.0)
        out, outputs = self._student_loss(model, inputs, scale)
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
