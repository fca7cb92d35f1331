"""The training loop. The trainer owns the loop and one iteration (``run_step``); hooks do the rest.

The order of every call, the stop check included, is in ``engine.hooks.HookBase``'s docstring.
"""

import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import all_reduce_sum, get_world_size, in_process_group, unwrapped
from engine.hooks import HOOK_METHODS, HookBase, TrainingInterrupted
from engine.precision import autocast_runs_on, needs_grad_scaler
from engine.rng import gather_rng_states, restore_rng_state, rng_state_of_this_rank

logger = logging.getLogger("engine")

# The default training loss: summed over the batch (the trainer divides by the samples of the whole step).
cross_entropy_sum = functools.partial(F.cross_entropy, reduction="sum")


class Batch(Protocol):
    images: torch.Tensor  # [N, C, H, W] on the training device
    labels: torch.Tensor  # [N] class indices, or [N, classes] probabilities (mixed batches)


class BatchSource(Protocol):
    """What the trainer iterates: this process's share of every global batch, epoch by epoch."""

    def epoch(self, epoch: int, start: int = 0) -> Iterable[Batch]:
        """The batches of ``epoch`` from batch ``start`` on (resuming mid-epoch), in the same order every time."""

    def __len__(self) -> int:
        """Batches per epoch."""

    def global_batch_size(self, index: int) -> int:
        """Samples in batch ``index`` summed over all processes (the last batch may be smaller)."""


class MetricStorage:
    """Scalars recorded by the step and the hooks, kept (on the device where they live) until written.

    ``drain`` reads everything pending with one host sync. Tensor values are summed over processes on the
    way (each rank stores its share of a global mean), so every rank must call ``drain`` at the same points;
    plain numbers are taken as they are.
    """

    def __init__(self):
        self._pending: list[tuple[str, object, object]] = []

    def put(self, name: str, value, step: int) -> None:
        self._pending.append((name, value, step))

    def put_series(self, name: str, values: torch.Tensor, steps: list[int]) -> None:
        """One value per step of ``steps``, as a 1-D device tensor (read in the same sync as the rest)."""
        self._pending.append((name, values, list(steps)))

    def drain(self) -> list[tuple[str, float, int]]:
        """The pending records as ``(name, number, step)``."""
        pending, self._pending = self._pending, []
        tensors = [value.detach().float().reshape(-1) for _, value, _ in pending if isinstance(value, torch.Tensor)]
        read = iter(all_reduce_sum(torch.cat(tensors)).tolist() if tensors else [])
        records = []
        for name, value, step in pending:
            if isinstance(step, list):
                records += [(name, next(read), one_step) for one_step in step]
            else:
                records.append((name, next(read) if isinstance(value, torch.Tensor) else float(value), step))
        return records


@dataclass(slots=True)
class StepOutputs:
    """What the step that just ran produced, for ``after_step`` hooks (``trainer.step_outputs``).

    ``loss_sum`` stays on the device (reading it waits for the step: read it every N steps, not every step)."""

    loss_sum: torch.Tensor  # this process's training loss summed over its samples of the step
    samples: int  # samples in the whole step: all its batches, all processes
    batches: int  # batches in the step (TRAIN.ACCUM_STEPS, fewer at an epoch's end)
    iteration: int  # the step's number, 1-based (= trainer.iter after it)

    @property
    def loss(self) -> torch.Tensor:
        """This process's mean training loss of the step (a device tensor)."""
        return self.loss_sum * (get_world_size() / self.samples)


class Trainer:
    """Runs ``max_epochs`` epochs over ``train_batches``; hooks evaluate, log, checkpoint.

    One iteration is one optimizer step over ``accum_steps`` consecutive batches. ``iter`` counts finished
    iterations; it is the MLflow step of every metric and the only position a checkpoint needs.

    ``loss(logits, targets)`` returns the loss summed over the batch (``reduction="sum"``; targets are class
    indices or per-class probabilities): the trainer divides by the samples of the whole step, so gradient
    accumulation and DDP give the exact mean. ``amp_dtype``: the autocast type of ``amp`` (float16 on CUDA only,
    with a GradScaler; bfloat16 on CUDA and the CPU, without one). ``checkpoint_extras`` are saved as they are
    in every checkpoint. Public state for hooks: ``iter``, ``epoch``, ``max_iter``, ``iters_per_epoch``,
    ``storage``, ``latest_eval`` (the newest evaluation, set by ``EvalHook``), ``step_outputs`` (the last step's
    loss and sizes: ``StepOutputs``), ``exception`` (what ended ``train``, if anything).
    """

    def __init__(self, model: nn.Module, optimizer, train_batches: BatchSource, max_epochs: int, device,
                 hooks: Iterable[HookBase] = (), loss: Callable | None = None, amp: bool = False,
                 accum_steps: int = 1, clip_grad_norm: float = 0.0, stop_check_period: int = 1,
                 checkpoint_extras: dict | None = None, amp_dtype: torch.dtype = torch.float16):
        self.model, self.optimizer, self.train_batches = model, optimizer, train_batches
        self.loss = loss or cross_entropy_sum
        self.device = torch.device(device)
        self.max_epochs, self.accum_steps, self.clip_grad_norm = max_epochs, accum_steps, clip_grad_norm
        self.checkpoint_extras = dict(checkpoint_extras or {})
        self.world_size = get_world_size()
        # How often processes agree on a stop request (and hooks on failures only one rank sees, such as a
        # checkpoint write): every step alone, less often under DDP to save a sync.
        self._in_process_group = in_process_group()
        self.stop_check_period = stop_check_period if self._in_process_group else 1
        self._stop_reason: str | None = None
        self.amp, self.amp_dtype = amp and autocast_runs_on(self.device, amp_dtype), amp_dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and needs_grad_scaler(amp_dtype))
        self.iters_per_epoch = math.ceil(len(train_batches) / accum_steps)
        self.max_iter = self.iters_per_epoch * max_epochs
        self.iter, self.epoch = 0, 0
        # Epochs whose after_epoch hooks have run. Usually iter // iters_per_epoch, but a checkpoint taken at
        # an epoch's last step (periodic, or on a signal) comes before that epoch's evaluation: a resume
        # from it must still run the epoch-end hooks.
        self.epochs_completed = 0
        self.storage = MetricStorage()
        self.latest_eval: dict | None = None
        self.step_outputs: StepOutputs | None = None
        self.exception: BaseException | None = None
        # Each step's summed loss (on the device), its samples and its step number: divided, stored as
        # train_loss and checked for NaN or inf at the next flush_metrics, in one batch of tensor ops and the
        # flush's one host sync, instead of several small ops every step.
        self._step_losses: list[tuple[torch.Tensor, int, int]] = []
        self._loss_gradients: dict[int, torch.Tensor] = {}  # by samples in the step (the last may be short)
        self._scaling = self.scaler.is_enabled()
        # Per iteration of an epoch: (batches, samples summed over them and over processes). The same every
        # epoch, so the step reads two numbers instead of asking the batch source each time.
        self._step_sizes = self._plan_steps()
        self.hooks: list[HookBase] = []
        self.register_hooks(hooks)

    def register_hooks(self, hooks: Iterable[HookBase]) -> None:
        for hook in hooks:
            if hook.state_key is None and type(hook).state_dict is not HookBase.state_dict:
                raise TypeError(f"the hook {type(hook).__name__} keeps state (it defines state_dict) but has no "
                                f"state_key; set state_key = \"{_snake_case(type(hook).__name__)}\" in the class: "
                                "a stable name its state is saved and found under when a run resumes")
            hook._attach(self)
            self.hooks.append(hook)
        self._dispatch = self._methods_of(self.hooks)

    @staticmethod
    def _methods_of(hooks: list[HookBase]) -> dict[str, list]:
        """Per hook method, the bound methods of the hooks that override it: the others are never called."""
        return {name: [getattr(hook, name) for hook in hooks
                       if getattr(type(hook), name) is not getattr(HookBase, name)] for name in HOOK_METHODS}

    @property
    def unwrapped_model(self) -> nn.Module:
        """The plain module inside torch.compile's wrapper and DataParallel / DistributedDataParallel."""
        return unwrapped(self.model)

    def train(self) -> None:
        epochs = f"{self.max_epochs} epoch{'s' if self.max_epochs != 1 else ''}"
        logger.info(f"training for {epochs} ({self.max_iter} iterations), starting at {self.iter}")
        self._dispatch = self._methods_of(self.hooks)  # ``hooks`` may have been edited since registration
        try:
            self._call("before_train")
            self.epoch = self.epochs_completed
            while self.epoch < self.max_epochs:
                self._train_one_epoch()
                self.epochs_completed = self.epoch = self.epoch + 1
            self.epoch = self.max_epochs - 1  # hooks in after_train see the last epoch
        except BaseException as error:
            self.exception = error  # hooks look at it in after_train (e.g. checkpoint on interruption)
            raise
        finally:
            self._call_each("after_train")

    def _train_one_epoch(self) -> None:
        self.model.train()
        self._call("before_epoch")
        first_batch = (self.iter - self.epoch * self.iters_per_epoch) * self.accum_steps
        batches = iter(self.train_batches.epoch(self.epoch, start=first_batch))
        before_step, after_step = self._dispatch["before_step"], self._dispatch["after_step"]
        end = (self.epoch + 1) * self.iters_per_epoch
        while self.iter < end:
            for call in before_step:
                call()
            self.run_step(batches)
            self.iter += 1
            for call in after_step:
                call()
            if self._stop_reason is not None or self._in_process_group:
                self._stop_if_requested()
        self._call("after_epoch")

    def run_step(self, batches: Iterator[Batch]) -> None:
        """One optimizer step over up to ``accum_steps`` batches; the loss is the exact mean over their samples.

        On a GPU this is the host's whole share of a step: every line here is paid at every step, so the
        step asks nothing it can know in advance (sizes, contexts, whether a scaler runs)."""
        count, step_samples = self._step_sizes[self.iter - self.epoch * self.iters_per_epoch]
        gradient = self._loss_gradient(step_samples)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = None
        for position in range(count):
            batch = next(batches)
            if self.amp or position < count - 1:  # autocast, or DDP's no_sync on all but the last batch
                with self._maybe_no_sync(position == count - 1), self._autocast():
                    loss = self.loss(self.model(batch.images), batch.labels)
            else:
                loss = self.loss(self.model(batch.images), batch.labels)
            loss = loss if loss.dtype == torch.float32 else loss.float()
            loss.backward(self.scaler.scale(gradient) if self._scaling else gradient)
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        self._optimizer_step()
        self._step_losses.append((loss_sum, step_samples, self.iter + 1))
        self.step_outputs = StepOutputs(loss_sum, step_samples, count, self.iter + 1)

    def _plan_steps(self) -> list[tuple[int, int]]:
        """(batches, summed samples) of every iteration of an epoch (the last ones may be fewer or smaller)."""
        sizes = [self.train_batches.global_batch_size(index) for index in range(len(self.train_batches))]
        steps = [sizes[first:first + self.accum_steps] for first in range(0, len(sizes), self.accum_steps)]
        return [(len(step), sum(step)) for step in steps]

    def _loss_gradient(self, step_samples: int) -> torch.Tensor:
        """d(mean loss of the step)/d(this process's summed loss) = world_size / step_samples (DDP averages
        gradients over ranks). Handed to ``backward`` as its starting gradient: the same float32 value as
        multiplying the loss by it first, without a multiply and its backward node at every step."""
        gradient = self._loss_gradients.get(step_samples)
        if gradient is None:
            gradient = torch.tensor(self.world_size / step_samples, dtype=torch.float32, device=self.device)
            self._loss_gradients[step_samples] = gradient
        return gradient

    def _optimizer_step(self) -> None:
        if self.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        if self._scaling:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _maybe_no_sync(self, last_micro_batch: bool):
        if not last_micro_batch and hasattr(self.model, "no_sync"):
            return self.model.no_sync()  # DDP: all-reduce gradients only on the step's last batch
        return nullcontext()

    def _autocast(self):
        return torch.autocast(self.device.type, self.amp_dtype) if self.amp else nullcontext()

    # ---- metrics and the non-finite check ----------------------------------------------------------------
    def flush_metrics(self) -> None:
        """Read the stored metrics (one host sync), raise if a training loss was NaN or inf, and hand the
        records to every hook's ``write_metrics``. Call it on every rank at the same points (DDP sums over
        ranks, so a NaN on one rank is a NaN on all of them, and every rank raises at the same point)."""
        if self._step_losses:
            losses, samples, steps = zip(*self._step_losses, strict=True)
            self._step_losses = []
            divisors = torch.tensor(samples, dtype=torch.float32, device=self.device)
            self.storage.put_series("train_loss", torch.stack(losses) / divisors, steps)
        records = self.storage.drain()
        self._raise_if_not_finite(records)
        if records:
            for call in self._dispatch["write_metrics"]:
                call(records)

    def _raise_if_not_finite(self, records: list[tuple[str, float, int]]) -> None:
        bad = next((step for name, value, step in records if name == "train_loss" and not math.isfinite(value)), None)
        if bad is not None:
            epoch = (bad - 1) // self.iters_per_epoch + 1
            raise FloatingPointError(
                f"the training loss became NaN or inf at iteration {bad} (epoch {epoch}); "
                "lower TRAIN.LR, set TRAIN.CLIP_GRAD_NORM, or check the data. Earlier checkpoints are intact.")

    # ---- stopping ----------------------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step (safe to call from a signal handler)."""
        self._stop_reason = reason

    @property
    def stop_requested(self) -> bool:
        return self._stop_reason is not None

    def _stop_if_requested(self) -> None:
        if self.iter % self.stop_check_period and self.iter != self.max_iter:
            return
        requested = self._stop_reason is not None
        if self._in_process_group:  # every rank must stop at the same iteration
            flag = torch.tensor([float(requested)], device=self.device)
            requested = bool(all_reduce_sum(flag).item())
        if requested:
            raise TrainingInterrupted(f"stopped by {self._stop_reason or 'another process'} at iteration {self.iter}")

    def _call(self, method: str) -> None:
        for call in self._dispatch[method]:
            call()

    def _call_each(self, method: str) -> None:
        """Every hook's ``method``, also after one of them raised (then the first error is raised at the end):
        a later hook may be the one that waits for the checkpoint writes."""
        first_error = None
        for call in self._dispatch[method]:
            try:
                call()
            except BaseException as error:
                first_error = first_error or error
        if first_error is not None:
            raise first_error

    # ---- state for checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything that decides the next step. Under DDP it gathers every rank's random state (a
        collective): call it on every rank at the same point."""
        return {
            "iteration": self.iter,
            "epochs_completed": self.epochs_completed,
            "model": self.unwrapped_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "hooks": {key: hook.state_dict() for key, hook in self._keyed_hooks() if hook.state_dict()},
            "rng": gather_rng_states(),  # one entry per rank
            **self.checkpoint_extras,
        }

    def load_state_dict(self, state: dict) -> None:
        self.iter = state["iteration"]
        self.epochs_completed = state["epochs_completed"]
        self.unwrapped_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        restore_scaler(self.scaler, state["scaler"])
        for key, hook in self._keyed_hooks():
            if key in state["hooks"]:
                hook.load_state_dict(state["hooks"][key])
        restore_rng_state(rng_state_of_this_rank(state["rng"]))

    def _keyed_hooks(self) -> list[tuple[str, HookBase]]:
        """Hooks by their ``state_key``, numbered when a key occurs twice (``ema``, ``ema#2``)."""
        seen: dict[str, int] = {}
        keyed = []
        for hook in self.hooks:
            name = hook.state_key or type(hook).__name__  # (a hook without state: never saved)
            seen[name] = seen.get(name, 0) + 1
            keyed.append((name if seen[name] == 1 else f"{name}#{seen[name]}", hook))
        return keyed


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict) -> None:
    """Load the GradScaler's state. A checkpoint written without AMP (on the CPU, say) holds an empty one:
    resumed with AMP on, the scaler then starts from its initial scale."""
    if not saved and scaler.is_enabled():
        logger.info("the checkpoint was written without AMP: the GradScaler starts from its initial scale")
        return
    scaler.load_state_dict(saved)


def _snake_case(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))
