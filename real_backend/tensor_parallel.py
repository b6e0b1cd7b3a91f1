"""Tensor parallelism for the real executor: the model split across ``p`` processes, Megatron style,
with ``torch.distributed`` collectives between them (gloo on CPU, NCCL on CUDA).

The split is ``ModelSpec.tensor_shard(p)``'s (the simulator's ``hw.parallel.TensorParallelCost``
times the same thing): rank ``r`` holds query heads ``[r nh/p, (r+1) nh/p)`` with their K/V heads
(KV heads split when there are at least ``p``, else the one its query heads use, replicated), the
matching columns of the output projection, intermediate units ``[r I_s, (r+1) I_s)`` of every
routed expert, of the fused shared experts and of the dense FFNs (``I_s = ceil(I/p)``; a last shard
that runs past ``I`` is zero-padded, which adds nothing to a SwiGLU), and vocabulary rows
``[r V_s, (r+1) V_s)`` of the embedding and the LM head (zero-padded the same way); the router and
the norms are replicated. ``shard_model`` cuts a shard out of the full model's weights, so the
ranks together compute the full model's function (``tests/test_tensor_parallel.py`` checks the
logits against the unsplit model's).

Collectives per pass, as vLLM issues them (``hw.parallel``'s module docstring): an all-reduce of
the hidden states after the vocab-parallel embedding, after each attention block's output
projection (inside the ``attention`` op, where the simulator books it: ``attention_block_s``), and
after each layer's FFN (inside ``combine`` for an MoE layer, the simulator's ``combine_s``;
inside ``dense_ffn`` for a dense layer); an all-gather of the logits after the LM head (inside
``lm_head``). So the executor's measured op times include the communication, as the simulated
ones do.

Processes. Rank 0 is the executor's own process: it runs the serving loop, the scheduler, the
cache controller, the policy and the offload runtime, and it records. Ranks ``1..p-1`` are worker
processes (``start_group``) that follow it: before every forward pass of the target model rank 0
broadcasts the pass (which KV cache, each sequence's slot, cached length and new tokens, the token
ids and the forced routing), and every rank runs the same forward pass on its shard. A worker's
cached lengths are set from rank 0's before each pass, so rank 0's admissions, releases and
speculative roll-backs need no messages of their own.

Experts on the workers. Rank 0 carries out the offload protocol for its slice of every expert
(copy orders, waits, stalls: what the simulator models per GPU, every GPU copying its own slice
over its own link at the same time). Workers keep their slices of all experts resident and run
the experts in routing order: they take part in every collective, so a pass ends when the slowest
rank is done, but their experts never wait on a copy. On CPU the ranks share one host's cores and
memory bus anyway (on CUDA, rank ``r`` runs on ``cuda:r``; written, not run on a GPU here).

The workers are started with ``multiprocessing``'s ``spawn`` (a fresh interpreter each, safe with
threads and CUDA), so a script that runs a tensor-parallel scenario needs the usual
``if __name__ == "__main__":`` guard around its entry point (``benchmarks/tensor_parallel.py``).

Not supported with ``p > 1`` (one-line ``ConfigError``s in ``check_tensor_parallel`` and the
executor): free-running routing (each rank's router would decide on its own), a model or weights
handed in (every rank rebuilds its shard from the seed, so checkpoints are not run), more ranks
than the device type can give (CUDA: GPUs; rank 0 on ``cuda:0``). A worker that fails before
joining the group is reported by rank 0 (``RuntimeError``; the worker's traceback is on stderr);
one that dies mid-pass ends rank 0's next collective with an error on gloo (NCCL may wait out
``COLLECTIVE_TIMEOUT``). The announcement of a pass (two broadcasts, ~1 ms on gloo here) is
outside the op timers, in the pass's overhead. The draft model of speculative decoding runs unsplit
on rank 0, as vLLM's ``speculative_draft_tensor_parallel_size=1`` and the simulator.
"""

from __future__ import annotations

import datetime
import os
import queue
import tempfile
import traceback
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from workloads.validation import ConfigError

from . import ops
from .model import ExpertWeights, MoEModel

# Commands rank 0 broadcasts to the workers (first element of a fixed-size int64 header).
_STOP, _NEW_CACHE, _FORWARD = 0, 1, 2
_HEADER = 7
#: How long a rank waits in one collective before giving up (a worker waits for rank 0's next pass
#: through every idle gap of the serving loop, so this is long).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def check_tensor_parallel(p: int, device: torch.device, free_running: bool) -> None:
    """One-line ``ConfigError`` unless the real executor can run ``p``-way tensor parallelism."""
    if p == 1:
        return
    if free_running:
        raise ConfigError(f"hw.tensor_parallel={p} cannot run free-running (each rank's router would route on its "
                          f"own); replay forced routing or use hw.tensor_parallel=1")
    if device.type == "cuda":
        if device.index not in (None, 0):
            raise ConfigError(f"hw.tensor_parallel={p} runs rank r on cuda:r, so rank 0 needs cuda:0, not {device}")
        if torch.cuda.device_count() < p:
            raise ConfigError(f"hw.tensor_parallel={p} needs {p} CUDA devices; this machine has "
                              f"{torch.cuda.device_count()}")
    if not dist.is_available():
        raise ConfigError(f"hw.tensor_parallel={p} needs torch.distributed, which this PyTorch build lacks")
    if dist.is_initialized():
        raise ConfigError(f"hw.tensor_parallel={p}: a torch.distributed process group already exists in this "
                          f"process; the real executor starts its own")


# --------------------------------------------------------------------------------------------- shards


def _rows(t: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """Rows ``[start, start + size)`` of ``t``, zero rows past its end (a contiguous copy)."""
    out = t.new_zeros((size,) + tuple(t.shape[1:]))
    n = max(0, min(size, t.shape[0] - start))
    if n:
        out[:n] = t[start:start + n]
    return out


def _ffn_shard(f: ExpertWeights, rank: int, size: int) -> ExpertWeights:
    """Intermediate units ``[rank size, (rank+1) size)`` of a SwiGLU FFN (gate rows, then up rows)."""
    gate, up = f.gate_up.chunk(2, dim=0)
    start = rank * size
    gate_up = torch.cat([_rows(gate, start, size), _rows(up, start, size)])
    down = _rows(f.down.t(), start, size).t().contiguous()
    return ExpertWeights(gate_up, down)


@dataclass(frozen=True)
class ShardPlan:
    """Which slice of each split dimension rank ``rank`` of ``p`` holds (module docstring)."""

    rank: int
    p: int
    q_heads: tuple[int, int]       # [first, last) query head
    kv_heads: tuple[int, int]      # [first, last) KV head
    vocab_start: int
    vocab_size: int                # rows of the shard (V_s)

    @classmethod
    def of(cls, full: MoEModel, shard_spec, rank: int, p: int) -> "ShardPlan":
        g, gs = full.geometry, ops.AttnGeometry.from_spec(shard_spec)
        q0 = rank * gs.num_heads
        kv0 = q0 // g.group if gs.kv_heads == 1 and g.kv_heads < p else rank * gs.kv_heads
        return cls(rank, p, (q0, q0 + gs.num_heads), (kv0, kv0 + gs.kv_heads),
                   rank * shard_spec.vocab_size, shard_spec.vocab_size)


def shard_model(full: MoEModel, rank: int, p: int, experts: Optional[Iterable[tuple]] = None,
                expert_device: Optional[torch.device] = None) -> MoEModel:
    """Rank ``rank``'s shard of ``full`` (weights cut from it; see the module docstring), with its
    slice of every expert in ``experts`` (``((layer, e), ExpertWeights)`` pairs, taken one at a
    time; default ``full.experts.items()``), the slices moved to ``expert_device`` (default: where
    they are). The shard's ``tp`` is None until the caller sets a ``TPComm``."""
    spec = full.spec.tensor_shard(p)
    shard = MoEModel(spec, full.device, full.dtype, seed=full.seed, init_std=0.0, experts=False,
                     expert_device=full.expert_device, rms_norm_eps=full.eps)
    shard.rope = full.rope
    plan = ShardPlan.of(full, spec, rank, p)
    g, d = full.geometry, full.geometry.head_dim
    for layer, (lw, src) in enumerate(zip(shard.layers, full.layers)):
        q, k, v = src.attn.w_qkv.split((g.num_heads * d, g.kv_heads * d, g.kv_heads * d))
        (q0, q1), (k0, k1) = plan.q_heads, plan.kv_heads
        lw.attn.w_qkv = torch.cat([q[q0 * d:q1 * d], k[k0 * d:k1 * d], v[k0 * d:k1 * d]]).contiguous()
        lw.attn.w_o = src.attn.w_o[:, q0 * d:q1 * d].contiguous()
        lw.attn.attn_norm, lw.attn.ffn_norm = src.attn.attn_norm, src.attn.ffn_norm
        lw.router = src.router
        if src.shared is not None:
            lw.shared = _ffn_shard(src.shared, rank, spec.shared_intermediate_total)
        if src.dense is not None:
            lw.dense = _ffn_shard(src.dense, rank, spec.dense_intermediate_size)
    shard.final_norm = full.final_norm
    shard.embed_w = _rows(full.embed_w, plan.vocab_start, plan.vocab_size)
    shard.lm_head_w = (shard.embed_w if full.lm_head_w is full.embed_w
                       else _rows(full.lm_head_w, plan.vocab_start, plan.vocab_size))
    size = spec.expert_intermediate_size
    for key, w in (full.experts.items() if experts is None else experts):
        w = _ffn_shard(w, rank, size)
        if expert_device is not None and torch.device(expert_device) != w.gate_up.device:
            w = ExpertWeights(w.gate_up.to(expert_device), w.down.to(expert_device))
        shard.experts[key] = w
    shard.tp_plan = plan
    return shard


class TPComm:
    """The collectives of one rank's forward pass (what ``MoEModel.forward`` calls when ``model.tp``
    is set): sum partial hidden states, gather the vocabulary-split logits."""

    def __init__(self, plan: ShardPlan, full_vocab: int):
        self.plan = plan
        self.full_vocab = full_vocab

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    def embed(self, token_ids: torch.Tensor, w_embed: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel embedding: this rank's rows, zeros for the others' tokens, summed."""
        local = token_ids - self.plan.vocab_start
        mine = (local >= 0) & (local < self.plan.vocab_size)
        x = F.embedding(local.clamp(0, self.plan.vocab_size - 1), w_embed)
        x = x * mine.unsqueeze(-1).to(x.dtype)
        return self.all_reduce(x)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``[T, V_s]`` per rank -> ``[T, V]`` (rank order, padding dropped)."""
        parts = [torch.empty_like(logits) for _ in range(self.plan.p)]
        dist.all_gather(parts, logits.contiguous())
        return torch.cat(parts, dim=-1)[:, :self.full_vocab]


# --------------------------------------------------------------------------------------------- group


def _init(rank: int, p: int, init_file: str, device_type: str) -> None:
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=p,
                            timeout=COLLECTIVE_TIMEOUT)


def _device(device_type: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def _rank_model(scenario, rank: int, p: int, device: torch.device, dtype,
                expert_device: Optional[torch.device] = None) -> MoEModel:
    """Rank ``rank``'s shard of the scenario's model (random weights from its seed), its slice of
    every expert included. The full experts are built on the host and cut there, one at a time, so
    a rank never holds more than one full expert; the slices then move to ``expert_device``
    (default: stay on the host)."""
    full = MoEModel(scenario.model, device, dtype, seed=scenario.seed, expert_device="cpu", experts=False)
    built = (((layer, e), full.random_expert(layer, e)) for layer in full.moe_layers
             for e in range(full.spec.num_experts))
    shard = shard_model(full, rank, p, experts=built, expert_device=expert_device)
    shard.tp = TPComm(shard.tp_plan, scenario.model.vocab_size)
    return shard


class TPGroup:
    """Rank 0's side of a tensor-parallel group: starts the workers, announces each pass to them.

    ``TPGroup.start(scenario, p, device, dtype, threads)`` spawns ranks ``1..p-1`` and joins the
    process group; ``model`` is rank 0's shard (experts included: the executor moves them into its
    host store). ``new_cache``/``forward`` are ``MoEModel``'s, announced first. ``close()`` stops
    the workers and leaves the group (also on errors)."""

    def __init__(self, p: int, procs: list, init_dir: tempfile.TemporaryDirectory, model: MoEModel):
        self.p, self._procs, self._dir, self.model = p, procs, init_dir, model
        self._caches: dict[int, int] = {}     # id(KVCache) -> cache id known to the workers
        self._dev = model.device

    @classmethod
    def start(cls, scenario, p: int, device: torch.device, dtype: Optional[torch.dtype],
              threads: Optional[int]) -> "TPGroup":
        init_dir = tempfile.TemporaryDirectory(prefix="moesim-tp-")
        init_file = os.path.join(init_dir.name, "rendezvous")
        ctx = mp.get_context("spawn")
        ready = ctx.Queue()
        procs: list = []
        try:
            for r in range(1, p):
                proc = ctx.Process(target=_worker, args=(r, p, init_file, scenario, device.type, dtype, threads, ready),
                                   daemon=True, name=f"moesim-tp-rank{r}")
                proc.start()
                procs.append(proc)
            model = _rank_model(scenario, 0, p, device, dtype)
            _wait_ready(procs, ready)
            _init(0, p, init_file, device.type)
        except BaseException:
            if dist.is_initialized():
                dist.destroy_process_group()
            _stop(procs, kill=True)
            init_dir.cleanup()
            raise
        return cls(p, procs, init_dir, model)

    def _send(self, cmd: int, *args: int) -> None:
        head = torch.zeros(_HEADER, dtype=torch.long, device=self._dev)
        head[0] = cmd
        head[1:1 + len(args)] = torch.tensor(args, dtype=torch.long)
        dist.broadcast(head, 0)

    def new_cache(self, max_seqs: int, capacity: int) -> ops.KVCache:
        cache = self.model.new_cache(max_seqs, capacity)
        cid = len(self._caches)
        self._caches[id(cache)] = cid
        self._send(_NEW_CACHE, cid, max_seqs, capacity)
        return cache

    def forward(self, tokens: Sequence, cache: ops.KVCache, slots: Sequence[int], *,
                routing: Mapping[int, Any], all_logits: bool = False, **hooks):
        """Announce the pass, then run rank 0's part of it (``MoEModel.forward``). ``routing``: forced
        expert ids ``[T, K]`` per MoE layer (no weights). The announcement (two broadcasts) is outside
        the op timers: it is part of the pass's overhead, which the simulator does not model."""
        seqs = [torch.as_tensor(t, dtype=torch.long).reshape(-1).cpu() for t in tokens]
        layers = self.model.moe_layers
        if any(isinstance(routing[layer], tuple) for layer in layers):
            raise ValueError("tensor-parallel forced routing takes expert ids only, not (ids, weights)")
        rows = np.stack([np.asarray(routing[layer]) for layer in layers], axis=1).astype(np.int64) if layers else None
        T = sum(int(s.numel()) for s in seqs)
        top_k = rows.shape[2] if rows is not None else 0
        meta = torch.tensor([int(s.numel()) for s in seqs] + list(slots) + [cache.lengths[s] for s in slots],
                            dtype=torch.long)
        parts = [meta, torch.cat(seqs) if seqs else meta[:0]]
        if rows is not None:
            parts.append(torch.from_numpy(rows.reshape(-1)))
        payload = torch.cat(parts)
        self._send(_FORWARD, self._caches[id(cache)], len(seqs), T, int(all_logits), top_k, int(payload.numel()))
        dist.broadcast(payload.to(self._dev), 0)
        return self.model.forward(tokens, cache, slots, routing=routing, all_logits=all_logits, **hooks)

    def close(self, failed: bool = False) -> None:
        """Stop the workers and leave the group. ``failed``: rank 0 stopped part-way (an error, an
        interrupt), perhaps inside a pass the workers are still in, so no stop message can reach
        them: they are killed instead."""
        try:
            if dist.is_initialized():
                try:
                    if not failed:
                        self._send(_STOP)
                finally:
                    if failed:
                        _stop(self._procs, kill=True)
                    dist.destroy_process_group()
        finally:
            _stop(self._procs, kill=False)
            self._dir.cleanup()


def _stop(procs: list, kill: bool) -> None:
    """Kill (``kill``) or wait for (at most 60 s, then kill) the worker processes, and reap them."""
    for proc in procs:
        if kill and proc.is_alive():
            proc.kill()
        proc.join(timeout=None if kill else 60)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _wait_ready(procs: list, ready, poll_s: float = 0.2) -> None:
    """Wait until every worker has built its shard (each puts its rank on ``ready``); a worker that
    exits first is an error here, instead of a rendezvous that would wait for it for good."""
    waiting = {int(proc.name.rsplit("rank", 1)[1]): proc for proc in procs}
    while waiting:
        try:
            waiting.pop(ready.get(timeout=poll_s), None)
        except queue.Empty:
            dead = [(r, proc.exitcode) for r, proc in waiting.items() if not proc.is_alive()]
            if dead:
                r, code = dead[0]
                raise RuntimeError(f"tensor-parallel rank {r} exited with status {code} before joining the group "
                                   f"(its traceback is on stderr)")


def _worker(rank: int, p: int, init_file: str, scenario, device_type: str, dtype, threads, ready) -> None:
    """Ranks 1..p-1: build the shard, say so, join the group, then run every pass rank 0 announces
    until told to stop."""
    try:
        if threads:
            torch.set_num_threads(threads)
        dev = _device(device_type, rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        model = _rank_model(scenario, rank, p, dev, dtype, expert_device=dev)   # experts resident
        ready.put(rank)
        _init(rank, p, init_file, device_type)
        _follow(model, dev)
    except Exception:   # the traceback is the worker's only way to say what went wrong
        traceback.print_exc()
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@torch.inference_mode()
def _follow(model: MoEModel, dev: torch.device) -> None:
    caches: dict[int, ops.KVCache] = {}
    M = model.spec.num_moe_layers
    while True:
        head = torch.zeros(_HEADER, dtype=torch.long, device=dev)
        dist.broadcast(head, 0)
        cmd, a, b, c, d, top_k, n = head.tolist()
        if cmd == _STOP:
            return
        if cmd == _NEW_CACHE:
            caches[a] = model.new_cache(b, c)
            continue
        cache, B, T, all_logits = caches[a], b, c, bool(d)
        payload = torch.empty(n, dtype=torch.long, device=dev)
        dist.broadcast(payload, 0)
        flat = payload.cpu()
        new, slots, starts = (flat[i * B:(i + 1) * B].tolist() for i in range(3))
        tokens = list(flat[3 * B:3 * B + T].split(new))
        rows = flat[3 * B + T:].view(T, M, top_k) if M else None
        for s, start in zip(slots, starts):
            cache.lengths[s] = start
        routing = {layer: rows[:, m, :] for m, layer in enumerate(model.moe_layers)} if M else None
        model.forward(tokens, cache, slots, routing=routing, all_logits=all_logits)
