"""Preemption: a signal asks the run to checkpoint and stop, instead of killing it.

A cluster scheduler preempting a job sends SIGTERM (Slurm, Kubernetes; then SIGKILL after
a grace period); SIGUSR1 is the usual "time is nearly up" signal (`sbatch --signal=USR1@120`).
The default action of both is to end the process at once, losing everything since the last
checkpoint. Inside `Preemption()` they only raise a flag; the training loop tests it once
per micro-step, writes a checkpoint at that micro-step and exits with `REQUEUE_EXIT`, and
`--resume latest` continues bit-exactly.

    from rpo.preempt import Preemption, REQUEUE_EXIT
    with Preemption() as preempt:                 # main thread only (Python's rule for handlers)
        for step in ...:
            micro_step(...)
            if preempt.requested_on_any(accelerator):   # a collective: every rank calls it each step
                save_checkpoint(...)
                print(preempt.message(step))
                sys.exit(REQUEUE_EXIT)

API:
- `Preemption(signals=(SIGTERM, SIGUSR1))`: context manager; installs the handlers on
  enter and puts the previous ones back on exit (also after an exception).
- `.requested` (bool), `.signal_name` ("SIGTERM", ... or None), `.request(signum)` (what the
  handler calls; tests and code may call it too).
- `.requested_on_any(accelerator=None)`: True on every rank when any rank got a signal
  (an all-reduce of one number when torch.distributed is initialised, else `.requested`),
  so all ranks checkpoint at the same micro-step even if the signal reached only one.
- `REQUEUE_EXIT = 75` (EX_TEMPFAIL of sysexits.h, "temporary failure, try again"): the
  status of a run that stopped on a signal after writing its checkpoint. A requeue script
  tests it: `python train.py ... ; [ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID`.
  Status 2 stays "bad input" (rpo.cli.run_main), 1 a crash.

A second signal while the flag is up changes nothing: Slurm signals every task of a step
and the launcher forwards its own signal too, so one rank may see two. Under `accelerate
launch` (torch elastic), SIGTERM to the launcher is forwarded to the ranks, which are then
killed after TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30): raise it above the
time a checkpoint takes. The launcher forwards SIGUSR1 only with
`TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1`; otherwise send it
to the ranks themselves (`scancel --signal=USR1 --full`, or to the process group).
"""
import signal

REQUEUE_EXIT = 75  # EX_TEMPFAIL: checkpointed on a signal, requeue me
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """A flag raised by SIGTERM / SIGUSR1 while inside the `with` block (module docstring)."""

    def __init__(self, signals=SIGNALS):
        self.signals = tuple(signals)
        self.signum = None
        self._previous = {}

    @property
    def requested(self):
        return self.signum is not None

    @property
    def signal_name(self):
        return signal.Signals(self.signum).name if self.signum is not None else None

    def request(self, signum=signal.SIGTERM, frame=None):
        if self.signum is None:
            self.signum = int(signum)

    def requested_on_any(self, accelerator=None):
        """Whether any rank got a signal; a collective when several processes run."""
        import torch
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        device = accelerator.device if accelerator is not None else (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu"))
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.signum is None:
            self.signum = int(signal.SIGTERM)  # another rank's signal: stop the same way
        return flag.item() > 0

    def message(self, step):
        """The line a stopped run prints."""
        return (f"{self.signal_name or 'a signal'} received: checkpoint written at micro-step {step}; exiting with "
                f"status {REQUEUE_EXIT} (requeue and --resume latest to continue)")

    def __enter__(self):
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self.request)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        return False
