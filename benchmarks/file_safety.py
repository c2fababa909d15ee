"""The mutation campaign behind "Loading files safely": how every mutated lowbit file ends.

    python benchmarks/file_safety.py [--examples 400]

Builds real files of each format lowbit loads (PTQ packed, k-means packed, quantized.pt,
model.pt; ``tests/file_mutations.py``), then per format: truncation at and around every section
boundary, ``--examples`` random byte-flip sets (1 to 6 flips), ``--examples`` header-field
replacements by arbitrary values (checksum / CRC rewritten to match, as an attacker would), and
for quantized.pt ``--examples`` state tensors replaced by tensors of another shape or dtype.
Each mutated file is loaded through the API and classified: identical (loads, outputs
bit-equal to the original), refused (a LowbitError), or anything else (another exception, a
hang past 30 s, or a different model). Writes ``benchmarks/results/file_safety.json``; the
peak-RSS growth over the whole campaign bounds what any file made lowbit allocate.
"""
from __future__ import annotations

import argparse
import collections
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowbit.data.digits import load_digits  # noqa: E402
from lowbit.io import write_json  # noqa: E402
from lowbit.models import build_model  # noqa: E402
from lowbit.training import TrainConfig, train  # noqa: E402
from tests import file_mutations as fm  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "file_safety.json"


def campaign(examples: int) -> dict:
    data = load_digits()
    torch.manual_seed(0)
    fp = train(build_model("digits_cnn"), data, data.normalization(),
               TrainConfig(epochs=5, batch_size=64, optimizer="adam", lr=3e-3,
                           augment=False)).model
    work = Path(tempfile.mkdtemp(prefix="lowbit-safety-"))
    paths, x, outputs = fm.make_files(work, data, fp)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"formats": {}, "unexpected": []}
    for kind in fm.KINDS:
        raw = paths[kind].read_bytes()
        counts = collections.defaultdict(collections.Counter)

        def record(mutation: str, data_bytes: bytes):
            path = work / f"mutated{paths[kind].suffix}"
            path.write_bytes(data_bytes)
            outcome = fm.outcome(fm.loader(kind, x[:8]), path, outputs[kind], x)
            label = outcome if outcome in ("identical", "refused") else "other"
            counts[mutation][label] += 1
            if label == "other":
                result["unexpected"].append({"format": kind, "mutation": mutation,
                                             "outcome": outcome})

        for n in fm.cut_points(fm.sections(kind, raw), len(raw)):
            record("truncation", raw[:n])
        fuzz = settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                        suppress_health_check=list(HealthCheck))

        @fuzz
        @given(st.lists(st.tuples(st.integers(0, 2 ** 24), st.integers(1, 255)), min_size=1,
                        max_size=6))
        def byte_flips(changes):
            record("byte flips", fm.flips(raw, changes))

        header = fm.header_of(kind, paths[kind])

        @fuzz
        @given(st.data())
        def header_fields(draw):
            record("header field", fm.with_header(kind, paths[kind], fm.edit(header, draw.draw)))

        byte_flips()
        header_fields()
        if kind == "quantized":
            payload = torch.load(paths[kind], weights_only=True)
            state = payload["state_dict"]

            @fuzz
            @given(st.sampled_from(sorted(state)), st.lists(st.integers(0, 3), max_size=3),
                   st.sampled_from([torch.float32, torch.int64, torch.uint8, torch.float64]))
            def state_tensors(key, dims, dtype):
                value = torch.zeros(dims, dtype=dtype)
                if value.shape != state[key].shape or dtype != state[key].dtype:
                    record("state tensor", fm.torch_bytes(
                        {**payload, "state_dict": {**state, key: value}}))

            state_tensors()
        result["formats"][kind] = {"bytes": len(raw),
                                   **{m: dict(c) for m, c in counts.items()}}
    result["rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                - rss_before) / 1024
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    result = campaign(args.examples)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    result.update(command=f"python benchmarks/file_safety.py --examples {args.examples}",
                  commit=commit, machine=platform.processor() or platform.machine(),
                  seconds=round(time.time() - start, 1))
    write_json(OUT, result)
    total = collections.Counter()
    for kind, rows in result["formats"].items():
        for mutation, counts in rows.items():
            if mutation != "bytes":
                total.update(counts)
                print(f"{kind:14s} {mutation:13s} {dict(counts)}")
    print(f"total {sum(total.values())} files: {dict(total)}; peak RSS grew "
          f"{result['rss_growth_mib']:.0f} MiB; wrote {OUT}")


if __name__ == "__main__":
    main()
