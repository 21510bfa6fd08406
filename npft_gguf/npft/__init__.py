"""NPFT (Noise Perturbation Fine-tuning, arXiv 2412.06858): LoRA tuned while the Fisher outliers
are randomly perturbed, so the loss is flat around them and plain RTN afterwards loses little.

config.py  settings (a frozen dataclass that travels into reports and GGUF provenance)
noise.py   the perturbation, applied in the forward pass of the targeted linears
hessian.py Hutchinson's estimate of the Hessian trace restricted to the outliers
train.py   the tuning loop: Fisher -> outliers -> noisy LoRA steps, checkpoints, resume, merge
report.py  the run report (JSON and Markdown)
"""

from .config import NPFTSettings
from .train import TuneResult, tune

__all__ = ["NPFTSettings", "TuneResult", "tune"]
