"""Per-epoch metrics, written three ways: TensorBoard event files (the ``tensorboard`` package's
writer, through ``torch.utils.tensorboard``), ``metrics.csv`` and ``metrics.json``.

The CSV and JSON files are rewritten whole and atomically after every epoch from the rows kept
in the checkpoint, so a resumed run continues them without duplicated or half-written epochs.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from lowbit.io import write_json, write_text


class MetricLog:
    def __init__(self, out: Path, rows: list[dict] | None = None, tensorboard: bool = True):
        self.out, self.rows = Path(out), list(rows or [])
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # after a resume, events of epochs past the checkpoint are dropped
            purge = self.rows[-1]["epoch"] + 1 if self.rows else None
            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=purge)

    def add(self, row: dict) -> None:
        """Record one epoch (``row["epoch"]`` is its step in TensorBoard) and rewrite the files."""
        self.rows.append(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        buffer = io.StringIO()
        table = csv.DictWriter(buffer, keys)
        table.writeheader()
        table.writerows(self.rows)
        write_text(self.out / "metrics.csv", buffer.getvalue())
        write_json(self.out / "metrics.json", self.rows)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
