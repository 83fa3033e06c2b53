"""A quick frontier probe for the low-dimensional release (not the federated run: a central proxy).

One process, no Flower: the MiniLM bottom (frozen, no LoRA) cut after `layer` blocks, a k-dim
projection (PCA of public hidden states, or seeded random orthonormal rows with INIT=rand;
trainable with tp=1, optionally with Gaussian noise of std DPNOISE/16 on its gradient as a
stand-in for DP-SGD), per-token clip and uniform d_chi noise in k dims, then the top (LoRA + head
+ a k -> D map) trained STEPS steps of 16 rows on the noisy release; accuracy on the 500 test
rows; then three attacks on 64 training rows: nearest neighbour against the bottom's vocabulary
table through the same projection, ridge and an MLP (3-token context) trained on public rows
released through the same mechanism. Used to choose which points the real (federated) run
measures; its numbers are not the run's (see docs/privacy-evaluation.md).

Usage: python simulations/probe_release.py layer=4,k=4,eta=2,clip=1,tp=1 [more specs]
(TASK_JSON=<file> supplies the task's rows where `datasets` is not installed, e.g. the GPU image.)
"""

import json
import os
import sys
import time
from pathlib import Path as _P

import torch

import guardedtuning.data.sources as _src
from guardedtuning.recipes import config_for

if os.environ.get("SENTIMENT_CSV"):
    _src.sentiment_csv = lambda: _P(os.environ["SENTIMENT_CSV"])
from guardedtuning.data.batches import collate, tokenize
from guardedtuning.data.sources import load_task
from guardedtuning.models.loading import kind_of, load_tokenizer
from guardedtuning.models.parts import split_model
from guardedtuning.privacy.attacks.common import aux_batches, aux_vocabulary, special_ids, vocabulary_outputs
from guardedtuning.privacy.attacks.metrics import token_report
from guardedtuning.privacy.dchi import clip_tokens, sample_dchi_noise

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODEL = os.environ.get("GT_MODEL", "minilm-l6")
STEPS = int(os.environ.get("STEPS", "500"))
cfg = config_for("split", {"model.name": MODEL})
if os.environ.get("TASK_JSON"):
    from guardedtuning.data.sources import TaskData

    class _DS(dict):
        def __len__(self):
            return len(self["text"])

    _j = json.load(open(os.environ["TASK_JSON"]))
    task = TaskData(_j["name"], _DS(_j["train"]), _DS(_j["test"]), tuple(_j["names"]), _j["instruction"])
else:
    task = load_task(cfg.data, cfg.seed)
tok = load_tokenizer(cfg.model.name)
special = special_ids(tok)


def ex(ds):
    return tokenize(
        tok,
        kind_of(cfg.model.name),
        list(ds["text"]),
        list(ds["label"]),
        max_length=64,
        label_names=task.label_names,
        instruction=task.instruction,
    )


train = ex(task.train)
test = ex(task.test)
aux = test[:256]
victim = train[:64]
g = torch.Generator(device=dev).manual_seed(0)


def run(k, eta, clip, seed=0, train_proj=False, steps=STEPS, lr=2e-3, layer=2):
    torch.manual_seed(seed)
    m = split_model(cfg.model, layer, cfg.lora, task.num_labels, str(dev), seed, lora_bottom=False)
    bottom, top = m.bottom.eval(), m.top
    D = bottom.word_embeddings().shape[1]
    with torch.no_grad():
        hs = []
        for b in aux_batches(aux, tok.pad_token_id, 32):
            b = b.to(dev)
            h = bottom(b.input_ids, b.attention_mask)
            hs.append(h[b.attention_mask.bool()])
        H = torch.cat(hs).float()
        mu = H.mean(0)
        if os.environ.get("INIT") == "rand":
            mu = torch.zeros_like(mu)
            q, _ = torch.linalg.qr(
                torch.randn(D, k, device=dev, generator=torch.Generator(device=dev).manual_seed(seed))
            )
            P = q.T.contiguous()
        elif k and k < D:
            U, S, Vh = torch.linalg.svd(H - mu, full_matrices=False)
            P = Vh[:k].clone()  # (k, D)
        else:
            P = torch.eye(D, device=dev)
            k = D
    P = torch.nn.Parameter(P, requires_grad=train_proj)
    pb = torch.nn.Parameter(torch.zeros(P.shape[0], device=dev), requires_grad=train_proj)
    up = torch.nn.Linear(k, D).to(dev)
    with torch.no_grad():
        up.weight.copy_(P.detach().T)
        up.bias.copy_(mu)

    def release(b, noise=True, eta_=None):
        with torch.no_grad():
            h = bottom(b.input_ids, b.attention_mask)
        z = (h - mu) @ P.T + pb
        if clip:
            z = clip_tokens(z, clip=clip)
        if noise and eta_ != 0:
            z = z + sample_dchi_noise(tuple(z.shape[:2]), dim=k, eta=eta_ or eta, generator=g, device=dev)
        return z

    params = [p for p in top.parameters() if p.requires_grad] + list(up.parameters()) + ([P, pb] if train_proj else [])
    opt = torch.optim.AdamW(params, lr=lr)
    top.train()
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    for _s in range(steps):
        idx = torch.randint(len(train), (16,), generator=gen).tolist()
        b = collate([train[i] for i in idx], tok.pad_token_id).to(dev)
        z = release(b)
        loss = top.per_example_loss(up(z), b.attention_mask, b.labels).mean()
        opt.zero_grad()
        loss.backward()
        if train_proj and os.environ.get("DPNOISE"):
            sig = float(os.environ["DPNOISE"])
            for q in (P, pb):
                q.grad.add_(torch.randn_like(q.grad) * sig / 16)
        opt.step()
    top.eval()
    correct = 0
    with torch.no_grad():
        for b in aux_batches(test, tok.pad_token_id, 64):
            b = b.to(dev)
            pred = top.logits(up(release(b)), b.attention_mask).argmax(-1)
            correct += (pred == b.labels).sum().item()
    acc = correct / len(test)
    # attacks on victim rows
    vb = collate(victim, tok.pad_token_id).to(dev)
    with torch.no_grad():
        zv = release(vb)
        V = bottom.word_embeddings().shape[0]
        ids = torch.arange(V)
        tab = vocabulary_outputs(bottom, ids, context=(tok.cls_token_id, tok.sep_token_id)).to(dev)
        tabz = (tab - mu) @ P.T + pb
        if clip:
            tabz = clip_tokens(tabz, clip=clip)
        d = torch.cdist(zv.reshape(-1, k), tabz)  # (BT, V)
        nn_c = d.topk(5, largest=False).indices.reshape(*zv.shape[:2], 5).cpu()
    res = {
        "layer": layer,
        "steps": steps,
        "pc_std": round(float(((H - mu) @ P.detach().T).std(0).mean()), 3),
        "k": k,
        "eta": eta,
        "clip": clip,
        "seed": seed,
        "train_proj": train_proj,
        "acc": acc,
        "nn": token_report(nn_c, vb.input_ids.cpu(), vb.attention_mask.cpu(), special)["asr"],
    }
    # ridge + mlp through the exact mechanism, on aux releases (several draws)
    ab = aux_batches(aux, tok.pad_token_id, 32)
    vocab = aux_vocabulary(ab, special, limit=8000).to(dev)
    Vn = len(vocab)
    lut = torch.full((V,), -1, dtype=torch.long, device=dev)
    lut[vocab] = torch.arange(Vn, device=dev)
    Xs, Ys = [], []
    with torch.no_grad():
        for _rep in range(4):
            for b in ab:
                b = b.to(dev)
                z = release(b)
                msk = b.attention_mask.bool()
                y = lut[b.input_ids[msk]]
                keep = y >= 0
                # context features: z at t-1, t, t+1
                zc = torch.cat([z, torch.roll(z, 1, 1), torch.roll(z, -1, 1)], -1)[msk]
                Xs.append(zc[keep])
                Ys.append(y[keep])
    X = torch.cat(Xs).float()
    Y = torch.cat(Ys)

    def feats(z):
        return torch.cat([z, torch.roll(z, 1, 1), torch.roll(z, -1, 1)], -1)

    # ridge (closed form) to one-hot
    Xa = torch.cat([X, torch.ones(len(X), 1, device=dev)], 1)
    oh = torch.zeros(len(Y), Vn, device=dev)
    oh[torch.arange(len(Y)), Y] = 1
    best = 0
    for lam in (1e-2, 1.0, 100.0):
        W = torch.linalg.solve(Xa.T @ Xa + lam * torch.eye(Xa.shape[1], device=dev), Xa.T @ oh)
        fz = feats(zv)
        fz = torch.cat([fz, torch.ones(*fz.shape[:2], 1, device=dev)], -1)
        pred = vocab[(fz @ W).argmax(-1)].cpu()
        r = token_report(pred[..., None].repeat(1, 1, 5), vb.input_ids.cpu(), vb.attention_mask.cpu(), special)["asr"]
        best = max(best, r)
    res["ridge"] = best
    # MLP, fresh noise each epoch
    mlp = torch.nn.Sequential(torch.nn.Linear(3 * k, 1024), torch.nn.GELU(), torch.nn.Linear(1024, Vn)).to(dev)
    o = torch.optim.AdamW(mlp.parameters(), lr=1e-3)
    for _ep in range(int(os.environ.get("MLP_EP", "8"))):
        for b in ab:
            b = b.to(dev)
            with torch.no_grad():
                z = release(b)
                msk = b.attention_mask.bool()
                y = lut[b.input_ids[msk]]
                keep = y >= 0
                f = feats(z)[msk][keep]
            loss = torch.nn.functional.cross_entropy(mlp(f), y[keep])
            o.zero_grad()
            loss.backward()
            o.step()
    with torch.no_grad():
        pred = vocab[mlp(feats(zv)).argmax(-1)].cpu()
    res["mlp"] = token_report(pred[..., None].repeat(1, 1, 5), vb.input_ids.cpu(), vb.attention_mask.cpu(), special)[
        "asr"
    ]
    # prior: most frequent aux token everywhere
    res["prior"] = token_report(
        torch.full_like(vb.input_ids.cpu(), int(vocab[0]))[..., None].repeat(1, 1, 5),
        vb.input_ids.cpu(),
        vb.attention_mask.cpu(),
        special,
    )["asr"]
    res["sec"] = round(time.time() - t0, 1)
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        kw = dict(x.split("=") for x in spec.split(","))
        run(
            int(kw.get("k", 0)),
            float(kw.get("eta", 100)),
            float(kw.get("clip", 0)),
            int(kw.get("seed", 0)),
            kw.get("tp", "0") == "1",
            int(kw.get("steps", STEPS)),
            float(kw.get("lr", 2e-3)),
            int(kw.get("layer", 2)),
        )
