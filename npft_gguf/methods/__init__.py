"""Baseline methods beside NPFT, in one harness: GPTQ onto GGUF grids, OWQ (simulated), and the
paper's per-channel min-max quantizer (simulated).

  gptq.py        GPTQ: Hessian accumulation and column-wise quantization with error feedback
  ongrid.py      column quantizers whose output is exactly on a legacy GGUF grid (Q4_0 ... Q8_0)
  simulate.py    per-channel asymmetric min-max RTN at b bits (fake-quant; GPTQ's quantizer too)
  sequential.py  the layer-by-layer driver over a llama-family model and calibration ids
  owq.py         OWQ: weak columns kept in fp16, the rest GPTQ-quantized (simulated)
"""

from .gptq import GPTQ, GPTQResult, GPTQSettings
from .owq import OWQ_WARNING, OWQSettings, owq_model_
from .sequential import SequentialReport, gptq_model_, run_layerwise
from .simulate import MinMax, fake_quantize_minmax_

__all__ = ["GPTQ", "GPTQResult", "GPTQSettings", "MinMax", "OWQSettings", "OWQ_WARNING", "SequentialReport",
           "fake_quantize_minmax_", "gptq_model_", "owq_model_", "run_layerwise"]
