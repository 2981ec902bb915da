"""One Stage-1 training step as a callable: eager, or captured whole in a CUDA graph.

A step is the recipe of :func:`bundleflow.maths.flow.flow_pairs` and
:func:`bundleflow.maths.flow.rectified_flow_loss`, unchanged: B fresh pairs (component
c ~ U{0..K−1}, z0 = μ_c + e^{log_std}·N(0, I), z1 = 1[z0 ≥ 0.5] + target_std·N(0, I)) and
times t ~ U[0, 1), all drawn on the device from one generator seeded once, in that order;
the rectified-flow loss, backward, one Adam step, and the loss written into
``history[step − 1]`` by a device-side index (no host synchronisation per step).

Modes:

- ``eager``: plain PyTorch, on the CPU or CUDA. On the CPU, given the trainer's own
  generator, it is the plain Stage-1 loop (``Adam(lr=cfg.lr)`` and torch's
  ``CosineAnnealingLR``) bit for bit.
- ``graph`` (CUDA): after ``warmup`` eager steps on a side stream (real steps, each one
  optimizer step) the whole step — draws, forward, backward, a fused capturable Adam, the
  history write — is captured once and replayed. The step's generator is registered with
  the graph, so every replay advances its Philox offset exactly as an eager call does: eager
  and graph runs from one seed draw the same numbers. The learning rate is a 0-d device
  tensor filled before each replay, so the cosine schedule needs no recapture.

On CUDA both modes build the same optimizer (fused, capturable Adam with a tensor lr), so
``eager`` there is the graph's step run uncaptured. Versions: Adam with ``fused=True,
capturable=True`` and a tensor ``lr`` is in every torch the project supports (≥ 2.5);
``CUDAGraph.register_generator_state`` is checked for, not assumed (present in 2.11 and
2.13): without it the step draws from the default CUDA generator, seeded here, which torch
registers with every capture itself.

One process only: the captured step has no gradient all-reduce, so several processes (DDP)
and Accelerate's mixed precision run :class:`PreparedStage1Step`, the same recipe through
Accelerate's prepared model. :func:`bundleflow.train.plan.stage1_mode` decides which (the
trainer, the plan recorded in run.json and ``bundleflow profile`` ask it). Stage 1 stays
float32 unless mixed precision is chosen explicitly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from bundleflow.maths.flow import MixtureNoise, VelocityField, flow_pairs, rectified_flow_loss
from bundleflow.system.timing import synchronize
from bundleflow.train.checkpoint import (
    flatten_optimizer_state,
    load_optimizer_tensors,
    optimizer_tensors,
    regroup_optimizer_state,
)
from bundleflow.train.config import FlowConfig, Stage1Config
from bundleflow.train.run import optimizer_step
from bundleflow.train.stage2_step import resolve_mode, settle_capture

Stage1Mode = Literal["auto", "eager", "graph"]
STAGE1_MODES = ("auto", "eager", "graph")
LR_SCHEDULES = ("constant", "cosine")

# Without it a CUDA graph can only advance the default CUDA generator on replay.
GRAPH_REGISTERS_GENERATORS = hasattr(torch.cuda.CUDAGraph, "register_generator_state")


def cosine_next(lr: float, base_lr: float, total: int, done: int) -> float:
    """The lr after ``done`` scheduler steps from the lr after ``done − 1``: torch's
    ``CosineAnnealingLR(T_max=total, eta_min=0)`` recursion, operation for operation, so the
    floats are equal to the scheduler's (its closed form differs in the last bits)."""
    if (done - 1 - total) % (2 * total) == 0:
        return lr + base_lr * (1 - math.cos(math.pi / total)) / 2
    ratio = (1 + math.cos(math.pi * done / total)) / (1 + math.cos(math.pi * (done - 1) / total))
    return ratio * lr


def cosine_lr(base_lr: float, total: int, done: int) -> float:
    """The lr after ``done`` steps of ``CosineAnnealingLR(T_max=total)``:
    ≈ base_lr·(1 + cos(π·done/total))/2, computed by the scheduler's recursion."""
    lr = base_lr
    for k in range(1, done + 1):
        lr = cosine_next(lr, base_lr, total, k)
    return lr


def _on_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Stage1Step:
    """The Stage-1 step over a flow and its mixture; each call is exactly one Adam step.

    Args:
        field, noise: the velocity network and its source mixture; moved to ``device`` here
            (in place). Afterwards load weights only in place (``load_state_dict``), never
            move or re-create them: a captured graph reads them at their addresses.
        cfg: ``steps`` (the length of :attr:`history` and the cosine's T), ``batch_size``,
            ``lr``, ``lr_schedule`` (``constant`` | ``cosine``) and ``seed``.
        flow_cfg: ``target_std``.
        device: where the step runs and draws.
        mode: ``auto`` | ``eager`` | ``graph`` (see the module docstring).
        generator: draw from this generator instead (on ``device``; not seeded here), e.g.
            the CPU generator that drew the mixture means, which continues the plain loop's
            stream exactly.
        warmup: eager calls before the graph is captured (at least 1).

    Attributes:
        optimizer: the Adam it steps (CPU: ``Adam(lr=cfg.lr)`` as the plain loop builds it;
            CUDA: fused and capturable, ``lr`` a 0-d device tensor).
        history: ``[cfg.steps]`` losses on the device, step s at ``history[s − 1]`` (NaN
            where no step has run).
        step: steps done (host counter; the device holds the same index).
    """

    def __init__(
        self,
        field: VelocityField,
        noise: MixtureNoise,
        cfg: Stage1Config,
        flow_cfg: FlowConfig,
        device: torch.device | str,
        *,
        mode: Stage1Mode = "auto",
        generator: torch.Generator | None = None,
        warmup: int = 3,
    ):
        if not isinstance(field, VelocityField):
            raise TypeError(
                f"Stage1Step needs the VelocityField itself, got {type(field).__name__}; "
                "the step runs in one process (no DDP wrapper)"
            )
        if cfg.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}")
        self.device = _on_device(device)
        self.mode = resolve_mode(mode, self.device, STAGE1_MODES, "the Stage-1 step")
        self.field = field.to(self.device)
        self.noise = noise.to(self.device)
        self.batch_size, self.total = cfg.batch_size, cfg.steps
        self.target_std = flow_cfg.target_std
        self.base_lr, self.schedule = cfg.lr, cfg.lr_schedule
        self.warmup = max(1, warmup)
        self.generator = self._make_generator(cfg.seed, generator)
        self.optimizer = self._make_optimizer()
        self.history = torch.full((cfg.steps,), math.nan, device=self.device)
        # The next slot of `history` as a device tensor: a replay writes where it points.
        self._index = torch.zeros(1, dtype=torch.long, device=self.device)
        self.step = 0
        self.calls = 0
        self._lr = cfg.lr  # the lr of the next step (host float, the scheduler's value)
        self._lr_set: float | None = None  # the lr last written into the optimizer
        self._graph: torch.cuda.CUDAGraph | None = None

    # ------------------------------------------------------------------ setup

    def _make_generator(self, seed: int, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None:
            if generator.device.type != self.device.type:
                raise ValueError(
                    f"the generator is on {generator.device}, the step draws on {self.device}"
                )
            unregistrable = self.mode == "graph" and not GRAPH_REGISTERS_GENERATORS
            if unregistrable and generator is not self._default_generator():
                raise ValueError(
                    "this torch cannot register a generator with a CUDA graph; "
                    "pass generator=None (the default CUDA generator is used)"
                )
            return generator
        if self.device.type == "cuda" and not GRAPH_REGISTERS_GENERATORS:
            generator = self._default_generator()
        else:
            generator = torch.Generator(device=self.device)
        return generator.manual_seed(seed)

    def _default_generator(self) -> torch.Generator | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.default_generators[self.device.index]

    def _make_optimizer(self) -> torch.optim.Adam:
        params = list(self.field.parameters())
        if self.device.type != "cuda":
            return torch.optim.Adam(params, lr=self.base_lr)
        # A tensor lr: the schedule fills it in place, and a replay reads the new value.
        lr = torch.tensor(self.base_lr, dtype=torch.float32, device=self.device)
        return torch.optim.Adam(params, lr=lr, fused=True, capturable=True)

    # ------------------------------------------------------------------ one step

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return self._lr

    @property
    def losses(self) -> Tensor:
        """``[step]`` the losses so far, on the device (a view of :attr:`history`)."""
        return self.history[: self.step]

    def __call__(self) -> Tensor:
        """One optimizer step. Returns its loss: a 0-d view of ``history`` on the device."""
        if self.step >= self.total:
            raise RuntimeError(f"all {self.total} Stage-1 steps are done (cfg.steps)")
        self._write_lr()
        if self.mode == "eager":
            self.optimizer.zero_grad(set_to_none=True)
            self._body()
        else:
            self._graph_call()
        self.calls += 1
        self.step += 1
        if self.schedule == "cosine":
            self._lr = cosine_next(self._lr, self.base_lr, self.total, self.step)
        return self.history[self.step - 1]

    def _write_lr(self) -> None:
        if self._lr == self._lr_set:  # constant schedule: nothing to launch
            return
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(self._lr)  # in place: the captured graph reads this tensor
            else:
                group["lr"] = self._lr
        self._lr_set = self._lr

    def _body(self) -> None:
        z0, z1 = flow_pairs(
            self.noise, self.batch_size, target_std=self.target_std, generator=self.generator
        )  # (B, m), (B, m)
        t = torch.rand(
            self.batch_size, 1, generator=self.generator, device=z0.device, dtype=z0.dtype
        )  # (B, 1)
        loss = rectified_flow_loss(self.field, z0, z1, t)
        loss.backward()
        self.optimizer.step()
        self.history.index_copy_(0, self._index, loss.detach().reshape(1))
        self._index.add_(1)

    def _graph_call(self) -> None:
        if self._graph is None and self.calls < self.warmup:
            # Eager warm-up on a side stream (cuBLAS handles, Adam's state, the allocator).
            current = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                self._body()
            current.wait_stream(side)
            return
        if self._graph is None:
            self.optimizer.zero_grad(set_to_none=True)  # grads get allocated in the graph
            graph = torch.cuda.CUDAGraph()
            if self.generator is not self._default_generator():
                # Before capture: each replay then advances the generator's offset by the
                # whole graph's draws (torch registers the default generator itself).
                graph.register_generator_state(self.generator)
            with torch.cuda.graph(graph):
                self._body()
            settle_capture(self.device)
            self._graph = graph  # capturing ran nothing: the replay below is this step
        self._graph.replay()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """What a resume needs besides the weights (which stay the caller's: the field's and
        the mixture's own ``state_dict``). Host copies, taken at the call:

        - ``step``: steps done (int);
        - ``generator``: the generator's ``get_state()`` (uint8 tensor);
        - ``history``: ``[step]`` float32 losses so far;
        - ``optimizer``: Adam's state dict with ``lr`` a float (the next step's), so its
          ``param_groups`` are JSON-able.
        """
        saved = self.optimizer.state_dict()
        state = {
            index: {k: _host_copy(v) for k, v in entry.items()}
            for index, entry in saved["state"].items()
        }
        groups = [{**group, "lr": self._lr} for group in saved["param_groups"]]
        return {
            "step": self.step,
            "generator": self.generator.get_state(),
            "history": _host_copy(self.history[: self.step]),
            "optimizer": {"state": state, "param_groups": groups},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from :meth:`state_dict` (of this object or another on the same device
        type). Every tensor a captured graph reads is written in place, so loading after
        capture is safe; the lr follows from the step. Load the weights in place as well."""
        step = int(state["step"])
        if not 0 <= step <= self.total:
            raise ValueError(f"checkpoint at step {step}; this Stage 1 has {self.total} steps")
        try:
            self.generator.set_state(state["generator"])
        except RuntimeError as err:
            raise ValueError(
                f"the checkpoint's generator state does not fit the {self.device.type} "
                f"generator of this step ({err}); resume on the device type it was saved on"
            ) from err
        self._load_optimizer(state["optimizer"])
        self.history[:step].copy_(state["history"][:step])
        self.history[step:].fill_(math.nan)
        self._index.fill_(step)
        self.step = step
        self._lr = self.base_lr
        if self.schedule == "cosine":
            self._lr = cosine_lr(self.base_lr, self.total, step)
        self._lr_set = None

    def _load_optimizer(self, saved: Mapping) -> None:
        # Only Adam's moments and step counts are taken; this optimizer's hyperparameters and
        # flags (capturable, fused, the lr tensor) stay. Tensors that exist already keep their
        # identity (values copied in), because a captured graph reads them at their addresses.
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        before = {p: dict(self.optimizer.state[p]) for p in params if p in self.optimizer.state}
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        own_groups = self.optimizer.state_dict()["param_groups"]
        state = {int(index): entry for index, entry in saved["state"].items()}
        self.optimizer.load_state_dict({"state": state, "param_groups": own_groups})
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        for param, old in before.items():
            new = self.optimizer.state[param]
            for key, tensor in old.items():
                if not isinstance(tensor, Tensor):
                    continue
                if key in new:
                    tensor.copy_(new[key])
                else:  # saved before any step: a fresh Adam's zeros
                    tensor.zero_()
                new[key] = tensor

    def checkpoint(self) -> dict:
        """What a Stage-1 checkpoint stores of the step: ``optimizer`` (flat tensors, the
        rest), ``rng`` (the generator's state), ``history`` (``[step]`` losses), ``schedule``
        (None: the lr follows from the step)."""
        state = self.state_dict()
        return {
            "optimizer": flatten_optimizer_state(state["optimizer"]),
            "rng": state["generator"],
            "history": state["history"],
            "schedule": None,
        }

    def restore(self, step: int, saved: dict) -> None:
        """Continue from :meth:`checkpoint`'s record of step ``step``."""
        tensors, rest = saved["optimizer"]
        state = regroup_optimizer_state(tensors, rest)
        self.load_state_dict(
            {"step": step, "generator": saved["rng"], "history": saved["history"],
             "optimizer": {"state": state}}
        )  # fmt: skip


class PreparedStage1Step:
    """The Stage-1 step through Accelerate's prepared model: DDP over several processes, or
    Accelerate's autocast for a mixed-precision flow. Every rank draws the same seeded global
    batch on the CPU and takes its slice (so any process count sees the same pairs); plain
    Adam and torch's ``CosineAnnealingLR``; the loss goes to ``history`` on the device."""

    mode = "ddp"

    def __init__(
        self,
        field: VelocityField,
        noise: MixtureNoise,
        cfg: Stage1Config,
        flow_cfg: FlowConfig,
        accelerator,
        generator: torch.Generator,
    ) -> None:
        self.device = accelerator.device
        self.cfg, self.target_std, self.noise = cfg, flow_cfg.target_std, noise
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.generator, self.accelerator = generator, accelerator
        field.to(self.device)
        optimizer = torch.optim.Adam(field.parameters(), lr=cfg.lr)
        self.model, self.optimizer = accelerator.prepare(field, optimizer)
        self.schedule = None
        if cfg.lr_schedule == "cosine":
            self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=cfg.steps
            )
        self.history = torch.empty(cfg.steps, device=self.device)
        self.step = 0

    def __call__(self) -> Tensor:
        """One optimizer step on this rank's slice of the global batch."""
        cfg, part = self.cfg, self.cfg.batch_size // self.world
        z0, z1 = flow_pairs(
            self.noise, cfg.batch_size, target_std=self.target_std, generator=self.generator
        )
        t = torch.rand(cfg.batch_size, 1, generator=self.generator)
        lo = self.rank * part
        z0, z1, t = (x[lo : lo + part].to(self.device, non_blocking=True) for x in (z0, z1, t))
        loss = rectified_flow_loss(self.model, z0, z1, t)
        optimizer_step(loss, self.optimizer, self.accelerator)
        if self.schedule is not None:
            self.schedule.step()
        self.step += 1
        self.history[self.step - 1] = loss.detach()
        return self.history[self.step - 1]

    def checkpoint(self) -> dict:
        """As :meth:`Stage1Step.checkpoint` (the scheduler's state besides)."""
        return {
            "optimizer": optimizer_tensors(self.optimizer),
            "rng": self.generator.get_state(),
            "history": self.history[: self.step].detach().cpu(),
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
        }

    def restore(self, step: int, saved: dict) -> None:
        load_optimizer_tensors(self.optimizer, *saved["optimizer"])
        self.generator.set_state(saved["rng"])
        self.history[:step] = saved["history"].to(self.device)
        if self.schedule is not None and saved.get("schedule"):
            self.schedule.load_state_dict(saved["schedule"])
        self.step = step


def _host_copy(value):
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    return value


def time_stage1(
    mode: Stage1Mode,
    steps: int,
    m: int = 50,
    batch: int = 2048,
    *,
    hidden: int | None = None,
    device: torch.device | str | None = None,
    warmup_steps: int = 20,
) -> float:
    """Milliseconds per Stage-1 step (m items, batch pairs, the reference's widths unless
    ``hidden``), timed over ``steps`` calls after ``warmup_steps`` (capture included)."""
    device = _on_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(0)
    field = VelocityField(m, hidden)
    noise = MixtureNoise(m, generator=gen)
    cfg = Stage1Config(steps=warmup_steps + steps, batch_size=batch)
    step = Stage1Step(field, noise, cfg, FlowConfig(), device, mode=mode)
    for _ in range(warmup_steps):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps * 1e3
