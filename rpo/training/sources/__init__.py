"""Pair sources by name: where a micro-step's training batch comes from. Each has
`draw(step, state) -> (sample, noise)`, every random draw from the state's generators;
`expert_batch_size(args)` (the expert loader's batch), `truncatable` (whether truncated
rollouts can apply) and `from_options(args, refiller=, params=, family=)`."""
from rpo.training.sources.experts import ExpertSamples
from rpo.training.sources.replay import ReplayPairs
from rpo.training.sources.resample import ResamplePairs

SOURCES = {cls.name: cls for cls in (ReplayPairs, ResamplePairs, ExpertSamples)}
