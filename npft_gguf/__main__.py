"""`python -m npft_gguf ...`, the form launchers take: `torchrun --nproc-per-node N -m npft_gguf convert ...`."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="npft-gguf")
