"""The world file's `model`, `data`, `schedule` and `aggregation` sections, typed and checked.

Errors name the world file and the field, e.g. ``examples/world.yaml schedule.lr: must be > 0 (got -1)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worldlm_secure.aggregation.attentive import AttentionConfig
from worldlm_secure.data.synthetic import SyntheticSpec
from worldlm_secure.errors import ConfigError
from worldlm_secure.federation.world import World
from worldlm_secure.model.adapters import LoraSpec
from worldlm_secure.model.factory import ModelSpec
from worldlm_secure.model.pretrained import check_pretrained_folder
from worldlm_secure.train.loop import TrainConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSection(_Strict):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None  # peft's default for the architecture when omitted


class AdaptersSection(_Strict):
    lora: LoraSection | None = None  # the one kind of adapter supported (through peft)


class ModelSection(_Strict):
    arch: Literal["llama", "gpt2"] = "llama"
    size: str = "tiny"
    config: str | None = None
    tie_embeddings: bool = False
    # A local Hugging Face checkpoint folder (config.json, safetensors, tokenizer files), relative to the world
    # file or absolute: its weights are loaded instead of initialised and its tokenizer encodes the text.
    pretrained: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # of the loaded base weights
    adapters: AdaptersSection | None = None  # LoRA (peft): only adapter tensors train and are released
    base_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")  # pin the base; refuse any other


class SyntheticSection(_Strict):
    vocab_size: int = Field(512, ge=16)
    own_tokens: int = Field(64, ge=0)
    successors: int = Field(12, ge=1)
    fed_weight: float = Field(0.75, ge=0, le=1)
    site_weight: float = Field(0.1, ge=0, le=1)
    train_tokens: int = Field(24_576, ge=64)
    val_tokens: int = Field(8_192, ge=64)


class FilesSection(_Strict):
    path: str
    format: Literal["text", "jsonl", "json", "csv", "parquet"] | None = None
    text_column: str = "text"
    site_column: str | None = "site"
    tokenizer: str | None = None  # a local tokenizer folder; the built-in byte tokenizer otherwise
    val_fraction: float = Field(0.1, gt=0, lt=1)


class DataSection(_Strict):
    synthetic: SyntheticSection | None = None
    files: FilesSection | None = None
    hub: str | None = None  # a Hugging Face dataset name (needs network) with the same columns as `files`
    tokenizer: str | None = None
    text_column: str = "text"
    site_column: str | None = "site"
    val_fraction: float = Field(0.1, gt=0, lt=1)


class ScheduleSection(_Strict):
    rounds: int = Field(24, ge=1)
    local_steps: int = Field(8, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(64, ge=8)
    lr: float = Field(3e-3, gt=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_every: int = Field(1, ge=1)


class AdaptiveClipSection(_Strict):
    """Adaptive clipping (Andrew et al. 2021; protocols/dp.md §2.7), user-level DP only; off when absent."""

    target_quantile: float = Field(0.5, gt=0, lt=1)
    learning_rate: float = Field(0.2, gt=0, le=10)
    initial_clip: float | None = Field(None, gt=0)  # default: the policy's clipping_norm (never above it)
    count_stddev: float | None = Field(None, gt=0)  # σ_b; default max(cohort/20, z/(2·sqrt(0.1)))


class AggregationSection(_Strict):
    key_step: float = Field(1.0, gt=0, le=2)
    key_temperature: float = Field(1.0, gt=0)
    key_max_score: float = Field(3.0, gt=0, le=40)
    residual_temperature: float = Field(0.1, gt=0)
    hierfavg_root_every: int = Field(2, ge=1)
    # DP-FedAvgM (protocols/dp.md §2.4): a server step on the released (noised) mean of every site round.
    server_lr: float = Field(1.0, gt=0, le=10)
    server_momentum: float = Field(0.0, ge=0, lt=1)
    # Under DP example weights are min(n, cap) / cap with this public cap (None: uniform weights). A policy
    # field would be the natural home (differential_privacy.weight_cap); until then it is a world setting.
    dp_weight_cap: int | None = Field(None, ge=1)
    adaptive_clip: AdaptiveClipSection | None = None


class Settings(BaseModel):
    """Everything a simulation needs besides the tree and the policies."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    model: ModelSpec
    data: DataSection
    train: TrainConfig
    seq_len: int
    rounds: int
    eval_every: int
    attention: AttentionConfig
    residual_temperature: float
    hierfavg_root_every: int
    seed: int
    server_lr: float = 1.0
    server_momentum: float = 0.0
    dp_weight_cap: int | None = None
    adaptive_clip: Any = None  # privacy.adaptive_clip.AdaptiveClipConfig, or None (off)
    device: str = "auto"

    @property
    def synthetic(self) -> SyntheticSpec | None:
        s = self.data.synthetic
        if s is None:
            return None
        return SyntheticSpec(**s.model_dump(), seed=self.seed)


def _parse(world_path: Path, section: str, cls: type[_Strict], raw: dict[str, Any]) -> Any:
    try:
        return cls(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in (section, *err["loc"]))
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        raise ConfigError(f"{world_path} {loc}: {err['msg']}{got}") from None


def adaptive_clip_of(world: World) -> Any:
    """``aggregation.adaptive_clip`` of ``world`` as a `privacy.adaptive_clip.AdaptiveClipConfig` (None: off).
    The release path reads it from the world itself, so every backend runs the same setting."""
    from worldlm_secure.privacy.adaptive_clip import AdaptiveClipConfig

    agg_raw = getattr(world, "aggregation", None)
    raw = agg_raw.get("adaptive_clip") if isinstance(agg_raw, dict) else None
    if raw is None:
        return None
    agg = _parse(world.path, "aggregation", AggregationSection, {"adaptive_clip": raw})
    return AdaptiveClipConfig(**agg.adaptive_clip.model_dump())


def _pretrained_folder(world: World, model: ModelSection) -> str | None:
    """``model.pretrained`` as an absolute folder (relative paths are relative to the world file), checked."""
    if model.pretrained is None:
        return None
    if model.config is not None:
        raise ConfigError(f"{world.path} model.pretrained: give model.pretrained (load weights) or model.config "
                          "(random init from a config), not both")
    folder = Path(model.pretrained).expanduser()
    if not folder.is_absolute():
        folder = Path(world.path).parent / folder
    try:
        check_pretrained_folder(str(folder))
    except ConfigError as exc:
        raise ConfigError(f"{world.path} {exc}") from None
    return str(folder.resolve())


def _config_ref(world: World, model: ModelSection) -> str | None:
    """``model.config``: a local path relative to the world file when one exists there (so a world runs from any
    working directory), else as given (an absolute path, or a hub name the model factory resolves)."""
    if model.config is None:
        return None
    local = Path(model.config).expanduser()
    if not local.is_absolute() and (Path(world.path).parent / local).exists():
        return str((Path(world.path).parent / local).resolve())
    return model.config


def _with_checkpoint_tokenizer(data: DataSection, folder: str) -> DataSection:
    """Text is encoded with the checkpoint's own tokenizer unless the world file names one."""
    if data.tokenizer is not None or (data.files is not None and data.files.tokenizer is not None):
        return data
    return data.model_copy(update={"tokenizer": folder})


def settings_for(world: World, *, rounds: int | None = None, device: str = "auto", seed: int | None = None) -> Settings:
    """Typed settings from the world file, with command-line overrides applied."""
    model = _parse(world.path, "model", ModelSection, world.model)
    data = _parse(world.path, "data", DataSection, world.data)
    pretrained = _pretrained_folder(world, model)
    if sum(x is not None for x in (data.synthetic, data.files, data.hub)) > 1:
        raise ConfigError(f"{world.path} data: give one of synthetic, files or hub")
    if data.synthetic is None and data.files is None and data.hub is None and not all(s.data for s in world.sites):
        data = DataSection(synthetic=SyntheticSection())
    sched = _parse(world.path, "schedule", ScheduleSection, world.schedule)
    agg = _parse(world.path, "aggregation", AggregationSection, world.aggregation)
    if rounds is not None and rounds < 1:
        raise ConfigError(f"--rounds: must be at least 1 (got {rounds})")
    if pretrained is not None and data.synthetic is None:
        data = _with_checkpoint_tokenizer(data, pretrained)
    vocab = data.synthetic.vocab_size if data.synthetic is not None else 260
    lora = model.adapters.lora if model.adapters is not None else None
    if model.adapters is not None and lora is None:
        raise ConfigError(f"{world.path} model.adapters: give lora: {{r, alpha, dropout, target_modules}}")
    return Settings(
        model=ModelSpec(
            arch=model.arch,
            size=model.size,
            config=_config_ref(world, model),
            tie_embeddings=model.tie_embeddings,
            vocab_size=vocab,
            max_seq_len=sched.seq_len,
            pretrained=pretrained,
            adapters=None if lora is None else LoraSpec(
                r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                target_modules=tuple(lora.target_modules) if lora.target_modules else None,
            ),
            dtype=model.dtype,
            base_sha256=model.base_sha256.lower() if model.base_sha256 else None,
        ),
        data=data,
        train=TrainConfig(
            local_steps=sched.local_steps,
            batch_size=sched.batch_size,
            grad_accum=sched.grad_accum,
            lr=sched.lr,
            lr_schedule=sched.lr_schedule,
            warmup_steps=sched.warmup_steps,
            weight_decay=sched.weight_decay,
            max_grad_norm=sched.max_grad_norm,
        ),
        seq_len=sched.seq_len,
        rounds=rounds if rounds is not None else sched.rounds,
        eval_every=sched.eval_every,
        attention=AttentionConfig(agg.key_step, agg.key_temperature, agg.key_max_score),
        residual_temperature=agg.residual_temperature,
        hierfavg_root_every=agg.hierfavg_root_every,
        server_lr=agg.server_lr,
        server_momentum=agg.server_momentum,
        dp_weight_cap=agg.dp_weight_cap,
        adaptive_clip=adaptive_clip_of(world),
        seed=world.seed if seed is None else seed,
        device=device,
    )
