"""NPFT settings. Defaults are the paper's code for LLaMA (docs/METHOD.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


# settings that change what the tuning holds in memory and how long it takes, never its result
MEMORY_ONLY = ("gradient_checkpointing", "fisher_stages", "shard")


@dataclass(frozen=True)
class NPFTSettings:
    # sensitivity
    outlier_pct: float = 0.05          # percent of each module's weights, by Fisher score
    fisher_samples: int | None = None  # calibration samples for the Fisher pass (None: all)
    fisher_stages: int = 1             # passes the Fisher scores are made in, each for a run of modules (memory only)
    # noise
    noise: str = "paper"               # paper | grid | rtn | none (rtn: the exact RTN error, ours; none: a plain-LoRA control)
    noise_scope: str = "outliers"      # outliers | all (grid noise on every weight; ours to try)
    grid: str = "q4_0"                 # the file type written (a grid, or one of llama.cpp's mixes: q4_k_m), for the noise
    imatrix: str | None = None         # the imatrix the file will be written with: rtn noise is then llama.cpp's
                                       # importance-weighted error on that grid, not plain RTN's
    resample: str = "step"             # step | epoch
    clean_weight: float = 0.5          # lambda in L(W+z+BA) + lambda * L(W+BA); 0 drops the term
    objective: str = "ce"              # what L measures: ce | kl | ce+kl (objective.py)
    # LoRA (peft)
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: tuple[str, ...] | None = None     # None: the family's (arch/), filled in by `for_family`
    perturbed: tuple[str, ...] | None = None
    # optimisation
    lr: float = 5e-5
    epochs: int = 3
    batch: int = 2
    grad_accum: int = 1
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_steps_per_epoch: int | None = None  # short recipes and smoke tests
    seed: int = 0
    gradient_checkpointing: bool = False
    shard: bool = False                # several processes: FSDP2 shards the weights across them (npft/train.py)
    # the method's own claim, measured
    trace_samples: int = 8
    trace_probes: int = 2
    trace_len: int | None = None       # tokens per trace sample (None: the calibration length)


    @property
    def tensor_grid(self) -> str:
        """The grid most weights of `grid` get, which the noise rounds to where the mix has no rule of
        its own for a weight: a mix's base type (q4_k_m -> q4_k), else `grid` itself."""
        from ..choices import base_type

        return base_type(self.grid)

    def __post_init__(self):
        checks = [
            (self.noise in ("paper", "grid", "rtn", "none"), "--noise must be paper, grid, rtn or none"),
            (self.noise_scope in ("outliers", "all"), "--noise-scope must be outliers or all"),
            (self.noise_scope == "outliers" or self.noise == "grid", "--noise-scope all needs --noise grid"),
            (self.resample in ("step", "epoch"), "--resample must be step or epoch"),
            (self.noise != "rtn" or self.resample == "step", "--noise rtn follows the adapter: it needs --resample step"),
            (self.imatrix is None or self.noise == "rtn", "--imatrix shapes the rtn noise (the error the written file "
                                                          "will have): it needs --noise rtn"),
            (0 < self.outlier_pct <= 100, "--outlier-pct must be in (0, 100]"),
            (self.clean_weight >= 0, "--clean-weight must be >= 0"),
            (self.objective in ("ce", "kl", "ce+kl"), "--objective must be ce, kl or ce+kl"),
            # the adapter starts at zero, so the student is its own teacher: the KL and its gradient are zero and
            # stay zero (evals/ABLATION.md measured the file bit-identical to untuned RTN after a full tune)
            (not (self.objective == "kl" and self.noise == "none"),
             "--objective kl with --noise none trains nothing (the untuned model is its own teacher, so the KL and "
             "its gradient are zero): add noise (--noise rtn) or use --objective ce or ce+kl"),
            (self.rank >= 1 and self.epochs >= 1 and self.batch >= 1 and self.grad_accum >= 1,
             "--rank, --epochs, --batch and --grad-accum must be >= 1"),
            (self.lr > 0, "--lr must be > 0"),
            (self.fisher_stages >= 1, "--fisher-stages must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                from ..errors import UsageError

                raise UsageError(message)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["targets"], d["perturbed"] = (list(v) if v is not None else None for v in (self.targets, self.perturbed))
        return d

    def for_family(self, family) -> "NPFTSettings":
        """These settings with the family's default LoRA targets and perturbed set where none were given."""
        from dataclasses import replace

        return replace(self, targets=family.lora_targets if self.targets is None else self.targets,
                       perturbed=family.perturbed if self.perturbed is None else self.perturbed)

    def same_run(self, other: dict) -> list[str]:
        """Names of settings that differ from a saved run's (a resume must not change them; those that
        only trade memory for time may change)."""
        mine = self.as_dict()
        return [k for k in mine if k in other and mine[k] != other[k] and k not in MEMORY_ONLY]
