"""The training loop. The trainer owns the loop and one iteration (``run_step``); hooks do the rest."""

import functools
import io
import logging
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import (
    all_gather_objects,
    all_reduce_sum,
    earliest_over_ranks,
    get_rank,
    get_world_size,
    in_process_group,
    unwrapped,
)
from engine.hooks import HookBase, TrainingInterrupted
from engine.precision import autocast_runs_on, needs_grad_scaler

logger = logging.getLogger("engine")


class MetricStorage:
    """Scalars recorded by the step and the hooks, kept (on the device where they live) until written.

    The step puts its loss as a device tensor; ``drain`` reads everything pending with one host sync.
    Tensor values are summed over processes on the way (each rank stores its share of a global mean), so
    every rank must call ``drain`` at the same points; plain numbers are taken as they are.
    """

    def __init__(self):
        self._pending: list[tuple[str, object, int]] = []

    def put(self, name: str, value, step: int) -> None:
        self._pending.append((name, value, step))

    def drain(self) -> list[tuple[str, float, int]]:
        pending, self._pending = self._pending, []
        tensors = [value for _, value, _ in pending if isinstance(value, torch.Tensor)]
        values = iter(all_reduce_sum(torch.stack([t.detach().float() for t in tensors])).tolist() if tensors else ())
        return [(name, next(values) if isinstance(value, torch.Tensor) else float(value), step)
                for name, value, step in pending]


class Trainer:
    """Runs ``max_epochs`` epochs over ``train_batches`` (a batch source with ``epoch(epoch, start)``).

    One iteration is one optimizer step over ``accum_steps`` consecutive batches. ``iter`` counts finished
    iterations; it is the MLflow step of every metric and the only position a checkpoint needs.

    ``loss(logits, targets)`` returns the SUM of the per-sample losses over the batch (the step divides by the
    samples of the whole step, so accumulation and DDP give the exact mean); targets are class indices or
    per-class probabilities (mixup, cutmix). Default: cross-entropy, summed. ``amp_dtype``: the autocast type
    of ``amp`` (float16 on CUDA only, with a GradScaler; bfloat16 on CUDA and the CPU, without one).
    """

    def __init__(self, model: nn.Module, optimizer, train_batches, max_epochs: int, device,
                 hooks: list[HookBase] = (), amp: bool = False, accum_steps: int = 1, clip_grad_norm: float = 0.0,
                 stop_check_period: int = 1, loss=None, amp_dtype: torch.dtype = torch.float16):
        self.model, self.optimizer, self.train_batches = model, optimizer, train_batches
        self.device = torch.device(device)
        self.max_epochs, self.accum_steps, self.clip_grad_norm = max_epochs, accum_steps, clip_grad_norm
        self.world_size = get_world_size()
        # How often processes agree on a stop request (and hooks on failures only one rank sees, such as a
        # checkpoint write): every step alone, less often under DDP to save a sync.
        self.stop_check_period = stop_check_period if in_process_group() else 1
        self._stop_reason: str | None = None
        self.loss = loss or functools.partial(F.cross_entropy, reduction="sum")
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
        self.exception: BaseException | None = None  # what ended train(), if it raised
        self.checkpoint_extras = dict  # callable -> extra entries saved in every checkpoint (run id, config)
        # First iteration whose loss was not finite, kept on the device: checking it every step would
        # force a host sync, so it is read only when metrics are written and before each checkpoint.
        self._first_bad_iter = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.hooks: list[HookBase] = []
        self.register_hooks(hooks)

    def register_hooks(self, hooks) -> None:
        for hook in hooks:
            hook._attach(self)
            self.hooks.append(hook)

    @property
    def unwrapped_model(self) -> nn.Module:
        """The plain module inside torch.compile's wrapper and DataParallel / DistributedDataParallel."""
        return unwrapped(self.model)

    def train(self) -> None:
        logger.info(f"training for {self.max_epochs} epochs ({self.max_iter} iterations), starting at {self.iter}")
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
            self._call("after_train")

    def _train_one_epoch(self) -> None:
        self.model.train()
        self._call("before_epoch")
        first_batch = (self.iter - self.epoch * self.iters_per_epoch) * self.accum_steps
        batches = iter(self.train_batches.epoch(self.epoch, start=first_batch))
        while self.iter < (self.epoch + 1) * self.iters_per_epoch:
            self._call("before_step")
            self.run_step(batches)
            self.iter += 1
            self._call("after_step")
            self._stop_if_requested()
        self._call("after_epoch")

    def run_step(self, batches) -> None:
        """One optimizer step over up to ``accum_steps`` batches; the loss is the exact mean over their samples."""
        micro_batches = self._batches_in_step()
        step_samples = sum(self.train_batches.global_batch_size(b) for b in micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = None
        for position in range(len(micro_batches)):
            batch = next(batches)
            last = position == len(micro_batches) - 1
            with self._maybe_no_sync(last), torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp):
                loss = self.loss(self.model(batch.images), batch.labels)
            loss = loss if loss.dtype == torch.float32 else loss.float()
            # Sum over local samples / samples of the whole step; DDP averages gradients over ranks, so
            # scaling by world_size makes the gradient the mean over the global step.
            self.scaler.scale(loss * (self.world_size / step_samples)).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        self._optimizer_step()
        step_loss = loss_sum / step_samples
        self._first_bad_iter = torch.where((self._first_bad_iter < 0) & ~torch.isfinite(step_loss),
                                           self.iter, self._first_bad_iter)
        self.storage.put("train_loss", step_loss, self.iter + 1)

    def _optimizer_step(self) -> None:
        if self.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _batches_in_step(self) -> range:
        """Indices (within the epoch) of the batches this iteration consumes."""
        first = (self.iter - self.epoch * self.iters_per_epoch) * self.accum_steps
        return range(first, min(first + self.accum_steps, len(self.train_batches)))

    def _maybe_no_sync(self, last_micro_batch: bool):
        if not last_micro_batch and hasattr(self.model, "no_sync"):
            return self.model.no_sync()  # DDP: all-reduce gradients only on the step's last batch
        return _NullContext()

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
        if in_process_group():  # every rank must stop at the same iteration
            flag = torch.tensor([float(requested)], device=self.device)
            requested = bool(all_reduce_sum(flag).item())
        if requested:
            raise TrainingInterrupted(f"stopped by {self._stop_reason or 'another process'} at iteration {self.iter}")

    def check_finite(self) -> None:
        """Raise if any loss so far was NaN or inf, naming the first such iteration (1-based).

        Under DDP the ranks agree first (one all-reduce): every rank raises at the same point with the same
        message, also when only one of them saw the bad loss. Call it on every rank at the same points.
        """
        bad = earliest_over_ranks(self._first_bad_iter)
        if bad >= 0:
            epoch = bad // self.iters_per_epoch + 1
            raise FloatingPointError(
                f"the training loss became NaN or inf at iteration {bad + 1} (epoch {epoch}); "
                "lower TRAIN.LR, set TRAIN.CLIP_GRAD_NORM, or check the data. Earlier checkpoints are intact.")

    def _call(self, method: str) -> None:
        for hook in self.hooks:
            getattr(hook, method)()

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
            **self.checkpoint_extras(),
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
        """Hooks named by class, numbered when a class occurs twice (``MyHook``, ``MyHook#2``)."""
        seen: dict[str, int] = {}
        keyed = []
        for hook in self.hooks:
            name = type(hook).__name__
            seen[name] = seen.get(name, 0) + 1
            keyed.append((name if seen[name] == 1 else f"{name}#{seen[name]}", hook))
        return keyed


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def capture_rng_state() -> dict:
    """The global random streams training draws from, in types that ``torch.load(weights_only=True)`` accepts.

    Python's ``random`` is recorded but never seeded or restored: other libraries draw from it (MLflow's run
    names), and training does not.
    """
    numpy_state = np.random.get_state()
    return {
        "python": _to_lists(random.getstate()),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def gather_rng_states() -> list[dict]:
    """Every rank's ``capture_rng_state()``, in rank order (a collective under DDP).

    Sent as ``torch.save`` bytes and read back with ``weights_only=True``: tensors inside objects do not
    survive ``all_gather_object`` itself.
    """
    state = capture_rng_state()
    if not in_process_group():
        return [state]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return [torch.load(io.BytesIO(data), weights_only=True) for data in all_gather_objects(buffer.getvalue())]


def restore_rng_state(state: dict) -> None:
    """Set the global random streams from ``capture_rng_state``'s result (Python's ``random`` is left alone).

    CUDA states are restored for the GPUs visible now: a checkpoint of more GPUs (``TRAIN.GPUS`` may change
    on resume) gives its first ones, a checkpoint written on the CPU leaves the GPUs' streams alone.
    """
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    saved, visible = state["cuda"], torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, cuda_state in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(cuda_state, index)
    if saved and len(saved) != visible:
        logger.info(f"the checkpoint holds the CUDA random states of {len(saved)} GPU(s), {visible} visible now: "
                    f"restored {min(len(saved), visible)}")


def rng_state_of_this_rank(saved) -> dict:
    """This rank's entry of a checkpoint's ``rng`` (one per rank; older checkpoints hold one for all ranks).

    With more ranks than entries (resumed on more processes) the extra ranks take rank 0's.
    """
    states = saved if isinstance(saved, list) else [saved]
    rank, world_size = get_rank(), get_world_size()
    if len(states) != world_size and rank == 0:
        logger.info(f"the checkpoint holds the random states of {len(states)} process(es), this run has "
                    f"{world_size}")
    return states[rank] if rank < len(states) else states[0]


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict) -> None:
    """Load the GradScaler's state. A checkpoint written without AMP (on the CPU, say) holds an empty one:
    resumed with AMP on, the scaler then starts from its initial scale."""
    if not saved and scaler.is_enabled():
        logger.info("the checkpoint was written without AMP: the GradScaler starts from its initial scale")
        return
    scaler.load_state_dict(saved)


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value
