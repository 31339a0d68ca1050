"""The planner and train.method: DPO / ORPO run each row's chosen and rejected replies through the
model together, so a micro-batch of B rows is 2B sequences; GRPO adds the sampling of a step's
completions with a KV cache, beyond what its training step holds."""
import dataclasses

import pytest

from nbtune.planner import plan, plan_from_config
from nbtune.planner.memory import Settings


def config(method, batch=2, seq=2048, checkpointing="offload"):
    return {"model": {"name": "llama-3.1-8b", "max_seq_length": seq},
            "train": {"method": method, "batch_size": batch, "gradient_checkpointing": checkpointing}}


@pytest.mark.parametrize("method", ["dpo", "orpo"])
@pytest.mark.parametrize("checkpointing", ["offload", "plain", "off"])
def test_a_pair_method_plans_twice_the_sequences_of_its_rows(method, checkpointing):
    pairs = plan_from_config(config(method, batch=2, checkpointing=checkpointing), gpu="H100")
    sft_2b = plan_from_config(config("sft", batch=4, checkpointing=checkpointing), gpu="H100")
    sft_b = plan_from_config(config("sft", batch=2, checkpointing=checkpointing), gpu="H100")
    assert pairs.settings.batch_size == 2 and pairs.settings.sequences_per_row == 2
    assert pairs.settings.tokens == sft_2b.settings.tokens == 2 * sft_b.settings.tokens
    # the GPU terms that grow with the tokens of a forward are those of 2B sequences, not B
    assert pairs.peak_gib == pytest.approx(sft_2b.peak_gib, rel=1e-9)
    assert pairs.peak_gib > sft_b.peak_gib
    assert any("chosen and rejected" in n and "4 sequences" in n for n in pairs.notes)


def test_the_suggestion_of_a_pair_method_is_in_rows():
    """Advice and config patches speak of train.batch_size, the rows, whatever the method."""
    p = plan_from_config(config("dpo", batch=64, seq=4096), gpu="T4")
    assert not p.fits
    smaller = p.replace(batch_size=1)
    assert smaller.settings.sequences_per_row == 2 and smaller.settings.tokens == 2 * 4096


def test_grpo_counts_the_sampling_of_a_step_s_completions():
    """The KV cache of batch x grad_accum completions of up to max_seq_length tokens, beyond
    training's activations: nothing for short generations, the peak's largest term for long ones."""
    from nbtune.planner.memory import GiB, estimate

    sft = plan_from_config(config("sft"), gpu="H100")
    assert sft.breakdown["generation"] == 0 and sft.settings.generation_rows == 0
    few = plan_from_config(config("grpo"), gpu="H100")
    assert few.settings.generation_rows == 2 and few.settings.generation_tokens == 2048
    assert few.peak_gib == pytest.approx(sft.peak_gib + few.breakdown["generation"], rel=1e-9)
    many = plan_from_config({**config("grpo", batch=8), "train": {**config("grpo", batch=8)["train"], "grad_accum": 4}},
                            gpu="H100")
    shape, st = many.model, many.settings
    assert st.generation_rows == 32
    kv = 32 * 2048 * shape.num_layers * 2 * shape.kv_dim * 2
    e = estimate(shape, st)
    assert many.breakdown["generation"] * GiB >= kv - e.terms["activations"] - e.terms["loss chunk"]
    assert many.breakdown["generation"] > few.breakdown["generation"] and many.peak_gib > sft.peak_gib
    assert any("32 completions" in n and "KV cache" in n for n in many.notes)
    assert not any("KV cache" in n for n in sft.notes)
    # a suggestion that changes the batch changes what a step samples
    assert many.replace(batch_size=2).settings.generation_rows == 8
    assert many.term_label("generation").startswith("generation (32 x <= 2048 tokens")


def test_sequences_per_row_is_one_or_two():
    with pytest.raises(Exception, match="sequences_per_row must be 1 or 2"):
        dataclasses.replace(Settings(), sequences_per_row=3)
    assert plan("llama-3.1-8b", gpu="H100").settings.sequences_per_row == 1
