"""Objectives by name (`--objective`): `objective(model=, params=, family=, sample=, noise=,
autocast=) -> (loss, stats)` with `stats` under the objective's `stat_keys`; `source` names
the pair source it trains on (None: the one `--buffer_mode` names); `needs_reference` says
whether a frozen reference model is loaded."""
from rpo.training.objectives.ranking import Ranking
from rpo.training.objectives.sft import SFT

OBJECTIVES = {cls.name: cls for cls in (Ranking, SFT)}
