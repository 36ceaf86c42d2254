"""Causal hop distances over SOSM's semantic graph (semantic_graph.py), for graph_attention's graph RoPE and
landmark distance bias.

Every edge points back (query i -> key j <= i), so a path that follows edges from position i visits only
positions <= i, and every distance below uses only the edges among positions <= i:
    depth(i)       hops from i back to position 0 (graph RoPE's position of i)
    hops(i, m)     hops from i back to landmark m, the position m * every (the landmarks depend on the
                   position alone), capped at `cap`; `cap` where no path is shorter
    distance(i, j) for an edge i -> j: min over landmarks of hops(i, m) + hops(j, m), capped (0 for the self
                   edge): the landmark estimate of the shortest path between i and j, exact when j is a
                   landmark

Both are Bellman-Ford relaxations over the slots, batched: a position's value is 1 + the least value of the
keys it links to. With the values of the positions before `start` known (incremental decoding), n new
positions settle in at most n rounds; hops need at most cap rounds besides (longer paths read cap anyway),
so they run a fixed number and never synchronise with the host; depth runs until a round changes nothing.
`depth_reference` and `hops_reference` compute the same by breadth-first search in Python, for tests.
"""

from collections import deque

import torch
import torch.nn.functional as F
from torch import Tensor


def _relax(values: Tensor, neighbors: Tensor, cap: int, rounds: int, until_stable: bool) -> Tensor:
    """values [B, S, M] (the last n rows those of the queries of neighbors [B, n, E], keys < S) -> the same,
    the last n rows relaxed `rounds` times (stopping early when `until_stable` and a round changes nothing):
    v_i = min(v_i, 1 + min over i's edges to j < i of v_j), capped at `cap`."""
    b, n, _ = neighbors.shape
    start = values.shape[1] - n
    queries = torch.arange(start, start + n, device=neighbors.device)[:, None]
    edges = (neighbors >= 0) & (neighbors < queries)  # the self edge adds nothing
    rows = torch.arange(b, device=neighbors.device)[:, None, None]
    keys = neighbors.clamp(min=0)
    for _ in range(rounds):
        via = values[rows, keys].masked_fill(~edges[..., None], cap).amin(dim=2) + 1  # [B, n, M]
        new = torch.minimum(values[:, start:], via.clamp(max=cap))
        if until_stable and torch.equal(new, values[:, start:]):
            break
        values = torch.cat([values[:, :start], new], dim=1)
    return values


def graph_depth(neighbors: Tensor, past: Tensor | None = None) -> Tensor:
    """neighbors [B, n, E] of positions s..s+n-1, past [B, s] the depths before them (None: s = 0) -> [B, s+n]
    int64 depths of all positions; a position with no path to 0 (none in a graph of build_graph, whose
    previous-token edges chain back) reads s + n."""
    b, n, _ = neighbors.shape
    start = 0 if past is None else past.shape[1]
    total = start + n
    new = torch.full((b, n), total, dtype=torch.long, device=neighbors.device)
    if start == 0:
        new[:, 0] = 0
    values = new if past is None else torch.cat([past, new], dim=1)
    return _relax(values[..., None], neighbors, total, n, until_stable=True)[..., 0]


def landmark_hops(neighbors: Tensor, every: int, cap: int, past: Tensor | None = None) -> Tensor:
    """neighbors [B, n, E] of positions s..s+n-1, past [B, s, M'] the hops before them (None: s = 0) ->
    [B, s+n, M] int64 hops of all positions to the M = ceil((s+n) / every) landmarks, capped at `cap`."""
    b, n, _ = neighbors.shape
    start = 0 if past is None else past.shape[1]
    total = start + n
    m = -(-total // every)
    positions = torch.arange(start, total, device=neighbors.device)
    new = torch.full((b, n, m), cap, dtype=torch.long, device=neighbors.device)
    on_landmark = positions % every == 0
    new[:, on_landmark, positions[on_landmark] // every] = 0
    values = new if past is None else torch.cat([F.pad(past[..., :m], (0, m - min(m, past.shape[2])), value=cap), new], dim=1)
    return _relax(values, neighbors, cap, min(cap, n), until_stable=False)


def landmark_distance(hops: Tensor, neighbors: Tensor, cap: int) -> Tensor:
    """hops [B, S, M] of all positions (landmark_hops), neighbors [B, n, E] of the last n -> [B, n, E] int64:
    each edge's landmark distance (module docstring), capped at `cap`; empty slots read 0."""
    b, n, _ = neighbors.shape
    start = hops.shape[1] - n
    rows = torch.arange(b, device=neighbors.device)[:, None, None]
    through = (hops[:, start:, None, :] + hops[rows, neighbors.clamp(min=0)]).amin(dim=-1).clamp(max=cap)
    queries = torch.arange(start, start + n, device=neighbors.device)[:, None]
    return through.masked_fill((neighbors == queries) | (neighbors < 0), 0)


def _bfs_back(neighbors: list[list[int]], source: int) -> dict[int, int]:
    """Hops from `source` to every position it reaches along the edges (each list the keys of a query)."""
    found, queue = {source: 0}, deque([source])
    while queue:
        i = queue.popleft()
        for j in neighbors[i]:
            if 0 <= j < i and j not in found:
                found[j] = found[i] + 1
                queue.append(j)
    return found


def depth_reference(neighbors: Tensor) -> Tensor:
    """graph_depth by breadth-first search from every position, row by row."""
    b, t, _ = neighbors.shape
    out = torch.full((b, t), t, dtype=torch.long)
    for r, rows in enumerate(neighbors.tolist()):
        for i in range(t):
            out[r, i] = _bfs_back(rows, i).get(0, t)
    return out


def hops_reference(neighbors: Tensor, every: int, cap: int) -> Tensor:
    """landmark_hops by breadth-first search from every position, row by row."""
    b, t, _ = neighbors.shape
    m = -(-t // every)
    out = torch.full((b, t, m), cap, dtype=torch.long)
    for r, rows in enumerate(neighbors.tolist()):
        for i in range(t):
            reached = _bfs_back(rows, i)
            for landmark in range(m):
                out[r, i, landmark] = min(reached.get(landmark * every, cap), cap)
    return out
