"""Peak RSS and weight bytes of a client bottom (LoRA r=8, release 4) and one forward + backward, by ``model.dtype``.

A benchmark script: ``python simulations/dtype_memory.py NAME DTYPE LAYER`` (one process per figure, since
``ru_maxrss`` is the process's peak), e.g. ``python simulations/dtype_memory.py smollm2-135m bfloat16 10``.
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from guardedtuning.config import LoraConfig, ModelConfig, SplitConfig
from guardedtuning.data.batches import encode
from guardedtuning.models.loading import kind_of, load_tokenizer
from guardedtuning.models.parts import client_bottom


def main(name: str, dtype: str, layer: int) -> None:
    torch.set_num_threads(1)
    bottom = client_bottom(ModelConfig(name=name, dtype=dtype), SplitConfig(layer=layer, release_dim=4),
                           LoraConfig(), "cpu", 0)
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    weights = sum(p.numel() * p.element_size() for p in bottom.parameters())
    kind = kind_of(name)
    b = encode(load_tokenizer(name), kind, ["a fine day for a walk in the park, truly lovely"] * 16, [1] * 16,
               max_length=64, label_names=("negative", "positive"),
               instruction="" if kind == "encoder" else "Classify.")
    start = time.perf_counter()
    h = bottom(b.input_ids, b.attention_mask)
    h.backward(torch.ones_like(h))
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{name} layer={layer} {dtype}: weights {weights / 2**20:.1f} MiB, peak RSS after build {built / 1024:.0f} "
          f"MiB, after forward+backward {peak / 1024:.0f} MiB ({wall:.2f} s), release {h.dtype}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
