"""The core sections of the run config: model, split, LoRA, data, federation, training, ..."""

from __future__ import annotations

from dataclasses import dataclass

from guardedtuning.config.fields import fail as _fail
from guardedtuning.config.fields import opt as _opt

GRAD_BITS = (0, 4, 8)
MODEL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _opt(
        "minilm-l6",
        "`minilm-l6` (embedded encoder), `smollm2-135m` (embedded decoder), "
        "a local model folder, or a Hugging Face hub id",
    )
    max_length: int = _opt(64, "tokens per example after truncation")
    num_layers: int = _opt(0, "tiny test models only: 0 keeps the model's own depth")
    dtype: str = _opt(
        "float32", "the frozen base weights: `float32`, `bfloat16`, or `float16` (GPU only); what trains (LoRA, "
        "the release maps, the head) and its optimizer state stay float32, and so does every released activation; "
        "central-ft trains every weight, so it keeps float32",
    )

    def __post_init__(self) -> None:
        if self.dtype not in MODEL_DTYPES:
            raise _fail("model.dtype", self.dtype, "`float32`, `bfloat16` or `float16` (float16 needs a GPU)")
        if not self.name.strip():
            raise _fail("model.name", self.name, "a model name, folder or hub id")
        if self.max_length < 8:
            raise _fail("model.max-length", self.max_length, "an integer >= 8")
        if self.num_layers < 0:
            raise _fail("model.num-layers", self.num_layers, "an integer >= 0")


@dataclass(frozen=True)
class SplitConfig:
    layer: int = _opt(4, "transformer blocks kept on the client (the bottom); 1 <= layer < L")
    release_dim: int = _opt(
        4, "numbers released per token: a trainable client-side projection D -> k before the noise "
           "(and k -> D on the server); 0 releases the D-dimensional hidden state",
    )
    grad_bits: int = _opt(
        0, "downlink: the server's activation gradients as 8 or 4 bits a value with one float32 scale per token; "
           "0 = float32 (the uplink's is privacy.quantize-bits)",
    )
    stochastic_rounding: bool = _opt(
        False, "round privacy.quantize-bits and split.grad-bits codes stochastically (unbiased: E[decoded] = value, "
               "error < 1 step); false = to nearest (error <= 1/2 step)",
    )
    trim_padding: bool = _opt(
        True, "send only the real tokens' rows (attention mask 1) both ways; padding is rebuilt as zeros, the losses "
              "are unchanged. false sends (B, T, D)",
    )

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise _fail("split.layer", self.layer, "an integer >= 1")
        if self.release_dim < 0:
            raise _fail("split.release-dim", self.release_dim, "an integer >= 0 (0 = no projection)")
        if self.grad_bits not in GRAD_BITS:
            raise _fail("split.grad-bits", self.grad_bits, "0 (float32 gradients), 8 or 4")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = _opt(8, "LoRA rank r")
    alpha: float = _opt(16.0, "LoRA scaling alpha")
    dropout: float = _opt(0.0, "LoRA dropout")
    targets: str = _opt(
        "auto", "comma-separated module names to adapt; `auto` picks the attention query/value"
    )
    top: bool = _opt(True, "also put LoRA on the server's top blocks (else only the head trains)")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise _fail("lora.rank", self.rank, "a positive integer")
        if self.alpha <= 0:
            raise _fail("lora.alpha", self.alpha, "a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise _fail("lora.dropout", self.dropout, "a number in [0, 1)")
        if not self.target_list:
            raise _fail("lora.targets", self.targets, "`auto` or a list like `query,value`")

    @property
    def target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())


DATA_FORMATS = ("auto", "label", "alpaca", "chat")


@dataclass(frozen=True)
class DataConfig:
    name: str = _opt(
        "sentiment",
        "`sentiment` (embedded corpus), `synthetic` (classification rows with sensitive attributes), "
        "`synthetic-instruct` (the same rows as instructions with free-text responses), a local "
        ".jsonl/.csv/.parquet file, or `hub:<dataset id>` (read through flwr-datasets' FederatedDataset)",
    )
    text_field: str = _opt("text", "column holding the input text (local and hub data)")
    label_field: str = _opt("label", "column holding the label (local and hub data)")
    train_size: int = _opt(4000, "training rows kept after a seeded shuffle; 0 keeps all")
    test_size: int = _opt(500, "held-out rows for central evaluation")
    partition: str = _opt("iid", "`iid` or `dirichlet` (non-IID by data.partition-by)")
    alpha: float = _opt(0.5, "Dirichlet concentration; smaller is more skewed")
    partition_by: str = _opt("label", "column the Dirichlet partitioner skews by (any column of the rows)")
    format: str = _opt(
        "auto", "`label` (text + class label), `alpaca` (instruction, optional input, output), `chat` (messages) "
                "or `auto` (chat if data.messages-field is a column, alpaca if the instruction and response "
                "fields are, else label)",
    )
    instruction_field: str = _opt("instruction", "alpaca: column holding the instruction")
    input_field: str = _opt("input", "alpaca: column holding the optional input (absent or empty: none)")
    response_field: str = _opt("output", "alpaca: column holding the response")
    messages_field: str = _opt("messages", "chat: column holding the {role, content} turns (last: the response)")
    split: str = _opt("train", "hub: the dataset split the rows come from (test rows are held out of it)")
    bad_rows: str = _opt(
        "error", "instruction rows with a missing field, an empty response or a prompt too long for "
                 "model.max-length: `error` (one line naming the row) or `skip` (counted in the record)",
    )

    def __post_init__(self) -> None:
        if self.partition not in ("iid", "dirichlet"):
            raise _fail("data.partition", self.partition, "`iid` or `dirichlet`")
        if self.format not in DATA_FORMATS:
            raise _fail("data.format", self.format, "`auto`, `label`, `alpaca` or `chat`")
        if self.bad_rows not in ("error", "skip"):
            raise _fail("data.bad-rows", self.bad_rows, "`error` or `skip`")
        for key, value in (("data.partition-by", self.partition_by), ("data.split", self.split)):
            if not value.strip():
                raise _fail(key, value, "a non-empty name")
        if self.alpha <= 0:
            raise _fail("data.alpha", self.alpha, "a positive number")
        if self.train_size < 0:
            raise _fail("data.train-size", self.train_size, "an integer >= 0 (0 keeps all)")
        if self.test_size < 1:
            raise _fail("data.test-size", self.test_size, "a positive integer")


@dataclass(frozen=True)
class FederationConfig:
    num_clients: int = _opt(10, "simulated clients (SuperNodes); each holds one partition")
    clients_per_round: int = _opt(5, "clients sampled per round")
    rounds: int = _opt(5, "federated rounds")

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise _fail("federation.num-clients", self.num_clients, "a positive integer")
        if not 1 <= self.clients_per_round <= self.num_clients:
            raise _fail(
                "federation.clients-per-round",
                self.clients_per_round,
                f"between 1 and federation.num-clients ({self.num_clients})",
            )
        if self.rounds < 1:
            raise _fail("federation.rounds", self.rounds, "a positive integer")


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = _opt(20, "optimizer steps per client per round")
    batch_size: int = _opt(16, "examples per client step")
    lr: float = _opt(5e-3, "client learning rate (AdamW); the recipes other than guarded set 2e-3")
    server_lr: float = _opt(5e-3, "server learning rate for the top (AdamW); the recipes other than guarded set 2e-3")
    weight_decay: float = _opt(0.0, "AdamW weight decay")

    def __post_init__(self) -> None:
        for key, value in (("train.local-steps", self.local_steps), ("train.batch-size", self.batch_size)):
            if value < 1:
                raise _fail(key, value, "a positive integer")
        for key, val in (("train.lr", self.lr), ("train.server-lr", self.server_lr)):
            if not val > 0:
                raise _fail(key, val, "a positive number")
        if self.weight_decay < 0:
            raise _fail("train.weight-decay", self.weight_decay, "a number >= 0")


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = _opt(64, "evaluation batch size")
    max_new_tokens: int = _opt(8, "generation length for decoder evaluation")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise _fail("eval.batch-size", self.batch_size, "a positive integer")
        if self.max_new_tokens < 1:
            raise _fail("eval.max-new-tokens", self.max_new_tokens, "a positive integer")


@dataclass(frozen=True)
class CentralConfig:
    lr: float = _opt(5e-5, "learning rate of central full fine-tuning")

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise _fail("central.lr", self.lr, "a positive number")


@dataclass(frozen=True)
class SimConfig:
    num_cpus: int = _opt(1, "CPUs reserved per simulated client (Ray); sets how many run at once")
    num_gpus: float = _opt(0.0, "GPUs per client; fractions let several clients share one")
    server_device: str = _opt(
        "auto", "`auto`, `cpu`, `cuda` or `cuda:N` for the server's compute; auto = the first GPU not given to "
        "Ray (see sim.ray-num-gpus), else cuda:0, else the CPU"
    )
    ray_num_cpus: int = _opt(0, "CPUs the simulation's Ray runtime may use; 0 = all of this machine's")
    ray_num_gpus: int = _opt(
        -1, "GPUs the simulation's Ray runtime gives to clients (the first N); -1 = all. Fewer than the "
        "machine has leaves the rest to the server's top compute"
    )
    dispatch_interval: float = _opt(
        0.002, "seconds the simulation engine's dispatcher sleeps between sweeps (Flower: 0.1); 0 keeps Flower's"
    )

    def __post_init__(self) -> None:
        if self.num_cpus < 1:
            raise _fail("sim.num-cpus", self.num_cpus, "a positive integer")
        if self.num_gpus < 0:
            raise _fail("sim.num-gpus", self.num_gpus, "a number >= 0")
        if self.ray_num_cpus < 0:
            raise _fail("sim.ray-num-cpus", self.ray_num_cpus, "an integer >= 0 (0 = all CPUs)")
        if self.ray_num_gpus < -1:
            raise _fail("sim.ray-num-gpus", self.ray_num_gpus, "an integer >= 0, or -1 for all GPUs")
        if self.num_gpus > 0 and self.ray_num_gpus == 0:
            raise _fail("sim.ray-num-gpus", self.ray_num_gpus,
                        "at least 1 (or -1) when sim.num-gpus > 0, or set sim.num-gpus=0 for CPU clients")
        if self.dispatch_interval < 0:
            raise _fail("sim.dispatch-interval", self.dispatch_interval, "a number >= 0")
        dev = self.server_device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise _fail("sim.server-device", dev, "`auto`, `cpu`, `cuda` or `cuda:N`")


@dataclass(frozen=True)
class CommConfig:
    poll_interval: float = _opt(0.002, "seconds between the ServerApp's pulls for replies")
    timeout: float = _opt(600.0, "seconds to wait for a client's reply before dropping it")

    def __post_init__(self) -> None:
        if not 0 < self.poll_interval <= 5:
            raise _fail("comm.poll-interval", self.poll_interval, "a number in (0, 5]")
        if self.timeout <= 0:
            raise _fail("comm.timeout", self.timeout, "a positive number")


@dataclass(frozen=True)
class AggregationConfig:
    secure: bool = _opt(
        True, "sum sparse, quantized adapter updates under secure aggregation (SecAgg+); false = plain FedAvg"
    )
    density: float = _opt(1.0, "secure: fraction of the adapter's coordinates sent each round")
    bits: int = _opt(8, "secure: bits per sent value")
    clip: float = _opt(0.05, "secure: quantization range [-clip, clip] of a sent value")
    support: str = _opt("rand", "secure: `rand` (rand-k from a public round seed) or `topk` (of the public aggregate)")
    explore: float = _opt(0.5, "secure, topk: fraction of the support drawn at random")
    scope: str = _opt(
        "all", "secure, topk: coordinates the support may use: `all`, or `lora-b` (LoRA's A matrices are frozen on "
               "every client and never sent, so the global A stays at its random init; B, the head and other "
               "tensors train and are eligible)"
    )
    dense_rest: bool = _opt(
        False, "secure, topk: every coordinate of the tensors that are not LoRA's (guarded's release projection, "
               "a head) on every round's support; the top-k picks the rest among LoRA's (density must leave room)"
    )
    degree: int = _opt(
        0, "secure: neighbours per client in the masking graph; 0 = the smallest that meets security-bits and "
           "collusion (complete graph up to 10 clients; docs/threat-model.md)"
    )
    threshold: int = _opt(
        0, "secure: shares needed to unmask, and the fewest survivors a round accepts; 0 = the smallest safe one "
           "(> (degree + 1) / 2, and colluders hold fewer than t - 1 shares of anyone)"
    )
    security_bits: int = _opt(
        40, "secure: sigma, the graph lets colluders unmask a client with probability <= 2^-sigma; >= 40 (the clients')"
    )
    collusion: float = _opt(
        1 / 3, "secure: fraction of a round's clients that may collude with the server, in [1/3, 1) (clients assume 1/3)"
    )
    max_weight: int = _opt(1024, "cap on a client's weight (example count), plain FedAvg and secure")
    norm_clip: float = _opt(0.0, "secure: L2 clip of each client's sent update before quantization (0 = off)")
    packing: str = _opt("bits", "secure: `bits` (exactly m bits a value) or `word` (smallest uint word)")
    downlink_bits: int = _opt(0, "secure: quantize the global adapters sent to clients (0 = fp32)")

    def __post_init__(self) -> None:
        if not 0 < self.density <= 1:
            raise _fail("aggregation.density", self.density, "a number in (0, 1]")
        if not 2 <= self.bits <= 32:
            raise _fail("aggregation.bits", self.bits, "an integer in [2, 32]")
        if not self.clip > 0:
            raise _fail("aggregation.clip", self.clip, "a positive number")
        if self.support not in ("rand", "topk"):
            raise _fail("aggregation.support", self.support, "`rand` or `topk`")
        if not 0 <= self.explore <= 1:
            raise _fail("aggregation.explore", self.explore, "a number in [0, 1]")
        if self.scope not in ("all", "lora-b"):
            raise _fail("aggregation.scope", self.scope, "`all` or `lora-b`")
        if self.scope != "all" and self.support != "topk":
            raise _fail("aggregation.scope", self.scope, "`all` unless aggregation.support=topk (the server sends a "
                        "scoped support's indices; set aggregation.support=topk, with aggregation.explore=1 for a "
                        "random one)")
        if self.dense_rest and self.support != "topk":
            raise _fail("aggregation.dense-rest", self.dense_rest, "false unless aggregation.support=topk (the server "
                        "sends the support's indices; set aggregation.support=topk)")
        if self.scope != "all" and not self.secure:
            raise _fail("aggregation.scope", self.scope, "`all` unless aggregation.secure=true (clients freeze LoRA's "
                        "A under `lora-b` and leave it out of their update, which only the secure codec takes; set "
                        "aggregation.secure=true or aggregation.scope=all)")
        if self.degree < 0:
            raise _fail("aggregation.degree", self.degree, "an integer >= 0 (0 picks O(log n))")
        if not (self.threshold == 0 or self.threshold >= 2):
            raise _fail("aggregation.threshold", self.threshold, "0 (auto) or an integer >= 2")
        if not 40 <= self.security_bits <= 256:  # 40: the clients' own floor (secagg_mod's Policy)
            raise _fail("aggregation.security-bits", self.security_bits,
                        "an integer in [40, 256] (clients refuse rounds planned for less than 40 bits)")
        if not 1 / 3 - 1e-9 <= self.collusion < 1:  # 1/3: what the clients assume (secagg_mod's Policy)
            raise _fail("aggregation.collusion", self.collusion,
                        "a fraction in [1/3, 1) (clients refuse rounds planned for less collusion than 1/3)")
        if self.max_weight < 1:
            raise _fail("aggregation.max-weight", self.max_weight, "a positive integer")
        if self.norm_clip < 0:
            raise _fail("aggregation.norm-clip", self.norm_clip, "a number >= 0 (0 turns it off)")
        if self.packing not in ("bits", "word"):
            raise _fail("aggregation.packing", self.packing, "`bits` or `word`")
        if not (self.downlink_bits == 0 or 2 <= self.downlink_bits <= 32):
            raise _fail("aggregation.downlink-bits", self.downlink_bits, "0 (off) or an integer in [2, 32]")


@dataclass(frozen=True)
class OutputConfig:
    dir: str = _opt("runs/latest", "folder for results.json, plots, events and checkpoints")
    resume: bool = _opt(True, "resume from <dir>/checkpoint.json (or a v1 checkpoint.pt) when it exists")


@dataclass(frozen=True)
class GradfreeConfig:
    adapter_dim: int = _opt(
        64, "gradfree: width of the client's output adapter (a residual bottleneck on the hidden states the "
            "server returns, before the head); 0 = head only"
    )

    def __post_init__(self) -> None:
        if self.adapter_dim < 0:
            raise _fail("gradfree.adapter-dim", self.adapter_dim, "an integer >= 0 (0 trains the head only)")


OFFSITE_ADAPTERS = ("lora", "full")


@dataclass(frozen=True)
class OffsiteConfig:
    adapter_layers: int = _opt(1, "offsite: a, the blocks at each end the client adapts (first a and last a)")
    emulator_layers: int = _opt(
        2, "offsite: L', the middle blocks the emulator keeps by uniform layer drop (of the L - 2a middle blocks)"
    )
    adapter: str = _opt("lora", "offsite: `lora` (LoRA on the first and last a blocks) or `full` (those blocks train)")
    distill_steps: int = _opt(
        0, "offsite: steps distilling the emulator against the full middle on public synthetic text; 0 = layer drop only"
    )
    distill_lr: float = _opt(1e-4, "offsite: learning rate of the emulator's distillation (AdamW)")
    distill_rows: int = _opt(256, "offsite: rows of public synthetic text the distillation draws its batches from")
    reference: bool = _opt(
        True, "offsite: also train the same adapters on the full model (pooled data, server process) for the "
              "full fine-tuning utility the plug-in is measured against"
    )

    def __post_init__(self) -> None:
        if self.adapter_layers < 1:
            raise _fail("offsite.adapter-layers", self.adapter_layers, "a positive integer")
        if self.emulator_layers < 0:
            raise _fail("offsite.emulator-layers", self.emulator_layers, "an integer >= 0 (0 drops the whole middle)")
        if self.adapter not in OFFSITE_ADAPTERS:
            raise _fail("offsite.adapter", self.adapter, "`lora` or `full`")
        if self.distill_steps < 0:
            raise _fail("offsite.distill-steps", self.distill_steps, "an integer >= 0 (0 turns distillation off)")
        if not self.distill_lr > 0:
            raise _fail("offsite.distill-lr", self.distill_lr, "a positive number")
        if self.distill_rows < 1:
            raise _fail("offsite.distill-rows", self.distill_rows, "a positive integer")
