"""Per-client-step cost of the client-side privacy knobs on MiniLM, side by side.

One client split step = forward of step s (cut activations, no autograd) + recompute of
the bottom on step s - 1 + backward from the server's activation gradient + AdamW
step. The variants below run interleaved in one process (round-robin, so machine load
drifts hit them alike), on the minilm-l6 bottom with ``split.layer=2``, LoRA r=8,
batch 16, sequence length 64; the medians over the repeated steps are printed with
their ratios to the unprotected step. The server's gradient is a fixed random tensor:
server time is not a client cost. Torch runs with ``--threads`` (default 1) threads.

- ``plain``: ``forward_activations`` + ``backward_from_server``;
- ``privtune``: the same plus ``PrivTuneMechanism.perturb`` on the released activations;
- ``dpsgd``: ``forward_activations`` + ``DPStep.step`` (Opacus per-sample gradients,
  clipping, noise, accountant);
- ``privtune+dpsgd``: both.

PrivTune's one-off preprocessing (importance from the client's data, vocabulary k-NN
graph, hop centroids, PGD of the mean table over 30,522 tokens) is timed separately,
cold (empty cache folder) and warm (from the disk cache, in a fresh process cache).

    python simulations/bench_privacy_overhead.py [--steps 15]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from guardedtuning.config import DataConfig, LoraConfig
from guardedtuning.config.privacy import DPConfig, PrivacyConfig
from guardedtuning.data.batches import Batch, encode
from guardedtuning.data.partition import load_partition
from guardedtuning.data.sources import load_task
from guardedtuning.models.loading import load_backbone
from guardedtuning.models.lora import add_lora
from guardedtuning.models.split import Bottom
from guardedtuning.privacy import knn
from guardedtuning.privacy.dpsgd import DPAccountant, DPPlan, DPStep
from guardedtuning.privacy.privtune import activation_scale, privtune_from_config
from guardedtuning.privacy.randomness import STREAM_DP_NOISE, STREAM_TOKEN_NOISE, make_generator
from guardedtuning.training import backward_from_server, forward_activations, make_optimizer

BATCH, SEQ, LAYER = 16, 64, 2


def client_bottom() -> Bottom:
    bb = load_backbone("minilm-l6")
    bottom = Bottom(bb, LAYER)
    add_lora(bottom, LoraConfig(), bb.kind)
    bottom.eval()
    return bottom


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is what a simulated client gets with sim.num-cpus=1 (Ray sets "
                         "OMP_NUM_THREADS to its CPUs), and is robust to other load on the machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # a client's data: partition 0 of 10 of the embedded sentiment corpus
    data_cfg = DataConfig()
    task = load_task(data_cfg, 0)
    rows = load_partition(data_cfg, 0, 10, 0)
    tok = load_backbone("minilm-l6").tokenizer
    full = encode(tok, "encoder", list(rows["text"]), list(rows["label"]), max_length=SEQ,
                  label_names=task.label_names, instruction=task.instruction)
    enc = tok(list(rows["text"])[:BATCH], truncation=True, max_length=SEQ, padding="max_length", return_tensors="pt")
    labels = torch.tensor(list(rows["label"])[:BATCH])
    batch = Batch(enc["input_ids"], enc["attention_mask"], labels, labels)  # exactly (16, 64)
    print(f"client data: {len(rows)} rows; step batch {tuple(batch.input_ids.shape)}; torch threads "
          f"{torch.get_num_threads()}")

    # --- PrivTune one-off preprocessing -------------------------------------------------
    plain_bottom, dp_bottom = client_bottom(), client_bottom()
    emb = plain_bottom.word_embeddings().detach()
    pcfg = PrivacyConfig(mechanism="privtune", eta=100.0, rho=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(pcfg, cache_dir=tmp)
        t0 = time.perf_counter()
        scale = activation_scale(plain_bottom, emb)
        t_scale = time.perf_counter() - t0
        kw = dict(embeddings=emb, input_ids=full.input_ids, attention_mask=full.attention_mask,
                  labels=full.class_ids, num_classes=task.num_labels, scale=scale,
                  ignore_ids=tuple(tok.all_special_ids))
        t0 = time.perf_counter()
        mech, tables = privtune_from_config(cfg, **kw)
        cold = time.perf_counter() - t0
        knn._MEMORY.clear()  # a fresh process: only the disk cache is warm
        t0 = time.perf_counter()
        _, warm_tables = privtune_from_config(cfg, **kw)
        warm = time.perf_counter() - t0
    print(f"\nPrivTune preprocessing (vocabulary {emb.shape[0]} x {emb.shape[1]}, k={cfg.knn_k}, "
          f"hops={cfg.hops}, PGD steps={cfg.pgd_steps}), one-off:")
    print(f"  activation scale probe  {t_scale:8.2f} s   (scale {scale:.2f})")
    for part, sec in tables.seconds.items():
        print(f"  {part:<22}  {sec:8.2f} s")
    print(f"  total, cold cache       {cold:8.2f} s")
    print(f"  total, warm disk cache  {warm:8.2f} s   (knn {warm_tables.seconds['knn']:.2f} s)")
    shift_norms = tables.mean_shift.norm(dim=-1)
    print(f"  mean shift norms: max {float(shift_norms.max()):.4f} (rho {cfg.rho}); eta range "
          f"[{float(tables.token_eta.min()):.1f}, {float(tables.token_eta.max()):.1f}]")

    # --- DP plan ------------------------------------------------------------------------
    dcfg = DPConfig(enabled=True, target_epsilon=8.0, delta=1e-5)
    t0 = time.perf_counter()
    plan = DPPlan.from_config(dcfg, num_examples=len(rows), batch_size=BATCH, rounds=3, local_steps=20)
    t_plan = time.perf_counter() - t0
    print(f"\nDP plan: noise multiplier {plan.noise_multiplier:.3f} at q={plan.sample_rate:.3f} for "
          f"{plan.planned_steps} steps (computed in {t_plan:.2f} s)")
    dp = DPStep(dp_bottom, plan)
    acc = DPAccountant(kind=dcfg.accountant)

    # --- per-step timing ----------------------------------------------------------------
    dev = torch.device("cpu")
    grad_h = 1e-3 * torch.randn(BATCH, SEQ, emb.shape[1])
    opt_plain = make_optimizer(plain_bottom, lr=1e-3)
    opt_dp = make_optimizer(dp_bottom, lr=1e-3)
    step_no = [0]

    def gen(stream: int) -> torch.Generator:
        step_no[0] += 1
        return make_generator(1234, stream, 0, step_no[0])

    perturb_times: list[float] = []

    def release(bottom: Bottom, noisy: bool) -> None:
        h = forward_activations(bottom, batch, dev)
        if noisy:
            t0 = time.perf_counter()
            mech.perturb(h, batch.attention_mask, generator=gen(STREAM_TOKEN_NOISE), input_ids=batch.input_ids)
            perturb_times.append(time.perf_counter() - t0)

    def dp_backward() -> None:
        if acc.steps >= plan.planned_steps - 1:  # the benchmark outlasts the plan: start a fresh ledger
            acc.load_state_dict(DPAccountant(kind=dcfg.accountant).state_dict())
        dp.step(opt_dp, batch, grad_h, generator=gen(STREAM_DP_NOISE), accountant=acc, device=dev)

    variants: dict[str, Callable[[], None]] = {
        "plain": lambda: (release(plain_bottom, False),
                          backward_from_server(plain_bottom, opt_plain, batch, grad_h, dev)),
        "privtune": lambda: (release(plain_bottom, True),
                             backward_from_server(plain_bottom, opt_plain, batch, grad_h, dev)),
        "dpsgd": lambda: (release(dp_bottom, False), dp_backward()),
        "privtune+dpsgd": lambda: (release(dp_bottom, True), dp_backward()),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for rep in range(args.steps + 2):
        order = names[rep % len(names):] + names[: rep % len(names)]  # rotate who goes first
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            if rep >= 2:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    print(f"\nPer client step, median of {args.steps} (minilm-l6 bottom, split.layer={LAYER}, LoRA r=8, "
          f"batch {BATCH}, seq {SEQ}):")
    print(f"  {'variant':<16} {'median ms':>10} {'ratio':>7}   {'quartiles ms':>15}")
    for name in names:
        med = statistics.median(times[name])
        q1, _, q3 = statistics.quantiles(times[name], n=4)
        print(f"  {name:<16} {1000 * med:10.1f} {med / base:7.2f}x   {1000 * q1:7.1f}-{1000 * q3:<7.1f}")
    print(f"  PrivTune perturb alone: {1000 * statistics.median(perturb_times):.2f} ms per step "
          f"(median of {len(perturb_times)})")
    dp.close()


if __name__ == "__main__":
    main()
