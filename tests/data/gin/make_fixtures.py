"""Write config.gin fixtures with the reference gin: gin.config_str(), as outer_train.run_train does."""

import json
import sys

import gin
from learned_optimization import outer_train  # noqa: F401  (registers run_train and the outer trainers)
from learned_optimization.learned_optimizers import adafac_mlp_lopt, mlp_lopt  # noqa: F401
from learned_optimization.optimizers import gradient_accumulator, optax_opts  # noqa: F401
from learned_optimization.outer_trainers import (  # noqa: F401
    full_es,
    gradient_learner,
    lopt_truncated_step,
    truncation_schedule,
)
from learned_optimization.research.general_lopt import hyper_v2  # noqa: F401
from learned_optimization.tasks import quadratics  # noqa: F401
from learned_optimization.tasks.fixed import image_mlp  # noqa: F401

out = sys.argv[1]
expected = {}


def record(name, cls, scope):
    """What gin itself would pass to the learned optimizer's constructor (scope as run_train would see it)."""
    with gin.config_scope(scope):
        bindings = gin.get_bindings(cls, resolve_references=True)
    expected[name] = {"class": cls, "bindings": bindings}
    with open(f"{out}/{name}", "w") as f:
        f.write(gin.config_str())
    gin.clear_config()


# The training bindings of learned_optimization/research/general_lopt/configs/large_scale_phase1.py, plus a
# macro, a long tuple (gin wraps it over several lines with a backslash) and unrelated configurables.
COMMON = [
    "NUM_TASKS = 8",
    "run_train.outer_learner_fn = @GradientLearner",
    "run_train.num_estimators = 8",
    "run_train.trainer_batch_size = 512",
    "run_train.staleness = 100",
    "run_train.stochastic_resample_frequency = 1000",
    "run_train.summary_every_n = 25",
    "run_train.num_steps = 100000",
    "periodically_save_checkpoint.time_interval = 60",
    "GradientLearner.theta_opt = @GradientClipOptimizer()",
    "GradientClipOptimizer.opt = @GradientAccumulator()",
    "GradientAccumulator.opt = @Adam()",
    "Adam.learning_rate = 3e-4",
    "GradientAccumulator.num_average = 4",
    "build_gradient_estimators.gradient_estimator_fn = @FullES",
    "VectorizedLOptTruncatedStep.trunc_sched = @NeverEndingTruncationSchedule()",
    "FullES.truncation_schedule = @LogUniformLengthSchedule()",
    "LogUniformLengthSchedule.min_length = 100",
    "LogUniformLengthSchedule.max_length = 20000",
    "FullES.loss_type = 'last_recompute'",
    "FullES.recompute_samples = 100",
    "FullES.sign_delta_loss_scalar = 1.0",
    "VectorizedLOptTruncatedStep.random_initial_iteration_offset = 10000",
    "VectorizedLOptTruncatedStep.num_tasks = %NUM_TASKS",
    "build_gradient_estimators.sample_task_family_fn = @FixedDimQuadraticFamily",
    "FixedDimQuadraticFamily.dim = (" + ", ".join(str(i) for i in range(40)) + ")",
]

# 1. VeLO-like: unscoped HyperV2 bindings, one of them through a macro.
gin.parse_config(
    ["import learned_optimization.research.general_lopt.hyper_v2"]
    + COMMON
    + [
        "HIDDEN = 512",
        "run_train.lopt = @HyperV2()",
        "GradientLearner.meta_init = @HyperV2()",
        "HyperV2.param_inits = 256",
        "HyperV2.lstm_hidden_size = %HIDDEN",
        "HyperV2.use_bugged_loss_features = False",
    ]
)
record("hyperv2_config.gin", "HyperV2", None)

# 2. Scoped: the learned optimizer is built in scope `lopt`; unscoped HyperV2 bindings are overridden there.
gin.parse_config(
    COMMON
    + [
        "run_train.lopt = @lopt/HyperV2()",
        "HyperV2.lstm_hidden_size = 64",
        "HyperV2.param_inits = 8",
        "lopt/HyperV2.lstm_hidden_size = 32",
        "other/HyperV2.param_inits = 999",
    ]
)
record("hyperv2_scoped_config.gin", "HyperV2", "lopt")

# 3. AdafacMLPLOpt (small_fc_lopt's class) with a non-default hidden size.
gin.parse_config(COMMON + ["run_train.lopt = @AdafacMLPLOpt()", "AdafacMLPLOpt.hidden_size = 16"])
record("adafac_config.gin", "AdafacMLPLOpt", None)
with open(f"{out}/expected.json", "w") as f:
    json.dump(expected, f, indent=1, sort_keys=True)
