#!/usr/bin/env python
"""Train the small CLIP of the embedded "shapes" world on CPU, evaluate it, and export its weights.

    python scripts/train_toy_clip.py --steps 1200 --batch-size 128 --lr 1e-3 --seed 0 --out toy_runs/toy_clip --export

Training is contrastive (symmetric InfoNCE, learnable temperature) on an endless, seeded image–caption
stream: the batch of step ``s`` is ``ShapesWorld().batch(batch_size, seed=(seed, s))``, so ``--resume``
continues the exact same run from the last checkpoint in ``--out``.

At the end it prints one JSON object with
  * ``zero_shot_acc``: colour × shape zero-shot accuracy on the held-out test split (mean of the text
    embeddings of every template),
  * ``pointing_game``: share of single-object test images whose top patch of the image relevance (CLS row,
    Chefer et al. 2021, as in docs/method.md) overlaps the object's box (``pointing_game_strict``: the top
    patch's centre lies inside the box),
  * ``text_neglect_rate``: on two-object captions "a c1 s1 and a c2 s2", how often one object's words get
    < 0.3 of the other object's text-relevance score,
and with ``--export`` writes the float16 ``model.state_dict()`` to explainguide/models/toy/toy_clip.safetensors.

The relevance here is a small standalone version (manual attention inside open_clip's
ResidualAttentionBlock, so the attention probabilities and their gradients can be read).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import open_clip  # noqa: E402
from tqdm import tqdm  # noqa: E402

from explainguide.data.shapes import (  # noqa: E402
    ShapesClassification,
    ShapesWorld,
    normalize,
)

TOY_DIR = REPO / "explainguide" / "models" / "toy"
DEFAULT_CONFIG = TOY_DIR / "toy_clip.json"
DEFAULT_EXPORT = TOY_DIR / "toy_clip.safetensors"
NEGLECT_THRESHOLD = 0.3


# ----------------------------------------------------------------------------------------------------------
# model


def build_model(config: Path, pretrained: str | None = None):
    open_clip.add_model_config(config)
    name = Path(config).stem
    model = open_clip.create_model(name, pretrained=pretrained)
    tokenizer = open_clip.get_tokenizer(name)
    return model, tokenizer


def param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in n or "logit_scale" in n or n.endswith("class_embedding"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, base: float, final_frac: float = 0.02) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def clip_loss(model, images, tokens, neg_tokens=None):
    """Symmetric InfoNCE. Optional hard-negative captions (one per image) are extra candidates for the
    image -> text direction only (NegCLIP-style)."""
    b = images.shape[0]
    img = F.normalize(model.encode_image(images), dim=-1)
    all_tokens = tokens if neg_tokens is None else torch.cat([tokens, neg_tokens])
    txt = F.normalize(model.encode_text(all_tokens), dim=-1)
    scale = model.logit_scale.exp().clamp(max=100.0)
    logits = scale * img @ txt.t()  # (B, B) or (B, 2B)
    labels = torch.arange(b)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :b].t(), labels))
    acc = (logits[:, :b].argmax(1) == labels).float().mean()
    return loss, acc


# ----------------------------------------------------------------------------------------------------------
# standalone relevance (Chefer et al. 2021) – attention probabilities from a manual attention


def _manual_attention(self, q_x, k_x=None, v_x=None, attn_mask=None):
    """Drop-in for ResidualAttentionBlock.attention that keeps the post-softmax probabilities."""
    mha = self.attn
    assert mha.batch_first and k_x is None and v_x is None
    b, n, d = q_x.shape
    h = mha.num_heads
    qkv = F.linear(q_x, mha.in_proj_weight, mha.in_proj_bias).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // h)
    if attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)
    probs = scores.softmax(dim=-1)
    self._probs = probs
    out = (probs @ v).transpose(1, 2).reshape(b, n, d)
    return mha.out_proj(out)


@contextlib.contextmanager
def recording(blocks):
    for blk in blocks:
        blk.attention = types.MethodType(_manual_attention, blk)
    try:
        yield
    finally:
        for blk in blocks:
            del blk.attention  # back to the class method
            blk.__dict__.pop("_probs", None)


def _rollout(probs, grads):
    b, _, n, _ = probs[0].shape
    R = torch.eye(n).expand(b, n, n).clone()
    for A, G in zip(probs, grads):
        cam = (G * A).clamp(min=0).mean(dim=1)
        R = R + cam @ R
    return R


def relevance(model, images, tokens):
    """Paired relevance for targets s_i = cos(image_i, text_i).

    Returns (image relevance (B, g, g) from the CLS row, text relevance matrices (B, L, L)).
    """
    vblocks, tblocks = model.visual.transformer.resblocks, model.transformer.resblocks
    with torch.enable_grad(), recording(vblocks), recording(tblocks):
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        s = (img * txt).sum(-1)
        vp = [blk._probs for blk in vblocks]
        tp = [blk._probs for blk in tblocks]
        grads = torch.autograd.grad(s.sum(), vp + tp)  # samples are independent: d sum / d A_i = d s_i / d A_i
    Rv = _rollout([p.detach() for p in vp], grads[: len(vp)])
    Rt = _rollout([p.detach() for p in tp], grads[len(vp):])
    g = int(round(math.sqrt(Rv.shape[-1] - 1)))
    return Rv[:, 0, 1:].reshape(-1, g, g), Rt


# ----------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def class_text_features(model, tokenizer, classnames, templates):
    feats = []
    for c in classnames:
        t = F.normalize(model.encode_text(tokenizer([tpl.format(c) for tpl in templates])), dim=-1)
        feats.append(F.normalize(t.mean(0), dim=-1))
    return torch.stack(feats)


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, ds: ShapesClassification, batch: int = 256) -> float:
    model.eval()
    W = class_text_features(model, tokenizer, ds.classnames, ds.templates)
    correct = 0
    for i0 in range(0, len(ds), batch):
        idx = range(i0, min(len(ds), i0 + batch))
        x = normalize(torch.stack([ds.sample(i).image for i in idx]))
        y = torch.tensor([i % len(ds.classnames) for i in idx])
        pred = (F.normalize(model.encode_image(x), dim=-1) @ W.t()).argmax(1)
        correct += int((pred == y).sum())
    return correct / len(ds)


def pointing_game(model, tokenizer, ds: ShapesClassification, n: int, batch: int = 64) -> dict:
    model.eval()
    hits = strict = 0
    patch = None
    for i0 in range(0, n, batch):
        smps = [ds.sample(i) for i in range(i0, min(n, i0 + batch))]
        x = normalize(torch.stack([s.image for s in smps]))
        tok = tokenizer([f"a {s.objects[0].name}" for s in smps])
        rel, _ = relevance(model, x, tok)
        g = rel.shape[-1]
        patch = x.shape[-1] // g
        top = rel.flatten(1).argmax(1)
        for s, t in zip(smps, top.tolist()):
            py, px = divmod(t, g)
            l, tp, w, h = s.objects[0].box
            cx0, cy0 = px * patch, py * patch
            hits += int(cx0 < l + w and l < cx0 + patch and cy0 < tp + h and tp < cy0 + patch)
            cx, cy = cx0 + patch / 2, cy0 + patch / 2
            strict += int(l <= cx <= l + w and tp <= cy <= tp + h)
    return {"pointing_game": hits / n, "pointing_game_strict": strict / n}


def _word_token_spans(tokenizer, words: list[str]) -> list[tuple[int, int]]:
    spans, pos = [], 1  # position 0 is the start-of-text token
    for w in words:
        k = len(tokenizer.encode(w))
        spans.append((pos, pos + k))
        pos += k
    return spans


def text_neglect(model, tokenizer, world: ShapesWorld, n: int, seed: int, batch: int = 64) -> dict:
    """Two-object images with captions "a c1 s1 and a c2 s2"; an object is neglected when its score
    (max text relevance over its colour and shape tokens; R diagonal zeroed, row EOT over 1..EOT-1,
    normalised by sum) is < 0.3 of the other object's."""
    model.eval()
    smps = [s for s in world.samples(n, seed=seed, n_objects=2) if len(s.objects) == 2][:n]
    neglected, ratios = 0, []
    for i0 in range(0, len(smps), batch):
        chunk = smps[i0: i0 + batch]
        word_lists, spans = [], []
        for s in chunk:
            a, b = s.objects
            words = ["an" if a.colour[0] in "aeiou" else "a", a.colour, a.shape, "and",
                     "an" if b.colour[0] in "aeiou" else "a", b.colour, b.shape]
            word_lists.append(words)
            spans.append(_word_token_spans(tokenizer, words))
        tok = tokenizer([" ".join(w) for w in word_lists])
        x = normalize(torch.stack([s.image for s in chunk]))
        _, Rt = relevance(model, x, tok)
        eot = tok.argmax(-1)
        for j in range(len(chunk)):
            R = Rt[j] - torch.diag(torch.diag(Rt[j]))
            r = R[eot[j]].clone()
            r[0] = 0
            r[eot[j]:] = 0
            r = r / r.sum().clamp_min(1e-12)
            sp = spans[j]
            s1 = float(max(r[a:b].max() for a, b in (sp[1], sp[2])))
            s2 = float(max(r[a:b].max() for a, b in (sp[5], sp[6])))
            ratio = min(s1, s2) / max(max(s1, s2), 1e-12)
            ratios.append(ratio)
            neglected += int(ratio < NEGLECT_THRESHOLD)
    return {"text_neglect_rate": neglected / len(ratios), "text_min_max_ratio_mean": sum(ratios) / len(ratios),
            "text_neglect_n": len(ratios)}


def evaluate(model, tokenizer, seed: int, n_test: int, n_point: int, n_neglect: int) -> dict:
    world = ShapesWorld()
    test = ShapesClassification("test", n=n_test, seed=seed, world=world)
    out = {"zero_shot_acc": zero_shot_accuracy(model, tokenizer, test), "zero_shot_n": len(test)}
    out.update(pointing_game(model, tokenizer, test, n=min(n_point, len(test))))
    out["pointing_n"] = min(n_point, len(test))
    out.update(text_neglect(model, tokenizer, world, n=n_neglect, seed=10_000 + seed))
    return out


# ----------------------------------------------------------------------------------------------------------
# training


def export_safetensors(model, path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", "model": "toy_clip", "dtype": "float16"})


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hard-negatives", type=float, default=1.0,
                    help="share of images that get a hard-negative caption (one object's colour/shape changed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "toy_runs" / "toy_clip")
    ap.add_argument("--resume", action="store_true", help="continue from --out/last.pt if it exists")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=250, help="quick val zero-shot accuracy (0: never)")
    ap.add_argument("--model-config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--n-test", type=int, default=1080)
    ap.add_argument("--n-point", type=int, default=540)
    ap.add_argument("--n-neglect", type=int, default=300)
    ap.add_argument("--export", nargs="?", const=str(DEFAULT_EXPORT), default=None,
                    help=f"write float16 safetensors (default path {DEFAULT_EXPORT.relative_to(REPO)})")
    ap.add_argument("--eval-only", action="store_true", help="skip training (use with --resume)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_model(args.model_config)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    world = ShapesWorld()
    val = ShapesClassification("val", n=360, seed=args.seed, world=world)

    start, elapsed, history = 0, 0.0, []
    ckpt_path = args.out / "last.pt"
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, elapsed, history = ck["step"], ck.get("elapsed", 0.0), ck.get("history", [])
        print(f"resumed from {ckpt_path} at step {start}", file=sys.stderr)

    def save(step):
        tmp = args.out / "last.pt.tmp"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "elapsed": elapsed, "history": history, "args": vars(args) | {"out": str(args.out),
                    "model_config": str(args.model_config)}}, tmp)
        os.replace(tmp, ckpt_path)

    gen_time = 0.0
    if not args.eval_only and start < args.steps:
        model.train()
        bar = tqdm(range(start, args.steps), initial=start, total=args.steps, dynamic_ncols=True,
                   mininterval=5.0, desc="train")
        t_last = time.time()
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
            t0 = time.time()
            images, captions = world.batch(args.batch_size, seed=args.seed * 1_000_003 + step)
            images, tokens = normalize(images), tokenizer(captions)
            neg_tokens = None
            if args.hard_negatives > 0:
                nrng = np.random.default_rng([args.seed, step, 77])
                negs = [world.hard_negative(c, nrng) for c in captions if nrng.random() < args.hard_negatives]
                neg_tokens = tokenizer(negs) if negs else None
            gen_time += time.time() - t0
            loss, acc = clip_loss(model, images, tokens, neg_tokens)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            now = time.time()
            elapsed += now - t_last
            t_last = now
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc.item():.2f}",
                            T=f"{model.logit_scale.exp().item():.1f}", refresh=False)
            done = step + 1
            if args.eval_every and (done % args.eval_every == 0 or done == args.steps):
                va = zero_shot_accuracy(model, tokenizer, val)
                model.train()
                history.append({"step": done, "loss": round(loss.item(), 4), "val_zero_shot_acc": va,
                                "elapsed_s": round(elapsed, 1)})
                print(json.dumps(history[-1]), file=sys.stderr, flush=True)
                t_last = time.time()
            if done % args.ckpt_every == 0 or done == args.steps:
                save(done)
                t_last = time.time()
        bar.close()

    t0 = time.time()
    metrics = evaluate(model, tokenizer, args.seed, args.n_test, args.n_point, args.n_neglect)
    metrics.update({"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                    "train_wall_s": round(elapsed, 1), "eval_wall_s": round(time.time() - t0, 1),
                    "data_gen_s_this_session": round(gen_time, 1), "params": n_params,
                    "threads": torch.get_num_threads()})
    if args.export:
        path = Path(args.export)
        export_safetensors(model, path)
        metrics["exported"] = str(path)
        metrics["exported_mb"] = round(path.stat().st_size / 2**20, 2)
    with open(args.out / "metrics.json", "w") as f:
        json.dump(metrics | {"history": history}, f, indent=2)
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
