"""Defaults shared by every recipe in configs/; each recipe file changes what its paper says.

Not a recipe itself. Sections map onto the library's config types:
  model      which backbone (a preset, or the saved model it starts from) and how it computes
  head       the EmoVerse emotion head (eemo_jax.model.heads.HeadConfig); kind "none" for plain SFT
  lora       LoRA adapters (eemo_jax.model.lora.LoraConfig); rank 0 = no LoRA
  trainable  what trains: freeze patterns, or only the last k text layers (+ the head), or only adapters
  data       the Grain input pipeline (data_pipeline.pipeline.PipelineConfig), per JAX process
  eval       the held-out split and how often to evaluate
  optimizer  AdamW, warmup + constant/linear/cosine, clipping, gradient accumulation (eemo_jax.train.optimizer)
  loss       weights of the LM, CES and DES objectives (eemo_jax.train.losses.LossConfig)
  mesh       device mesh sizes over (data, fsdp, tensor); -1 takes the remaining devices
  rules      logical axis -> mesh axis (eemo_jax.parallel.sharding.DEFAULT_RULES)
  train      run directory, length, seeds, logging, checkpoints, export
  grpo       `eemo-jax grpo` only: group size, sampling, the policy loss (TRL 1.16's options), the rewards
  aot        ahead-of-time compile target for `eemo-jax aot`
  shrink     "tiny": the recipe at CPU sizes, all else as shipped (eemo_jax.config.shrink), e.g. on the synthetic set
"""

import ml_collections

from eemo_jax.parallel.sharding import DEFAULT_RULES


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.model = dict(
      preset="tiny",  # eemo_jax.model.config presets: tiny, small, qwen25vl_3b, qwen25vl_7b (random init)
      # the weights to start from, with their architecture and tokenizer (overrides preset): an HF folder, an
      # import-hf checkpoint, a run directory (its newest checkpoint) or RUN_DIR/checkpoints/N (train/init_from.py)
      init_from="",
      hf_dir="",  # an HF folder, as init_from takes one; kept for the configs and commands that name it (set one)
      dtype="bfloat16",  # compute dtype; parameters stay float32 master weights
      param_dtype="float32",
      remat="dots_no_batch",  # none | full | dots | dots_no_batch (keeps weight matmuls, not attention scores)
      attention="xla",  # xla | cudnn (GPU)
  )
  c.head = dict(
      kind="none",  # none | pooled (the authors' ClassifyModelImprove) | token ([EMO]-token EmotionHead)
      des_dim=0,  # 0: the authors' width (pooled: hidden/2, token: 1024)
      num_attention_heads=8,
      classifier_hidden=512,
      projection_dropout=0.1,
      attention_dropout=0.1,
      classifier_dropout=0.2,
      num_hidden_layers_mean=4,
      mask_padding=True,
  )
  c.lora = dict(rank=0, alpha=64.0, dropout=0.05, targets=("all-linear",), exclude=("lm_head", "*embed*"))
  c.trainable = dict(
      freeze=(),  # parameter-path regexes to freeze, e.g. ("visual/(patch_embed|blocks)/.*",)
      last_text_layers=0,  # k > 0: only the last k decoder layers train (plus the head)
      adapters_only=False,  # True: only LoRA adapters (and the head) train
  )
  c.data = dict(
      dataset="synthetic", data_dir="", split="train", dataset_config="emoverse", tokenizer_dir="",
      image_root="", task="emoverse_ces", seq_len=1024, patch_budget=0, frame_budget=0,
      min_pixels=3136, max_pixels=200704, shuffle=True, worker_count=0, worker_buffer_size=4, read_threads=4,
      prefetch=2, overlong="truncate", packing=False,
      prompt_only=False,  # GRPO: left-padded generation prompts with their ground truth; seq_len is the bucket
      strict=False,  # a record that cannot be used (any reason) stops the run instead of being skipped and counted
      max_image_pixels=0,  # images larger (read from the header) are skipped; 0: 256 x max_pixels, capped at PIL's
      max_unusable_at_start=1000,  # stop when none of the first N records is usable (e.g. seq_len too short)
      max_unusable_in_a_row=10000,  # ... or when N in a row are not
      pixel_dtype="uint8",  # levels cross to the device and are normalised there, to the float32 values exactly
  )
  c.eval = dict(split="test", every=0, batches=8)  # every 0: only at the end
  c.optimizer = dict(
      learning_rate=1e-5,  # the peak
      # after the warmup: constant | linear | cosine, HF's get_*_schedule_with_warmup. The HF Trainer's
      # lr_scheduler_type "constant" skips the warmup whatever warmup_ratio says: reproduce it with warmup_ratio 0
      schedule="cosine",
      warmup_ratio=0.03,  # linear warmup from 0 over ceil(ratio x steps) steps (HF's count)
      end_learning_rate=0.0,  # where linear and cosine end (HF: 0)
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0, accum_steps=1)
  c.loss = dict(lm_weight=1.0, ces_weight=0.0, des_weight=0.0, des_kind="cosine",
                chunk_size=256)  # LM-head positions per chunk: (rows, 256, vocab) fp32 logits alive at a time
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.rules = tuple(DEFAULT_RULES)
  c.train = dict(
      run_dir="runs/default",  # local path or a bucket path (gs://...) shared by every host
      global_batch_size=8,  # examples per optimizer update over all hosts = per-process rows x accum x hosts
      epochs=1.0,
      steps=0,  # > 0 overrides epochs
      seed=0,
      log_every=10,
      checkpoint_every=500,
      keep_checkpoints=3,
      async_checkpoints=True,
      export_dir="",  # at the end: an HF folder (LoRA merged) + the head's safetensors
      export_overwrite=False,  # replace a non-empty export_dir this run did not write (else refused at the start)
      allow_config_changes=False,  # resume with a changed model/optimizer/batch/data config (recorded in the run)
      peak_flops=0.0,  # per-device peak FLOP/s for MFU; 0: the vendor figure of known TPUs/GPUs
  )
  # GRPO (`eemo-jax grpo`; eemo_jax.rl). train.global_batch_size counts the completions of an optimizer step
  # (prompts x num_generations), split into optimizer.accum_steps micro-batches of whole prompt groups.
  c.grpo = dict(
      num_generations=8,  # G completions per prompt
      max_completion_length=256,  # T, the rollout's static completion length
      temperature=1.0, top_k=0, top_p=1.0,  # sampling; the log-probs are of softmax(logits / temperature)
      num_iterations=1,  # optimizer steps per rollout (> 1: the rollout's log-probs are the old policy's)
      loss_type="dapo",  # grpo | bnpo | dr_grpo | dapo (rl.policy_loss; TRL 1.16's default)
      epsilon_low=0.2,
      epsilon_high=0.0,  # 0: epsilon_low
      delta=0.0,  # upper bound of the unclipped ratio (two-sided clipping); 0: none
      beta=0.0,  # KL weight to the reference policy (LoRA: the adapters switched off; else the initial weights)
      use_bias_correction_kl=True,  # k3 KL weighted by the importance ratio (TRL); False: the plain k3 term
      importance_sampling_level="token",  # token | sequence (GSPO)
      scale_rewards="group",  # group | batch | none
      aggregation="sum_then_normalize",  # | normalize_then_sum
      mask_truncated_completions=False,
      rewards=(("format", 1.0), ("eemo_task", 1.0)),  # (name, weight[, options]) of eemo_jax.rl.rewards.REWARDS
      sample_every=10,  # steps between completion samples written to samples.jsonl; 0: none
      sample_rows=8,  # completions written each time
  )
  c.aot = dict(topology="v5e:4x4", batch_size=0)  # batch_size 0: global_batch_size / accum_steps
  c.shrink = ""  # "tiny": the recipe's sizes cut to what a CPU runs in a minute, all else as shipped (config.shrink)
  c = ml_collections.ConfigDict(c)
  c.lock()  # recipes change existing fields only, so a typo in a recipe fails too
  return c
