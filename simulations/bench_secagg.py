"""Benchmark of secure sparse aggregation: crypto cost by participants, and bytes on the wire.

Three tables, all for the MiniLM bottom-LoRA update (2 blocks, query+value, r = 8:
24,576 parameters in 8 tensors) at density 5 % and 8 bits:

1. crypto cost for n participants (no Ray, no messages: the two state machines called in
   process): per-client time of each stage (median over clients) and server time of
   each stage (median over repeats), with a fraction of clients dropping after sharing
   keys, so the server also rebuilds their pair masks;
2. the masked upload: our packing against Flower's SecAgg+ payload (int64 arrays as
   ``ndarray_to_bytes``, one per tensor plus the weight factor, dense: Flower has no
   sparsification), all measured as serialized Flower messages (``message_nbytes``);
3. bytes per client per round, through the real strategy wrapper and client mod on the
   in-process LocalGrid, against plain FedAvg of dense fp32 updates.

Run: ``PYTHONPATH=. python simulations/bench_secagg.py`` (about a minute on 2 CPU cores;
``--sizes 10,100`` for less).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guardedtuning import codecs as C  # noqa: E402
from guardedtuning.compat import TaskIdentity, ndarray_to_bytes  # noqa: E402
from guardedtuning.strategies.secagg import ClientSecAgg, RoundParams, ServerSecAgg  # noqa: E402
from guardedtuning.strategies.secagg.graph import round_shape  # noqa: E402
from guardedtuning.strategies.secagg.masking import clamp_weight, fold_weight, pack_masked  # noqa: E402
from guardedtuning.strategies.secagg.mod import SecAggMod  # noqa: E402
from guardedtuning.strategies.secagg.prg import expand  # noqa: E402
from guardedtuning.strategies.secagg.wire import COLLECT_MASKED, MaskedReply, to_content  # noqa: E402
from guardedtuning.strategies.secure import SecureSparseFedAvg  # noqa: E402
from guardedtuning.wire.exchange import exchange  # noqa: E402
from guardedtuning.wire.records import message_nbytes  # noqa: E402
from tests.local_grid import LocalGrid  # noqa: E402


def lora_shapes(layers: int) -> dict[str, tuple[int, int]]:
    """MiniLM (hidden 384) LoRA r = 8 on query and value of ``layers`` blocks."""
    return {f"block.{layer}.{mod}.lora_{ab}": ((8, 384) if ab == "A" else (384, 8))
            for layer in range(layers) for mod in ("query", "value") for ab in ("A", "B")}


SHAPES = lora_shapes(2)  # the split recipe's bottom LoRA (split.layer = 2)
SIZE = sum(int(np.prod(s)) for s in SHAPES.values())
DENSITY, BITS, CLIP = 0.05, 8, 0.05


def fake_update(node: int, shapes: dict[str, tuple[int, int]] = SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in shapes.items()}


def round_params(n: int, *, max_weight: int, packing: str) -> RoundParams:
    seed = bytes(range(32))
    d, t, q = round_shape(n)  # the automatic degree, threshold and quorum (docs/threat-model.md)
    return RoundParams(server_round=1, nodes=tuple(range(1, n + 1)), degree=d, threshold=t, quorum=q,
                       size=SIZE, density=DENSITY, support_mode="rand",
                       support=C.rand_k_support(size=SIZE, density=DENSITY, seed=seed), bits=BITS, clip=CLIP,
                       norm_clip=0.0, max_weight=max_weight, packing=packing, seed=seed)


# ---------------------------------------------------------------------------- 1. crypto cost

def crypto_round(n: int, *, dropout: float, max_weight: int) -> dict[str, float]:
    """One round in process; returns per-client medians and server stage times (seconds)."""
    p = round_params(n, max_weight=max_weight, packing="word")
    rng = np.random.default_rng(n)
    client_s: dict[int, float] = {}
    codec_s: list[float] = []
    clients, adverts = {}, {}
    for v in p.nodes:
        t0 = time.perf_counter()
        comp = C.compress_update(update=rng.normal(0, 0.01, SIZE), residual=None, support=p.support, bits=BITS,
                                 clip=CLIP, rng=rng)
        x = fold_weight(comp.q, weight=clamp_weight(320, max_weight=max_weight), max_weight=max_weight)
        t1 = time.perf_counter()
        clients[v], adverts[v] = ClientSecAgg.start(params=p, node=v, x=x)
        codec_s.append(t1 - t0)
        client_s[v] = time.perf_counter() - t1
    gone = set(rng.choice(p.nodes, size=int(dropout * n), replace=False).tolist())
    srv = ServerSecAgg(p)
    server: dict[str, float] = {}

    def timed_server(name, fn, arg):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = fn(arg)
        server[name] = time.perf_counter() - t0
        return out

    def timed_clients(reqs, method, skip=frozenset()):  # type: ignore[no-untyped-def]
        out = {}
        for v, req in reqs.items():
            if v in skip:
                continue
            t0 = time.perf_counter()
            out[v] = getattr(clients[v], method)(req)
            client_s[v] += time.perf_counter() - t0
        return out

    reqs = timed_server("advertise", srv.receive_advertise, adverts)
    reqs = timed_server("share-keys", srv.receive_shares, timed_clients(reqs, "share_keys"))
    reqs = timed_server("collect-masked", srv.receive_masked, timed_clients(reqs, "masked_input", gone))
    reqs = timed_server("consistency", srv.receive_consistency, timed_clients(reqs, "consistency"))
    result = timed_server("unmask", srv.receive_unmask, timed_clients(reqs, "unmask"))
    assert len(result.survivors) == n - len(gone)
    return {"client": statistics.median(client_s[v] for v in p.nodes if v not in gone),
            "codec": statistics.median(codec_s), **server, "degree": p.degree, "threshold": p.threshold,
            "m": p.field_bits, "dropped": len(gone)}


def table_crypto(sizes: list[int], *, repeats: int, dropout: float, max_weight: int) -> None:
    print(f"\n1. Crypto cost per round (in process, no Ray): {SIZE:,} params, density {DENSITY:.0%}, {BITS} bits, "
          f"max weight {max_weight}, {dropout:.0%} of clients drop after sharing keys; medians")
    print(f"{'n':>6} {'deg':>4} {'t':>3} {'m':>3} {'drop':>5} | {'client crypto':>13} {'client codec':>12} | "
          f"{'srv keys':>9} {'srv shares':>10} {'srv masked':>10} {'srv UNMASK':>10} {'srv total':>9}")
    for n in sizes:
        runs = [crypto_round(n, dropout=dropout, max_weight=max_weight) for _ in range(repeats if n < 1000 else 1)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        total = sum(med[k] for k in ("advertise", "share-keys", "collect-masked", "consistency", "unmask"))
        print(f"{n:>6} {int(med['degree']):>4} {int(med['threshold']):>3} {int(med['m']):>3} {int(med['dropped']):>5} | "
              f"{med['client'] * 1e3:>10.2f} ms {med['codec'] * 1e3:>9.2f} ms | "
              f"{med['advertise'] * 1e3:>6.1f} ms {med['share-keys'] * 1e3:>7.1f} ms "
              f"{med['collect-masked'] * 1e3:>7.1f} ms {med['unmask'] * 1e3:>7.1f} ms {total:>7.2f} s")


# ---------------------------------------------------------------------------- 2. masked upload size

def _msg(content: RecordDict) -> int:
    return message_nbytes(Message(content, dst_node_id=1, message_type="train"))


def flower_secaggplus_upload(n_values: list[int]) -> int:
    """Flower SecAgg+'s masked upload: int64 arrays as ndarray_to_bytes in a ConfigRecord, weight factor first."""
    arrays = [np.array([1], dtype=np.int64)] + [np.random.default_rng(0).integers(0, 2**32, k, dtype=np.int64)
                                                for k in n_values]
    return _msg(RecordDict({"secaggplus": ConfigRecord({"masked_parameters": [ndarray_to_bytes(a) for a in arrays]})}))


def our_upload(n: int, *, max_weight: int, packing: str) -> tuple[int, int, str]:
    """Our collect-masked reply: a masked vector is uniform in the field, so a PRG output stands in for it."""
    p = round_params(n, max_weight=max_weight, packing=packing)
    y = expand(bytes(32), length=p.length, bits=p.field_bits)
    reply = MaskedReply(y=pack_masked(y, bits=p.field_bits, packing=packing), undecryptable=[])
    return _msg(to_content(reply, stage=COLLECT_MASKED, server_round=1)), reply.y.nbytes, str(reply.y.dtype)


def table_upload(sizes: list[int], *, max_weight: int) -> None:
    k = C.support_size(size=SIZE, density=DENSITY)
    dense_fp32 = _msg(RecordDict({"update": ArrayRecord({n: Array(v) for n, v in fake_update(7).items()})}))
    flower_dense = flower_secaggplus_upload([int(np.prod(s)) for s in SHAPES.values()])
    flower_sparse = flower_secaggplus_upload([k + 1])
    print(f"\n2. Masked upload of one client (serialized Flower message bytes): {SIZE:,} params, k = {k} sent, "
          f"{BITS} bits")
    print(f"   dense fp32 update (AdapterFedAvg reply record):          {dense_fp32:>8,} B")
    print(f"   Flower SecAgg+ (dense, int64, masks from 32-bit seeds):  {flower_dense:>8,} B")
    print(f"   Flower-style int64 of our sparse vector ({k + 1} values):   {flower_sparse:>8,} B")
    for mw in sorted({1, max_weight}):
        for n in sizes:
            for packing in ("word", "bits"):
                total, payload, dtype = our_upload(n, max_weight=mw, packing=packing)
                m = round_params(n, max_weight=mw, packing=packing).field_bits
                print(f"   ours n={n:<5} max weight {mw:<5} m={m:<2} {packing:<4} ({dtype:<6} payload {payload:>6,} B): "
                      f"{total:>7,} B  = {total / flower_dense:6.2%} of Flower SecAgg+, "
                      f"{total / flower_sparse:6.1%} of int64 sparse")


# ---------------------------------------------------------------------------- 3. bytes per client per round

def _fake_app(shapes: dict[str, tuple[int, int]]) -> ClientApp:
    app = ClientApp(mods=[SecAggMod(rounding_seed=lambda _node, _round: 0)])

    @app.train()
    def train(msg: Message, context) -> Message:  # type: ignore[no-untyped-def]
        """The dense fp32 update; in a secure round the mod seals it on the way out."""
        metrics = MetricRecord({"num-examples": 320.0, "compute_s": 0.0, "peak_mem_mb": 0.0})
        return Message(RecordDict({"update": ArrayRecord({k: Array(v) for k, v in fake_update(
            context.node_id, shapes).items()}), "metrics": metrics}), reply_to=msg)

    return app


def _stage_of(msg: Message) -> str:
    return msg.content["secagg-stage"]["stage"] if "secagg-stage" in msg.content else "?"


def table_round_bytes(sizes: list[int], *, max_weight: int, layers: int = 2) -> None:
    shapes = lora_shapes(layers)
    glob = ArrayRecord({k: Array(v) for k, v in fake_update(10**6, shapes).items()})  # random: no deduplication
    dense = 4 * sum(int(np.prod(s)) for s in shapes.values())
    print(f"\n3. Bytes per client per round through LocalGrid (all stages, serialized): LoRA on {layers} blocks, "
          f"{dense // 4:,} params, density {DENSITY:.0%}, {BITS} bits; vs dense fp32 ({dense:,} B of parameters) "
          f"and vs the FedAvg messages (same metrics/config records)")
    print(f"{'n':>5} {'max w':>5} {'packing':>7} {'downlink':>8} | {'up/client':>9} {'less than':>9} "
          f"{'less than':>9} | {'advertise':>9} {'shares':>6} {'masked':>6} {'unmask':>6} | {'down/client':>11} "
          f"{'less than':>9}")
    print(f"{'':>30} | {'':>9} {'fp32 vals':>9} {'FedAvg':>9} | {'':>30} | {'':>11} {'FedAvg':>9}")
    configs = ((max_weight, "word", 0), (max_weight, "bits", 0), (1, "word", 0), (1, "bits", 0), (1, "bits", 8)) \
        if layers == 2 else ((max_weight, "bits", 0), (1, "bits", 0), (1, "bits", 8))
    for n in sizes:
        grid = LocalGrid(_fake_app(shapes), n, {})
        nodes = SecureSparseFedAvg(clients_per_round=n, seed=0).sample(1, grid)
        fed = exchange(grid, [Message(RecordDict({"arrays": glob, "config": ConfigRecord({"server-round": 1})}),
                                      dst_node_id=v, message_type=MessageType.TRAIN) for v in nodes],
                       timeout=5, poll=0.002)
        fed_up, fed_down = sum(fed.bytes_up.values()) / n, sum(fed.bytes_down.values()) / n
        for mw, packing, down_bits in configs:
            per_stage: dict[str, int] = {}

            def tally(node: int, request: Message, reply: Message, per_stage=per_stage) -> Message:
                if not reply.has_error():
                    st = _stage_of(reply)
                    per_stage[st] = per_stage.get(st, 0) + message_nbytes(reply)
                return reply

            grid = LocalGrid(_fake_app(shapes), n, {}, tamper=tally)
            s = SecureSparseFedAvg(clients_per_round=n, seed=0, density=DENSITY, bits=BITS, clip=CLIP,
                                   max_weight=mw, packing=packing, downlink_bits=down_bits, timeout=5)
            msgs = list(s.configure_train(1, glob, ConfigRecord({}), grid))
            ex = exchange(grid, msgs, timeout=5, poll=0.002)
            _, met = s.aggregate_train(1, ex.replies.values())
            if met["refused"]:
                raise RuntimeError("benchmark round was refused")
            up = (sum(ex.bytes_up.values()) + met["secagg-bytes-up"]) / n
            down = (sum(ex.bytes_down.values()) + met["secagg-bytes-down"]) / n
            parts = [per_stage.get(k, 0) / n for k in ("advertise", "share-keys", "collect-masked", "unmask")]
            print(f"{n:>5} {mw:>5} {packing:>7} {down_bits or 'fp32':>8} | {up:>7,.0f} B {1 - up / dense:>9.1%} "
                  f"{1 - up / fed_up:>9.1%} | {parts[0]:>9,.0f} {parts[1]:>6,.0f} {parts[2]:>6,.0f} {parts[3]:>6,.0f} | "
                  f"{down:>9,.0f} B {1 - down / fed_down:>9.1%}")
    print("   (masked = the sealed final training reply, masked vector + metrics; the FedAvg reply carries the same "
          "metrics; advertise and share-keys run before training, in configure_train)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10,100,1000", help="participants per round for table 1")
    ap.add_argument("--repeats", type=int, default=3, help="repeats per size below 1000 (1000: one run)")
    ap.add_argument("--dropout", type=float, default=0.1, help="fraction dropping after sharing keys")
    ap.add_argument("--max-weight", type=int, default=1024, help="cap on a client's weight (example count)")
    ap.add_argument("--bytes-sizes", default="5,10,100", help="participants for table 3 (LocalGrid)")
    args = ap.parse_args()
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1  # Messages outside a Flower run
    sizes = [int(s) for s in args.sizes.split(",") if s]
    table_crypto(sizes, repeats=args.repeats, dropout=args.dropout, max_weight=args.max_weight)
    table_upload([5, *sizes], max_weight=args.max_weight)
    table_round_bytes([int(s) for s in args.bytes_sizes.split(",") if s], max_weight=args.max_weight)
    table_round_bytes([5, 10], max_weight=args.max_weight, layers=6)  # the fedlora recipe's adapter


if __name__ == "__main__":
    main()
