"""The server's top pass and the evaluation, with and without the padding they used to compute.

On the default job's model and data (``guarded``: MiniLM cut after block 4, a 4-dim release,
the embedded sentiment corpus), alternately, in one process:

- the top pass over ``--clients`` clients' batches of ``--batch`` rows each:
  ``top_step(trim_padding=False)`` (every row padded to the longest row of any client, the
  code as it was) against the default (rows by length, groups cut to their longest);
- the held-out evaluation: ``evaluate(sort_by_length=False)`` (batches in the split's
  order) against the default (batches by length), both under ``torch.inference_mode``.

Prints the medians and the ratios, and the token positions each top pass computes.

``--main-job OUT`` instead runs the default main job (or it with ``--set``s) in process
(:func:`guardedtuning.inprocess.run_in_process`), the top trimmed (the default) and padded
(``top_step(trim_padding=False)``), alternately, ``--repeats`` times, with the same token and
DP noise (``privacy.noise-seed``, ``--noise-seed``) in both, and prints each run's rounds,
server compute and utility, then the medians and the ratio.

    python simulations/bench_no_waste.py [--repeats 5] [--clients 5] [--batch 16] [--threads 1] [--eval-repeats 0]
    python simulations/bench_no_waste.py --main-job /work/runs/s24_perf/main --repeats 1
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from guardedtuning.data.batches import collate, tokenize  # noqa: E402
from guardedtuning.data.sources import load_task  # noqa: E402
from guardedtuning.evaluation import evaluate  # noqa: E402
from guardedtuning.models.loading import load_tokenizer  # noqa: E402
from guardedtuning.models.parts import split_model  # noqa: E402
from guardedtuning.recipes import DEFAULT, config_for  # noqa: E402
from guardedtuning.training import ClientActs, forward_activations, length_groups, top_step, used_lengths  # noqa: E402


def main_job(out: Path, repeats: int, sets: dict, noise_seed: int) -> int:
    """The default main job in process, top trimmed and padded alternately; rounds, server compute, utility."""
    from guardedtuning import training
    from guardedtuning.inprocess import run_in_process
    from guardedtuning.server_app import split_driver

    trimmed_step = split_driver.top_step
    legs = {"trimmed": trimmed_step, "padded": functools.partial(training.top_step, trim_padding=False)}
    figures: dict[str, list[tuple[float, float, float]]] = {k: [] for k in legs}
    for rep in range(repeats):
        for name in (("trimmed", "padded") if rep % 2 == 0 else ("padded", "trimmed")):
            cfg = config_for(DEFAULT, {**sets, "privacy.noise-seed": noise_seed, "output.dir": str(out / f"{name}{rep}")})
            split_driver.top_step = legs[name]
            try:
                record = run_in_process(cfg)
            finally:
                split_driver.top_step = trimmed_step
            cost = record["cost"]
            figures[name].append((float(cost["wall_s"]), float(cost["server_s"]), float(record["utility"]["value"])))
            rounds = ", ".join(f"{h['utility']:.4f}" for h in record["history"])
            clients = cost["client_s_per_step"] * cfg.train.local_steps * cfg.federation.clients_per_round * len(
                record["history"])  # every client's training compute (in process: one after another)
            print(f"repeat {rep} {name}: rounds {cost['wall_s']:.1f} s, server compute {cost['server_s']:.1f} s "
                  f"(top and evaluation), client compute {clients:.1f} s, utility {record['utility']['value']:.4f} "
                  f"(by round {rounds})", flush=True)
    med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in figures.items()}
    print(f"main job in process, {repeats} repeat(s), sets {sets or 'none'}, noise seed {noise_seed}")
    for k, (w, srv, u) in med.items():
        print(f"{k:8s} median rounds {w:.1f} s, server compute {srv:.1f} s, utility {u:.4f}")
    print(f"ratio trimmed/padded: rounds {med['trimmed'][0] / med['padded'][0]:.3f}, "
          f"server compute {med['trimmed'][1] / med['padded'][1]:.3f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-repeats", type=int, default=2, help="0 skips the evaluation")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    ap.add_argument("--main-job", type=Path, default=None, metavar="OUT",
                    help="run the default main job in process, top trimmed vs padded, into OUT/<leg><repeat>")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="with --main-job")
    ap.add_argument("--noise-seed", type=int, default=7, help="with --main-job: privacy.noise-seed of both legs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.main_job is not None:
        from guardedtuning.config import parse_set

        return main_job(args.main_job, args.repeats, parse_set(args.sets), args.noise_seed)
    cfg = config_for(DEFAULT, {})
    cpu = torch.device("cpu")
    task = load_task(cfg.data, cfg.seed)
    tok = load_tokenizer(cfg.model.name)
    model = split_model(cfg.model, cfg.split, cfg.lora, task.num_labels, "cpu", cfg.seed, lora_top=cfg.lora.top)
    rows = task.train.shuffle(seed=1).select(range(args.clients * args.batch))
    examples = tokenize(tok, model.kind, list(rows["text"]), list(rows["label"]), max_length=cfg.model.max_length,
                        label_names=task.label_names, instruction=task.instruction)
    acts = []
    for c in range(args.clients):
        b = collate(examples[c * args.batch:(c + 1) * args.batch], tok.pad_token_id)
        acts.append(ClientActs(forward_activations(model.bottom, b, cpu), b.attention_mask, b.labels))
    mask = torch.cat([torch.nn.functional.pad(a.attention_mask, (0, max(x.h.shape[1] for x in acts)
                                                                  - a.attention_mask.shape[1])) for a in acts])
    lengths = used_lengths(mask, torch.zeros(mask.shape[0]))
    padded_pos = mask.numel()
    trimmed_pos = sum(len(idx) * w for idx, w in length_groups(lengths))
    times: dict[str, list[float]] = {"padded": [], "trimmed": []}
    for rep in range(args.repeats):
        for name in (("padded", "trimmed") if rep % 2 == 0 else ("trimmed", "padded")):
            t0 = time.perf_counter()
            top_step(model.top, None, acts, cpu, trim_padding=name == "trimmed")
            times[name].append(time.perf_counter() - t0)
    ev: dict[str, list[float]] = {"in order": [], "by length": []}
    utility: dict[str, float] = {}
    for rep in range(args.eval_repeats):
        for name in (("in order", "by length") if rep % 2 == 0 else ("by length", "in order")):
            t0 = time.perf_counter()
            out = evaluate(model, tok, task, max_length=cfg.model.max_length, batch_size=cfg.eval.batch_size,
                           max_new_tokens=cfg.eval.max_new_tokens, device=cpu, sort_by_length=name == "by length")
            ev[name].append(time.perf_counter() - t0)
            utility[name] = out["utility"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch threads {torch.get_num_threads()}")
    print(f"top pass, {args.clients} clients x {args.batch} rows ({args.repeats} repeats, alternating): "
          f"padded {med['padded'] * 1000:.0f} ms ({padded_pos} token positions), "
          f"trimmed {med['trimmed'] * 1000:.0f} ms ({trimmed_pos}; {int(mask.sum())} real); "
          f"ratio {med['trimmed'] / med['padded']:.3f}")
    if not args.eval_repeats:
        return 0
    emed = {k: statistics.median(v) for k, v in ev.items()}
    print(f"evaluation, {len(task.test)} rows ({args.eval_repeats} repeats): in order {emed['in order']:.2f} s, "
          f"by length {emed['by length']:.2f} s; ratio {emed['by length'] / emed['in order']:.3f}; "
          f"utility {utility['in order']:.4f} / {utility['by length']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
