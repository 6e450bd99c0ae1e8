"""LoRA experts (expert.adapter=lora): adapters on the frozen seed, saved for peft, merged by dfm."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from dfm.cli import main
from dfm.errors import DfmError
from models.ensemble import Ensemble
from tests.resume import resumes_bit_identically
from tests.tiny_config import write_tiny_config
from training.config import parse_override, resolve_config
from training.layout import RunLayout

LORA = ["--set", "expert.adapter=lora", "--set", "expert.lora.r=4"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    run = tmp / "run"
    assert main(["run", "--out", str(run), "--config", str(write_tiny_config(tmp)), "--modes", "mixture", *LORA]) == 0
    return run


@pytest.mark.slow
# plain peft 0.2x reads a transformers property that 5.x deprecates (dfm's own loading quiets it)
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_experts_and_baseline_are_adapters_that_peft_loads(lora_run):
    layout = RunLayout.of(lora_run)
    for directory in [layout.expert(0), layout.expert(2), layout.baseline]:
        assert {p.name for p in directory.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
        assert not (directory / "model.safetensors").exists()
    adapter = (layout.expert(0) / "adapter_model.safetensors").stat().st_size
    assert adapter * 5 < (layout.seed_model / "model.safetensors").stat().st_size  # rank 4: a fraction of the model
    # plain peft, no dfm code: the seed plus the adapter gives what dfm's merged expert gives
    seed = AutoModelForCausalLM.from_pretrained(layout.seed_model)
    peft_expert = PeftModel.from_pretrained(seed, layout.expert(1)).eval()
    ensemble = Ensemble.from_run(lora_run)
    tokens = torch.tensor([[0, 5, 9, 17, 3, 11, 40, 2]])
    with torch.no_grad():
        merged = ensemble.experts[1](tokens).logits
        unmerged = peft_expert(tokens).logits
        plain_seed = AutoModelForCausalLM.from_pretrained(layout.seed_model)(tokens).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)  # merging only reorders float sums
    assert (merged - plain_seed).abs().max() > 1e-3  # negative control: the adapter changed the seed's predictions


@pytest.mark.slow
def test_lora_compute_is_counted_per_trained_parameter(lora_run):
    layout = RunLayout.of(lora_run)
    expert = layout.read_summary("expert-0")
    assert 0 < expert["adapter_parameters"] < expert["parameters"] / 5
    assert expert["flops"] == (4 * expert["parameters"] + 6 * expert["adapter_parameters"]) * expert["tokens"]
    baseline = layout.read_summary("baseline")
    assert baseline["adapter_parameters"] == expert["adapter_parameters"]
    report = json.loads((lora_run / "eval" / "report.json").read_text())
    assert report["models"]["mixture"]["bpb"] > 0 and "baseline" in report["models"]


@pytest.mark.slow
def test_a_lora_expert_resumes_bit_identically(lora_run, tmp_path):
    assert resumes_bit_identically(lora_run, tmp_path, 2, "adapter_model.safetensors")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["expert.adapter=qlora"], "expert.adapter"),
        (["expert.adapter=lora", "path.kind=masked"], "path.kind=ar"),
        (["expert.adapter=lora", "seed_model.phase=false"], "seed phase"),
        (["expert.adapter=lora", "expert.lora.r=0"], "expert.lora.r"),
        (["expert.adapter=lora", "expert.lora.dropout=1"], "expert.lora.dropout"),
        (["expert.adapter=lora", 'expert.lora.target_modules="q_proj"'], "target_modules"),
        (["expert.lora.rank=4"], "expert.lora.rank"),
    ],
)
def test_bad_lora_settings_name_the_key(overrides, message):
    with pytest.raises(DfmError, match=message):
        resolve_config(None, [parse_override(o) for o in overrides])


@pytest.mark.slow
def test_a_missing_seed_is_named_when_loading_an_adapter(lora_run, tmp_path):
    copy_run = tmp_path / "run"
    shutil.copytree(lora_run, copy_run)
    shutil.rmtree(copy_run / "seed")
    with pytest.raises(DfmError, match="seed/"):
        Ensemble.from_run(copy_run)


@pytest.mark.slow
def test_a_changed_seed_is_refused_under_lora_experts(lora_run, tmp_path):
    """A LoRA expert is its adapter plus the seed: `dfm assemble` records the seed's files too, so a
    seed replaced after assembling (here retrained-looking: one weight changed) is refused."""
    copy_run = tmp_path / "run"
    shutil.copytree(lora_run, copy_run)
    recorded = json.loads((copy_run / "ensemble.json").read_text())["sha256"]
    assert "seed/model.safetensors" in recorded
    weights = copy_run / "seed" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(DfmError, match="seed/model.safetensors differs from the file `dfm assemble` recorded"):
        Ensemble.from_run(copy_run)
