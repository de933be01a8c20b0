"""PEFT LoRA adapter folders (`adapter_config.json` + `adapter_model.safetensors`) <-> LoRA on `Qwen25VL`.

The public EmoVerse model is such a folder on Qwen2.5-VL-3B-Instruct, and PEFT is how torch users load
LoRA weights, so `load_peft_adapter` reads one onto a loaded backbone and `save_peft_adapter` writes ours
so that `PeftModel.from_pretrained(base, folder)` loads them.

A saved PEFT key is `base_model.model.<module>.lora_A.weight` (r, in) or `.lora_B.weight` (out, r), with
no adapter name; any other key is a full weight of a `modules_to_save` module (`base_model.model.lm_head.weight`).
`<module>` is the module's name in the transformers version that made the adapter: 5.x names
(`model.language_model.layers.3.self_attn.q_proj`, `model.visual.blocks.0.attn.qkv`) or the 4.x ones
(`model.layers.3...`, `visual.blocks.0...`). Both are read; module names go through the one key table
(`eemo_jax.hf.keys`), so a module maps to the same parameter here as on import and export. We write 5.x
names: peft 0.21 with transformers 5.23 does not rename 4.x adapter keys for Qwen2.5-VL (it reports them
missing and keeps the fresh adapters), so an adapter in the 4.x layout only loads with transformers 4.x.

Which modules carry an adapter is decided by `target_modules` exactly as PEFT decides it (a list of names
matched as suffixes, a regex string matched against the whole module name, `exclude_modules`, and never a
`modules_to_save` module), and must agree with the modules in the weights file. A scanned group of layers
is adapted as a whole: layers the adapter does not target get A = B = 0, which computes nothing and, with
both factors zero, gets no gradient either. Options that change what the adapter computes (DoRA, rsLoRA,
bias, per-module ranks, ...) are refused, naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eemo_jax import paths
from eemo_jax.hf.keys import LINEAR, KeyRule, canonical_key, key_table, num_layers
from eemo_jax.hf.safetensors_io import CheckpointError, TensorSpec, read_entries, write_sharded
from eemo_jax.hf.save import _to_host, export_folder
from eemo_jax.model.config import Qwen25VLConfig
from eemo_jax.model.lora import LoraConfig, apply_lora, linear_layers
from eemo_jax.parallel.sharding import DEFAULT_RULES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel puts before the base model's own names
FACTORS = {".lora_A.weight": "a", ".lora_B.weight": "b"}
ALL_LINEAR = "all-linear"
_TRANSFORMERS5 = ("model.visual.", "model.language_model.")

# adapter_config.json fields that change nothing a trained plain LoRA computes: bookkeeping, and the
# initialisations that only choose the starting A and B. The fields read are in `read_adapter_config`.
_BOOKKEEPING = {
    "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
    "megatron_core", "runtime_config", "qalora_group_size", "ensure_weight_tying", "eva_config", "loftq_config",
    "corda_config", "lora_ga_config",
}
_READ = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save",
         "init_lora_weights"}
# Options whose non-default value changes the computation; every other field must be empty (None, False, {}, []).
_DEFAULTS = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False, "lora_bias": False}
# Initialisations after which A B is the whole update of the unchanged base weights. PiSSA, OLoRA, CorDA,
# LoftQ, LoRA-GA and MiCA also rewrite the base weights, so their adapters are deltas on another model.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """The parts of `adapter_config.json` that decide what a plain LoRA adapter computes."""
  rank: int
  alpha: float
  dropout: float
  target_modules: str | tuple[str, ...]  # a regex over whole module names, or names matched as suffixes
  exclude_modules: str | tuple[str, ...]
  modules_to_save: tuple[str, ...]
  base_model_name_or_path: str | None = None

  def targets(self, module: str, linear: bool) -> bool:
    """Whether PEFT puts an adapter on `module` (peft.tuners.tuners_utils.check_target_module_exists)."""
    if _names_match(self.exclude_modules, module) or self.saves(module):
      return False
    if isinstance(self.target_modules, str):
      if self.target_modules.lower() == ALL_LINEAR:  # PEFT: every nn.Linear but the output layer
        return linear and module != "lm_head"
      return re.fullmatch(self.target_modules, module) is not None
    return _names_match(self.target_modules, module)

  def saves(self, module: str) -> bool:
    """Whether `module` is, or is inside, a `modules_to_save` module (PEFT's own regex)."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.modules_to_save)


def _names_match(names: str | tuple[str, ...], module: str) -> bool:
  if isinstance(names, str):
    return bool(names) and re.fullmatch(names, module) is not None
  return module in names or any(module.endswith(f".{n}") for n in names)


# ------------------------------------------------------------------------------- module names
@dataclasses.dataclass(frozen=True)
class Site:
  """One module of the HF model that PEFT can adapt, in one layer."""
  name: str  # on-disk (4.x) name, e.g. model.layers.3.self_attn.q_proj
  group: str  # our module path without the layer index, e.g. language_model/layers/self_attn/q_proj
  layer: int | None  # index in the scanned group, None outside one
  linear: bool  # False for the patch Conv3d and the token embedding, which our LoRA cannot adapt


def sites(config: Qwen25VLConfig) -> list[Site]:
  """Every weight-bearing module PEFT could target, from the key table."""
  out = []
  for rule in key_table(config):
    if not rule.hf.endswith(".weight") or rule.path[-1] not in ("kernel", "embedding"):
      continue
    layers = range(num_layers(rule, config)) if rule.stacked else [None]
    for i in layers:
      out.append(Site(rule.hf_key(i).removesuffix(".weight"), "/".join(rule.path[:-1]), i, rule.transform == LINEAR))
  return out


def transformers5_name(name: str) -> str:
  """An on-disk (4.x) module or tensor name -> its transformers 5 name; the inverse of `keys.canonical_key`."""
  if name.startswith("visual."):
    return "model." + name
  if name.startswith("model."):
    return "model.language_model." + name.removeprefix("model.")
  return name


def _group_layers(model) -> dict[str, tuple[str, object, int | None]]:
  """Our module path without the layer index -> (path template, Linear, layers of its group)."""
  return {template.replace("/{i}", ""): (template, linear, layers) for template, linear, layers in linear_layers(model)}


# ------------------------------------------------------------------------------------ reading
def read_adapter_config(folder: str) -> AdapterConfig:
  """`adapter_config.json` of a PEFT LoRA folder; anything we cannot compute exactly is one error naming the field."""
  path = paths.join(folder, ADAPTER_CONFIG)
  if not paths.isdir(folder):
    raise CheckpointError(f"{folder} is not a directory; pass a PEFT adapter folder (adapter_config.json + "
                          f"{ADAPTER_WEIGHTS})")
  if not paths.isfile(path):
    raise CheckpointError(f"{folder} has no {ADAPTER_CONFIG}; pass the folder PeftModel.save_pretrained wrote")
  try:
    data = json.loads(paths.read_text(path))
  except ValueError as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}); fix or replace the file") from None
  if not isinstance(data, dict):
    raise CheckpointError(f"{path} must hold a JSON object")
  hint = ("EEmo-JAX reads plain LoRA only; merge the adapter in peft (merge_and_unload) and import the merged "
          "model with `eemo-jax import-hf`")
  if data.get("peft_type") != "LORA":
    raise CheckpointError(f"{path}: peft_type={data.get('peft_type')!r} is not supported; {hint}")
  for field, default in _DEFAULTS.items():
    if data.get(field, default) != default:
      raise CheckpointError(f"{path}: {field}={data[field]!r} is not supported (only {default!r}); {hint}")
  init = data.get("init_lora_weights", True)
  if init not in _PLAIN_INITS:
    raise CheckpointError(f"{path}: init_lora_weights={init!r} adapters are relative to rewritten base weights and "
                          f"are not supported; {hint}")
  for field, value in data.items():
    if field not in _BOOKKEEPING | _READ | set(_DEFAULTS) and value not in (None, False, {}, [], ""):
      raise CheckpointError(f"{path}: {field}={value!r:.80} is not supported; {hint}")
  rank, alpha, dropout = data.get("r"), data.get("lora_alpha"), data.get("lora_dropout", 0.0)
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
    raise CheckpointError(f"{path}: r={rank!r} must be a positive integer")
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
    raise CheckpointError(f"{path}: lora_alpha={alpha!r} must be a number")
  if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    raise CheckpointError(f"{path}: lora_dropout={dropout!r} must be a number in [0, 1)")
  return AdapterConfig(rank=rank, alpha=float(alpha), dropout=float(dropout),
                       target_modules=_names(path, "target_modules", data.get("target_modules"), required=True),
                       exclude_modules=_names(path, "exclude_modules", data.get("exclude_modules")),
                       modules_to_save=tuple(_names(path, "modules_to_save", data.get("modules_to_save"), regex=False)),
                       base_model_name_or_path=data.get("base_model_name_or_path"))


def _names(path: str, field: str, value, *, required=False, regex=True) -> str | tuple[str, ...]:
  """A field holding module names: a list of strings, or (where PEFT allows one) a regex string."""
  if value is None and not required:
    return ()
  if isinstance(value, str) and regex:
    try:
      re.compile(value)
    except re.error as e:
      raise CheckpointError(f"{path}: {field}={value!r:.80} is not a valid regex ({e})") from None
    return value
  if isinstance(value, list) and all(isinstance(v, str) for v in value) and (value or not required):
    return tuple(value)
  raise CheckpointError(f"{path}: {field}={value!r:.80} must be a list of module names"
                        + (" or a regex string" if regex else ""))


def read_adapter_weights(folder: str) -> dict[str, np.ndarray]:
  """`adapter_model.safetensors` as {key without `base_model.model.`: array}, validated like any safetensors file."""
  path = paths.join(folder, ADAPTER_WEIGHTS)
  if not paths.isfile(path):
    pickle = paths.isfile(paths.join(folder, "adapter_model.bin"))
    raise CheckpointError(f"{folder} has no {ADAPTER_WEIGHTS}" + (
        " (only adapter_model.bin, a PyTorch pickle, which EEmo-JAX does not read because pickles can run code); "
        "re-save it with PeftModel.save_pretrained(dir, safe_serialization=True)" if pickle else ""))
  if paths.is_url(path):  # read_entries checks a local file: the adapter (small) is read from a local copy
    with tempfile.TemporaryDirectory(prefix="eemo-jax-adapter-") as local:
      paths.download(folder, local, [ADAPTER_WEIGHTS])
      return read_adapter_weights(local)  # np.fromfile copies the tensors out before the folder goes
  out = {}
  for key, entry in read_entries(path).items():
    if not key.startswith(PREFIX):
      raise CheckpointError(f"{path}: tensor {key} does not start with {PREFIX!r}; is this a PEFT LoRA adapter?")
    count = int(np.prod(entry.shape))
    out[key.removeprefix(PREFIX)] = np.fromfile(path, entry.dtype, count, offset=entry.offset).reshape(entry.shape)
  return out


def load_peft_adapter(model, folder: str, *, rngs: nnx.Rngs | None = None, mesh=None,
                      rules=DEFAULT_RULES) -> list[str]:
  """Puts the PEFT LoRA adapter in `folder` onto `model` (a loaded `Qwen25VL`), in place; returns the adapted paths.

  The adapter's rank, alpha and dropout become a `LoraConfig` for `apply_lora` on the modules its config
  targets (in both towers), A and B come from the file, and `modules_to_save` weights replace the
  backbone's. `rngs` seeds the LoRA dropout keys. Everything is checked (config, key set, shapes)
  before the model is changed.
  """
  adapter = read_adapter_config(folder)
  weights = read_adapter_weights(folder)
  where = paths.join(folder, ADAPTER_WEIGHTS)
  factors, full = _split_keys(weights, where)
  new_names = any(k.startswith(_TRANSFORMERS5) for k in weights) or not weights
  config: Qwen25VLConfig = model.config
  by_name = {(transformers5_name(s.name) if new_names else s.name): s for s in sites(config)}
  chosen = {name: site for name, site in by_name.items() if adapter.targets(name, site.linear)}
  _check_targets(chosen, factors, by_name, where)
  groups = _group_layers(model)
  fills = _layer_factors(chosen, factors, groups, adapter.rank, where)
  replacements = _replacements(model, full, adapter, where)

  patterns = tuple(groups[g][0].format(i="*") for g in fills)
  lora = LoraConfig(rank=adapter.rank, alpha=adapter.alpha, dropout=adapter.dropout, targets=patterns, exclude=())
  names = apply_lora(model, lora, rngs if rngs is not None else nnx.Rngs(0), mesh=mesh, rules=rules)
  for group, (a, b) in fills.items():
    adapter_module = groups[group][1].lora
    for var, value in ((adapter_module.lora_a, a), (adapter_module.lora_b, b)):
      old = var[...]
      var[...] = jax.device_put(jnp.asarray(value, old.dtype), old.sharding)
  _replace(model, replacements)
  return names


def _split_keys(weights: dict[str, np.ndarray], where: str):
  """({module: {"a": A, "b": B}}, {full weight key: array}); other LoRA tensors (DoRA, embeddings) fail."""
  factors: dict[str, dict[str, np.ndarray]] = {}
  full = {}
  for key, value in weights.items():
    suffix = next((s for s in FACTORS if key.endswith(s)), None)
    if suffix is not None:
      factors.setdefault(key.removesuffix(suffix), {})[FACTORS[suffix]] = value
    elif re.search(r"(^|\.)lora_", key):
      raise CheckpointError(f"{where}: tensor {PREFIX}{key} is not a plain LoRA factor (lora_A/lora_B .weight); "
                            "EEmo-JAX reads plain LoRA on linear layers only")
    else:
      full[key] = value
  for module, pair in factors.items():
    if set(pair) != {"a", "b"}:
      missing = "lora_B" if "a" in pair else "lora_A"
      raise CheckpointError(f"{where}: {PREFIX}{module} has no {missing}.weight; the file is incomplete")
  return factors, full


def _check_targets(chosen: dict[str, Site], factors: dict, by_name: dict[str, Site], where: str) -> None:
  """The modules the config targets must be the modules the file holds, and all linear."""
  for name in sorted(set(factors) - set(by_name)):
    tied = " (this base model ties lm_head to the token embedding)" if name == "lm_head" else ""
    raise CheckpointError(f"{where}: {PREFIX}{name} is not a linear layer of this Qwen2.5-VL{tied}; is the adapter "
                          "made for this base model?")
  for name, site in sorted(chosen.items()):
    if not site.linear:
      raise CheckpointError(f"{ADAPTER_CONFIG} targets {name} (a Conv3d or embedding); EEmo-JAX puts LoRA on linear "
                            "layers only: merge the adapter in peft (merge_and_unload) and import the merged model")
  extra, missing = sorted(set(factors) - set(chosen)), sorted(set(chosen) - set(factors))
  if extra:
    raise CheckpointError(f"{where} has LoRA weights for {extra[0]}, which {ADAPTER_CONFIG}'s target_modules does "
                          f"not select ({len(extra)} such modules); the config and the weights do not belong together")
  if missing:
    raise CheckpointError(f"{ADAPTER_CONFIG}'s target_modules selects {missing[0]}, but {where} has no lora_A/lora_B "
                          f"for it ({len(missing)} such modules); the config and the weights do not belong together")
  if not chosen:
    raise CheckpointError(f"{ADAPTER_CONFIG}'s target_modules selects no linear layer of this Qwen2.5-VL")


def _layer_factors(chosen: dict[str, Site], factors: dict, groups: dict, rank: int, where: str):
  """{our group path: (A (*lead, in, r), B (*lead, r, out))} in our layout, zeros for layers not targeted."""
  fills = {}
  for name, site in chosen.items():
    _, linear, layers = groups[site.group]
    d_in, d_out = linear.kernel.shape[-2:]
    a, b = factors[name]["a"], factors[name]["b"]
    for factor, value, want in (("lora_A", a, (rank, d_in)), ("lora_B", b, (d_out, rank))):
      if tuple(value.shape) != want:
        raise CheckpointError(f"{where}: {PREFIX}{name}.{factor}.weight has shape {tuple(value.shape)}, expected "
                              f"{want} (r={rank} from {ADAPTER_CONFIG}, the layer is {d_in} -> {d_out})")
    if site.group not in fills:
      lead = (layers,) if layers is not None else ()
      fills[site.group] = (np.zeros((*lead, d_in, rank), np.float32), np.zeros((*lead, rank, d_out), np.float32))
    a_all, b_all = fills[site.group]
    index = site.layer if site.layer is not None else ...
    a_all[index] = a.T  # torch (r, in) -> (in, r)
    b_all[index] = b.T  # torch (out, r) -> (r, out)
  return fills


def _replacements(model, full: dict[str, np.ndarray], adapter: AdapterConfig,
                  where: str) -> list[tuple[KeyRule, int | None, np.ndarray]]:
  """(rule, layer, our-layout value) for every `modules_to_save` weight, checked against the key table and shapes."""
  config: Qwen25VLConfig = model.config
  table = {}
  for rule in key_table(config):
    for i in range(num_layers(rule, config)) if rule.stacked else [None]:
      table[rule.hf_key(i)] = (rule, i)
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  out = []
  for key, value in sorted(full.items()):
    module = key.rsplit(".", 1)[0]
    if not adapter.saves(module):
      raise CheckpointError(f"{where}: tensor {PREFIX}{key} is neither a LoRA factor nor part of a modules_to_save "
                            f"module ({list(adapter.modules_to_save)}); is this a PEFT LoRA adapter?")
    disk = canonical_key(key)
    if disk == "lm_head.weight" and disk not in table:
      raise CheckpointError(f"{where}: modules_to_save weight {PREFIX}{key} replaces lm_head, but this base model ties "
                            "lm_head to the token embedding (tie_word_embeddings), and EEmo-JAX does not untie it")
    if disk not in table:
      raise CheckpointError(f"{where}: modules_to_save weight {PREFIX}{key} is not a parameter of the Qwen2.5-VL "
                            "backbone; load other heads with eemo_jax.hf.heads_io")
    rule, layer = table[disk]
    shape = params[rule.path].get_value().shape
    want = rule.transform.hf_shape(tuple(shape[1:] if layer is not None else shape), config)
    if tuple(value.shape) != tuple(want):
      raise CheckpointError(f"{where}: modules_to_save weight {PREFIX}{key} has shape {tuple(value.shape)}, expected "
                            f"{tuple(want)}; is the adapter made for this base model?")
    out.append((rule, layer, rule.transform.to_jax(value)))
  return out


def _replace(model, replacements: list[tuple[KeyRule, int | None, np.ndarray]]) -> None:
  """Writes full `modules_to_save` weights into the model's parameters, keeping their dtype and sharding."""
  if not replacements:
    return
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  for rule, layer, value in replacements:
    var = flat[rule.path]
    old = var.get_value()
    new = jnp.asarray(value, old.dtype)
    if layer is not None:
      new = old.at[layer].set(new)
    var.set_value(jax.device_put(new, old.sharding))
  nnx.update(model, state)


# ------------------------------------------------------------------------------------ writing
def save_peft_adapter(model, folder: str, *, base_model_name_or_path: str | None = None,
                      modules_to_save: Sequence[str] = (), task_type: str | None = "CAUSAL_LM", dtype=None,
                      overwrite: bool = False) -> list[str]:
  """Writes the LoRA adapters of `model` (a `Qwen25VL`) as a PEFT LoRA folder; returns the adapted module names.

  `PeftModel.from_pretrained(base, folder)` on the transformers model of the same base weights then
  computes what `model` computes. `modules_to_save` names HF modules (e.g. `lm_head`) whose full weights
  are written too, as PEFT saves fully trained modules; `dtype` (e.g. "bfloat16") casts the tensors.
  The folder is put in place whole (`eemo_jax.hf.save.export_folder`). Every process must call this;
  only process 0 writes.
  """
  with export_folder(folder, overwrite=overwrite) as out:
    return write_peft_adapter(model, out, base_model_name_or_path=base_model_name_or_path,
                              modules_to_save=modules_to_save, task_type=task_type, dtype=dtype)


def write_peft_adapter(model, out: str, *, base_model_name_or_path: str | None = None,
                       modules_to_save: Sequence[str] = (), task_type: str | None = "CAUSAL_LM",
                       dtype=None) -> list[str]:
  """The files of `save_peft_adapter`, written into `out`, the (empty) folder an `export_folder` block yields, so
  an export can put other files beside them (an emotion head). Arguments as there."""
  config: Qwen25VLConfig = model.config
  adapted = _adapted_sites(model)
  rank, alpha, dropout = _uniform_options(adapted)
  saved, saved_names = _saved_rules(config, modules_to_save, {s.group for s, _ in adapted})
  tensors, gathered = [], {}
  for site, lora in adapted:
    if id(lora) not in gathered:  # one gather per adapter, not per layer
      gathered[id(lora)] = (_to_host(lora.lora_a[...]), _to_host(lora.lora_b[...]))
    name = PREFIX + transformers5_name(site.name)
    for suffix, host in zip((".lora_A.weight", ".lora_B.weight"), gathered[id(lora)]):
      host = host[site.layer] if site.layer is not None else host
      tensors.append((name + suffix, np.ascontiguousarray(host.T)))  # (in, r) -> torch (r, in); (r, out) -> (out, r)
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for rule, layer in saved:
    if rule.path not in gathered:
      gathered[rule.path] = _to_host(params[rule.path].get_value())
    host = gathered[rule.path][layer] if layer is not None else gathered[rule.path]
    tensors.append((PREFIX + transformers5_name(rule.hf_key(layer)),
                    rule.transform.to_hf(host, rule.transform.hf_shape(host.shape, config))))
  if dtype is not None:
    tensors = [(k, v.astype(jnp.dtype(dtype))) for k, v in tensors]
  names = [transformers5_name(s.name) for s, _ in adapted]
  adapter_config = {
      "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
      "r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": dropout,
      "target_modules": _target_modules(names, config), "exclude_modules": None,
      "modules_to_save": saved_names or None,
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_bias": False,
      "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
      "rank_pattern": {}, "alpha_pattern": {},
  }
  if jax.process_index() == 0:
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors]
    (written,) = write_sharded(out, specs, tensors, max_shard_bytes=2**62, metadata={"format": "pt"})
    # PEFT reads one file of this name (in a bucket the move is a copy and a delete, inside the staged folder)
    paths.move(paths.join(out, written), paths.join(out, ADAPTER_WEIGHTS))
    paths.write_text(paths.join(out, ADAPTER_CONFIG), json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
  return names


def _adapted_sites(model) -> list[tuple[Site, object]]:
  """(site, its LoraAdapter) for every adapted layer, in key-table order; refuses adapters PEFT cannot name."""
  by_group: dict[str, list[Site]] = {}
  for site in sites(model.config):
    by_group.setdefault(site.group, []).append(site)
  out = []
  for template, linear, _ in linear_layers(model):
    if linear.lora is None:
      continue
    group = template.replace("/{i}", "")
    if group not in by_group or not all(s.linear for s in by_group[group]):
      raise ValueError(f"{template.format(i='*')} has a LoRA adapter, but PEFT adapts only the linear layers of "
                       "Qwen2.5-VL; remove it (merge_lora) before saving a PEFT adapter")
    out += [(site, linear.lora) for site in by_group[group]]
  if not out:
    raise ValueError("the model has no LoRA adapters to save; apply_lora (or load_peft_adapter) first")
  order = {s.name: i for i, s in enumerate(sites(model.config))}
  return sorted(out, key=lambda pair: order[pair[0].name])


def _uniform_options(adapted: list[tuple[Site, object]]) -> tuple[int, float, float]:
  """(rank, alpha, dropout) shared by all adapters, as one adapter_config.json must state them."""
  options = {(lora.lora_a.shape[-1], lora.scale, lora.dropout) for _, lora in adapted}
  if len(options) > 1:
    raise ValueError(f"the model's adapters differ in (rank, alpha/rank, dropout): {sorted(options)}; a PEFT adapter "
                     "has one of each, so save adapters made with one LoraConfig")
  ((rank, scale, dropout),) = options
  return int(rank), round(scale * rank, 9), dropout  # alpha = scale * r, without the float noise of the product


def _saved_rules(config: Qwen25VLConfig, modules: Sequence[str], adapted_groups: set[str]):
  """([(rule, layer) of every parameter under the named modules], their transformers 5 names); 4.x names work too."""
  out, names = [], []
  for module in modules:
    disk = canonical_key(module + ".")[:-1]  # canonical_key maps prefixes with their trailing dot
    names.append(transformers5_name(disk))
    found = [(rule, i) for rule in key_table(config)
             for i in (range(num_layers(rule, config)) if rule.stacked else [None])
             if rule.hf_key(i).startswith(disk + ".")]
    if not found:
      raise ValueError(f"modules_to_save names {module!r}, which holds no parameter of this Qwen2.5-VL "
                       "(use HF module names, e.g. 'lm_head')")
    clash = sorted({"/".join(rule.path[:-1]) for rule, _ in found} & adapted_groups)
    if clash:
      raise ValueError(f"modules_to_save module {module!r} contains adapted layers ({clash[0]}); PEFT never puts a "
                       "LoRA inside a module it saves whole")
    out += found
  return out, sorted(set(names))


def _target_modules(names: list[str], config: Qwen25VLConfig) -> list[str]:
  """The layer names (`q_proj`) when they select exactly the adapted modules, as users write them; else full names.

  A numeric name (`mlp.0` -> `0`) would also select whole decoder layers (`layers.0`), and `proj` the
  patch embedding, so those cases fall back to the full module names, which PEFT matches exactly.
  """
  leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
  every = [transformers5_name(s.name) for s in sites(config)]
  if all(not leaf.isdigit() for leaf in leaves):
    if {n for n in every if _names_match(tuple(leaves), n)} == set(names):
      return leaves
  return sorted(names)
