"""MetaMorph on LLaMA-3 70B Instruct: the paper's stage 1, stage 2 and decoder settings
(configs/metamorph_llama3.py), for a TPU v5p or v6e pod or 8xH100 nodes:

    python train.py --config configs/metamorph_llama3_70b.py:v5p-256 --workdir DIR
    python train.py --config configs/metamorph_llama3_70b.py:v6e-256 --workdir DIR
    python train.py --config configs/metamorph_llama3_70b.py:h100x8:8 --workdir DIR
"""
import importlib.util
from pathlib import Path


def get_config(topology: str = "v5p-256"):
    spec = importlib.util.spec_from_file_location(
        "metamorph_llama3", Path(__file__).with_name("metamorph_llama3.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.recipe("70b", topology)
