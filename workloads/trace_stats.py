"""Statistics of router traces that matter for expert offloading.

Every function takes ``requests``: a sequence of objects with ``experts`` (int array
``[T, M, K]``: the top-k expert ids of each of the request's T token positions at each of its M MoE
layers, as :class:`workloads.trace.RoutedRequest` and :class:`workloads.requests.Request` hold it)
and ``prompt_len`` (the first ``prompt_len`` positions are the prompt), plus ``num_experts`` (E).
K = top_k. Token positions of a request are in order; requests are in file order.

Definitions
-----------
* **Popularity skew** of MoE layer m: ``max_e load(m, e) / mean_e load(m, e)``, load = number of
  token positions (all requests, prompt and decode) that picked expert e at layer m; the mean load
  is ``tokens * K / E``. Summarised by the median, min and max over layers. A finite sample reads
  higher than the routing's expectation (the maximum of noisy counts): compare traces of similar
  size, or calibrate by simulation (``workloads.fit``).
* **Reuse** of layer m: ``P(an expert of token t was also used by token t-1, same layer, same
  request)`` = ``sum |S_t ∩ S_{t-1}| / (K * pairs)`` over all consecutive position pairs of all
  requests (S_t = the K experts of position t at layer m). "Overall" pools every layer. Uniform
  routing gives the chance value K/E. Unbiased at any sample size.
* **Cross-layer affinity** (top-successor probability) of consecutive MoE layers (m, m+1): with
  ``c(e, f)`` = number of token positions that picked e at layer m and f at layer m+1 and
  ``f*(e) = argmax_f c(e, f)`` (e's most frequent successor in this trace),
  ``A_m = sum_e c(e, f*(e)) / (tokens * K)``: the probability that a token which chose expert e at
  layer m also chose e's most frequent successor at layer m+1, over the (token, chosen expert)
  pairs of layer m. "Overall" pools every layer pair. **Independence baseline**: the same statistic
  with each token's layer-(m+1) routing replaced by that of a token ``d`` positions later in the
  trace's token sequence (requests back to back, circular), so both layers keep their loads, their
  temporal structure and the sample size but lose the token pairing; ``d`` runs over up to 16 evenly
  spaced shifts that never pair two positions of one request (when the trace allows), and the
  baseline is the mean. The successor is chosen in-sample, so both the statistic and the baseline
  grow as the sample shrinks; ``lift = A / baseline`` and ``excess = A - baseline``.
* **Distinct experts per batch of t tokens**, per MoE layer, averaged over layers:
  ``consecutive`` = mean over every window of t consecutive positions inside one request (sliding,
  stride 1; requests shorter than t contribute no window); ``random`` = exact expectation for t
  token positions drawn uniformly without replacement from all positions of the trace (across
  requests): ``sum_e 1 - C(n - n_e, t) / C(n, t)`` with n positions of which n_e picked e.
  Beside them MoESD's uniform-routing ``N(t) = E (1 - ((E-K)/E)^t)``.
* **Expert-cache hit rate** versus per-layer capacity c for LRU, LFU and Belady's MIN (see
  :func:`hit_rates` for the exact replay rules, shared with the simulator's engine).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy.special import gammaln

from .model import ModelSpec, expected_active_experts
from .validation import ConfigError

POLICIES = ("lru", "lfu", "min")
#: index meaning "never accessed again" in Belady's MIN
_NEVER = 1 << 62
#: element budget of one vectorised block (keeps memory bounded on large traces)
_BLOCK = 1 << 21
#: shifts used for the affinity independence baseline
AFFINITY_SHIFTS = 16

AFFINITY_DEFINITION = (
    "A_m = sum_e c(e, f*(e)) / (tokens * K) for consecutive MoE layers (m, m+1), c(e, f) = tokens "
    "choosing e at m and f at m+1, f*(e) = e's most frequent successor in the trace: P(a token that "
    "chose e at m also chose f*(e) at m+1). Baseline = same statistic with layer m+1 taken from the "
    "token d positions later (circular, d never pairing positions of one request), mean over up to "
    f"{AFFINITY_SHIFTS} shifts: independence with loads, temporal structure and sample size kept.")


# ---------------------------------------------------------------------------------------------
# Input


@dataclass(frozen=True)
class Routed:
    """A minimal request: ``experts`` ``[T, M, K]`` and ``prompt_len`` (anything with these works)."""

    experts: np.ndarray
    prompt_len: int


@dataclass
class _Flat:
    """All requests back to back: ``X[n, M, K]`` and per-request bounds."""

    X: np.ndarray            # int64 [n, M, K]
    starts: np.ndarray       # int64 [R]
    lengths: np.ndarray      # int64 [R]
    prompt_lens: np.ndarray  # int64 [R]
    num_experts: int

    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def M(self) -> int:
        return self.X.shape[1]

    @property
    def K(self) -> int:
        return self.X.shape[2]

    def request(self, i: int) -> np.ndarray:
        s = self.starts[i]
        return self.X[s:s + self.lengths[i]]


def _flatten(requests, num_experts: int) -> _Flat:
    if isinstance(requests, _Flat):
        return requests
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)) or num_experts < 1:
        raise ConfigError(f"num_experts={num_experts!r} is invalid; must be an integer >= 1")
    requests = list(requests)
    if not requests:
        raise ConfigError("the trace has no requests; statistics need at least one")
    arrays, prompts = [], []
    shape = None
    for i, req in enumerate(requests):
        ex = np.asarray(req.experts)
        if ex.ndim != 3 or ex.shape[0] < 1 or ex.shape[1] < 1 or ex.shape[2] < 1:
            raise ConfigError(f"request {i}: experts has shape {list(ex.shape)}; expected "
                              f"[tokens >= 1, moe_layers, top_k]")
        if shape is None:
            shape = ex.shape[1:]
        elif ex.shape[1:] != shape:
            raise ConfigError(f"request {i}: experts has shape {list(ex.shape)}; the first request "
                              f"has [tokens, {shape[0]}, {shape[1]}] (every request needs the same "
                              f"layers and top_k)")
        p = int(req.prompt_len)
        if not 1 <= p <= ex.shape[0]:
            raise ConfigError(f"request {i}: prompt_len={p} is invalid; must be in [1, {ex.shape[0]}] "
                              f"(its token positions)")
        arrays.append(ex)
        prompts.append(p)
    X = np.concatenate(arrays).astype(np.int64, copy=False)
    if X.min() < 0 or X.max() >= num_experts:
        raise ConfigError(f"expert ids must be in [0, num_experts={num_experts}); found "
                          f"{int(X.min())}..{int(X.max())}")
    if shape[1] > num_experts:
        raise ConfigError(f"top_k={shape[1]} exceeds num_experts={num_experts}")
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return _Flat(X, starts, lengths, np.asarray(prompts, dtype=np.int64), int(num_experts))


def flatten(requests, num_experts: int) -> _Flat:
    """Check and concatenate ``requests`` once (pass the result to several statistics)."""
    return _flatten(requests, num_experts)


def _token_request_index(flat: _Flat) -> np.ndarray:
    return np.repeat(np.arange(len(flat.lengths)), flat.lengths)


# ---------------------------------------------------------------------------------------------
# Popularity, reuse, affinity


@dataclass
class Popularity:
    """``per_layer[m]`` = max load / mean load of MoE layer m; ``loads[m, e]``."""

    per_layer: np.ndarray
    loads: np.ndarray
    median: float
    min: float
    max: float


def expert_loads(requests, num_experts: int) -> np.ndarray:
    """``[M, E]`` number of token positions that picked expert e at MoE layer m."""
    f = _flatten(requests, num_experts)
    E = f.num_experts
    idx = (np.arange(f.M)[None, :, None] * E + f.X).ravel()
    return np.bincount(idx, minlength=f.M * E).reshape(f.M, E)


def popularity(requests, num_experts: int) -> Popularity:
    """Per-layer popularity skew: busiest expert's load over the mean load."""
    f = _flatten(requests, num_experts)
    loads = expert_loads(f, num_experts)
    mean = f.n * f.K / f.num_experts
    per = loads.max(axis=1) / mean
    return Popularity(per, loads, float(np.median(per)), float(per.min()), float(per.max()))


@dataclass
class Reuse:
    """``per_layer[m]`` = P(an expert of token t was used by token t-1, same layer and request)."""

    per_layer: np.ndarray
    overall: float
    chance: float   # K / E
    pairs: int      # consecutive position pairs (per layer)

    @property
    def lift(self) -> float:
        return self.overall / self.chance if self.chance else float("nan")


def reuse(requests, num_experts: int) -> Reuse:
    """Temporal reuse per layer and pooled; NaN when no request has two positions."""
    f = _flatten(requests, num_experts)
    n, M, K = f.X.shape
    valid = np.ones(max(n - 1, 0), dtype=bool)
    ends = (f.starts + f.lengths - 1)[:-1]  # last position of every request but the last
    valid[ends] = False
    overlap = np.zeros(M, dtype=np.int64)
    step = max(1, _BLOCK // (M * K * K))
    for a in range(0, n - 1, step):
        b = min(n - 1, a + step)
        cur, prev = f.X[a + 1:b + 1], f.X[a:b]
        same = (cur[:, :, :, None] == prev[:, :, None, :]).sum(axis=(2, 3))  # [b-a, M]
        overlap += same[valid[a:b]].sum(axis=0)
    pairs = int(valid.sum())
    chance = K / f.num_experts
    if pairs == 0:
        per = np.full(M, np.nan)
        return Reuse(per, float("nan"), chance, 0)
    per = overlap / (pairs * K)
    return Reuse(per, float(overlap.sum() / (pairs * K * M)), chance, pairs)


def _top_successor_counts(X: np.ndarray, Y: np.ndarray, E: int) -> np.ndarray:
    """Per layer pair m: sum_e max_f c(e, f), with e from ``X[:, m]`` and f from ``Y[:, m]``."""
    n, P, K = X.shape
    out = np.zeros(P, dtype=np.int64)
    per_pair = n * K * K + E * E
    step = max(1, _BLOCK // per_pair)
    for a in range(0, P, step):
        b = min(P, a + step)
        idx = ((np.arange(b - a)[None, :, None, None] * E + X[:, a:b, :, None]) * E
               + Y[:, a:b, None, :])
        c = np.bincount(idx.ravel(), minlength=(b - a) * E * E).reshape(b - a, E, E)
        out[a:b] = c.max(axis=2).sum(axis=1)
    return out


def affinity_shifts(lengths: Sequence[int], count: int = AFFINITY_SHIFTS) -> np.ndarray:
    """Token shifts of the affinity baseline: up to ``count`` evenly spaced shifts d that never
    pair two positions of one request (d >= longest request and n - d >= longest request); if the
    trace is too short for that, shifts in the middle half of [1, n-1]. Empty when n < 2."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = int(lengths.sum())
    if n < 2:
        return np.zeros(0, dtype=np.int64)
    longest = int(lengths.max())
    lo, hi = longest, n - longest
    if lo > hi:
        lo, hi = max(1, n // 4), max(1, min(n - 1, (3 * n) // 4))
    k = min(count, hi - lo + 1)
    return np.unique(np.round(np.linspace(lo, hi, k)).astype(np.int64))


@dataclass
class Affinity:
    """Top-successor probability per layer pair (``per_pair[m]`` for layers m, m+1), pooled, and
    the independence baseline (see the module docstring)."""

    per_pair: np.ndarray
    baseline_per_pair: np.ndarray
    overall: float
    baseline: float
    shifts: np.ndarray
    definition: str = field(default=AFFINITY_DEFINITION, repr=False)

    @property
    def lift(self) -> float:
        return self.overall / self.baseline if self.baseline else float("nan")

    @property
    def excess(self) -> float:
        return self.overall - self.baseline


def affinity(requests, num_experts: int, shifts: Optional[Sequence[int]] = None) -> Affinity:
    """Cross-layer affinity (top-successor probability) with its independence baseline.

    NaN when the trace has a single MoE layer; the baseline is NaN when it has one position.
    ``shifts`` overrides the baseline's token shifts (default :func:`affinity_shifts`).
    """
    f = _flatten(requests, num_experts)
    n, M, K = f.X.shape
    E = f.num_experts
    if M < 2:
        nan = np.zeros(0)
        return Affinity(nan, nan, float("nan"), float("nan"), np.zeros(0, np.int64))
    X, Y = f.X[:, :-1], f.X[:, 1:]
    top = _top_successor_counts(X, Y, E)
    d = affinity_shifts(f.lengths) if shifts is None else np.asarray(shifts, dtype=np.int64)
    if d.size:
        base = np.zeros(M - 1)
        for s in d:
            base += _top_successor_counts(X, np.roll(Y, -int(s), axis=0), E)
        base /= d.size * n * K
        baseline = float(base.mean())
    else:
        base = np.full(M - 1, np.nan)
        baseline = float("nan")
    per = top / (n * K)
    return Affinity(per, base, float(top.sum() / (n * K * (M - 1))), baseline, d)


# ---------------------------------------------------------------------------------------------
# Distinct experts per batch


@dataclass
class Distinct:
    """Mean distinct experts per MoE layer for batches of ``tokens[i]`` token positions.

    ``consecutive[i]``: windows of consecutive positions inside a request (NaN if no request is that
    long), ``windows[i]`` of them; ``random[i]``: expectation for random position sets across the
    trace (NaN if t > positions); ``moesd[i]``: uniform-routing N(t).
    """

    tokens: np.ndarray
    consecutive: np.ndarray
    windows: np.ndarray
    random: np.ndarray
    moesd: np.ndarray


def _check_batch_tokens(batch_tokens) -> np.ndarray:
    t = np.asarray(list(batch_tokens))
    if t.size == 0 or t.dtype.kind not in "iu" or (t < 1).any():
        raise ConfigError(f"batch tokens={list(batch_tokens)!r} is invalid; expected integers >= 1")
    return t.astype(np.int64)


def distinct_experts(requests, num_experts: int, batch_tokens: Sequence[int]) -> Distinct:
    """Distinct experts per layer for batches of t tokens (see the module docstring)."""
    f = _flatten(requests, num_experts)
    ts = _check_batch_tokens(batch_tokens)
    n, M, K = f.X.shape
    E = f.num_experts

    # consecutive windows: every occurrence x of (request, layer, expert) with previous occurrence
    # x' (-1 if none) is the first occurrence inside window [s, s+t) for s in (max(x', x-t), x],
    # and the window exists if s <= T - t. Summing those counts gives the sum of distinct counts.
    req = _token_request_index(f)
    pos = np.arange(n) - f.starts[req]                               # request-local position
    key = ((req[:, None, None] * M + np.arange(M)[None, :, None]) * E + f.X).ravel()
    x = np.broadcast_to(pos[:, None, None], f.X.shape).ravel()
    T = np.broadcast_to(f.lengths[req][:, None, None], f.X.shape).ravel()
    order = np.argsort(key, kind="stable")                           # x ascending within a key
    ks, xs = key[order], x[order]
    prev = np.full(ks.size, -1, dtype=np.int64)
    same = ks[1:] == ks[:-1]
    prev[1:][same] = xs[:-1][same]
    x_prev = np.empty_like(prev)
    x_prev[order] = prev
    consecutive = np.full(ts.size, np.nan)
    windows = np.zeros(ts.size, dtype=np.int64)
    for i, t in enumerate(ts):
        w = int(np.clip(f.lengths - t + 1, 0, None).sum())
        windows[i] = w
        if w == 0:
            continue
        cnt = np.minimum(x, T - t) - np.maximum(x_prev, x - t)
        consecutive[i] = float(np.clip(cnt, 0, None).sum()) / (w * M)

    # random position sets: exact hypergeometric expectation per layer
    loads = expert_loads(f, num_experts).astype(np.float64)        # [M, E]
    random = np.full(ts.size, np.nan)
    for i, t in enumerate(ts):
        if t > n:
            continue
        rest = n - loads
        ok = rest >= t
        log_ratio = np.where(ok, gammaln(rest + 1) - gammaln(np.where(ok, rest - t, 0) + 1)
                             - gammaln(n + 1) + gammaln(n - t + 1), -np.inf)
        random[i] = float((1.0 - np.exp(log_ratio)).sum(axis=1).mean())
    moesd = np.array([expected_active_experts(int(t), E, K) for t in ts])
    return Distinct(ts, consecutive, windows, random, moesd)


# ---------------------------------------------------------------------------------------------
# Expert-cache hit rates


def passes_per_layer(requests, num_experts: int) -> list[list[list[int]]]:
    """``out[m][p]`` = ascending distinct experts of pass p at MoE layer m.

    Passes at batch 1, requests in order: a request's prefill (its ``prompt_len`` positions
    together), then each of its decode positions alone.
    """
    f = _flatten(requests, num_experts)
    M, E = f.M, f.num_experts
    out: list[list[list[int]]] = [[] for _ in range(M)]
    rows = np.arange(M)[:, None]
    for i in range(len(f.lengths)):
        ex = f.request(i)
        p = int(f.prompt_lens[i])
        hot = np.zeros((M, E), dtype=bool)
        hot[rows, ex[:p].transpose(1, 0, 2).reshape(M, -1)] = True
        for m in range(M):
            out[m].append(np.flatnonzero(hot[m]).tolist())
        if ex.shape[0] > p:
            dec = np.sort(ex[p:], axis=2).transpose(1, 0, 2).tolist()  # [M][T-p][K]
            for m in range(M):
                out[m].extend(dec[m])
    return out


def _lru(passes: list[list[int]], cap: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for S in passes:
        missing = []
        for e in S:
            if e in cache:
                cache.move_to_end(e)
            else:
                missing.append(e)
        h = len(S) - len(missing)
        hits += h
        pinned = h  # residents that belong to S (they sit at the most-recent end)
        for e in missing:
            if len(cache) < cap:
                cache[e] = None
                pinned += 1
            elif len(cache) > pinned:
                cache.popitem(last=False)
                cache[e] = None
                pinned += 1
            else:
                break  # every resident is needed by this pass: the rest stream through staging
    return hits


def _lfu(passes: list[list[int]], cap: int, num_experts: int) -> int:
    freq = [0] * num_experts
    stamp = [0] * num_experts
    resident = [False] * num_experts
    size = 0
    clock = 0
    heap: list[tuple[int, int, int]] = []
    hits = 0
    for S in passes:
        missing = []
        for e in S:
            freq[e] += 1
            if resident[e]:
                clock += 1
                stamp[e] = clock
                hits += 1
            else:
                missing.append(e)
        for e in missing:
            if size < cap:
                resident[e] = True
                size += 1
            else:
                # victim: lowest (frequency, recency) among residents not in S. Entries of S
                # members are stale here (their frequency and stamp changed at this step), and
                # members inserted at this step have no entry until the step ends.
                while heap:
                    fq, st, v = heap[0]
                    if resident[v] and stamp[v] == st and freq[v] == fq:
                        break
                    heapq.heappop(heap)
                if not heap:
                    break  # no evictable resident: this and the remaining misses are not cached
                v = heapq.heappop(heap)[2]
                resident[v] = False
                resident[e] = True
            clock += 1
            stamp[e] = clock
        for e in S:
            if resident[e]:
                heapq.heappush(heap, (freq[e], stamp[e], e))
    return hits


def _next_uses(passes: list[list[int]]) -> list[list[int]]:
    """``nxt[p][i]`` = next pass index after p that accesses ``passes[p][i]`` (_NEVER if none)."""
    last: dict[int, int] = {}
    nxt: list[list[int]] = [[]] * len(passes)
    for p in range(len(passes) - 1, -1, -1):
        S = passes[p]
        nxt[p] = [last.get(e, _NEVER) for e in S]
        for e in S:
            last[e] = p
    return nxt


def _belady(passes: list[list[int]], cap: int, nxt: list[list[int]]) -> int:
    stored: dict[int, int] = {}  # resident -> its next access (pass index)
    heap: list[tuple[int, int]] = []  # (-next access, expert): farthest first, ties lowest id
    hits = 0
    for p, S in enumerate(passes):
        N = nxt[p]
        missing = []
        for e, ne in zip(S, N):
            if e in stored:  # stored[e] == p: it was due now
                hits += 1
            else:
                missing.append((e, ne))
        for e, ne in missing:
            if len(stored) < cap:
                stored[e] = p  # in S: not evictable during this step (no heap entry yet)
                continue
            while heap:
                neg, v = heap[0]
                if stored.get(v) == -neg:
                    break
                heapq.heappop(heap)
            # a valid top with next == p is a member of S: nothing is evictable
            if not heap or -heap[0][0] == p:
                break
            if ne > -heap[0][0]:
                continue  # bypass: the incoming expert is needed later than the victim
            v = heapq.heappop(heap)[1]
            del stored[v]
            stored[e] = p
        for e, ne in zip(S, N):
            if e in stored:
                stored[e] = ne
                heapq.heappush(heap, (-ne, e))
    return hits


@dataclass
class HitRates:
    """``hits[policy][i, m]``: hits at capacity ``capacities[i]`` on MoE layer m.

    ``accesses[m]`` and ``cold[m]`` (distinct experts ever used at layer m = misses at c = E) do
    not depend on the policy. ``passes``: forward passes replayed (per layer).
    """

    capacities: np.ndarray
    hits: dict[str, np.ndarray]
    accesses: np.ndarray
    cold: np.ndarray
    passes: int

    def hit_rate(self, policy: str) -> np.ndarray:
        """Overall hit rate per capacity (total hits / total accesses)."""
        return self.hits[policy].sum(axis=1) / self.accesses.sum()


def _check_capacities(capacities, num_experts: int) -> np.ndarray:
    c = np.asarray(list(capacities))
    if c.size == 0 or c.dtype.kind not in "iu" or (c < 1).any() or (c > num_experts).any():
        raise ConfigError(f"capacities={list(capacities)!r} is invalid; expected integers in "
                          f"[1, num_experts={num_experts}]")
    return c.astype(np.int64)


def hit_rates(requests, num_experts: int, capacities: Optional[Sequence[int]] = None,
              policies: Sequence[str] = POLICIES) -> HitRates:
    """Expert-cache hits versus per-layer capacity for LRU, LFU and Belady's MIN.

    Replay (the simulator's engine implements the same rules): batch 1, requests in order, the
    cache kept across requests and initially EMPTY, one cache of c slots per MoE layer
    (independent layers). A *pass* is one request's prefill (all its prompt positions together)
    or one decode position. For each pass and MoE layer, S = the pass's distinct experts at that
    layer (ascending ids); each element of S is an access, a hit if resident at the start of the
    layer's step. Then the resident members of S are touched (most recent, ascending id order),
    then each missing expert of S in ascending id order is inserted into a free slot, or else
    replaces a victim the policy picks among residents NOT in S; with no such resident it is not
    cached (streamed through a staging buffer; still a miss). An inserted expert is most recent.

    * ``lru``: victim = least recently used.
    * ``lfu``: victim = lowest frequency (passes that accessed (layer, expert) so far, the current
      one included, counted for every member of S before victims are chosen; kept across
      evictions), ties -> least recently used.
    * ``min``: Belady with bypass: victim = the resident not in S whose next access (next pass
      index at which this layer needs it; never = infinity) is farthest, ties -> lowest id; if the
      incoming expert's own next access is strictly later than the victim's, it is not cached.

    ``capacities`` default: every c in 1..E.
    """
    f = _flatten(requests, num_experts)
    E = f.num_experts
    caps = _check_capacities(range(1, E + 1) if capacities is None else capacities, E)
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise ConfigError(f"policy={bad[0]!r} is not known; choose from {', '.join(POLICIES)}")
    per_layer = passes_per_layer(f, E)
    M = f.M
    accesses = np.array([sum(len(S) for S in layer) for layer in per_layer], dtype=np.int64)
    cold = np.array([len({e for S in layer for e in S}) for layer in per_layer], dtype=np.int64)
    hits = {p: np.zeros((caps.size, M), dtype=np.int64) for p in policies}
    for m, layer in enumerate(per_layer):
        nxt = _next_uses(layer) if "min" in policies else None
        for i, c in enumerate(caps):
            c = int(c)
            if c >= cold[m]:  # never full: only the cold misses, whatever the policy
                for p in policies:
                    hits[p][i, m] = accesses[m] - cold[m]
                continue
            for p in policies:
                if p == "lru":
                    hits[p][i, m] = _lru(layer, c)
                elif p == "lfu":
                    hits[p][i, m] = _lfu(layer, c, E)
                else:
                    hits[p][i, m] = _belady(layer, c, nxt)
    return HitRates(caps, hits, accesses, cold, len(per_layer[0]) if per_layer else 0)


# ---------------------------------------------------------------------------------------------
# Everything at once


def default_batch_tokens(max_tokens: int) -> list[int]:
    """1, 2, 4, ... up to ``max_tokens`` (at least [1])."""
    out, t = [], 1
    while t <= max(1, max_tokens):
        out.append(t)
        t *= 2
    return out


def default_capacities(num_experts: int, top_k: int, accesses: int) -> list[int]:
    """Every c in 1..E when the replay is cheap (accesses x E <= 5e6: a few seconds for three
    policies), else a geometric grid (powers of two and 1.5x them, K, and E)."""
    if accesses * num_experts <= 5e6:
        return list(range(1, num_experts + 1))
    grid = set(default_batch_tokens(num_experts)) | {top_k, num_experts}
    grid |= {c * 3 // 2 for c in list(grid) if c >= 2 and c * 3 // 2 <= num_experts}
    return sorted(grid)


def _f(v) -> Optional[float]:
    v = float(v)
    return None if math.isnan(v) else v


def trace_statistics(requests, num_experts: int, *, capacities: Optional[Sequence[int]] = None,
                     batch_tokens: Optional[Sequence[int]] = None,
                     policies: Sequence[str] = POLICIES, meta: Optional[dict] = None) -> dict:
    """All statistics as plain JSON-ready containers (lists of flat records per table).

    Keys: ``trace`` (sizes and ``meta``), ``popularity`` (``per_layer`` records, ``median``, ``min``,
    ``max``), ``reuse``, ``affinity`` (with its ``definition``), ``distinct`` (records), ``hit_rate``
    (records: policy, capacity, hits, accesses, hit_rate, hits_per_layer) and ``cache``
    (accesses, cold misses and passes per layer). ``pd.DataFrame(stats["hit_rate"])`` etc.
    """
    f = _flatten(requests, num_experts)
    E, K, M = f.num_experts, f.K, f.M
    layers = list((meta or {}).get("moe_layers") or range(M))
    if len(layers) != M:
        layers = list(range(M))
    pop = popularity(f, E)
    reu = reuse(f, E)
    aff = affinity(f, E)
    if batch_tokens is None:
        batch_tokens = default_batch_tokens(min(f.n, 4096))
    dis = distinct_experts(f, E, batch_tokens)
    total_acc = None
    if capacities is None:
        passes = int(f.lengths.sum() - f.prompt_lens.sum() + len(f.lengths))
        total_acc = passes * M * K  # an upper bound is enough to choose the grid
        capacities = default_capacities(E, K, total_acc)
    hr = hit_rates(f, E, capacities, policies)

    decode = int((f.lengths - f.prompt_lens).sum())
    out = {
        "trace": {**(meta or {}), "num_experts": E, "top_k": K, "num_moe_layers": M,
                  "requests": int(len(f.lengths)), "tokens": int(f.n),
                  "prefill_tokens": int(f.n - decode), "decode_tokens": decode,
                  "passes": int(hr.passes)},
        "popularity": {
            "median": pop.median, "min": pop.min, "max": pop.max,
            "per_layer": [{"layer": int(layers[m]), "max_over_mean": float(pop.per_layer[m]),
                           "max_load": int(pop.loads[m].max()), "mean_load": f.n * K / E,
                           "busiest_expert": int(pop.loads[m].argmax())} for m in range(M)],
        },
        "reuse": {
            "overall": _f(reu.overall), "chance": reu.chance, "lift": _f(reu.lift), "pairs": reu.pairs,
            "per_layer": [{"layer": int(layers[m]), "reuse": _f(reu.per_layer[m]), "chance": reu.chance}
                          for m in range(M)],
        },
        "affinity": {
            "definition": AFFINITY_DEFINITION, "overall": _f(aff.overall),
            "independent": _f(aff.baseline), "lift": _f(aff.lift), "excess": _f(aff.excess),
            "shifts": [int(s) for s in aff.shifts],
            "per_pair": [{"layer": int(layers[m]), "next_layer": int(layers[m + 1]),
                          "top_successor": _f(aff.per_pair[m]),
                          "independent": _f(aff.baseline_per_pair[m])} for m in range(M - 1)],
        },
        "distinct": [{"tokens": int(t), "consecutive": _f(dis.consecutive[i]),
                      "windows": int(dis.windows[i]), "random": _f(dis.random[i]),
                      "moesd": float(dis.moesd[i])} for i, t in enumerate(dis.tokens)],
        "hit_rate": [{"policy": p, "capacity": int(c), "hits": int(hr.hits[p][i].sum()),
                      "accesses": int(hr.accesses.sum()),
                      "hit_rate": float(hr.hits[p][i].sum() / hr.accesses.sum()),
                      "hits_per_layer": [int(v) for v in hr.hits[p][i]]}
                     for p in policies for i, c in enumerate(hr.capacities)],
        "cache": {
            "passes": int(hr.passes), "accesses": int(hr.accesses.sum()),
            "mean_active_experts": float(hr.accesses.sum() / (hr.passes * M)) if hr.passes else None,
            "per_layer": [{"layer": int(layers[m]), "accesses": int(hr.accesses[m]),
                           "cold_misses": int(hr.cold[m])} for m in range(M)],
        },
    }
    return out


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_report(stats: dict, max_rows: int = 24) -> str:
    """Human-readable tables of :func:`trace_statistics` output."""
    tr, pop, reu, aff = stats["trace"], stats["popularity"], stats["reuse"], stats["affinity"]
    E, K = tr["num_experts"], tr["top_k"]
    lines = []
    name = tr.get("model", "?")
    lines.append(f"trace: model {name}, E={E} experts, top-{K}, {tr['num_moe_layers']} MoE layers; "
                 f"{tr['requests']} requests, {tr['tokens']} token positions "
                 f"({tr['prefill_tokens']} prefill, {tr['decode_tokens']} decode), {tr['passes']} passes "
                 f"at batch 1")
    lines.append("")
    lines.append(f"popularity skew (max load / mean load per layer): median {pop['median']:.3f}, "
                 f"min {pop['min']:.3f}, max {pop['max']:.3f}")
    lines.append(f"reuse P(expert of token t used by t-1): {_fmt(reu['overall'])} "
                 f"(chance K/E = {reu['chance']:.3f}, lift {_fmt(reu['lift'], '.2f')}, "
                 f"{reu['pairs']} position pairs)")
    lines.append(f"cross-layer affinity (top-successor probability): {_fmt(aff['overall'])} vs "
                 f"{_fmt(aff['independent'])} under independence (lift {_fmt(aff['lift'], '.2f')}, "
                 f"excess {_fmt(aff['excess'], '+.3f')})")
    lines.append("")
    lines.append(f"{'layer':>5} {'max/mean':>9} {'reuse':>7} {'top-succ':>9} {'indep':>7}")
    pairs = {r["layer"]: r for r in aff["per_pair"]}
    for p, r in zip(pop["per_layer"], reu["per_layer"]):
        a = pairs.get(p["layer"], {})
        lines.append(f"{p['layer']:>5} {p['max_over_mean']:>9.3f} {_fmt(r['reuse']):>7} "
                     f"{_fmt(a.get('top_successor')):>9} {_fmt(a.get('independent')):>7}")
    lines.append("")
    lines.append("distinct experts per layer for a batch of t tokens (consecutive: windows inside a "
                 "request; random: token sets across requests; N(t): MoESD uniform routing)")
    lines.append(f"{'t':>6} {'consecutive':>12} {'random':>9} {'N(t)':>9} {'windows':>8}")
    for r in stats["distinct"]:
        lines.append(f"{r['tokens']:>6} {_fmt(r['consecutive'], '.2f'):>12} {_fmt(r['random'], '.2f'):>9} "
                     f"{r['moesd']:>9.2f} {r['windows']:>8}")
    lines.append("")
    cache = stats["cache"]
    lines.append(f"expert-cache hit rate vs per-layer capacity c (batch 1, cache empty at start, "
                 f"{cache['accesses']} accesses, {_fmt(cache['mean_active_experts'], '.2f')} "
                 f"experts per pass per layer)")
    table: dict[int, dict[str, float]] = {}
    for r in stats["hit_rate"]:
        table.setdefault(r["capacity"], {})[r["policy"]] = r["hit_rate"]
    caps = sorted(table)
    if len(caps) > max_rows:
        keep = set(default_batch_tokens(E)) | {K, E, caps[0], caps[-1]}
        caps = [c for c in caps if c in keep]
        lines.append("(selected capacities; --json has every one)")
    pols = [p for p in POLICIES if any(p in v for v in table.values())]
    lines.append(f"{'c':>5} " + " ".join(f"{p.upper():>7}" for p in pols))
    for c in caps:
        lines.append(f"{c:>5} " + " ".join(f"{table[c].get(p, float('nan')):>7.3f}" for p in pols))
    return "\n".join(lines)


def model_for_trace(name: str, num_experts: int, top_k: int, num_layers: int,
                    moe_layers: Sequence[int]) -> ModelSpec:
    """A ModelSpec with the routing shapes of a trace (other sizes are placeholders: enough for
    loading, replaying and generating routing, not for timing)."""
    moe = sorted(int(v) for v in moe_layers)
    dense = tuple(i for i in range(num_layers) if i not in set(moe))
    model = ModelSpec(name=name, hidden_size=1, num_layers=int(num_layers),
                      num_experts=int(num_experts), top_k=int(top_k), expert_intermediate_size=1,
                      num_attention_heads=1, num_kv_heads=1, head_dim=1, vocab_size=1,
                      dense_layers=dense, dense_intermediate_size=1 if dense else 0)
    model.validate()
    if tuple(model.moe_layers) != tuple(moe):
        raise ConfigError(f"moe_layers={moe} is invalid for num_layers={num_layers}")
    return model
