"""Training: the SFT losses, optimizer, trainable selection, sharded train state and the pure step.

    optimizer = make_optimizer(opt_cfg)
    graphdef, state = create_train_state(lambda: Qwen25VL(cfg, dtype="bfloat16", rngs=nnx.Rngs(0)),
                                         optimizer, mesh, trainable=freeze_vision_tower())
    step = jit_train_step(make_train_step(graphdef, optimizer, trainable=freeze_vision_tower(),
                                          schedule=learning_rate_schedule(opt_cfg), mesh=mesh),
                          state, batch, mesh)
    state, metrics = step(state, batch)      # batch = stack_microbatches([Batch.from_inputs(...), ...])
"""

from eemo_jax.train.flops import Flops, forward_flops, mfu, train_step_flops
from eemo_jax.train.freeze import (Trainable, count_trainable, freeze_paths, freeze_vision_tower, last_text_layers,
                                   only, paths, split_trainable, train_all)
from eemo_jax.train.losses import IGNORE_INDEX, LossConfig, LossSums, metrics_from_sums
from eemo_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from eemo_jax.train.state import TrainState, abstract_train_state, create_train_state, train_state_shardings
from eemo_jax.train.step import (Batch, ForwardOutput, batch_shardings, emotion_forward, jit_eval_step, jit_train_step,
                                 lm_forward, make_eval_step, make_train_step, stack_microbatches)

__all__ = [
    "IGNORE_INDEX", "Batch", "Flops", "ForwardOutput", "LossConfig", "LossSums", "OptimizerConfig", "TrainState",
    "Trainable", "abstract_train_state", "batch_shardings", "count_trainable", "create_train_state",
    "emotion_forward", "forward_flops", "freeze_paths", "freeze_vision_tower", "jit_eval_step", "jit_train_step",
    "last_text_layers", "learning_rate_schedule", "lm_forward", "make_eval_step", "make_optimizer",
    "make_train_step", "metrics_from_sums", "mfu", "only", "paths", "split_trainable", "stack_microbatches",
    "train_all", "train_state_shardings", "train_step_flops",
]
