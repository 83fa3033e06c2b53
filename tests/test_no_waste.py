"""No wasted compute (issue 15, item 2): the trimmed paths compute what the padded ones did.

The server's top pass without padding (rows sorted by length, in groups cut to their longest)
against the pass padded to the longest row of any client (``top_step(trim_padding=False)``,
the code as it was); evaluation batched by length against evaluation in the split's order
(``evaluate(sort_by_length=False)``), on tiny encoder and decoder models.
"""

from __future__ import annotations

import copy

import pytest
import torch

from guardedtuning.config import DataConfig, LoraConfig, ModelConfig
from guardedtuning.data.batches import collate, tokenize
from guardedtuning.data.sources import load_task
from guardedtuning.evaluation import evaluate, length_order
from guardedtuning.models.loading import load_tokenizer
from guardedtuning.models.parts import split_model
from guardedtuning.training import (
    ClientActs,
    forward_activations,
    length_groups,
    top_step,
    used_lengths,
)

CPU = torch.device("cpu")


def _no_dropout(model):
    """The top trains in train mode; compare the two paths without random dropout masks."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _model(name, num_labels=3):
    return _no_dropout(split_model(ModelConfig(name=name), 2, LoraConfig(rank=4), num_labels, "cpu", 0))


def _client_acts(model, name, task, sizes):
    """One ClientActs per client: its rows of the training split, each client padded to its own longest."""
    tok = load_tokenizer(name)
    rows = task.train.select(range(sum(sizes)))
    examples = tokenize(tok, model.kind, list(rows["text"]), list(rows["label"]), max_length=64,
                        label_names=task.label_names, instruction=task.instruction)
    acts, start = [], 0
    for n in sizes:
        b = collate(examples[start:start + n], tok.pad_token_id)
        start += n
        acts.append(ClientActs(forward_activations(model.bottom, b, CPU), b.attention_mask, b.labels))
    return acts


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_the_trimmed_top_pass_gives_the_padded_pass_s_losses_gradients_and_step(name):
    task = load_task(DataConfig(name="sentiment", train_size=200, test_size=20), 0)
    model = _model(name)
    acts = _client_acts(model, name, task, [5, 23, 1, 17])  # groups of 16 rows cut across clients
    widths = {a.h.shape[1] for a in acts}
    assert len(widths) > 1  # the clients' own paddings differ: the padded pass pads them to the longest
    padded, trimmed = model, copy.deepcopy(model)
    model0 = {n: p.detach().clone() for n, p in model.top.named_parameters()}
    # SGD: AdamW's first step is lr x sign(gradient), which turns float rounding of a ~0 gradient into lr
    opt_p = torch.optim.SGD([p for p in padded.top.parameters() if p.requires_grad], lr=0.5)
    opt_t = torch.optim.SGD([p for p in trimmed.top.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # two steps: the second runs on the stepped tops
        g_p, l_p = top_step(padded.top, opt_p, acts, CPU, trim_padding=False)
        g_t, l_t = top_step(trimmed.top, opt_t, acts, CPU, trim_padding=True)
        assert [g.shape for g in g_t] == [a.h.shape for a in acts]
        for a, b in zip(g_p, g_t, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        assert l_t == pytest.approx(l_p, rel=1e-5)
        moved = 0.0
        for (n, p), q in zip(padded.top.named_parameters(), trimmed.top.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=n)
            moved += float((p.detach() - model0[n]).abs().sum())
        assert moved > 0  # the tops did step


def test_used_lengths_keep_every_masked_or_labelled_position_and_groups_cover_each_row_once():
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 0]])
    labels = torch.full((4, 5), -100)
    labels[2, 3] = 7  # a label past the mask still reaches the loss: kept
    assert used_lengths(mask, labels).tolist() == [2, 4, 4, 3]
    assert used_lengths(mask, torch.zeros(4)).tolist() == [2, 4, 1, 3]  # class labels: the mask alone
    groups = length_groups(torch.tensor([3, 9, 1, 9, 5]), rows=2)
    assert [(idx.tolist(), w) for idx, w in groups] == [([1, 3], 9), ([4, 0], 5), ([2], 1)]


def test_the_trimmed_pass_computes_fewer_padded_positions_than_the_padded_one():
    task = load_task(DataConfig(name="sentiment", train_size=200, test_size=20), 0)
    model = _model("tiny-bert")
    acts = _client_acts(model, "tiny-bert", task, [16] * 5)
    seen: list[int] = []
    hook = model.top.blocks.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:2].numel()))
    try:
        top_step(model.top, None, acts, CPU, trim_padding=False)
        padded, seen[:] = sum(seen), []
        top_step(model.top, None, acts, CPU, trim_padding=True)
        trimmed = sum(seen)
    finally:
        hook.remove()
    real = sum(int(a.attention_mask.sum()) for a in acts)
    assert real <= trimmed < padded
    assert trimmed - real < 0.5 * (padded - real)  # most of the padding is gone


# few decoder rows: generation without a KV cache on a starved shared CPU is slow
@pytest.mark.parametrize("name,data,rows", [("tiny-bert", "sentiment", 40), ("tiny-llama", "sentiment", 9),
                                            ("tiny-llama", "synthetic-instruct", 4)])
def test_evaluation_by_length_gives_the_figures_of_evaluation_in_order(name, data, rows):
    task = load_task(DataConfig(name=data, train_size=50, test_size=rows), 0)
    model = split_model(ModelConfig(name=name), 2, LoraConfig(rank=4), task.num_labels, "cpu", 0)
    tok = load_tokenizer(name)
    kw = dict(max_length=64, batch_size=8 if name == "tiny-bert" else 3, max_new_tokens=3, device=CPU)
    fast = evaluate(model, tok, task, **kw)
    slow = evaluate(model, tok, task, **kw, sort_by_length=False)
    assert fast.keys() == slow.keys()
    for k in slow:
        assert fast[k] == pytest.approx(slow[k], rel=1e-5, abs=1e-6), k
    # and evaluation left nothing behind that training's autograd trips over (inference tensors)
    model.top.train()
    h = torch.randn(2, 5, model.bottom.release_dim, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.long)
    labels = torch.zeros(2, dtype=torch.long) if model.kind == "encoder" else torch.randint(0, 5, (2, 5))
    model.top.per_example_loss(h, mask, labels).sum().backward()
    assert h.grad is not None and bool(torch.isfinite(h.grad).all())


def test_length_order_batches_every_row_once_shortest_first():
    batches = length_order([5, 1, 4, 1, 9], 2)
    assert batches == [[1, 3], [2, 0], [4]]
    assert length_order([5, 1, 4], 2, sort=False) == [[0, 1], [2]]


def test_generation_by_length_gives_each_prompt_its_own_response(monkeypatch):
    """Every response goes back to its own prompt: a stand-in for greedy decoding that echoes each
    row's unpadded prompt makes a wrong reassembly visible (the decoder cases above can score 0.0
    on both paths whatever the order, since an untrained tiny model answers junk)."""
    from guardedtuning import evaluation

    def echo(model, tokenizer, batch, *, max_new_tokens, device):
        return [" ".join(map(str, ids[mask.bool()].tolist())) 
                for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True)]

    monkeypatch.setattr(evaluation, "_greedy", echo)
    prompts = [[5 + k] * n for k, n in enumerate((7, 2, 9, 1, 4, 4, 8, 3))]  # lengths out of order
    expected = [" ".join(map(str, p)) for p in prompts]
    tok = type("Tok", (), {"pad_token_id": 0})()
    for sort in (True, False):
        got = evaluation._generate_all(None, tok, prompts, batch_size=3, max_new_tokens=1, device=CPU, sort=sort)
        assert got == expected, sort
    assert length_order([len(p) for p in prompts], 3) != length_order([len(p) for p in prompts], 3, sort=False)


@pytest.mark.parametrize("layout", ["sizes differ", "equal sizes", "content ties"])
@pytest.mark.parametrize("trim", [True, False])
@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_the_top_step_does_not_depend_on_the_order_the_clients_come_in(name, trim, layout):
    """The clients come in node-id order, and Flower's engine draws the node ids at random: with the
    top's dropout ON, a step on the clients in another order must give each client the same loss and
    gradient and the top the same step (its dropout masks, the trimmed pass's length groups and the
    float sums must not follow the clients' order). Otherwise the in-process and Flower records drift
    apart (tests/test_inprocess.py): a client's rows got other masks in another order."""
    task = load_task(DataConfig(name="sentiment", train_size=200, test_size=20), 0)
    model = split_model(ModelConfig(name=name), 2, LoraConfig(rank=4), 3, "cpu", 0)
    dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.top.modules())
    assert dropout == (name == "tiny-bert")  # BERT's hidden dropout 0.1 on; Llama has none (float sums only)
    acts = _client_acts(model, name, task, [5, 23, 1, 17, 9] if layout == "sizes differ" else [8] * 5)
    if layout == "content ties":  # the same shapes, mask and labels as client 1: only the activations differ
        acts[3] = ClientActs(acts[1].h + 0.01, acts[1].attention_mask.clone(), acts[1].labels.clone())
    perm = [3, 0, 4, 2, 1]
    tops = [model.top, copy.deepcopy(model.top)]
    opts = [torch.optim.SGD([p for p in t.parameters() if p.requires_grad], lr=0.5) for t in tops]
    for _ in range(2):  # the second step on the stepped tops
        torch.manual_seed(11)
        g_a, l_a = top_step(tops[0], opts[0], acts, CPU, trim_padding=trim)
        torch.manual_seed(11)
        g_b, l_b = top_step(tops[1], opts[1], [acts[i] for i in perm], CPU, trim_padding=trim)
        assert l_b == [l_a[i] for i in perm]
        for j, i in enumerate(perm):
            assert torch.equal(g_b[j], g_a[i]), (j, i)
        for (n, p), q in zip(tops[0].named_parameters(), tops[1].parameters(), strict=True):
            assert torch.equal(p, q), n
    if dropout:  # and the masks are random: another seed gives other losses
        torch.manual_seed(12)
        assert top_step(copy.deepcopy(tops[0]), None, acts, CPU, trim_padding=trim)[1] != l_a
