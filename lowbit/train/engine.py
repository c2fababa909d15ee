"""The one training loop every training method uses (fine-tuning, STE QAT, LSQ, PSG, ...).

A *method* adapts the model and the loop without owning it: ``method.prepare(model)`` returns
the model to train (quantizers in the wrapper slots, gradient hooks, ...) and optionally
``method.before_step(model, epoch, step)`` switches things on a schedule (activation
quantization after N steps, BN statistics frozen from an epoch). ``None`` trains the float model.

Reproducibility and resume. Everything random is drawn from generators seeded by
``(seed, epoch)``: the data order and the augmentation of epoch ``e`` do not depend on how the
run got there. The global torch RNG (for methods that sample, e.g. stochastic binarization) is
saved in the checkpoint written after every epoch. So a run killed anywhere and resumed from its
last checkpoint replays the interrupted epoch and ends bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.data.core import Batches, Dataset, normalization_tensors
from lowbit.errors import DataError, NumericalError
from lowbit.evaluate import evaluate
from lowbit.progress import progress
from lowbit.train import distributed
from lowbit.train.augment import pad_crop_flip
from lowbit.train.config import TrainConfig
from lowbit.train.metrics import MetricLog
from lowbit.train.state import load_checkpoint, save_checkpoint

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainResult:
    model: nn.Module
    metrics: list[dict]
    checkpoint: Path | None


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 101 + stream) % (2 ** 63)


def _optimizer(model: nn.Module, config: TrainConfig, no_decay: set) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if id(p) not in no_decay]
    rest = [p for p in params if id(p) in no_decay]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                           nesterov=config.nesterov)


def _lr_factor(config: TrainConfig, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        if config.schedule == "multistep":
            epoch = step // steps_per_epoch
            return config.gamma ** sum(epoch >= m for m in config.milestones)
        return 1.0
    return factor


def distillation_loss(logits, teacher_logits, target, temperature: float, alpha: float):
    """(1 - alpha) CE(s, y) + alpha T^2 KL(softmax(t/T) || softmax(s/T))  (Hinton et al. 2015)."""
    ce = F.cross_entropy(logits, target)
    kl = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(teacher_logits /
                  temperature, 1), reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl


def _settings(config: TrainConfig, method) -> dict:
    settings = {"train": config.to_dict()}
    if method is not None:
        settings["method"] = {"name": method.name, **method.config.to_dict()}
    return settings


def train(model: nn.Module, data: Dataset, normalization, config: TrainConfig | None = None,
          method=None, out=None, resume: bool = False, callbacks=()) -> TrainResult:
    """Train ``model`` on ``data.train`` (augmented) and evaluate on ``data.test`` each epoch.

    ``out``: folder for ``checkpoint.pt`` (every epoch, atomic), ``metrics.csv`` / ``.json``
    and TensorBoard events; ``resume`` continues from its checkpoint. ``callbacks`` are called
    after every step as ``callback(epoch, step, loss)``. Under ``torchrun`` the batch is split
    over the processes (DistributedDataParallel).
    """
    config = (config or TrainConfig()).validate()
    device = config.device
    distributed.init_from_env(device)
    rank, size = distributed.world()
    torch.manual_seed(config.seed)
    teacher = copy.deepcopy(model).to(device).eval() if config.distill else None
    model = (method.prepare(model) if method is not None else model).to(device)
    settings = _settings(config, method)

    mean, std = (t.to(device) for t in normalization_tensors(normalization,
                                                             data.train.images.shape[1]))
    test = Batches(data.test, normalization, 500)
    local_batch = max(config.batch_size // size, 1)
    steps_per_epoch = len(data.train) // (local_batch * size)
    if steps_per_epoch == 0:
        raise DataError(f"{len(data.train)} training images are fewer than one batch of "
                        f"{config.batch_size}")

    out = Path(out) if out is not None else None
    ck = load_checkpoint(out / CHECKPOINT, model, settings) if resume else None
    if ck is not None:
        model.load_state_dict(ck["state_dict"])
    else:
        # Quantizers that calibrate on the first tensor they see do so here, on the same
        # images in every process, before DDP copies rank 0's state to the others.
        with torch.no_grad():
            first = data.train.images[:local_batch].to(device).float() / 255.0
            model.eval()((first - mean) / std)
    no_decay = method.no_weight_decay(model) if hasattr(method, "no_weight_decay") else set()
    optimizer = _optimizer(model, config, no_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config, steps_per_epoch))
    start_epoch, rows = 0, []
    if ck is not None:
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"])
        start_epoch, rows = ck["epoch"], ck["metrics"]
    log = MetricLog(out, rows, tensorboard=True) if out is not None and rank == 0 else None
    net = distributed.wrap(model, device)
    try:
        for epoch in range(start_epoch, config.epochs):
            lr = optimizer.param_groups[0]["lr"]
            loss_sum, correct, seen = _train_epoch(net, model, teacher, data, config, method,
                                                   epoch, steps_per_epoch, local_batch,
                                                   (mean, std), optimizer, scheduler, callbacks)
            loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], device)
            row = {"epoch": epoch + 1, "lr": lr,
                   "train_loss": loss_sum / seen, "train_top1": 100.0 * correct / seen}
            last = epoch + 1 == config.epochs
            if rank == 0 and ((epoch + 1) % config.eval_every == 0 or last):
                row["test_top1"] = evaluate(model, _on(test, device), desc="test")
            rows.append(row)
            if rank == 0 and out is not None:
                save_checkpoint(out / CHECKPOINT, model=model, optimizer=optimizer,
                                scheduler=scheduler, epoch=epoch + 1, settings=settings,
                                metrics=rows)
                log.add(row)
            distributed.barrier()
    finally:
        if log is not None:
            log.close()
    return TrainResult(model.eval(), rows, out / CHECKPOINT if out is not None else None)


def _on(batches, device):
    for x, y in batches:
        yield x.to(device), y.to(device)


def _train_epoch(net, model, teacher, data, config, method, epoch, steps, local_batch, norm,
                 optimizer, scheduler, callbacks):
    rank, size = distributed.world()
    device = config.device
    mean, std = norm
    order = torch.randperm(len(data.train),
                           generator=torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, 0)))
    shard = order[: steps * local_batch * size][rank::size]
    augment_rng = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, 1 + rank))
    net.train()
    loss_sum = correct = seen = 0.0
    bar = progress(range(steps), desc=f"epoch {epoch + 1}/{config.epochs}")
    for step in bar:
        idx = shard[step * local_batch:(step + 1) * local_batch]
        x = data.train.images[idx].float() / 255.0
        if config.augment:
            x = pad_crop_flip(x, augment_rng, reflect=config.reflect_pad)
        x, y = ((x.to(device) - mean) / std), data.train.labels[idx].to(device)
        if method is not None and hasattr(method, "before_step"):
            method.before_step(model, epoch, epoch * steps + step)
        logits = net(x)
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(x)
            loss = distillation_loss(logits, t_logits, y, config.kd_temperature, config.kd_alpha)
        else:
            loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise NumericalError(f"training diverged at epoch {epoch + 1}, step {step + 1} "
                                 f"(loss {loss.item()}); lower the learning rate. The last good "
                                 "checkpoint is kept.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        distributed.average_buffers(model)
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        for callback in callbacks:
            callback(epoch, step, loss.item())
    return loss_sum, correct, seen
