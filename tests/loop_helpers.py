"""One `TrainLoop.micro_step` from parts built in a test (no cadence, no logdir)."""
from rpo.training.loop import TrainLoop


def micro_step(*, accelerator, model, params, family, source, objective, optimizer, lr_scheduler, state,
               max_grad_norm=1.0, step=1):
    loop = TrainLoop(accelerator=accelerator, model=model, params=params, family=family, source=source,
                     objective=objective, optimizer=optimizer, lr_scheduler=lr_scheduler, ema=None, state=state,
                     cadence=None, max_grad_norm=max_grad_norm, logdir=None, args={}, batch_size=None)
    return loop.micro_step(step)
