"""The rollout actor: turns prompts into scored trajectory groups and puts them into the replay queue.

The driver dispatches work (``rollout(items)``) and weights (``set_weights``) as actor calls; Ray runs
an actor's calls one at a time, so weights change only between rollouts and every group is stamped with
the policy version that produced it.

The ``nccl`` transport is a collective: every member of the broadcast group must take part at once, busy
or not. Its ``receive_broadcast`` therefore runs in the actor's own ``weights`` concurrency group (a
second thread) and lands in a staging copy of the weights; ``rollout`` and ``evaluate`` swap the newest
staged version in before they start, so weights still change only between rollouts.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import zlib
from typing import Any

import torch

from common.config import ModelConfig, SamplerConfig, TaskConfig

log = logging.getLogger("unmask")


def completion_text(tokenizer, ids: list[int]) -> str:
    """Decode a completion up to its first EOS/EoT (LLaDA fills the tail with EOS)."""
    stops = {tokenizer.eos_id} | ({tokenizer.eot_id} if tokenizer.eot_id is not None else set())
    for i, t in enumerate(ids):
        if t in stops:
            ids = ids[:i]
            break
    return tokenizer.decode(ids)


def token_batches(prompt_lengths: list[int], gen_length: int, token_budget: int) -> list[slice]:
    """Consecutive rows cut into batches whose padded size, rows x (longest prompt + ``gen_length``), stays
    within ``token_budget`` (a row that alone exceeds it gets a batch of its own)."""
    batches, start, longest = [], 0, 0
    for i, length in enumerate(prompt_lengths):
        longest_with = max(longest, length)
        if i > start and (i - start + 1) * (longest_with + gen_length) > token_budget:
            batches.append(slice(start, i))
            start, longest_with = i, length
        longest = longest_with
    if prompt_lengths:
        batches.append(slice(start, len(prompt_lengths)))
    return batches


class Generator:
    """Policy + tokenizer + task on one device: prompts in, trajectories and rewards out."""

    def __init__(self, model_cfg: ModelConfig, sampler_cfg: SamplerConfig, task_cfg: TaskConfig,
                 device: str | None = None):
        from common.policy import load_policy
        from common.tasks import get_task

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = load_policy(model_cfg, device=self.device)
        self.model.eval().requires_grad_(False)
        self.sampler_cfg = sampler_cfg
        self.task = get_task(task_cfg)

    def encode_prompts(self, items) -> list[list[int]]:
        return [self.tokenizer.encode(self.task.prompt(item, self.tokenizer)) for item in items]

    @torch.no_grad()
    def generate(self, prompt_rows: list[list[int]], seed: int, sampler_cfg: SamplerConfig | None = None):
        from common.model import family_of
        from rollout.sampler import generate

        tok = self.tokenizer
        if family_of(self.model).canvases:  # uniform-noise canvases (DiffusionGemma)
            from rollout.uniform_sampler import generate_canvases

            return generate_canvases(self.model, prompt_rows, sampler_cfg or self.sampler_cfg, eos_id=tok.eos_id,
                                     pad_id=tok.pad_id, seed=seed)
        from rollout.sampler import pad_rows

        ids, mask = pad_rows(prompt_rows, tok.pad_id)
        return generate(self.model, ids.to(self.device), mask.to(self.device), sampler_cfg or self.sampler_cfg,
                        mask_id=tok.mask_id, eos_id=tok.eos_id, eot_id=tok.eot_id, pad_id=tok.pad_id, seed=seed)

    def score(self, traj, items_per_row) -> tuple[list[str], list[Any]]:
        texts = [completion_text(self.tokenizer, row.tolist()) for row in traj.completion_ids_BG.cpu()]
        return texts, [self.task.reward(text, item) for text, item in zip(texts, items_per_row)]

    def decode(self, prompt_rows: list[list[int]], sampler_cfg: SamplerConfig, token_budget: int,
               seed: int = 0) -> list[str]:
        """Completion texts of ``prompt_rows``, generated in batches of at most ``token_budget`` tokens (the
        batch starting at row i is seeded ``seed + i``, as ``unmask eval`` seeded its fixed-size batches)."""
        texts: list[str] = []
        for rows in token_batches([len(r) for r in prompt_rows], sampler_cfg.gen_length, token_budget):
            traj = self.generate(prompt_rows[rows], seed=seed + rows.start, sampler_cfg=sampler_cfg)
            texts += [completion_text(self.tokenizer, row.tolist()) for row in traj.completion_ids_BG.cpu()]
        return texts

    def evaluate(self, items: list, sampler_cfg: SamplerConfig, token_budget: int,
                 seed: int = 0) -> tuple[list[str], list[Any]]:
        """Held-out evaluation, the one both a run (rollout workers) and ``unmask eval`` use: completions and
        rewards of ``items``, decoded in token-budgeted batches."""
        texts = self.decode(self.encode_prompts(items), sampler_cfg, token_budget, seed)
        return texts, [self.task.reward(text, item) for text, item in zip(texts, items)]


class RolloutWorker:
    """Ray actor body (wrapped with ``ray.remote`` by the driver with per-worker resources)."""

    def __init__(self, worker_id: str, model_cfg: ModelConfig, sampler_cfg: SamplerConfig, task_cfg: TaskConfig,
                 group_size: int, queue_name: str, seed: int, max_prompt_tokens: int = 1 << 30,
                 eval_batch_tokens: int = 32768):
        import ray

        from common.metrics import RayMetrics
        from common.threads import set_cpu_threads

        set_cpu_threads()  # the CPUs Ray assigned this actor
        self.worker_id = worker_id
        self.gen = Generator(model_cfg, sampler_cfg, task_cfg)
        self.group_size = group_size
        self.max_prompt_tokens = max_prompt_tokens
        self.eval_batch_tokens = eval_batch_tokens  # rollout.eval_batch_tokens
        self.queue = ray.get_actor(queue_name)  # by name: the same handle reaches a restarted queue
        self.seed = seed
        self.version = 0
        self.calls = 0
        self.metrics = RayMetrics()
        self.receivers: dict[str, Any] = {}
        # nccl: broadcasts land in ``staging`` on the weights thread; ``_apply_staged`` swaps them in.
        self._staging_lock = threading.Lock()
        self._staging: dict[str, torch.Tensor] | None = None
        self._staged_version = -1
        self._staged_count = self._applied_count = 0  # broadcasts received / swapped in (versions may go back)
        self._group_id = ""
        self._receiving = False
        self._merge = None  # AdapterMerge of adapter-only syncs (LoRA over a checkpoint base)
        self._prefetch = None  # rollout.weight_sync.PrefetchBuffer, built at the first prefetch

    def ready(self) -> dict[str, Any]:
        import ray

        return {"worker": self.worker_id, "host": socket.gethostname(), "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id(), "device": self.gen.device, "version": self.version}

    def set_weights(self, update) -> dict[str, float]:
        """Swap in a new policy version (Ray runs this between rollouts) through its transport's receiver, or
        from the double buffer when ``prefetch_weights`` already brought this update in."""
        from rollout.weight_sync import build_receiver

        if update.transport not in self.receivers:
            self.receivers[update.transport] = build_receiver(update.transport)
        start = time.perf_counter()
        receiver = self.receivers[update.transport]
        if update.lora_scales is None and self._prefetch is not None and self._prefetch.take(self.gen.model, update):
            self.version = update.version
        elif update.lora_scales is None:
            self.version = receiver.receive(self.gen.model, update)
        else:  # adapters only: receive A and B, merge them into this actor's own base weights
            merge = self._adapter_merge(update.layout, update.lora_scales)
            self.version = receiver.receive_into(merge.buffers, update)
            merge.apply(self.gen.model)
        return {"version": self.version, "seconds": time.perf_counter() - start}

    def prefetch_weights(self, update) -> dict[str, Any]:
        """Copy a full-weights update (object_store / cuda_ipc) into the double buffer; runs on the weights thread,
        beside a rollout, ahead of the same update's ``set_weights``. Never raises: after a failed prefetch
        ``set_weights`` receives the update itself."""
        from rollout.weight_sync import PrefetchBuffer

        if self._prefetch is None:
            self._prefetch = PrefetchBuffer()
        start = time.perf_counter()
        try:
            self._prefetch.fill(self.gen.model, update)
        except Exception as e:  # noqa: BLE001 - reported; set_weights receives the update itself
            log.warning("%s: weights prefetch of version %d failed (%s); set_weights will receive them",
                        self.worker_id, update.version, type(e).__name__)
            return {"prefetched": False}
        return {"prefetched": True, "seconds": time.perf_counter() - start}

    def _adapter_merge(self, layout, scales):
        """The AdapterMerge for this layout (built once: it copies the base weights of adapted layers)."""
        from rollout.lora_merge import AdapterMerge

        if self._merge is None or not self._merge.matches(layout, scales):
            self._merge = AdapterMerge(self.gen.model, layout, scales)
        return self._merge

    def receive_broadcast(self, group: dict[str, Any]) -> dict[str, float]:
        """Take part in one nccl weight broadcast as group rank ``group['rank']`` (runs on the weights thread).

        ``group`` is the rendezvous the learner published (host, port, world_size, backend, bucket_bytes)
        plus this actor's rank and the group's ``id``; a new id means the driver rebuilt the group.
        """
        from rollout.weight_sync import NcclReceiver, staging_copy

        start = time.perf_counter()
        with self._staging_lock:  # waits for a swap in progress; rollouts never wait for a broadcast
            self._receiving = True
        try:
            if group["id"] != self._group_id:
                receiver = self.receivers.pop("nccl", None)
                if receiver is not None:
                    receiver.close()
                self.receivers["nccl"] = NcclReceiver(
                    host=group["host"], port=group["port"], rank=group["rank"], world_size=group["world_size"],
                    bucket_bytes=group["bucket_bytes"], backend=group["backend"], device=self.gen.device,
                    timeout_s=group["timeout_s"])
                self._group_id = group["id"]
            if group.get("lora_scales") is not None:  # adapters only: stage them in the merge's buffers
                self._staging = self._adapter_merge(group["layout"], group["lora_scales"]).buffers
            elif self._staging is None:  # one extra copy of the weights, allocated once
                self._staging = staging_copy(self.gen.model)
            version = self.receivers["nccl"].receive_into(self._staging)
        except BaseException:
            with self._staging_lock:
                self._receiving = False
            raise
        with self._staging_lock:
            self._staged_version, self._receiving = version, False
            self._staged_count += 1
        return {"version": self._staged_version, "seconds": time.perf_counter() - start}

    def _apply_staged(self) -> None:
        """Swap in the newest broadcast version, if one arrived since the last rollout."""
        from rollout.weight_sync import copy_into

        with self._staging_lock:
            # Not by version number: a learner rebuilt from a checkpoint sends an older version again.
            if self._receiving or self._staged_count == self._applied_count:
                return  # nothing new, or a broadcast is being written: keep the current version
            if self._merge is not None and self._staging is self._merge.buffers:
                self._merge.apply(self.gen.model)
            else:
                copy_into(self.gen.model, self._staging)
            self.version, self._applied_count = self._staged_version, self._staged_count

    def rollout(self, items: list, call_tag: str) -> dict[str, Any]:
        """Generate ``group_size`` samples for each item, score them, put one Arrow group per item."""
        import ray

        from common.schema import group_to_record_batch

        self._apply_staged()
        t0 = time.perf_counter()
        G = self.group_size
        encoded = self.gen.encode_prompts(items)
        keep = [i for i, ids in enumerate(encoded) if len(ids) <= self.max_prompt_tokens]
        rejected_ids = [f"{call_tag}:{item.id}" for i, item in enumerate(items) if i not in set(keep)]
        rejected = len(rejected_ids)
        if rejected:
            log.warning("%s: %d prompt(s) longer than rollout.max_prompt_tokens=%d skipped", self.worker_id, rejected,
                        self.max_prompt_tokens)
            # Their reservations will never be filled: settled by id (once, even if this call fails later).
            ray.get(self.queue.reject.remote(rejected_ids))
        items, encoded = [items[i] for i in keep], [encoded[i] for i in keep]
        if not items:
            return {"worker": self.worker_id, "pid": os.getpid(), "groups": 0, "dropped_stale": 0, "rejected_prompts": rejected,
                    "rejected_ids": rejected_ids, "dropped_ids": [], "tokens": 0, "gen_seconds": 0.0,
                    "reward_seconds": 0.0, "version": self.version}
        rows = [r for r in encoded for _ in range(G)]
        traj = self.gen.generate(rows, seed=self.seed * 1_000_003 + zlib.crc32(call_tag.encode()))
        t_gen = time.perf_counter() - t0
        items_per_row = [item for item in items for _ in range(G)]
        t1 = time.perf_counter()
        _, rewards = self.gen.score(traj, items_per_row)
        t_reward = time.perf_counter() - t1
        traj = traj.to("cpu")
        put, dropped = [], []
        for g, item in enumerate(items):
            sl = slice(g * G, (g + 1) * G)
            rs = rewards[sl]
            components = {k: [r.components[k] for r in rs] for k in rs[0].components}
            batch = group_to_record_batch(
                traj.select(sl), group_id=f"{call_tag}:{item.id}", task=self.gen.task.name,
                worker_id=self.worker_id, policy_version=self.version, rewards=[r.total for r in rs],
                correct=[bool(r.correct) for r in rs], components=components,
                timings={"gen_seconds": t_gen / len(items), "reward_seconds": t_reward / len(items)})
            if ray.get(self.queue.put.remote(batch)):
                put.append(batch.num_rows)
            else:
                dropped.append(f"{call_tag}:{item.id}")
        tokens = traj.completion_ids_BG.numel()
        self.metrics.record("rollout_tokens_per_s", tokens / max(t_gen, 1e-9), {"worker": self.worker_id})
        self.metrics.record("rollout_groups", float(len(put)), {"worker": self.worker_id})
        # The driver marks the rejected and dropped prompts done (driver/ledger.py): their ids come back.
        return {"worker": self.worker_id, "pid": os.getpid(), "groups": len(put), "dropped_stale": len(dropped),
                "rejected_prompts": rejected, "rejected_ids": rejected_ids, "dropped_ids": dropped, "tokens": tokens,
                "gen_seconds": t_gen, "reward_seconds": t_reward, "version": self.version,
                "reward": sum(r.total for r in rewards) / len(rewards),
                "accuracy": sum(bool(r.correct) for r in rewards) / len(rewards),
                **({"edited_tokens": int(traj.extras["step_edited_BT"].sum())} if "step_edited_BT" in traj.extras else {})}

    def evaluate(self, items: list, sampler_overrides: dict[str, Any] | None = None, seed: int = 0) -> list[dict]:
        """Greedy (or configured) decoding of held-out items in ``rollout.eval_batch_tokens`` batches
        (``Generator.evaluate``); one record per item."""
        self._apply_staged()
        cfg = type(self.gen.sampler_cfg).model_validate({**self.gen.sampler_cfg.model_dump(), **(sampler_overrides or {})})
        texts, rewards = self.gen.evaluate(items, cfg, self.eval_batch_tokens, seed)
        return [{"id": item.id, "completion": text, "reward": r.total, "correct": bool(r.correct)}
                for item, text, r in zip(items, texts, rewards)]
