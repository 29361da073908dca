# Golden values for tests/flex_golden.rs: float64 autograd through the formulas
# of programmable attention, and the same forward through
# torch.nn.attention.flex_attention in eager mode as a cross-check.
import json, torch, math
from torch.nn.attention.flex_attention import flex_attention, create_block_mask
torch.manual_seed(7)
dt = torch.float64

def attend(q, k, v, score, keep, sinks=None):
    # q (B,H,L,d), k,v (B,KV,S,·); score(s, b, h, i, j) elementwise on tensors
    B, H, L, d = q.shape
    S = k.shape[2]
    g = H // k.shape[1]
    k = k.repeat_interleave(g, 1); v = v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    b = torch.arange(B).view(B, 1, 1, 1); h = torch.arange(H).view(1, H, 1, 1)
    i = torch.arange(L).view(1, 1, L, 1); j = torch.arange(S).view(1, 1, 1, S)
    s = score(s, b, h, i, j)
    s = s.masked_fill(~keep(b, h, i, j).expand(B, H, L, S), float('-inf'))
    if sinks is not None:
        col = sinks.view(1, H, 1, 1).expand(B, H, L, 1)
        p = torch.softmax(torch.cat([s, col], -1), -1)[..., :S]
    else:
        p = torch.softmax(s, -1)
    return p @ v

def case(name, shape_q, shape_kv, dv, score, keep, params, sinks=None, flex=None):
    q = torch.randn(*shape_q, dtype=dt, requires_grad=True)
    k = torch.randn(*shape_kv, dtype=dt, requires_grad=True)
    v = torch.randn(*shape_kv[:3], dv, dtype=dt, requires_grad=True)
    d_out = torch.randn(*shape_q[:3], dv, dtype=dt)
    out = attend(q, k, v, score, keep, sinks)
    leaves = [q, k, v] + list(params.values()) + ([sinks] if sinks is not None else [])
    grads = torch.autograd.grad((out * d_out).sum(), leaves)
    r = dict(q=q.tolist(), k=k.tolist(), v=v.tolist(), d_out=d_out.tolist(), output=out.tolist(),
             dq=grads[0].tolist(), dk=grads[1].tolist(), dv=grads[2].tolist())
    for key, g in zip(params, grads[3:3 + len(params)]):
        r[key] = params[key].tolist(); r['d_' + key] = g.tolist()
    if sinks is not None:
        r['sinks'] = sinks.tolist(); r['d_sinks'] = grads[-1].tolist()
    if flex is not None:
        r['flex_max_diff'] = flex(q.detach(), k.detach(), v.detach(), (out.detach()))
    return r

cap = torch.tensor(2.0, dtype=dt, requires_grad=True)
sinks = torch.randn(4, dtype=dt, requires_grad=True)
starts = [0, 10, 25, 37]
doc = torch.tensor(sum(([n] * (starts[n + 1] - starts[n]) for n in range(3)), []))
def doc_keep(b, h, i, j):
    return (doc[i] == doc[j]) & (j <= i)
def softcap(s, b, h, i, j):
    return cap * torch.tanh(s / cap)
def flex_doc(q, k, v, out):
    # no sinks in flex_attention: compare without them
    ref = attend(q, k, v, lambda s, *a: 2.0 * torch.tanh(s / 2.0), doc_keep)
    mask = create_block_mask(lambda b, h, i, j: (doc[i] == doc[j]) & (j <= i), None, None, 37, 37, device='cpu')
    got = flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: 2.0 * torch.tanh(s / 2.0), block_mask=mask, enable_gqa=True)
    return (got - ref).abs().max().item()
cases = {}
cases['softcap_sinks_documents'] = case('a', (2, 4, 37, 8), (2, 2, 37, 8), 6, softcap, doc_keep, {'cap': cap}, sinks, flex_doc)

table = torch.randn(4, 9, dtype=dt, requires_grad=True)
def rel_score(s, b, h, i, j):
    off = ((j - i).clamp(-4, 4) + 4).expand(1, 1, s.shape[2], s.shape[3])
    hh = h.expand(1, s.shape[1], s.shape[2], s.shape[3])
    return s + table[hh, off.expand(1, s.shape[1], s.shape[2], s.shape[3])]
def prefix(b, h, i, j):
    return (j < 12) | (j <= i)
cases['relative_bias_prefix_lm'] = case('b', (1, 4, 30, 8), (1, 4, 30, 8), 8, rel_score, prefix, {'table': table})

parents = [-1, 0, 0, 1, 1, 2]
anc = torch.zeros(6, 6, dtype=torch.bool)
for n, p in enumerate(parents):
    if p >= 0: anc[n] = anc[p]
    anc[n, n] = True
def tree_keep(b, h, i, j):
    node = (j - 11).clamp(min=0)
    return (j < 11) | anc[i.expand(1, 1, 6, 17), node.expand(1, 1, 6, 17)]
def distance(s, b, h, i, j):
    return s - 0.1 * (i + 11 - j).abs().to(dt) * torch.sin(s)
cases['tree_user_function'] = case('c', (1, 2, 6, 8), (1, 2, 17, 8), 4, distance, tree_keep, {})
cases['about'] = ('float64 autograd (torch ' + torch.__version__ + ') of sum(output * d_out) through '
    'softmax(f(QK^T/sqrt(d)) masked, with sinks as an extra softmax column without a value); '
    'flex_max_diff: torch.nn.attention.flex_attention (eager) against the same formula without sinks')
json.dump(cases, open(__file__.replace('.py', '.json'), 'w'))
print(cases['softcap_sinks_documents']['flex_max_diff'])
