"""The one training loop every training method uses (fine-tuning, STE QAT, LSQ, PSG, ...).

A *method* adapts the model and the loop without owning it: ``method.prepare(model, example)``
returns the model to train (quantizers in the wrapper slots, gradient hooks, ...),
``method.before_step(model, epoch, step)`` switches things on a schedule (activation
quantization after N steps, BN statistics frozen from an epoch) and ``method.after_step(model)``
acts after each update (clipping latent weights, re-centring codebooks); see
:class:`lowbit.methods.base.TrainingMethod`. ``None`` trains the float model.

Speed. ``TrainConfig.compile`` compiles the training step with ``torch.compile``: a probe
step (forward and backward, on a copy of the model and under a forked RNG, so the run itself is
untouched) compiles it first, and when compilation fails the run goes on in eager mode after a
one-line warning. The real model then reuses the probe's compiled graph. ``channels_last``
puts 4-D weights and inputs in NHWC order, which oneDNN's CPU convolutions prefer.

Reproducibility and resume. Everything random is drawn from generators seeded by
``(seed, epoch)``: the data order and the augmentation of epoch ``e`` do not depend on how the
run got there. The global torch RNG (for methods that sample, e.g. stochastic binarization) is
saved in the checkpoint written after every epoch. So a run killed anywhere and resumed from its
last checkpoint replays the interrupted epoch and ends bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.data.core import Batches, Dataset, Split, normalization_tensors
from lowbit.errors import CheckpointError, DataError, NumericalError
from lowbit.evaluate import evaluate
from lowbit.io import load_weights
from lowbit.methods.ptq import check_finite
from lowbit.progress import progress
from lowbit.training import distributed
from lowbit.training.augment import pad_crop_flip
from lowbit.training.config import TrainConfig
from lowbit.training.metrics import MetricLog
from lowbit.training.state import load_checkpoint, save_checkpoint

CHECKPOINT = "checkpoint.pt"
COMPILE_BACKEND = "inductor"  # tests use "aot_eager": the same graph capture, no C++ build


@dataclass
class TrainResult:
    model: nn.Module
    metrics: list[dict]
    checkpoint: Path | None


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 101 + stream) % (2 ** 63)


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           nesterov=config.nesterov, weight_decay=config.weight_decay)


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """One forward pass for the quantizers that initialise on the first tensor they see, with
    BatchNorm normalising by the batch's statistics as in the training steps that follow, and
    its running statistics left as they were.

    The float running statistics are wrong once a method rescales the weights: BinaryConnect's
    +-1 weights are ~20x the float ones per layer, the error compounds through eval-mode
    BatchNorm, the last layer's input range came out orders of magnitude too wide and every
    feature quantized to 0 (chance accuracy that training could not leave).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None
              else None) for m in norms]
    model.eval()
    for m in norms:
        m.train()
        m.momentum = 0.0  # running <- (1 - 0) running + 0 batch: unchanged
    try:
        model(x)
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
        model.eval()


@torch.no_grad()
def estimate_bn_statistics(model: nn.Module, batches) -> nn.Module:
    """Set every batch norm's running mean / variance to the cumulative statistics of the
    ``(input, target)`` batches (or bare inputs), in place; returns the model in eval mode.
    After a short schedule the running averages lag the weights (torchvision's MobileNetV3
    uses momentum 0.01: 9.5% top-1 after 4 CIFAR-10 epochs, 34.9% once re-estimated), and a
    randomly initialised network needs them to keep its activations' scale through its depth."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average
    model.train()
    for batch in batches:
        model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    return model.eval()


def _lr_factor(config: TrainConfig, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    # cosine: one decay per segment between restarts (the milestones, in epochs)
    bounds = [0] + [m * steps_per_epoch for m in sorted(config.milestones) if m < config.epochs]
    bounds.append(total)

    def factor(step: int) -> float:
        if config.schedule == "cosine":
            step = min(step, total)
            start = max(b for b in bounds[:-1] if b <= step)
            length = bounds[bounds.index(start) + 1] - start
            return 0.5 * (1.0 + math.cos(math.pi * (step - start) / length))
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
          method=None, out=None, resume: bool = False, callbacks=(),
          until_epoch: int | None = None) -> TrainResult:
    """Train ``model`` on ``data.train`` (augmented) and evaluate on ``data.test`` each epoch.

    ``out``: folder for ``checkpoint.pt`` (every epoch, atomic), ``metrics.csv`` / ``.json``
    and TensorBoard events; ``resume`` continues from its checkpoint. ``callbacks`` are called
    after every step as ``callback(epoch, step, loss)``. ``until_epoch`` stops after that many
    epochs of the ``config.epochs`` schedule (the schedule is unchanged: a later call with
    ``resume`` goes on bit-identical to an uninterrupted run), for evaluations along a long run.
    Under ``torchrun`` the batch is split over the processes (DistributedDataParallel).
    """
    config = (config or TrainConfig()).validate()
    check_finite(model)
    device = config.device
    distributed.init_from_env(device)
    rank, size = distributed.world()
    torch.manual_seed(config.seed)
    local_batch = max(config.batch_size // size, 1)
    steps_per_epoch = len(data.train) // (local_batch * size)
    if steps_per_epoch == 0:
        raise DataError(f"{len(data.train)} training images are fewer than one batch of "
                        f"{config.batch_size}")
    mean, std = normalization_tensors(normalization, data.train.images.shape[1])
    first = (data.train.images[:local_batch].float() / 255.0 - mean) / std
    teacher = copy.deepcopy(model).to(device).eval() if config.distill else None
    if method is not None:  # the caller's model stays as it was; float training updates it
        model = method.prepare(copy.deepcopy(model).eval(), first)
    model, mean, std, first = model.to(device), mean.to(device), std.to(device), first.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    settings = _settings(config, method)
    test = Batches(Split(data.test.images[rank::size], data.test.labels[rank::size]),
                   normalization, 500)

    out = Path(out) if out is not None else None
    ck = load_checkpoint(out / CHECKPOINT, model, settings) if resume else None
    if ck is not None:
        load_weights(model, ck["state_dict"], out / CHECKPOINT, exact_dtypes=True)
    else:
        # Quantizers that calibrate on the first tensor they see do so here, on the same
        # images in every process, before DDP copies rank 0's state to the others.
        calibrate(model, first)
    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config, steps_per_epoch))
    start_epoch, rows = 0, []
    if ck is not None:
        try:
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            torch.set_rng_state(ck["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise CheckpointError(f"cannot resume from {out / CHECKPOINT}: its optimizer, "
                                  f"scheduler or RNG state does not fit this run ({e})") from None
        start_epoch, rows = ck["epoch"], ck["metrics"]
    log = MetricLog(out, rows, tensorboard=True) if out is not None and rank == 0 else None
    net = distributed.wrap(model, device)
    if config.compile:
        net = _compiled(net, model, _memory_format(first, config))
    try:
        stop = config.epochs if until_epoch is None else min(until_epoch, config.epochs)
        for epoch in range(start_epoch, stop):
            lr = optimizer.param_groups[0]["lr"]
            loss_sum, correct, seen = _train_epoch(net, model, teacher, data, config, method,
                                                   epoch, steps_per_epoch, local_batch,
                                                   (mean, std), optimizer, scheduler, callbacks)
            loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], device)
            row = {"epoch": epoch + 1, "lr": lr,
                   "train_loss": loss_sum / seen, "train_top1": 100.0 * correct / seen}
            last = epoch + 1 == stop
            if (epoch + 1) % config.eval_every == 0 or last:
                row["test_top1"] = _evaluate(model, test, device)
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


def _memory_format(x: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    if config.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _compiled(net: nn.Module, model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``torch.compile(net)``, after a probe step on a copy of ``model`` has compiled the forward
    and backward graphs (the copy and a forked RNG leave the run untouched; the compiled graphs
    are cached for the real model); ``net`` itself, with one warning, when compilation fails."""
    probe = copy.deepcopy(model).train()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.compile(probe, backend=COMPILE_BACKEND)(example).float().sum().backward()
    except Exception as e:  # inductor raises many types (no compiler, unsupported op, ...)
        warnings.warn(f"torch.compile failed, training in eager mode: {type(e).__name__}: "
                      f"{' '.join(str(e).split())[:200]}", stacklevel=3)
        return net
    return torch.compile(net, backend=COMPILE_BACKEND)


def _evaluate(model, batches, device) -> float:
    """Top-1 over the test set, each process taking its share (all of it when alone)."""
    n = len(batches.split)
    top1 = evaluate(model, ((x.to(device), y.to(device)) for x, y in batches), desc="test")
    correct, seen = distributed.all_reduce_sum([top1 * n / 100.0, n], device)
    return 100.0 * round(correct) / seen


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
        x = _memory_format(x, config)
        if method is not None:
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
        if method is not None:
            method.after_step(model)
        scheduler.step()
        distributed.average_buffers(model)
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        for callback in callbacks:
            callback(epoch, step, loss.item())
    return loss_sum, correct, seen
