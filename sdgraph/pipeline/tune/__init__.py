"""``sdgraph tune`` and ``sdgraph build``: the search space, one trial, the study (here or on Ray), recipes."""

from sdgraph.pipeline.tune.objective import Budget, run_trial
from sdgraph.pipeline.tune.recipe import build, read_recipe
from sdgraph.pipeline.tune.space import Space, load_space
from sdgraph.pipeline.tune.study import TuneResult, tune

__all__ = ["Budget", "Space", "TuneResult", "build", "load_space", "read_recipe", "run_trial", "tune"]
