"""Tiny attention models (random init, float64) in a per-example reweighting bilevel program, and
the hand-written autograd references its hypergradients are checked against."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import mlodsl as ml

DT = torch.float64
N, T, D, VOCAB, CLASSES = 6, 5, 16, 50, 3


class EncoderClassifier(nn.Module):
    """nn.TransformerEncoder (2 layers) over float features, mean-pooled into a linear head."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


def encoder(seed=0):
    torch.manual_seed(seed)
    net = EncoderClassifier().to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    train = (torch.randn(N, T, D, generator=g, dtype=DT), torch.randint(0, CLASSES, (N,), generator=g))
    val = (torch.randn(N, T, D, generator=g, dtype=DT), torch.randint(0, CLASSES, (N,), generator=g))
    return net, (lambda net, x: net(x)), train, val


def bert(seed=0, dropout=0.0):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=VOCAB, num_labels=CLASSES, max_position_embeddings=32,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    net = BertForSequenceClassification(cfg).to(DT)
    return net, (lambda net, ids: net(ids).logits), *_token_data(seed)


def gpt2(seed=0):
    """GPT-2 LM head; its "logits" for classification are the last position's first CLASSES logits."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    net = GPT2LMHeadModel(cfg).to(DT)
    return net, (lambda net, ids: net(ids).logits[:, -1, :CLASSES]), *_token_data(seed)


def _token_data(seed):
    g = torch.Generator().manual_seed(seed + 1)
    train = (torch.randint(0, VOCAB, (N, T), generator=g), torch.randint(0, CLASSES, (N,), generator=g))
    val = (torch.randint(0, VOCAB, (N, T), generator=g), torch.randint(0, CLASSES, (N,), generator=g))
    return train, val


def reweighting(net, logits, train, val, method, steps=2, lr=0.1, compile=False):
    """Lower level: the model on per-example weighted cross-entropy; upper: the weights (``w``, one
    per training example) on validation cross-entropy through the model's solution."""
    hyper = ml.Hyper(w=torch.zeros(N, dtype=DT))

    @ml.level(net, optimizer=ml.optim.sgd(lr=lr), data=train, steps=steps, hypergrad=method)
    def inner(net, batch, outer):
        x, y = batch
        return (torch.sigmoid(outer.w) * F.cross_entropy(logits(net, x), y, reduction="none")).mean()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return F.cross_entropy(logits(inner, x), y)

    return ml.Program(outer, compile=compile), hyper


def _losses(net, logits, train, val):
    """(θ_0, L(θ, w), F(θ)): the module's learnable parameters and both losses as functions of them."""
    def at(p):  # the model with parameters p, as the level functions see it
        return _Bound(lambda z: torch.func.functional_call(net, p, (z,)))

    def inner_loss(p, w):
        x, y = train
        return (torch.sigmoid(w) * F.cross_entropy(logits(at(p), x), y, reduction="none")).mean()

    def outer_loss(p):
        x, y = val
        return F.cross_entropy(logits(at(p), x), y)

    p0 = {k: p.detach().clone().requires_grad_() for k, p in net.named_parameters() if p.requires_grad}
    return p0, inner_loss, outer_loss


class _Bound:
    def __init__(self, f):
        self.f = f

    def __call__(self, x):
        return self.f(x)


def hand_unroll(net, logits, train, val, steps=2, lr=0.1):
    """d outer / d w through ``steps`` SGD updates, by plain autograd (math attention kernel)."""
    p, inner_loss, outer_loss = _losses(net, logits, train, val)
    w = torch.zeros(N, dtype=DT, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH):
        for _ in range(steps):
            g = torch.autograd.grad(inner_loss(p, w), list(p.values()), create_graph=True)
            p = {k: v - lr * gk for (k, v), gk in zip(p.items(), g)}
        return torch.autograd.grad(outer_loss(p), w)[0]


def hand_cg(net, logits, train, val, iters, steps=2, lr=0.1, damping=0.0):
    """The implicit hypergradient -(∂²L/∂w∂θ) x, (H + damping·I) x = ∂F/∂θ by ``iters`` steps of
    conjugate gradient from 0, at the point ``steps`` SGD updates reach; plain autograd (math kernel)."""
    p, inner_loss, outer_loss = _losses(net, logits, train, val)
    w = torch.zeros(N, dtype=DT)
    with sdpa_kernel(SDPBackend.MATH):
        for _ in range(steps):
            g = torch.autograd.grad(inner_loss(p, w), list(p.values()))
            p = {k: (v - lr * gk).detach().requires_grad_() for (k, v), gk in zip(p.items(), g)}
        p = {k: v.detach().requires_grad_() for k, v in p.items()}
        w = w.requires_grad_()
        ps = list(p.values())
        v = torch.autograd.grad(outer_loss(p), ps)
        grads = torch.autograd.grad(inner_loss(p, w), ps, create_graph=True)

        def hvp(u):
            return [h + damping * t for h, t in zip(torch.autograd.grad(grads, ps, u, retain_graph=True), u)]

        def dot(a, b):
            return sum((x * y).sum() for x, y in zip(a, b))

        x = [torch.zeros_like(t) for t in v]
        r = q = list(v)
        rr = dot(r, r)
        for _ in range(iters):
            hq = hvp(q)
            alpha = rr / dot(q, hq)
            x = [a + alpha * b for a, b in zip(x, q)]
            r = [a - alpha * b for a, b in zip(r, hq)]
            rr_new = dot(r, r)
            q = [a + (rr_new / rr) * b for a, b in zip(r, q)]
            rr = rr_new
        return -torch.autograd.grad(grads, w, x)[0]
