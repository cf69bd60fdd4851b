"""Matmuls whose shape a row never shares with the batch: why a request's logits are the same alone or batched.

A CPU GEMM picks its micro-kernel, blocking and vector tails by the matrix shape, so the same row can
round differently among 4 rows than among 8 (MKL 2024.2 on an Intel AVX-512 host, for most of our
widths) or among 2 than among 4 (attention's products on an AMD EPYC host). Padding every call to a
multiple of 4 rows relied on one BLAS build's behaviour. Here a row only ever meets calls of the one
shape it always meets, whatever else runs:
- a decoded token, and the last position of each prompt (the lm_head), is one (1, K) x (K, N) item of a
  batched matmul over a stride-0 view of the weight: the one-row kernel (GEMV), with Python's dispatch
  paid once for all rows. Single-stream decoding wants that kernel anyway: a GEMM of 4+ rows costs
  several times a GEMV here;
- prompt tokens go in blocks of PROMPT_BLOCK rows aligned to absolute positions: position p is row
  p % PROMPT_BLOCK of block p // PROMPT_BLOCK of its own sequence, whatever the chunking, the cached
  prefix or the other requests, so it always meets the same (PROMPT_BLOCK, K) x (K, N) item. A GEMM
  computes a row from that row of its input alone, so the block's other rows (padding, or tokens that
  belong to another chunk) cannot change it;
- attention (`attend`) takes keys in blocks of BLOCK: per block, (M, hd) x (hd, BLOCK) scores and
  (M, BLOCK) x (BLOCK, hd) values, with M fixed by the kind of row (the G query heads of one decode,
  or a prompt block's PROMPT_BLOCK * G), summed block after block.
What still varies with the batch is how many items a batched matmul holds; MKL computes each item as it
would alone (checked for every shape above on the AMD host, one and two threads), and tests/test_batching.py
compares logits alone and batched with `torch.equal`. The cost: prompt rows padded to whole blocks, and
more, smaller matmuls in prefill (docs/pages/decisions.md has the figures).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 128  # keys per attention block
PROMPT_BLOCK = 16  # prompt rows per GEMM item


def chunk_end(pos: int, end: int, chunk: int) -> int:
    """Where a prompt chunk starting at `pos` stops: at most `chunk` tokens, cut at a multiple of PROMPT_BLOCK
    when that still leaves some, so a block is not computed twice by two chunks."""
    stop = pos + chunk
    if stop >= end:
        return end
    return stop - stop % PROMPT_BLOCK if stop - stop % PROMPT_BLOCK > pos else stop


def block_layout(prompts: list[tuple[int, int, list[int]]],
                 first_row: int) -> tuple[list[int], list[int], list[tuple[int, int, int]], list[int]]:
    """Rows for prompt chunks (slot, first position, ids) in position-aligned blocks, from row `first_row` on:
    (ids, positions, (first block row, blocks, keys to attend) per chunk, each chunk's first token row). Padding
    rows hold token 0 at position 0: they ride along in their block; nothing reads their results or caches their
    K/V."""
    ids, pos, chunks, firsts = [], [], [], []
    for _, p, seg in prompts:
        lead, end = p % PROMPT_BLOCK, p + len(seg)
        tail = -end % PROMPT_BLOCK
        chunks.append((first_row + len(ids), (lead + len(seg) + tail) // PROMPT_BLOCK, end))
        firsts.append(first_row + len(ids) + lead)
        ids += [0] * lead + list(seg) + [0] * tail
        pos += [0] * lead + list(range(p, end)) + [0] * tail
    return ids, pos, chunks, firsts


def linear_rows(x: torch.Tensor, wt: torch.Tensor, nd: int) -> torch.Tensor:
    """x @ wt (the weight transposed, (K, N)) for `nd` one-row items, then blocks of PROMPT_BLOCK rows."""
    parts = []
    if nd:
        parts.append(torch.bmm(x[:nd, None], wt.expand(nd, *wt.shape))[:, 0])
    nb = (len(x) - nd) // PROMPT_BLOCK
    if nb:
        blocks = torch.bmm(x[nd:].reshape(nb, PROMPT_BLOCK, -1), wt.expand(nb, *wt.shape))
        parts.append(blocks.view(nb * PROMPT_BLOCK, -1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def key_mask(qpos: torch.Tensor, n_keys: int, max_len: int) -> torch.Tensor:
    """Which keys each query row may not see, block by block: (B or 1, blocks, M, BLOCK) for qpos (B or 1, M)
    and the first `n_keys` keys (at most `max_len`). The same for every layer: built once per forward."""
    n = -(-min(n_keys, max_len) // BLOCK)
    return torch.arange(n * BLOCK, device=qpos.device).view(1, n, 1, BLOCK) > qpos[:, None, :, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Causal attention of query rows over cached keys: q (B, M, hd), already scaled; k, v (B, max_len, hd);
    `mask` from `key_mask`. -> (B, M, hd). Every (row group, key block) pair is one item of the two batched
    matmuls, and the blocks are summed in order: the keys past a row's position give exact zeros and leave
    the max alone, so a row's result is the same however many blocks of keys come with it (a token attends
    the same in a decode step, in a prompt chunk, or beside longer sequences)."""
    (B, M, hd), n = q.shape, mask.shape[1]

    def blocks(t: torch.Tensor) -> torch.Tensor:  # (B * n, BLOCK, hd), block j of item b at b * n + j
        t = t[:, :n * BLOCK]
        if t.shape[1] < n * BLOCK:  # the cache's last block is short when max_len is not a multiple of BLOCK
            t = F.pad(t, (0, 0, 0, n * BLOCK - t.shape[1]))
        return t.reshape(B * n, BLOCK, hd)

    s = torch.bmm(q[:, None].expand(B, n, M, hd).reshape(B * n, M, hd), blocks(k).transpose(1, 2))
    s = s.view(B, n, M, BLOCK).masked_fill_(mask, float("-inf"))
    # clamped so that exp never takes its slow path for -inf or underflow (several times slower here); the
    # weights clamped are under 1e-34 beside the max's 1 and vanish in fp32 sums; the hidden keys are then zeroed
    e = s.sub_(s.amax((1, 3), keepdim=True)).clamp_(min=-80.0).exp_().masked_fill_(mask, 0.0)
    parts, totals = torch.bmm(e.view(B * n, M, BLOCK), blocks(v)).view(B, n, M, hd), e.sum(-1, keepdim=True)
    num, den = parts[:, 0], totals[:, 0]
    for j in range(1, n):
        num, den = num + parts[:, j], den + totals[:, j]
    return num / den
