"""The one training loop for every optimizer and task (``python -m experiments.train``).

``train(cfg, run_dir)`` reads top to bottom: processes and device; the run folder (resume if
it holds a checkpoint); data, model (sharded by FSDP2 with trainer.strategy=fsdp: experiments/sharding.py)
and optimizer, precision, compile and DDP (``_set_up``); then
the loop (``_run_loop``), which logs train loss / accuracy / step sizes every ``log_every`` steps,
evaluates every ``eval_every`` steps, checkpoints every ``checkpoint_every`` steps and when asked
to stop (SIGTERM, SIGHUP, SIGUSR1, SIGUSR2, ``max_time``), and stops with an explanation if the loss
or a step size stops being finite. Everything the loop reads and changes (step, data, model,
optimizer, train window, timer, clock, log) is one RunState, whose methods are the loop's parts
(a training step, a logged row, a stop request), resume it, evaluate, checkpoint and write the run
folder's records. Every optimizer goes through the same adapter calls, those of
experiments.adapters.Adapter; nothing here depends on which optimizer runs. The columns of
metrics.csv and the summary's rules come from experiments/schema.py.

The loss: ``cross_entropy(logits.flatten(0, -2), y.flatten())`` for classification (class logits
for images, next-token logits for language models), the half squared error for a regression (the
linear tracking stream, experiments/data/streams.py). A stream's train loss is its online loss:
each batch is seen once, in order, and its loss is computed before the step on it.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from experiments import checkpoint, files, run_folder, schema, sharding
from experiments.adapters import Adapter
from experiments.data.common import DataSplits
from experiments.loggers import MetricsLog, run_metadata, write_json
from experiments.validation import check_config

# A resumed run must share its checkpoint's whole configuration (experiments.run_folder.identity:
# every dataset, model, optimizer, trainer and seed key but where and how fast it runs) and its code
# (run_folder.code_digest), the latter unless trainer.resume_across_code_change=true.
# Preemption notices: SIGTERM (scontrol requeue, a preempting job, a time limit without warning),
# SIGHUP (the terminal or ssh session of the run closed),
# SIGUSR1 (slurm/run.sbatch's --signal=B:USR1@120, forwarded by its trap) and SIGUSR2 (the
# submitit launcher's --signal=USR2@signal_delay_s). The run checkpoints at the end of the current
# step, then hands the signal to the handler that was installed before (submitit's requeue).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


@dataclass
class TrainResult:
    """What ``train`` returns. A run folder that already holds a finished run is left as it is:
    ``summary`` is the one saved then, and ``model`` and ``adapter`` are None (nothing is built)."""

    summary: dict[str, Any]  # final metrics, also in meta.json
    model: nn.Module | None  # the unwrapped trained model
    adapter: Adapter | None  # the optimizer adapter (experiments/adapters.py)


@dataclass
class RunState:
    """One process's state of a run during this job: what the loop changes and what checkpointing,
    resuming, evaluating and the run folder's records share with it.

    Created once model and optimizer are built; ``save_checkpoint`` keeps what must outlive the
    job and ``resume`` restores it, so a resumed run continues bit for bit.
    """

    cfg: DictConfig
    config: dict[str, Any]  # cfg resolved: written to config.yaml, checkpointed, compared on resume
    run_dir: str
    checkpoint_path: str
    # the process layout: every rank holds its own RunState
    rank: int
    world_size: int
    device: torch.device
    sharded: bool  # trainer.strategy=fsdp over several ranks (experiments/sharding.py)
    # what the run trains on, and how long
    data: DataSplits
    total_steps: int
    steps_per_epoch: int
    # what training changes
    model: nn.Module  # unwrapped: neither compiled nor wrapped in DDP, as checkpointed (with FSDP2, sharded)
    train_model: nn.Module  # what the forward pass calls: the model, compiled and wrapped in DDP as asked
    adapter: Adapter
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None  # autocast's dtype, None for fp32
    window: _Window  # train loss / accuracy sums since the last logged row
    timer: _StepTimer  # step and optimizer times since the last logged row
    step: int = 0
    elapsed_before: float = 0.0  # the wall time of the jobs before this one
    started: float = field(default_factory=time.time)  # this job's start: max_time counts from here
    log: MetricsLog | None = None  # metrics.csv and W&B, on the main rank only
    # each resume by other code than the checkpoint's: {step, from, to} (trainer.resume_across_code_change)
    code_changes: list[dict[str, Any]] = field(default_factory=list)
    windows_ms: list[tuple[float, float]] = field(default_factory=list)  # (step ms, optimizer ms) of each logged row
    last_row: dict[str, Any] = field(default_factory=dict)  # the latest value of every logged metric
    progress: Any = None  # the tqdm bar

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def meta_path(self) -> str:
        return os.path.join(self.run_dir, "meta.json")

    def autocast(self) -> torch.autocast:
        """The precision of the forward passes (a no-op for fp32)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def elapsed(self) -> float:
        """The wall time of the run over all its jobs."""
        return self.elapsed_before + time.time() - self.started

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's payload: weights, optimizer, scaler, train window, this
        rank's random number generators, step and elapsed time."""
        if bool(state.get("shards")) != self.sharded:
            raise ValueError(f"{self.checkpoint_path} was written by a run {'' if state.get('shards') else 'not '}sharded "
                             "over several ranks: resume it as it ran (trainer.strategy=fsdp under torchrun or srun with "
                             "more than one task, or trainer.strategy=ddp)")
        if self.sharded:  # the optimizer's state from the shards, the adapter's other parts from the payload
            sharding.load(self.model, self.adapter, self.run_dir, state["shards"])
            self.adapter.load_state_dict({**state["optimizer"], "optimizer": self.adapter.optimizer.state_dict()})
        else:
            self.model.load_state_dict(state["model"])
            self.adapter.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.window.load_state_dict(state["window"])
        # each rank's own generators (a run resumed on fewer ranks takes the first ones)
        checkpoint.set_rng_state(state["rng"][self.rank % len(state["rng"])])
        self.step, self.elapsed_before = state["step"], state["elapsed_s"]
        self.code_changes = list(state.get("code_changes", []))

    def write_start_records(self, resumed_at_step: int | None) -> None:
        """config.yaml, and meta.json saying the run is running (and from which step it resumed)."""
        with files.atomic_write(os.path.join(self.run_dir, "config.yaml")) as f:
            f.write(OmegaConf.to_yaml(self.config))
        meta = run_metadata(self.cfg.seed, self.device, self.world_size)
        meta.update(record_of_identity(self.config, self.code_changes))
        meta["status"] = "running"
        meta["resumed_at_step"] = resumed_at_step
        write_json(meta, self.meta_path)

    def evaluate(self, test: Dataset, batch_size: int) -> dict[str, float]:
        """Test loss and accuracy; each rank evaluates its share of the test batches."""
        tcfg = self.cfg.trainer
        eval_model = self.adapter.eval_model(self.model)
        eval_model.eval()
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss * examples, correct, examples
        batches = _test_batches(test, batch_size, tcfg.eval_batches, self.rank, self.world_size, tcfg.num_workers)
        with torch.no_grad(), self.autocast():
            for x, y in batches:
                x, y = x.to(self.device), y.to(self.device)
                logits = eval_model(x)
                sums[0] += _loss(self.data.task, logits, y, reduction="sum").double()
                sums[1] += (logits.argmax(-1) == y).sum()
                sums[2] += y.numel()
            if self.sharded:  # every forward gathers the weights from every rank: all ranks run as many
                most = len(_test_batches(test, batch_size, tcfg.eval_batches, 0, self.world_size, tcfg.num_workers))
                for _ in range(most - len(batches)):
                    eval_model(test[0][0].unsqueeze(0).to(self.device))
        self.model.train()
        if self.distributed:
            dist.all_reduce(sums)
        loss_sum, correct, count = sums.tolist()
        if self.data.task == "regression":
            return {"test/loss": loss_sum / count}
        return {"test/loss": loss_sum / count, "test/acc": correct / count}

    def save_checkpoint(self, finished: bool, summary: dict[str, Any] | None = None) -> None:
        """Checkpoint the run at the current step: every rank calls it (its generators are
        gathered; sharded, it writes its shards), the main rank writes the file."""
        rng = [checkpoint.rng_state()]
        if self.distributed:
            rng = [None] * self.world_size
            dist.all_gather_object(rng, checkpoint.rng_state())
        step_sizes = self.adapter.step_sizes()  # on every rank: sharded step sizes are gathered
        parts = self._sharded_parts(step_sizes) if self.sharded else {
            "model": self.model.state_dict(), "optimizer": self.adapter.state_dict()}
        if self.is_main:
            payload = {
                "step": self.step, "finished": finished, "summary": summary, "config": self.config, **parts,
                "scaler": self.scaler.state_dict(), "window": self.window.state_dict(), "rng": rng,
                "elapsed_s": self.elapsed(), **record_of_identity(self.config, self.code_changes),
            }
            # a diverged state never replaces the last good checkpoint, even between logged rows
            problem = None if self.sharded else _non_finite_state(payload, step_sizes)
            if problem:
                raise FloatingPointError(_divergence_message(*problem, self))
            if self.log is not None:
                self.log.sync()  # the rows up to this step reach the disk before the checkpoint that counts on them
            checkpoint.save(payload, self.checkpoint_path)
            if self.sharded:
                sharding.remove_stale(self.checkpoint_path)

    def _sharded_parts(self, step_sizes: dict[str, float]) -> dict[str, Any]:
        """Every rank checks its shards and writes them (sharding.save); what checkpoint.pt holds of
        the model and the optimizer then: the shards' folder and the adapter's other state."""
        model_state, optimizer_state = sharding.state_dicts(self.model, self.adapter)
        shards = {"model": sharding.local(model_state), "optimizer": sharding.local(optimizer_state),
                  "window": self.window.state_dict()}
        problem = sharding.agreed(_non_finite_state(shards, step_sizes))
        if problem:
            raise FloatingPointError(_divergence_message(*problem, self))
        name = sharding.save(model_state, optimizer_state, self.checkpoint_path, self.step)
        rest = {key: value for key, value in self.adapter.state_dict().items() if key != "optimizer"}
        return {"model": {}, "optimizer": rest, "shards": name}

    def write_final_record(self, status: str, summary: dict[str, Any] | None, signal_name: str | None) -> None:
        """meta.json's status and step at the end of this job: "finished" (with the summary) only
        once the final checkpoint is written, "preempted" (with the signal) while a stopped job
        waits for its requeue."""
        record = {"status": status, "step": self.step}
        if status == "finished":
            record["summary"] = summary
        if status == "preempted":
            record["signal"] = signal_name
        write_json({**files.read_json(self.meta_path, "it is rewritten when the run starts again"), **record},
                   self.meta_path)



    # -- the loop's parts, in the order it calls them ---------------------------------------------------

    def open_log(self, resumed_at_step: int | None, num_params: int) -> None:
        """metrics.csv and W&B, then config.yaml and meta.json: written once the run is set up (logger
        and W&B included), so that a run that fails to start leaves no record claiming it runs."""
        step_size_keys = list(self.adapter.step_sizes())  # on every rank: sharded step sizes are gathered
        if not self.is_main:
            return
        name = os.path.relpath(self.run_dir, self.cfg.get("run_root", "."))
        self.log = MetricsLog(self.run_dir, schema.metrics_columns(step_size_keys),
                              csv_enabled=self.cfg.logger.csv, wandb=self.config["logger"]["wandb"],
                              resume_step=resumed_at_step, config=self.config,
                              name=name if not name.startswith("..") else os.path.basename(self.run_dir))
        print(f"{self.run_dir}: {num_params:,} parameters, {self.total_steps} steps of {self.data.batch_size} "
              f"({self.steps_per_epoch} per epoch), {self.world_size} x {self.device}, {self.cfg.trainer.precision}"
              + (f", resuming at step {self.step}" if resumed_at_step is not None else ""))
        self.write_start_records(resumed_at_step)

    def log_initial_evaluation(self) -> None:
        """Step 0's row: the test metrics and step sizes before any training."""
        self.last_row = {"step": 0, "epoch": 0.0, "time/elapsed_s": 0.0,
                         **self.evaluate(self.data.test, self.data.batch_size), **self.adapter.step_sizes()}
        if self.log is not None:
            self.log.log(self.last_row)

    def batches(self) -> Iterator:
        """The training batches from the current step on (experiments.trainer._train_batches)."""
        return _train_batches(self.data.train, self.data.batch_size, self.steps_per_epoch, self.step, self.cfg.seed,
                              self.rank, self.world_size, self.cfg.trainer.num_workers, self.device,
                              shuffle=self.data.shuffle)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step on the batch (x, y): forward, backward, clipping, the adapter's step."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        start = self.timer.mark()
        self.adapter.zero_grad()
        with self.autocast():
            logits = self.train_model(x)
            loss = _loss(self.data.task, logits, y)
        self.adapter.backward(self.scaler.scale(loss))
        if self.cfg.trainer.grad_clip is not None:
            self.adapter.unscale(self.scaler)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip)
        before_step = self.timer.mark()
        self.adapter.step(self.scaler)
        self.scaler.update()
        self.timer.add(start, before_step, self.timer.mark())
        self.step += 1
        self.progress.update()
        # no .item() here: reading the loss back every step would stall the GPU queue
        if self.data.task == "classification":
            self.window.add(loss.detach(), (logits.detach().argmax(-1) == y).sum(), y.numel())
        else:  # a regression logs no accuracy
            self.window.add(loss.detach(), torch.zeros((), device=self.device), 0)

    def log_row_if_due(self) -> None:
        """The train window's row every log_every steps and the test metrics every eval_every steps
        (and both at the last step); raises FloatingPointError if a loss or step size diverged."""
        tcfg, row = self.cfg.trainer, {}
        last = self.step == self.total_steps
        if self.step % tcfg.log_every == 0 or last:
            row.update(self.window.reduce(self.distributed))
            row.update(self.adapter.step_sizes())
            step_ms, optimizer_ms = self.timer.read()
            self.windows_ms.append((step_ms, optimizer_ms))
            row.update({"time/step_ms": step_ms, "time/optimizer_ms": optimizer_ms,
                        "memory/peak_mb": _peak_memory_mb(self.device)})
        if tcfg.eval_every and (self.step % tcfg.eval_every == 0 or last):
            row.update(self.evaluate(self.data.test, self.data.batch_size))
        if not row:
            return
        row = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "time/elapsed_s": self.elapsed(), **row}
        self.last_row = {**self.last_row, **row}
        if self.log is not None:
            self.log.log(row)
        self.progress.set_postfix(_postfix(self.last_row), refresh=False)
        problem = _diverged(row, zero_step_size_planned=self.adapter.plans_zero_step_size())
        if problem:
            raise FloatingPointError(_divergence_message(*problem, self))

    def stop_if_asked(self, stops: _StopSignals) -> str | None:
        """Checkpoint and return "preempted" (a stop signal, on any rank) or "stopped" (out of this job's
        max_time) before the last step; None to go on. Under DDP every rank agrees on it at logging
        steps only (one small all-reduce, no per-step sync)."""
        tcfg = self.cfg.trainer
        if self.distributed and self.step % tcfg.log_every != 0:
            return None
        out_of_time = tcfg.max_time is not None and time.time() - self.started > tcfg.max_time
        if not _any_rank(bool(stops.received) or out_of_time, self.distributed) or self.step >= self.total_steps:
            return None
        self.save_checkpoint(finished=False)
        status = "preempted" if stops.received or not out_of_time else "stopped"
        if self.is_main:
            reason = stops.name or ("another rank's signal" if status == "preempted"
                                    else f"max_time of {tcfg.max_time} s")
            then = ("passing the signal on to the handler from before the run (submitit's)" if stops.hands_over
                    else "run the same command again to continue")
            print(f"\n{reason}: checkpointed at step {self.step}; {then}", flush=True)
        return status

    def summary(self, status: str) -> dict[str, Any]:
        """The run's final metrics (meta.json's summary): quality, step sizes, costs."""
        step_size_keys = list(self.adapter.step_sizes())
        return {
            "status": status,
            "step": self.step,
            **{k: self.last_row[k] for k in schema.QUALITY if k in self.last_row},
            **{k: self.last_row[k] for k in step_size_keys if k in self.last_row},
            "time/step_ms": schema.steady_median([ms for ms, _ in self.windows_ms]) if self.windows_ms else None,
            "time/optimizer_ms": schema.steady_median([ms for _, ms in self.windows_ms]) if self.windows_ms else None,
            "memory/peak_mb": _peak_memory_mb(self.device),
            "wall_s": self.elapsed(),
        }


def train(cfg: DictConfig, run_dir: str) -> TrainResult:
    """Train as ``cfg`` says in ``run_dir``, continuing from its checkpoint if it holds one.

    Every value of the config is checked first (experiments/validation.py); the run folder stays
    locked against other processes until this returns or raises (experiments/files.py).
    """
    check_config(cfg)
    with contextlib.ExitStack() as run_folder_lock:
        return _train(cfg, run_dir, run_folder_lock)


def _train(cfg: DictConfig, run_dir: str, run_folder_lock: contextlib.ExitStack) -> TrainResult:
    # -- processes and device: one process per rank, every rank running this same function --------------
    world_size, rank, local_rank, rendezvous = _process_layout()
    device = _pick_device(cfg.trainer.device, local_rank if world_size > 1 else None)
    created_group = world_size > 1 and not dist.is_initialized()
    if created_group:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method=rendezvous,
                                rank=rank, world_size=world_size)
    # -- run folder: locked, cleared of killed writers' temporaries, resumed from its checkpoint --------
    os.makedirs(run_dir, exist_ok=True)
    if rank == 0:
        run_folder_lock.enter_context(files.RunLock(run_dir, cfg.get("run_root")))
        files.remove_temporaries(run_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    state = checkpoint.load_for_resume(checkpoint_path)
    code_change = None if state is None else check_resume(state, config, run_dir, checkpoint_path)
    if state is not None and state["finished"]:
        if created_group:
            dist.destroy_process_group()
        return _already_finished(state, run_dir, checkpoint_path, rank)

    # -- data, model, optimizer, precision, compile, DDP: the run's state, restored from the checkpoint ---
    run = _set_up(cfg, config, run_dir, checkpoint_path, (rank, world_size, device))
    if state is not None:
        run.resume(state)
        if code_change is not None:
            run.code_changes.append(code_change)

    # -- preemption: from here on a stop signal is recorded and acted on at the end of a step ----------
    stops = _StopSignals()
    try:
        run.open_log(resumed_at_step=None if state is None else state["step"],
                     num_params=sum(p.numel() for p in run.model.parameters()))
    except BaseException:
        stops.restore()
        if run.log is not None:
            run.log.close()  # no W&B run left open in the process
        raise
    status, summary = _run_loop(run, stops, fresh=state is None)
    if run.is_main and status == "finished":
        print(f"{run_dir}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in summary.items() if k != "status"))
    if created_group:
        dist.destroy_process_group()
    if status == "preempted":
        stops.hand_over()  # submitit's handler requeues the job and exits
    return TrainResult(summary, run.model, run.adapter)


def _run_loop(run: RunState, stops: _StopSignals, fresh: bool) -> tuple[str, dict[str, Any]]:
    """Train from run.step to the last step, or until a stop signal or max_time; returns (status, summary).

    Whatever ends it, meta.json records how (finished, preempted, stopped, interrupted, failed) and
    the stop signals are handed back; "finished" only once the final checkpoint is written.
    """
    tcfg, status, summary = run.cfg.trainer, "running", None
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    # a log file (SLURM, make run > log) gets a line every 30 s, not one per update
    run.progress = tqdm(total=run.total_steps, initial=run.step, disable=not (run.is_main and tcfg.progress_bar),
                        dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30)
    try:
        if fresh and tcfg.eval_every:
            run.log_initial_evaluation()
        batches = run.batches()
        run.model.train()
        while run.step < run.total_steps:
            run.train_step(*next(batches))
            run.log_row_if_due()
            stopped = run.stop_if_asked(stops)
            if stopped:
                status = stopped
                break
            if tcfg.checkpoint_every and run.step % tcfg.checkpoint_every == 0 and run.step < run.total_steps:
                run.save_checkpoint(finished=False)
        if status == "running":
            status = "finished"
        summary = run.summary(status)
        if status == "finished":  # the last checkpoint, with the stop signals still caught
            run.save_checkpoint(finished=True, summary=summary)
    except KeyboardInterrupt:
        status = "interrupted"  # Ctrl-C: not finished and not diverged; the same command continues it
        raise
    except BaseException:
        status = "failed"
        raise
    finally:
        run.progress.close()
        run.adapter.close()
        if run.log is not None:
            run.log.close()
        if run.is_main:
            run.write_final_record(status, summary, stops.name)
        stops.restore()
    return status, summary


def _already_finished(state: dict[str, Any], run_dir: str, checkpoint_path: str, rank: int) -> TrainResult:
    """A folder that holds a finished run is left as it is (meta.json rebuilt from the checkpoint if lost
    or unreadable)."""
    problem = run_folder.meta_problem(Path(run_dir) / "meta.json")
    if rank == 0 and problem is not None:
        write_json(run_folder.meta_from_checkpoint(state), os.path.join(run_dir, "meta.json"))
        print(f"{run_dir}: meta.json was {'missing' if problem == 'missing' else 'unreadable'}; rebuilt from "
              f"{checkpoint_path}")
    print(f"{run_dir} already holds a finished run; delete the folder to run it again")
    return TrainResult(state["summary"], None, None)


def _set_up(cfg: DictConfig, config: dict[str, Any], run_dir: str, checkpoint_path: str,
            layout: tuple[int, int, torch.device]) -> RunState:
    """Data, model (sharded with trainer.strategy=fsdp) and optimizer, precision, compile and DDP: a
    fresh RunState at step 0."""
    rank, world_size, device = layout
    tcfg = cfg.trainer
    data = _build(cfg.dataset)
    total_steps, steps_per_epoch = _steps(data, tcfg, world_size, cfg.dataset._target_)
    # Same seed on every rank: identical initial weights (DDP checks); each rank's dropout
    # and augmentation then draw from their own stream.
    _seed_everything(cfg.seed)
    model = _build(cfg.model, **data.model_kwargs).to(device)
    sharded = world_size > 1 and tcfg.strategy == "fsdp"
    if sharded:  # before the optimizer sees the parameters: it holds their shards
        sharding.shard(model, device, world_size)
    adapter = build_adapter(cfg.optimizer, model, total_steps)
    adapter.check(precision=tcfg.precision, distributed=world_size > 1, compiled=tcfg.compile)
    if sharded:
        sharding.check(adapter, precision=tcfg.precision, compiled=tcfg.compile)
    _seed_everything(cfg.seed + rank)
    # bf16 needs no loss scaling; fp16 gradients underflow without it. A disabled scaler is a
    # no-op, so the loop is the same for every precision.
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[tcfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=tcfg.precision == "fp16")
    train_model = torch.compile(model) if tcfg.compile else model
    if world_size > 1 and not sharded:  # sharded: FSDP2 above
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    return RunState(cfg=cfg, config=config, run_dir=run_dir, checkpoint_path=checkpoint_path, rank=rank,
                    world_size=world_size, device=device, sharded=sharded, data=data, total_steps=total_steps,
                    steps_per_epoch=steps_per_epoch, model=model, train_model=train_model, adapter=adapter,
                    scaler=scaler, amp_dtype=amp_dtype, window=_Window(device), timer=_StepTimer(device))


def _steps(data: DataSplits, tcfg: DictConfig, world_size: int, target: str) -> tuple[int, int]:
    """(the run's steps, steps per epoch), refusing a dataset the run cannot train on as configured."""
    if data.batch_size % world_size:
        raise ValueError(f"batch size {data.batch_size} does not split over {world_size} processes; "
                         f"set dataset.batch_size to a multiple of {world_size}")
    steps_per_epoch = len(data.train) // data.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {data.batch_size} exceeds the {len(data.train)} training examples")
    if tcfg.eval_every and len(data.test) == 0:
        raise ValueError(f"the test split of {target} is empty, so it cannot be evaluated: give it "
                         "examples (dataset.test_fraction, where the dataset has one) or set trainer.eval_every=0")
    total_steps = tcfg.epochs * steps_per_epoch if tcfg.epochs is not None else tcfg.max_steps
    if not data.shuffle and total_steps > steps_per_epoch:
        raise ValueError(f"{target} is a stream of {steps_per_epoch} steps, each batch seen once, and the run asks "
                         f"for {total_steps}: set trainer.max_steps to at most {steps_per_epoch} (or lengthen the "
                         "stream, dataset.steps)")
    return total_steps, steps_per_epoch


# -- helpers (in the order the loop uses them) -------------------------------------------------------


def record_of_identity(config: dict[str, Any], code_changes: list[dict[str, Any]]) -> dict[str, Any]:
    """What meta.json and every checkpoint record of the run's identity (experiments/run_folder.py)."""
    return {"config_sha256": run_folder.config_digest(config), "code_sha256": run_folder.code_digest(),
            "code_changes": code_changes}


def check_resume(state: dict[str, Any], config: dict[str, Any], run_dir: str, checkpoint_path: str
                 ) -> dict[str, Any] | None:
    """Refuse a checkpoint of another configuration, naming the keys that differ, or of other code
    unless trainer.resume_across_code_change; returns the code change to record, or None."""
    changed = run_folder.differences(state["config"], config)
    if changed:
        raise ValueError(
            f"{run_dir} holds a run of another configuration, which this one would continue as if it were its "
            "own. It differs in (its checkpoint's -> this command's):\n  " + "\n  ".join(changed) + "\nRun it "
            "with its own settings (its config.yaml), or give this configuration a folder of its own: another "
            "run_root, or delete the folder (rm -r " + run_dir + ") to start it over")
    recorded, current = state.get("code_sha256"), run_folder.code_digest()
    if state["finished"] or recorded == current:
        return None
    if not config["trainer"].get("resume_across_code_change"):
        was = f"code {recorded[:12]}" if recorded else "code of a version that recorded none"
        raise ValueError(
            f"{checkpoint_path} was written by other code ({was}, now {current[:12]}: a file of metaopt/ or "
            f"experiments/ changed since), so its steps from {state['step']} on would come from other code than "
            "those before. To continue it anyway, and record where, add trainer.resume_across_code_change=true "
            "(meta.json's code_changes); to run it with the new code from the start, delete the folder "
            f"(rm -r {run_dir}); or go back to the code it ran with")
    return {"step": state["step"], "from": recorded, "to": current}


def build_adapter(optimizer_cfg: DictConfig, model: nn.Module, total_steps: int) -> Adapter:
    """The optimizer of a conf/optimizer/*.yaml node inside its adapter (experiments/adapters.py):
    the node holds the optimizer's own keywords, plus `adapter`, the loop contract that drives
    it, which receives the optimizer factory."""
    optimizer_keys = [key for key in optimizer_cfg if key != "adapter"]
    optimizer = _build(OmegaConf.masked_copy(optimizer_cfg, optimizer_keys))
    adapter = _build(optimizer_cfg.adapter, model=model, optimizer=optimizer, total_steps=total_steps)
    if not isinstance(adapter, Adapter):
        raise TypeError(f"{optimizer_cfg.adapter._target_} does not implement experiments.adapters.Adapter")
    return adapter


def _build(node: DictConfig, **kwargs: Any) -> Any:
    """Hydra's instantiate, raising the builder's own error: Hydra wraps it in a one-line
    repr, which would hide the line breaks of messages such as a missing dataset's command."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as error:
        if error.__cause__ is None:
            raise
        raise error.__cause__ from None


def _process_layout() -> tuple[int, int, int, str | None]:
    """(world size, rank, local rank, rendezvous URL or None for torchrun's env://) of this process.

    torchrun (or whatever sets WORLD_SIZE, such as submitit's TorchDistributedEnvironment().export())
    comes first. Otherwise the tasks of a SLURM job step are the ranks (SLURM_STEP_NUM_TASKS,
    SLURM_PROCID, SLURM_LOCALID), meeting on the step's first node (MASTER_ADDR if set) at
    MASTER_PORT or a port drawn from the job id. A batch script's own shell is no such step, so a
    run started there without srun is one process, whatever --ntasks says.
    """
    if "WORLD_SIZE" in os.environ:
        return (int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", "0")),
                int(os.environ.get("LOCAL_RANK", "0")), None)
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if tasks == 1:
        return 1, 0, 0, None
    address = os.environ.get("MASTER_ADDR")
    if address is None:
        nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_STEP_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        address = nodes[0]
    port = int(os.environ.get("MASTER_PORT", 20000 + int(os.environ["SLURM_JOB_ID"]) % 40000))
    return tasks, int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_LOCALID"]), f"tcp://{address}:{port}"


def _pick_device(name: str, local_rank: int | None) -> torch.device:
    """The device of this process; with several processes per node, GPU number LOCAL_RANK of
    those it sees (the one it sees, where SLURM binds one GPU to each task)."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"trainer.device={name} but CUDA is not available; use trainer.device=cpu or auto")
        if local_rank is not None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif device.index is None:
            device = torch.device("cuda", 0)
        torch.cuda.set_device(device)  # NCCL and torch.cuda.* calls use the current device
    return device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _train_batches(dataset: Dataset, batch_size: int, steps_per_epoch: int, step: int, seed: int, rank: int,
                   world_size: int, num_workers: int, device: torch.device, shuffle: bool = True) -> Iterator:
    """Training batches from ``step`` on, forever: epoch after epoch, each a fresh permutation
    (or, for a stream, ``shuffle=False``, the examples in order).

    The order is a function of (seed, epoch) alone, so a run resumed at any step sees exactly
    the batches the uninterrupted run saw. Each global batch is split between the ranks.
    """
    epoch, offset = divmod(step, steps_per_epoch)
    rank_batch = batch_size // world_size
    while True:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(dataset), generator=generator) if shuffle else torch.arange(len(dataset))
        order = order[: steps_per_epoch * batch_size]
        indices = order.view(steps_per_epoch, world_size, rank_batch)[offset:, rank].reshape(-1).tolist()
        # the loader's own generator seeds its workers, so it never draws from the global RNG
        yield from DataLoader(dataset, batch_size=rank_batch, sampler=indices, num_workers=num_workers,
                              pin_memory=device.type == "cuda", generator=generator)
        epoch, offset = epoch + 1, 0


def _loss(task: str, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The loss of a batch: cross-entropy of the class (or next-token) logits for classification, the half
    squared error ``(y_hat - y)^2 / 2`` for a regression (experiments.data.DataSplits.task)."""
    if task == "regression":
        squared = 0.5 * ((logits - y) ** 2)
        return squared.mean() if reduction == "mean" else squared.sum()
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction=reduction)


def _test_batches(dataset: Dataset, batch_size: int, max_batches: int | None, rank: int, world_size: int,
                  num_workers: int) -> DataLoader:
    """The first ``max_batches`` global batches of the test split (all if None), in order; this rank's share."""
    count = len(dataset) if max_batches is None else min(len(dataset), max_batches * batch_size)
    # a generator of its own, so that evaluating never draws from the global RNG
    return DataLoader(dataset, batch_size=max(1, batch_size // world_size), sampler=range(rank, count, world_size),
                      num_workers=num_workers, generator=torch.Generator())


class _Window:
    """Sums of train loss and correct predictions since the last logged row.

    The sums stay on the device (adding to them never waits for the GPU); the counts are
    host integers.
    """

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.float64)
        self.steps, self.examples = 0, 0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, examples: int) -> None:
        self.loss += loss
        self.correct += correct
        self.steps += 1
        self.examples += examples

    def reduce(self, distributed: bool) -> dict[str, float]:
        """Mean loss per step and accuracy over the window (over all ranks), then reset."""
        sums = torch.stack([self.loss, self.correct, self.loss.new_tensor(self.steps), self.loss.new_tensor(self.examples)])
        if distributed:
            dist.all_reduce(sums)
        loss_sum, correct, steps, examples = sums.tolist()
        self.loss.zero_()
        self.correct.zero_()
        self.steps, self.examples = 0, 0
        if not examples:  # a regression
            return {"train/loss": loss_sum / steps}
        return {"train/loss": loss_sum / steps, "train/acc": correct / examples}

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.cpu(), "correct": self.correct.cpu(), "steps": self.steps, "examples": self.examples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.copy_(state["loss"])
        self.correct.copy_(state["correct"])
        self.steps, self.examples = state["steps"], state["examples"]


class _StepTimer:
    """Milliseconds per training step (forward, backward, optimizer) and of the optimizer step alone.

    On CUDA it records events in the stream instead of synchronising at every step, and reads
    them when a row is logged; elsewhere it reads the host clock.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[Any, Any, Any]] = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, start, before_step, end) -> None:
        self.spans.append((start, before_step, end))

    def read(self) -> tuple[float, float]:
        """Mean (step ms, optimizer ms) over the spans since the last read."""
        if not self.spans:
            return math.nan, math.nan
        if self.cuda:
            torch.cuda.synchronize()
            totals = [(a.elapsed_time(c), b.elapsed_time(c)) for a, b, c in self.spans]
        else:
            totals = [((c - a) * 1e3, (c - b) * 1e3) for a, b, c in self.spans]
        self.spans = []
        return sum(t for t, _ in totals) / len(totals), sum(o for _, o in totals) / len(totals)


def _peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors; on CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def _diverged(row: dict[str, Any], zero_step_size_planned: bool) -> tuple[str, str] | None:
    """(what, is what) for the first logged loss or step size that is NaN or infinite, or a step
    size of exactly 0 (underflowed: the weights stop moving) where no schedule plans one."""
    for key, value in row.items():
        if (key == "train/loss" or schema.is_step_size(key)) and not math.isfinite(value):
            return key, str(value)
        if schema.is_step_size(key) and value == 0 and not zero_step_size_planned:
            return key, "0"
    return None


def _non_finite_state(payload: dict[str, Any], step_sizes: dict[str, float]) -> tuple[str, str] | None:
    """(what, is what) for the first weight, optimizer state, train-loss sum or step size of a
    checkpoint that is NaN or infinite."""
    for part, name in (("model", "weight {}"), ("optimizer", "optimizer state {}"),
                       ("window", "train/{} summed since the last logged row")):
        found = checkpoint.first_non_finite(payload[part])
        if found is not None:
            return name.format(found), "not finite"
    for key, value in step_sizes.items():
        if not math.isfinite(value):
            return key, str(value)
    return None


def _divergence_message(what: str, value: str, run: RunState) -> str:
    if not schema.is_step_size(what):
        cause = ("training diverged: the updates grew too large for this model. Lower the step size "
                 "(optimizer.alpha0 and optimizer.meta_lr for MetaOptimize, optimizer.lr otherwise), clip "
                 "gradients with trainer.grad_clip=1.0")
        if run.cfg.trainer.precision == "fp16":
            cause += ", or train in trainer.precision=bf16 (fp16 overflows)"
    elif value == "0":
        cause = ("the learned step size underflowed to 0, so the weights no longer move. Lower optimizer.meta_lr, "
                 "or start lower with optimizer.alpha0 (a step size far too large is shrunk this fast)")
    else:
        cause = "the learned step size diverged. Lower optimizer.meta_lr, or start lower with optimizer.alpha0"
    kept = ("the last checkpoint, from before this (a diverged state is never checkpointed)"
            if os.path.exists(run.checkpoint_path) else "no checkpoint (none was due yet)")
    return (f"{what} is {value} at step {run.step}: {cause}. metrics.csv keeps every row up to here and the run "
            f"folder keeps {kept}; a changed override starts a fresh run folder.")


class _StopSignals:
    """Catches the preemption signals (STOP_SIGNALS) from its creation to ``restore()``.

    The handler only records a signal: the loop checkpoints at the end of the current step, so
    a checkpoint never holds half a step. ``hand_over()`` then passes the first signal to the
    handler that was there before, where that is a Python function: submitit's, which requeues
    the job (SIGUSR2) or logs the signal (SIGTERM). The default action or an ignored signal is
    not passed on: a run outside submitit returns and exits with status 3.
    """

    def __init__(self):
        self.received: list[int] = []
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            for signum in STOP_SIGNALS:
                if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                    continue  # started with nohup: a closed terminal is not a reason to stop
                self.previous[signum] = signal.signal(signum, self._record)

    def _record(self, signum: int, frame: Any) -> None:
        self.received.append(signum)

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received[0]).name if self.received else None

    @property
    def hands_over(self) -> bool:
        return bool(self.received) and callable(self.previous.get(self.received[0]))

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def hand_over(self) -> None:
        if self.hands_over:
            self.previous[self.received[0]](self.received[0], None)


def _any_rank(flag: bool, distributed: bool) -> bool:
    if not distributed:
        return flag
    tensor = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def _postfix(row: dict[str, Any]) -> dict[str, str]:
    postfix = {k.split("/")[-1]: _fmt(row[k]) for k in ("train/loss", "test/loss", "test/acc") if k in row}
    step_sizes = [v for k, v in row.items() if schema.is_step_size(k)]
    if step_sizes:
        postfix["step_size"] = _fmt(step_sizes[0]) if len(step_sizes) == 1 else f"{_fmt(min(step_sizes))}..{_fmt(max(step_sizes))}"
    return postfix


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
