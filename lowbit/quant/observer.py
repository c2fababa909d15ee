"""Streaming statistics of a layer input: what every range estimator needs, gathered batch by
batch so that the range does not depend on how the calibration set is split into batches.

A :class:`RangeObserver` sees the calibration images in order (image ``i`` of ``N``) and keeps

* the **exact extremes**, a running min / max (per channel or per tensor): min-max ranges are
  exactly those of one pass over the whole set;
* a **fixed-size sample**, the same positions for every channel: image ``i`` contributes
  ``m = ceil(max_total / (C N))`` positions drawn (with replacement) by a generator seeded with
  ``(seed, i)``, so which values enter the sample depends on the image index only, never on the
  batch the image came in. Where all ``N * P`` positions fit in the sample (``P`` positions per
  image and channel), it holds every value in image order. Percentile, MSE and ACIQ ranges and
  the bit allocation read this sample: one batch and many batches give identical ranges;
* **EMA state** over fixed chunks of :data:`EMA_CHUNK` images (``r <- 0.01 r_chunk + 0.99 r``,
  the first chunk initialising it), chunks counted across batch boundaries, so it equals the
  EMA over the whole set split into chunks of 64.

Memory is bounded by the sample size (``max_total`` values, 2^17 by default), whatever ``N``.
"""
from __future__ import annotations

import math

import torch

from lowbit.quant.ranges import ema_update

EMA_CHUNK = 64  # images per EMA step when clip == "ema"
EMA_MOMENTUM = 0.01


def image_positions(first: int, n: int, positions: int, per_image: int, seed: int) -> torch.Tensor:
    """``[n, per_image]`` positions (of ``positions``) for images ``first .. first + n - 1``,
    drawn with replacement by a generator seeded with ``(seed, image index)``: an image gets the
    same positions whatever batch it arrives in."""
    return torch.stack([torch.randint(positions, (per_image,), generator=torch.Generator()
                                      .manual_seed(seed * 1_000_003 + i))
                        for i in range(first, first + n)])


class RangeObserver:
    """Running extremes, a batch-independent sample and EMA state of one input (module
    docstring); per channel along axis 1 when ``per_channel``. Batches may live on any device;
    the state is kept on the CPU (it is small), where the ranges are then fitted."""

    def __init__(self, total_images: int, per_channel: bool, max_total: int = 1 << 17,
                 seed: int = 0):
        self.total_images, self.per_channel = total_images, per_channel
        self.max_total, self.seed = max_total, seed
        self.seen = 0
        self.lo = self.hi = None
        self._values, self._positions = [], []
        self.ema = None
        self._chunk = (None, None, 0)  # running (lo, hi, images) of the open EMA chunk

    def update(self, x: torch.Tensor) -> None:
        """Add the next ``len(x)`` images (their input to this layer)."""
        x = x.detach().float()
        rows = x.movedim(1, 0).reshape(x.shape[1], len(x), -1) if self.per_channel \
            else x.reshape(1, len(x), -1)  # [C, n, P]
        lo, hi = rows.amin((1, 2)).cpu(), rows.amax((1, 2)).cpu()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self._sample(rows)
        self._ema(rows)
        self.seen += len(x)

    def _sample(self, rows: torch.Tensor) -> None:
        channels, n, positions = rows.shape
        per_image = math.ceil(self.max_total / (channels * self.total_images))
        images = torch.arange(self.seen, self.seen + n)
        if per_image >= positions:  # every value fits: keep them all, in image order
            self._values.append(rows.reshape(channels, -1).cpu())
            self._positions.append((images[:, None] * positions
                                    + torch.arange(positions)).flatten())
            return
        picks = image_positions(self.seen, n, positions, per_image, self.seed)  # [n, m]
        index = (torch.arange(n)[:, None].to(rows.device), picks.to(rows.device))
        self._values.append(rows[:, index[0], index[1]].reshape(channels, -1).cpu())
        self._positions.append((images[:, None] * positions + picks).flatten())

    def _ema(self, rows: torch.Tensor) -> None:
        start = 0
        while start < rows.shape[1]:
            lo, hi, count = self._chunk
            take = min(EMA_CHUNK - count, rows.shape[1] - start)
            part = rows[:, start:start + take]
            c_lo, c_hi = part.amin((1, 2)).cpu(), part.amax((1, 2)).cpu()
            lo = c_lo if lo is None else torch.minimum(lo, c_lo)
            hi = c_hi if hi is None else torch.maximum(hi, c_hi)
            self._chunk = (lo, hi, count + take)
            if count + take == EMA_CHUNK:
                self._close_chunk()
            start += take

    def _close_chunk(self) -> None:
        lo, hi, count = self._chunk
        if count:
            old = (None, None) if self.ema is None else self.ema
            self.ema = (ema_update(old[0], lo, EMA_MOMENTUM), ema_update(old[1], hi, EMA_MOMENTUM))
        self._chunk = (None, None, 0)

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.per_channel else t[0]

    @property
    def exact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) over every image seen (per channel, or scalars)."""
        return self._out(self.lo), self._out(self.hi)

    @property
    def signed(self) -> bool:
        return bool(self.lo.min() < 0)

    @property
    def sample(self) -> torch.Tensor:
        """The [C, K] sample (one row if per tensor), ordered by image and position."""
        values = torch.cat(self._values, 1)
        order = torch.cat(self._positions).argsort(stable=True)
        return values[:, order]

    @property
    def ema_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The EMA range over 64-image chunks (the last, partial chunk included)."""
        self._close_chunk()
        return self._out(self.ema[0]), self._out(self.ema[1])
